"""Performer attention: FAVOR+ positive orthogonal random features for the softmax kernel.

Choromanski et al. 2021, "Rethinking attention with Performers" (arXiv:2009.14794), sec. 2.3-2.4 and
Lemma 1: for w ~ N(0, I_H),  exp(x . y) = E_w[exp(w.x - |x|^2/2) exp(w.y - |y|^2/2)], so with M random
rows w_1..w_M of a projection W and

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(M),   x' = x * H^-1/4,

phi(q) . phi(k) is an unbiased, positive estimate of exp(q . k / sqrt(H)), the unnormalised softmax
attention weight. Attention is then linear attention with these features (`jaxlab.attention.linear`):
O(T * M * H) time, causal via the same chunked prefix sums. Rows of W are drawn in blocks of H orthogonal
directions (QR of a Gaussian matrix) with norms resampled from chi(H), which keeps each row marginally
N(0, I_H) (unbiased) and lowers the variance (sec. 2.4).

Numerical stabilisation (as in the authors' implementation): the exponent is shifted before exp.
  * queries: by the max over features of each row (batch, position, head). A per-query factor
    multiplies numerator and denominator of that query's output alike and cancels.
  * keys: by one max over features AND positions (per batch and head). A key's factor does not cancel
    unless it is the same for every key j summed over (numerator sum_j phi(q).phi(k_j) v_j and
    denominator sum_j phi(q).phi(k_j) both carry it then); a per-key shift would reweight the keys.
  The shifts are constants for differentiation (stop_gradient), which is exact since they cancel.
  Then `eps` is added to every feature (keeps phi strictly positive, so the normaliser is never 0).
  Because the key shift is a max over all positions, in causal mode a (much) larger future key can make
  earlier keys' features underflow: outputs never depend on future keys through gradients (exactly), and
  in value only through float rounding and the eps floor.

Shapes (the jaxlab attention contract): q: [B, Tq, N, H]; k, v: [B, Tk, K, H], N % K == 0 (GQA by
grouping query heads; K/V never repeated); projection: [M, H] shared by all heads; output [B, Tq, N, H] in
q's dtype. Features and accumulations are float32.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxlab.attention.linear import linear_attention_from_features
from jaxlab.attention.softmax import check_qkv


def orthogonal_gaussian_features(key: jax.Array, num_features: int, head_dim: int) -> jax.Array:
  """[M, H] projection: ceil(M / H) blocks of H orthonormal rows (QR of a Gaussian), truncated to M rows,
  each row rescaled to the norm of an independent N(0, I_H) vector (chi(H) distributed)."""
  if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
    raise ValueError(f"num_features must be a positive int, got {num_features!r}")
  if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
    raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
  nb = -(-num_features // head_dim)
  k_blocks, k_norms = jax.random.split(key)
  g = jax.random.normal(k_blocks, (nb, head_dim, head_dim), jnp.float32)
  qmat, r = jnp.linalg.qr(g)
  # Sign fix makes Q Haar-distributed; rows of Q^T are the orthonormal directions.
  qmat = qmat * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  directions = jnp.swapaxes(qmat, -1, -2).reshape(nb * head_dim, head_dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(k_norms, (num_features, head_dim), jnp.float32), axis=-1)
  return directions * norms[:, None]


def positive_features(x: jax.Array, projection: jax.Array, *, is_query: bool,
                      eps: float = 1e-6) -> jax.Array:
  """FAVOR+ features phi(x) = (exp(W x' - |x'|^2/2 - shift) + eps) / sqrt(M), x' = x * H^-1/4.

  Args:
    x: [B, T, heads, H]. projection: [M, H].
    is_query: shift by the per-row max over features (True) or by the max over features and positions
      per (batch, head) (False, keys); see the module docstring.
    eps: floor added to every feature.

  Returns:
    [B, T, heads, M] float32.
  """
  if x.ndim != 4:
    raise ValueError(f"x must be [batch, length, heads, head_dim], got shape {x.shape}")
  if projection.ndim != 2 or projection.shape[1] != x.shape[-1]:
    raise ValueError(f"projection must be [num_features, head_dim={x.shape[-1]}], got "
                     f"{projection.shape}")
  f32 = jnp.float32
  m, h = projection.shape
  xs = x.astype(f32) * (h ** -0.25)
  wx = jnp.einsum("bthd,md->bthm", xs, projection.astype(f32), preferred_element_type=f32)
  logits = wx - 0.5 * jnp.sum(xs * xs, axis=-1, keepdims=True)
  axes = (-1,) if is_query else (1, 3)
  shift = lax.stop_gradient(jnp.max(logits, axis=axes, keepdims=True))
  return (jnp.exp(logits - shift) + eps) * (m ** -0.5)


def performer_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key: Optional[jax.Array],
                        num_features: int = 256, causal: bool = False,
                        projection: Optional[jax.Array] = None, chunk_size: int = 64,
                        eps: float = 1e-6) -> jax.Array:
  """FAVOR+ approximation of softmax attention with scale 1/sqrt(H) (Choromanski et al. 2021).

  Args:
    q: [B, Tq, N, H]. k, v: [B, Tk, K, H], N % K == 0.
    key: PRNG key drawing the projection (a new key = a feature redraw). Ignored if `projection` given.
    num_features: M, number of random features (ignored if `projection` given).
    causal: query i sees keys j <= i; needs Tq == Tk.
    projection: [M, H] fixed projection (e.g. from `orthogonal_gaussian_features`), or None.
    chunk_size: chunk length of the causal form.
    eps: feature floor and normaliser epsilon.

  Returns:
    [B, Tq, N, H] in q's dtype.
  """
  b, tq, tk, n, kh, h = check_qkv(q, k, v)
  if causal and tq != tk:
    raise ValueError(f"causal performer attention needs Tq == Tk, got Tq={tq}, Tk={tk}")
  if projection is None:
    if key is None:
      raise ValueError("key must be a PRNG key when projection is None")
    projection = orthogonal_gaussian_features(key, num_features, h)
  phi_q = positive_features(q, projection, is_query=True, eps=eps)
  phi_k = positive_features(k, projection, is_query=False, eps=eps)
  out = linear_attention_from_features(phi_q, phi_k, v, causal=causal, chunk_size=chunk_size,
                                       eps=eps)
  return out.astype(q.dtype)
