"""One mask vocabulary for every attention implementation.

A mask is described, never materialised up front: `AttentionMask` holds the description (causal, sliding
window, segment ids, valid lengths) and `AttentionMask.block(q_idx, k_idx)` evaluates it on any block of
query/key indices. The reference implementation evaluates it on the whole [Tq, Tk] grid; blockwise and
kernel implementations evaluate it one tile at a time, so all of them share the same semantics.

Coordinates: query i is placed at key coordinate i + (Tk - Tq) ("end-aligned"), so that a query block that
continues a longer key sequence (decoding) sees exactly the keys before it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.positions import _checks

Window = Optional[Tuple[Optional[int], Optional[int]]]

# A masked logit: a finite stand-in for -inf (keeps gradients and the online-softmax rescaling
# finite); every implementation masks with it, and treats logits at or below it as masked.
MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


def is_int(x) -> bool:
  """A static integer (Python or NumPy; not a bool)."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_window(window: Window) -> Window:
  if window is None:
    return None
  if not (isinstance(window, (tuple, list)) and len(window) == 2):
    raise ValueError(f"window must be None or a pair (left, right), got {window!r}")
  left, right = window
  for name, value in (("left", left), ("right", right)):
    if value is not None and (not is_int(value) or value < 0):
      raise ValueError(f"window {name} must be None or an int >= 0, got {value!r}")
  return tuple(None if value is None else int(value) for value in (left, right))


@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """Description of which (query, key) pairs may attend.

  Attributes:
    q_len, kv_len: sequence lengths Tq and Tk.
    causal: query i sees keys j <= i + (Tk - Tq).
    window: (left, right): query i sees keys j with i' - left <= j <= i' + right, i' = i + (Tk - Tq);
      either side may be None (unlimited).
    q_segment_ids, kv_segment_ids: [B, Tq], [B, Tk] ints; attend only within equal ids.
    q_lengths, kv_lengths: [B] ints; positions at or beyond the length are padding (never attend, never
      attended to).
  """

  q_len: int
  kv_len: int
  causal: bool = False
  window: Window = None
  q_segment_ids: Optional[jax.Array] = None
  kv_segment_ids: Optional[jax.Array] = None
  q_lengths: Optional[jax.Array] = None
  kv_lengths: Optional[jax.Array] = None

  @property
  def offset(self) -> int:
    """Key coordinate of query 0 minus 0: Tk - Tq (end alignment)."""
    return self.kv_len - self.q_len

  @property
  def is_trivial(self) -> bool:
    return (not self.causal and self.window is None and self.q_segment_ids is None
            and self.kv_segment_ids is None and self.q_lengths is None and self.kv_lengths is None)

  def block(self, q_idx: jax.Array, k_idx: jax.Array) -> Optional[jax.Array]:
    """Evaluates the mask on query indices `q_idx` [tq] and key indices `k_idx` [tk].

    Returns a boolean array broadcastable to [B, 1, tq, tk] (True = may attend; always an array, see
    `full` for None when nothing is masked). Indices may run past the true lengths (padded tiles):
    those positions are masked out.
    """
    q_idx = q_idx[:, None]
    k_idx = k_idx[None, :]
    conds = []
    # Tiles padded past the true lengths.
    conds.append((q_idx < self.q_len) & (k_idx < self.kv_len))
    q_pos = q_idx + self.offset
    if self.causal:
      conds.append(k_idx <= q_pos)
    if self.window is not None:
      left, right = self.window
      if left is not None:
        conds.append(k_idx >= q_pos - left)
      if right is not None:
        conds.append(k_idx <= q_pos + right)
    mask = conds[0]
    for c in conds[1:]:
      mask = mask & c
    mask = mask[None, None]  # [1, 1, tq, tk]
    if self.q_segment_ids is not None or self.kv_segment_ids is not None:
      q_seg = _take(self.q_segment_ids, q_idx[:, 0], fill=-1)
      k_seg = _take(self.kv_segment_ids, k_idx[0, :], fill=-2)
      mask = mask & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
    if self.q_lengths is not None:
      mask = mask & (q_idx[None, None] < self.q_lengths[:, None, None, None])
    if self.kv_lengths is not None:
      mask = mask & (k_idx[None, None] < self.kv_lengths[:, None, None, None])
    return mask

  def full(self) -> Optional[jax.Array]:
    """The mask on the whole grid, broadcastable to [B, 1, Tq, Tk]; None if nothing is masked."""
    if self.is_trivial:
      return None
    return self.block(jnp.arange(self.q_len), jnp.arange(self.kv_len))


