"""ReRoPE and leaky ReRoPE (Su 2023, "Rectified Rotary Position Embeddings", kexue.fm/archives/9708,
and the reference github.com/bojone/rerope).

RoPE's logit between query position m and key position n uses the relative position d = m - n.
ReRoPE replaces it by
  d                        if |d| < window
  window                   if d >= window            (ReRoPE)
  window + (d - window)/k  if d >= window            (leaky ReRoPE, k = leaky_k > 1)
(and the mirror image -window, -(window + (|d| - window)/k) for d <= -window with bidirectional=True).
Because the clamped relative position is not a difference of two absolute positions, it cannot be
applied to q and k separately: the logits are assembled from two RoPE logit matrices (three with
bidirectional=True), one with plain positions and one with q at position window (k unrotated) or, for
the leaky form, q at m/k + window (1 - 1/k) and k at n/k. The cost is therefore O(Tq * Tk) memory and
two or three times the work of a plain logit matrix, by nature; it does not fit flash-style kernels
that never form the logits.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxlab.positions import _checks
from jaxlab.positions.rope import _angles, _rotate_half_f32


def rerope_logits(q: jax.Array, k: jax.Array, q_positions: jax.Array, k_positions: jax.Array, *,
                  window: float, leaky_k: Optional[float] = None, theta: float = 10000.0,
                  scale: Optional[float] = None, bidirectional: bool = False) -> jax.Array:
  """(Leaky) ReRoPE attention logits, float32 [B, N, Tq, Tk], before any mask or softmax.

  q [B, Tq, N, H], k [B, Tk, K, H] with N % K == 0 (query head h uses kv head h // (N // K), as in
  grouped-query attention), q_positions [B, Tq], k_positions [B, Tk] (explicit, so offsets and packed
  segments work; add a mask for segments). window > 0; leaky_k None (ReRoPE) or >= 1 (leaky; 1 gives
  plain RoPE). scale: multiplies the logits, default 1/sqrt(H). bidirectional=False (causal use): keys
  in the future beyond the window (d <= -window) keep plain RoPE logits, which a causal mask removes;
  bidirectional=True clamps them symmetrically at the cost of a third logit matrix.
  """
  _checks.bhtd(q, "q")
  _checks.bhtd(k, "k")
  b, tq, n, h = q.shape
  if k.shape[0] != b or k.shape[-1] != h:
    raise ValueError(f"q and k must share batch and head_dim, got shapes {q.shape} and {k.shape}")
  kh = k.shape[2]
  if n % kh:
    raise ValueError(f"q heads ({n}) must be a multiple of k heads ({kh})")
  if h % 2:
    raise ValueError(f"ReRoPE needs an even head_dim, got {h}")
  qp = _checks.positions_of_shape(q_positions, q.shape[:2], "q_positions")
  kp = _checks.positions_of_shape(k_positions, k.shape[:2], "k_positions")
  _checks.positive_number(window, "window")
  if leaky_k is not None:
    _checks.positive_number(leaky_k, "leaky_k")
    lk = _checks.static_number(leaky_k)
    if lk is not None and lk < 1.0:
      raise ValueError(f"leaky_k must be >= 1 (1 = plain RoPE, larger = closer to ReRoPE), got {leaky_k}")
  if scale is None:
    scale = h ** -0.5
  _checks.positive_number(scale, "scale")
  _checks.positive_number(theta, "theta")
  if not isinstance(bidirectional, bool):
    raise ValueError(f"bidirectional must be a bool, got {bidirectional!r}")
  statics = (window, leaky_k, theta, scale)
  if _checks.all_static(*statics):
    statics = tuple(None if v is None else float(v) for v in statics)
    return _rerope_jit(q, k, qp, kp, *statics, bidirectional)
  return _rerope(q, k, qp, kp, *statics, bidirectional)


def _rerope(q, k, qp, kp, window, leaky_k, theta, scale, bidirectional):
  b, tq, n, h = q.shape
  kh = k.shape[2]
  group = n // kh
  qp = qp.astype(jnp.float32)
  kp = kp.astype(jnp.float32)

  def rot(x, pos):
    return _rotate_half_f32(x, _angles(pos, None, theta, h, None), h)

  def logits(qr, kr):
    qr = qr.reshape(b, tq, kh, group, h)
    out = jnp.einsum("bqkgh,bskh->bkgqs", qr, kr)
    return out.reshape(b, n, tq, k.shape[1])

  near = logits(rot(q, qp), rot(k, kp))
  if leaky_k is None:
    k_far = k.astype(jnp.float32)  # key at position 0
    q_far_pos = jnp.full_like(qp, window)
    q_far_neg_pos = jnp.full_like(qp, -window)
  else:
    k_far = rot(k, kp / leaky_k)
    q_far_pos = qp / leaky_k + window * (1.0 - 1.0 / leaky_k)
    q_far_neg_pos = qp / leaky_k - window * (1.0 - 1.0 / leaky_k)
  far = logits(rot(q, q_far_pos), k_far)
  d = (qp[:, :, None] - kp[:, None, :])[:, None]  # [B, 1, Tq, Tk]
  out = jnp.where(d >= window, far, near)
  if bidirectional:
    far_neg = logits(rot(q, q_far_neg_pos), k_far)
    out = jnp.where(d <= -window, far_neg, out)
  return out * scale


_rerope_jit = jax.jit(_rerope, static_argnums=(4, 5, 6, 7, 8))


def rerope_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     k_positions: jax.Array, *, window: float, leaky_k: Optional[float] = None,
                     theta: float = 10000.0, scale: Optional[float] = None, causal: bool = True,
                     q_segment_ids: Optional[jax.Array] = None,
                     kv_segment_ids: Optional[jax.Array] = None,
                     kv_lengths: Optional[jax.Array] = None) -> jax.Array:
  """Softmax attention over (leaky) ReRoPE logits: q [B, Tq, N, H], k/v [B, Tk, K, H] UNROTATED.

  The masks are those of `attention.dot_product_attention` (causal end-aligned, segment ids, kv
  lengths); rows that see no key give zeros. Returns [B, Tq, N, H] in q's dtype. The logits are
  materialised ([B, N, Tq, Tk] float32), which ReRoPE needs by construction (module docstring).
  """
  from jaxlab.attention import masks as masks_lib
  from jaxlab.attention.softmax import check_qkv, masked_softmax
  b, tq, tk, n, kh, h = check_qkv(q, k, v)
  mask = masks_lib.make_mask(tq, tk, b, causal=causal, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths)
  logits = rerope_logits(q, k, q_positions, k_positions, window=window, leaky_k=leaky_k,
                         theta=theta, scale=scale, bidirectional=not causal)
  probs = masked_softmax(logits, mask.full())
  g = n // kh
  probs = probs.reshape(b, kh, g, tq, tk).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, tq, n, h).astype(q.dtype)
