"""Sliding-window (local) and block-sparse softmax attention that compute only the visible band/blocks.

* Beltagy, Peters & Cohan 2020, "Longformer: the long-document transformer" (arXiv:2004.05150): sliding
  window attention, each token attending to `left` tokens before it and `right` tokens after it.
* Child, Gray, Radford & Sutskever 2019, "Generating long sequences with sparse transformers"
  (arXiv:1904.10509): block-sparse attention with strided/fixed patterns (`strided_layout`).
* Zaheer et al. 2020, "Big Bird: transformers for longer sequences" (arXiv:2007.14062): block-sparse
  attention as window + global + random blocks (`bigbird_layout`).

Both functions return exactly what `jaxlab.attention.softmax.xla_attention` returns for the equivalent
dense mask (to float32 tolerance), in value and gradient, but never build a [Tq, Tk] matrix:

`local_attention` splits the (self-attention) sequence into blocks of size b, pads T to a multiple of b,
and for every query block gathers the key blocks that can hold its band (the ceil(left/b) blocks before
it, its own block, the ceil(right/b) blocks after it): logits are [B, T/b, K, G, b, W*b] with
W = ceil(left/b) + 1 + ceil(right/b), i.e. O(T * (left + right + b)) work and memory. The band mask is
evaluated exactly from absolute indices, so window, causal, segment ids, lengths and padding are exact.

`block_sparse_attention` takes a static boolean block layout [num_q_blocks, num_k_blocks] and gathers,
per query block, only the key blocks the layout lists (each row padded to the row maximum A, the padding
masked): logits are [B, nq, K, G, b, A*b].

Shapes (the jaxlab attention contract): q: [B, Tq, N, H]; k, v: [B, Tk, K, H], N % K == 0 (GQA/MQA: query
heads grouped as [B, T, K, G, H], K/V never repeated); output [B, Tq, N, H] in q's dtype. Softmax
statistics are float32; rows that see no key give zeros (and zero gradients). The backward pass is plain
autodiff of these jnp ops: it stores the same O(T * band) tensors as the forward, no [T, T] ones.

Not supported here: an additive `bias` (ALiBi/T5 biases would have to be gathered to the band; use
`dot_product_attention` for those).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.attention import masks as masks_lib
_ROUND = 8


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _cdiv(x: int, m: int) -> int:
  return -(-x // m)


def _check_scale(scale, h: int) -> float:
  if scale is None:
    return h ** -0.5
  try:
    return float(scale)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"scale must be a static Python float, got {scale!r}") from None


def _band_softmax(qg: jax.Array, kg: jax.Array, vg: jax.Array, valid: jax.Array, scale: float,
                  out_dtype) -> jax.Array:
  """Softmax attention of each query block over its own gathered keys.

  qg: [B, nq, b, K, G, H]; kg, vg: [B, nq, S, K, H]; valid: bool broadcastable to [B, nq, b, S].
  Returns [B, nq, b, K, G, H] in out_dtype; rows with no valid key are zeros.
  """
  from jaxlab.attention.softmax import masked_softmax
  s = jnp.einsum("bnqkgh,bnskh->bnkgqs", qg, kg, preferred_element_type=jnp.float32) * scale
  valid = valid[:, :, None, None]  # [B|1, nq, 1, 1, b, S]
  probs = masked_softmax(s, valid).astype(vg.dtype)
  out = jnp.einsum("bnkgqs,bnskh->bnqkgh", probs, vg, preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def _pad_axis1(x: jax.Array, before: int, after: int, value=0) -> jax.Array:
  if before == 0 and after == 0:
    return x
  pads = [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, pads, constant_values=value)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: Tuple[int, int],
                    causal: bool = False, q_segment_ids: Optional[jax.Array] = None,
                    kv_segment_ids: Optional[jax.Array] = None,
                    q_lengths: Optional[jax.Array] = None, kv_lengths: Optional[jax.Array] = None,
                    scale: Optional[float] = None, block_size: Optional[int] = None) -> jax.Array:
  """Sliding-window self-attention computing only the band (Longformer, Beltagy et al. 2020).

  Equals `dot_product_attention(q, k, v, window=window, causal=causal, ...)` for Tq == Tk.

  Args:
    q: [B, T, N, H] queries. k, v: [B, T, K, H] keys/values, N % K == 0. Self-attention only (Tq == Tk).
    window: (left, right), ints >= 0: query i sees keys j with i - left <= j <= i + right.
    causal: also j <= i (so the effective right is 0).
    q_segment_ids, kv_segment_ids: [B, T] ints; attend only within a segment (one may be omitted: the
      other is used for both).
    q_lengths, kv_lengths: [B] ints; positions at or past the length are padding.
    scale: logit scale (static), default 1/sqrt(H).
    block_size: query/key block size b (static positive int); default max(left, right) rounded up to a
      multiple of 8, at least 8; clipped to T rounded up to 8. T need not be a multiple of b.

  Returns:
    [B, T, N, H] in q's dtype; rows that see no key are zeros.
  """
  masks_lib.check_causal(causal)
  from jaxlab.attention.softmax import check_qkv

  bsz, tq, tk, n, kh, h = check_qkv(q, k, v)
  if tq != tk:
    raise ValueError(f"local_attention is self-attention: q length (Tq={tq}) must equal k length "
                     f"(Tk={tk})")
  t = tq
  if not (isinstance(window, (tuple, list)) and len(window) == 2):
    raise ValueError(f"window must be a pair (left, right) of ints >= 0, got {window!r}")
  left, right = window
  for name, value in (("left", left), ("right", right)):
    if not masks_lib.is_int(value) or value < 0:
      raise ValueError(f"window {name} must be an int >= 0, got {value!r}")
  # A side past T is the same mask; limiting it keeps qi + right inside int32 (2**31-1 wrapped).
  left, right = min(int(left), tq), min(int(right), tq)
  causal = bool(causal)
  if causal:
    right = 0
  if block_size is None:
    block_size = max(_ROUND, _round_up(max(left, right), _ROUND))
  elif not masks_lib.is_int(block_size) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  scale = _check_scale(scale, h)
  # Validates segment ids / lengths (shapes, dtypes) and fills a missing segment-id array.
  mask = masks_lib.make_mask(t, t, bsz, causal=causal, window=(left, right),
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                             q_lengths=q_lengths, kv_lengths=kv_lengths)

  if t == 0:
    return jnp.zeros(q.shape, q.dtype)
  b = min(int(block_size), _round_up(t, _ROUND))
  nblk = _cdiv(t, b)
  tp = nblk * b
  nb_left = min(_cdiv(left, b), nblk - 1)
  nb_right = min(_cdiv(right, b), nblk - 1)
  w = nb_left + 1 + nb_right
  g = n // kh

  qg = _pad_axis1(q, 0, tp - t).reshape(bsz, nblk, b, kh, g, h)

  def gather(x, fill=0):
    """[B, T, ...] -> [B, nblk, W*b, ...]: for query block i, positions (i - nb_left)*b ... ."""
    xp = _pad_axis1(x, nb_left * b, tp - t + nb_right * b, fill)
    parts = [xp[:, s * b: s * b + tp].reshape((bsz, nblk, b) + x.shape[2:]) for s in range(w)]
    return jnp.concatenate(parts, axis=2)

  kg, vg = gather(k), gather(v)

  # Absolute indices: query (i, r) is i*b + r; gathered key (i, c) is (i - nb_left)*b + c.
  qi = (jnp.arange(nblk) * b)[:, None, None] + jnp.arange(b)[None, :, None]  # [nblk, b, 1]
  kj = (jnp.arange(nblk) * b - nb_left * b)[:, None, None] + jnp.arange(w * b)[None, None, :]
  valid = (qi < t) & (kj >= 0) & (kj < t) & (kj >= qi - left) & (kj <= qi + right)
  valid = valid[None]  # [1, nblk, b, W*b]
  if mask.q_segment_ids is not None:
    q_seg = _pad_axis1(mask.q_segment_ids, 0, tp - t, -1).reshape(bsz, nblk, b)
    k_seg = gather(mask.kv_segment_ids, -2)  # [B, nblk, W*b]
    valid = valid & (q_seg[:, :, :, None] == k_seg[:, :, None, :])
  if mask.q_lengths is not None:
    valid = valid & (qi[None] < mask.q_lengths[:, None, None, None])
  if mask.kv_lengths is not None:
    valid = valid & (kj[None] < mask.kv_lengths[:, None, None, None])

  out = _band_softmax(qg, kg, vg, valid, scale, q.dtype)
  return out.reshape(bsz, tp, n, h)[:, :t]


def _check_layout(layout, nq: int, nk: int) -> np.ndarray:
  if isinstance(layout, jax.core.Tracer):
    raise ValueError("layout must be a static boolean NumPy array, got a traced value")
  try:
    arr = np.asarray(layout)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"layout must be a static boolean NumPy array: {e}") from None
  if arr.dtype != np.bool_:
    if np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all():
      arr = arr.astype(bool)
    else:
      raise ValueError(f"layout must be a boolean array, got dtype {arr.dtype}")
  if arr.shape != (nq, nk):
    raise ValueError(f"layout must have shape [num_q_blocks, num_k_blocks] = {(nq, nk)} for "
                     f"block_size and the lengths, got {arr.shape}")
  return arr


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, layout,
                           block_size: int, causal: bool = False,
                           scale: Optional[float] = None) -> jax.Array:
  """Block-sparse softmax attention (Child et al. 2019; Zaheer et al. 2020) over a static layout.

  Query block i (queries i*b .. i*b+b-1) sees key block j (keys j*b .. j*b+b-1) iff layout[i, j]; only
  those blocks are computed. Each layout row is padded to the maximum number A of active blocks per row
  and the padding is masked, so the work and memory are O(Tq * A * b).

  Args:
    q: [B, Tq, N, H]; k, v: [B, Tk, K, H], N % K == 0.
    layout: static boolean array [ceil(Tq/b), ceil(Tk/b)] (NumPy, or 0/1 integers).
    block_size: b, static positive int; the lengths need not be multiples of it.
    causal: inside the listed blocks, query i sees keys j <= i + (Tk - Tq) (end-aligned, as elsewhere).
    scale: logit scale (static), default 1/sqrt(H).

  Returns:
    [B, Tq, N, H] in q's dtype; rows with nothing visible (e.g. an all-False layout row) are zeros.
  """
  masks_lib.check_causal(causal)
  from jaxlab.attention.softmax import check_qkv

  bsz, tq, tk, n, kh, h = check_qkv(q, k, v)
  if not masks_lib.is_int(block_size) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  b = int(block_size)
  nq, nk = _cdiv(tq, b), _cdiv(tk, b)
  layout = _check_layout(layout, nq, nk)
  scale = _check_scale(scale, h)
  g = n // kh

  counts = layout.sum(axis=1)
  a = max(1, int(counts.max()) if counts.size else 1)
  idx = np.zeros((nq, a), np.int32)
  blk_ok = np.zeros((nq, a), bool)
  for i in range(nq):
    cols = np.flatnonzero(layout[i])
    idx[i, :len(cols)] = cols
    blk_ok[i, :len(cols)] = True

  qg = _pad_axis1(q, 0, nq * b - tq).reshape(bsz, nq, b, kh, g, h)

  def gather(x):
    xb = _pad_axis1(x, 0, nk * b - tk).reshape((bsz, nk, b) + x.shape[2:])
    return jnp.take(xb, jnp.asarray(idx), axis=1).reshape((bsz, nq, a * b) + x.shape[2:])

  kg, vg = gather(k), gather(v)
  qi = (jnp.arange(nq) * b)[:, None, None] + jnp.arange(b)[None, :, None]  # [nq, b, 1]
  kj = (jnp.asarray(idx) * b)[:, :, None] + jnp.arange(b)[None, None, :]  # [nq, A, b]
  k_ok = (jnp.asarray(blk_ok)[:, :, None] & (kj < tk)).reshape(nq, 1, a * b)
  kj = kj.reshape(nq, 1, a * b)
  valid = (qi < tq) & k_ok
  if causal:
    valid = valid & (kj <= qi + (tk - tq))
  out = _band_softmax(qg, kg, vg, valid[None], scale, q.dtype)
  return out.reshape(bsz, nq * b, n, h)[:, :tq]


def _check_count(name: str, value) -> int:
  if not masks_lib.is_int(value) or value < 0:
    raise ValueError(f"{name} must be an int >= 0, got {value!r}")
  return int(value)


def block_layout_from_window(num_blocks: int, left_blocks: int, right_blocks: int) -> np.ndarray:
  """Banded layout [num_blocks, num_blocks]: block i sees blocks i - left_blocks .. i + right_blocks."""
  if not masks_lib.is_int(num_blocks) or num_blocks <= 0:
    raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
  left_blocks = _check_count("left_blocks", left_blocks)
  right_blocks = _check_count("right_blocks", right_blocks)
  i = np.arange(num_blocks)[:, None]
  j = np.arange(num_blocks)[None, :]
  return (j >= i - left_blocks) & (j <= i + right_blocks)


def strided_layout(num_blocks: int, *, local_blocks: int, stride: int,
                   causal: bool = True) -> np.ndarray:
  """A variant of the "fixed" sparse-transformer pattern of Child et al. 2019 (sec. 4.2), at block
  granularity: the paper's summary columns (its A^(2) with c = 1 block: every block j with
  j % stride == stride - 1) with a sliding local window instead of the paper's aligned groups.

  Block i sees the `local_blocks` blocks up to and including itself (i - local_blocks + 1 .. i; the
  paper's A^(1) is instead the blocks of i's own group, j // stride == i // stride, which sees fewer
  blocks early in a group), and every summary block; if causal, only blocks j <= i.
  """
  if not masks_lib.is_int(num_blocks) or num_blocks <= 0:
    raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
  if not masks_lib.is_int(local_blocks) or local_blocks <= 0:
    raise ValueError(f"local_blocks must be a positive int, got {local_blocks!r}")
  if not masks_lib.is_int(stride) or stride <= 0:
    raise ValueError(f"stride must be a positive int, got {stride!r}")
  i = np.arange(num_blocks)[:, None]
  j = np.arange(num_blocks)[None, :]
  local = (j > i - local_blocks) & (j <= i)
  if not causal:
    local = local | ((j < i + local_blocks) & (j >= i))
  layout = local | (j % stride == stride - 1)
  if causal:
    layout = layout & (j <= i)
  return layout


def bigbird_layout(num_blocks: int, *, window: Union[int, Sequence[int]] = 1, num_global: int = 1,
                   num_random: int = 1, seed: int = 0) -> np.ndarray:
  """BigBird layout (Zaheer et al. 2020, ITC variant) at block granularity.

  * window: blocks i - left .. i + right (an int w means (w, w); BigBird uses 3 blocks, w = 1);
  * global: the first `num_global` blocks see every block and are seen by every block;
  * random: every non-global row additionally sees `num_random` blocks drawn without replacement from
    those it does not see yet (fewer if not enough remain), from a NumPy generator seeded by `seed`.
  """
  if masks_lib.is_int(window):
    window = (int(window), int(window))
  if not (isinstance(window, (tuple, list)) and len(window) == 2):
    raise ValueError(f"window must be an int >= 0 or a pair (left, right), got {window!r}")
  layout = block_layout_from_window(num_blocks, window[0], window[1])
  num_global = _check_count("num_global", num_global)
  num_random = _check_count("num_random", num_random)
  if num_global > num_blocks:
    raise ValueError(f"num_global must be <= num_blocks ({num_blocks}), got {num_global}")
  layout[:num_global, :] = True
  layout[:, :num_global] = True
  rng = np.random.default_rng(seed)
  for i in range(num_global, num_blocks):
    free = np.flatnonzero(~layout[i])
    if num_random and free.size:
      layout[i, rng.choice(free, size=min(num_random, free.size), replace=False)] = True
  return layout


CAUSAL_LAYOUTS = ("window", "strided", "bigbird")


def causal_block_layout(kind: str, num_blocks: int, *, local_blocks: int, stride: int = 1,
                        num_global: int = 0, num_random: int = 0, seed: int = 0) -> np.ndarray:
  """Causal block layout [num_blocks, num_blocks] (bool, NumPy) for `block_sparse_attention`.

  Query block i sees key block j <= i iff:
    "window":  i - j < local_blocks (its own block and the local_blocks - 1 before it);
    "strided": the window, or j % stride == stride - 1 (after Child et al. 2019's "fixed" pattern,
      with a sliding window for its aligned groups; see strided_layout);
    "bigbird": the window, or j < num_global (global blocks), or one of `num_random` blocks drawn
      without replacement among the earlier blocks it does not see yet (Zaheer et al. 2020, made
      causal), from a NumPy generator seeded by (seed, i).
  Row i depends only on i (not on num_blocks), so the layout for a shorter sequence is the top-left
  corner of the one for a longer sequence: cached decoding can use the layout of the cache length.
  """
  if kind not in CAUSAL_LAYOUTS:
    raise ValueError(f"sparse_layout must be one of {CAUSAL_LAYOUTS}, got {kind!r}")
  for name, value, low in (("num_blocks", num_blocks, 1), ("sparse_local_blocks", local_blocks, 1),
                           ("sparse_stride", stride, 1), ("sparse_num_global", num_global, 0),
                           ("sparse_num_random", num_random, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  if kind == "window":
    return block_layout_from_window(num_blocks, local_blocks - 1, 0)
  if kind == "strided":
    return strided_layout(num_blocks, local_blocks=local_blocks, stride=stride, causal=True)
  layout = block_layout_from_window(num_blocks, local_blocks - 1, 0)
  layout[:, :num_global] = True
  for i in range(num_blocks):
    free = np.flatnonzero(~layout[i, :i + 1])
    if num_random and free.size:
      rng = np.random.default_rng((seed, i))
      layout[i, rng.choice(free, size=min(num_random, free.size), replace=False)] = True
  return layout & np.tri(num_blocks, dtype=bool)