def _take(ids: Optional[jax.Array], idx: jax.Array, fill: int) -> jax.Array:
  """ids[:, idx] with out-of-range indices giving `fill`."""
  n = ids.shape[1]
  safe = jnp.clip(idx, 0, n - 1)
  return jnp.where(idx[None, :] < n, ids[:, safe], fill)


def check_causal(causal) -> None:
  """`causal` must be a bool (a string such as "no" was taken as True)."""
  _checks.boolean(causal, "causal")


def check_mask_fits(mask, batch: int, q_len: int, kv_len: int) -> None:
  """Raises a clear error unless `mask` is an AttentionMask made for q [batch, q_len, ...] and
  k [batch, kv_len, ...] (the kernels take one built elsewhere, e.g. by make_mask for other shapes)."""
  if not isinstance(mask, AttentionMask):
    raise TypeError(f"mask must be an AttentionMask (see masks.make_mask), got {type(mask).__name__}")
  if (mask.q_len, mask.kv_len) != (q_len, kv_len):
    raise ValueError(f"mask is for (Tq, Tk) = {(mask.q_len, mask.kv_len)} but q and k give "
                     f"{(q_len, kv_len)}")
  if (mask.q_segment_ids is None) != (mask.kv_segment_ids is None):  # make_mask fills in the other
    raise ValueError("mask has only one of q_segment_ids and kv_segment_ids: give both (or build "
                     "the mask with masks.make_mask)")
  for name in ("q_segment_ids", "kv_segment_ids", "q_lengths", "kv_lengths"):
    array = getattr(mask, name)
    if array is not None and array.shape[0] != batch:
      raise ValueError(f"mask.{name} is for batch {array.shape[0]} but q has batch {batch}")


def make_mask(q_len: int, kv_len: int, batch: int, *, causal: bool = False, window: Window = None,
              q_segment_ids=None, kv_segment_ids=None, q_lengths=None, kv_lengths=None) -> AttentionMask:
  """Validates a mask description against the shapes it will be applied to. A window side larger
  than Tq + Tk is stored as Tq + Tk (the same mask: positions are int32, and a "huge" side such as
  2**31 - 1 would overflow i + right)."""
  q_len, kv_len = int(q_len), int(kv_len)  # NumPy ints too: they are static in every kernel
  check_causal(causal)
  window = _check_window(window)
  if window is not None:
    window = tuple(None if side is None else min(side, q_len + kv_len) for side in window)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    if q_segment_ids is None and q_len == kv_len:
      q_segment_ids = kv_segment_ids
    elif kv_segment_ids is None and q_len == kv_len:
      kv_segment_ids = q_segment_ids
    else:
      raise ValueError("q_segment_ids and kv_segment_ids must be given together when Tq != Tk")
  # NumPy inputs become jax arrays here: they are indexed by traced indices under jit.
  as_array = lambda x: None if x is None else jnp.asarray(x)
  q_segment_ids, kv_segment_ids = as_array(q_segment_ids), as_array(kv_segment_ids)
  q_lengths, kv_lengths = as_array(q_lengths), as_array(kv_lengths)
  for name, ids, length in (("q_segment_ids", q_segment_ids, q_len),
                            ("kv_segment_ids", kv_segment_ids, kv_len)):
    if ids is not None:
      if ids.shape != (batch, length):
        raise ValueError(f"{name} must have shape [B, T] = {(batch, length)}, got {ids.shape}")
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {ids.dtype}")
  for name, lengths in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
    if lengths is not None:
      if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = {(batch,)}, got {lengths.shape}")
      if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {lengths.dtype}")
  return AttentionMask(q_len=q_len, kv_len=kv_len, causal=bool(causal), window=window,
                       q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                       q_lengths=q_lengths, kv_lengths=kv_lengths)
