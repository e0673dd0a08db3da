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

Numerical stabilisation: the exponent is shifted before exp.
  * queries: by the max over features of each row (batch, position, head). A per-query factor
    multiplies numerator and denominator of that query's output alike and cancels.
  * keys, non-causal: by one max over features AND positions (per batch and head), as in the authors'
    implementation. A key's factor cancels only if it is the same for every key j summed over; a
    per-key shift would reweight the keys.
  * keys, causal: by the RUNNING max mu_j over the keys 0..j (per batch and head), so that no output
    depends on a later key in value either (a global max would let one large future key make earlier
    keys underflow). Key j's feature is taken relative to mu_j and rescaled by exp(mu_j - mu_t) <= 1
    for query t; all keys that a query sums over then carry the same factor exp(-mu_t), which cancels.
    The chunked form applies these factors per (query, key) pair inside a chunk and carries the state
    relative to the last key's mu (`linear.causal_chunk`'s shift), so it computes exactly what the
    one-token step (`performer_attention_step`, for decoding) computes, whatever the chunk size (to
    float rounding; tested).
  Then `eps` is added to every feature (keeps phi strictly positive, so the normaliser is never 0); in
  the causal form a key's eps is relative to the running max when the key was added, i.e. rescaled with
  the state like the rest of its feature. (An earlier version shifted each chunk by its own max, with
  which a later key of the same chunk moved earlier outputs through this floor.)
  The shifts are constants for differentiation (stop_gradient): exact for the exponentials, whose
  shifts cancel, and a negligible approximation for the eps floor, which is relative to them.
  The floor is not negligible when features span many orders of magnitude: with large |q|, |k|
  most features fall below eps times the largest and are raised to it, and the output leaves the
  exact FAVOR+ estimate (q, k at 3x unit scale, head dim 8, unit-scale values: max abs difference
  0.7 causal, 1.3 not; eps=1e-30 matches it to 1e-6). eps is 1e-6 by default, as in the paper's
  code; QK-norm (`model.qk_norm`) or a smaller eps keeps such inputs in range.

Shapes (the jaxlab attention contract): q: [B, Tq, N, H]; k, v: [B, Tk, K, H], N % K == 0 (GQA by
grouping query heads; K/V never repeated); projection: [M, H] shared by all heads; output [B, Tq, N, H] in
q's dtype. Features and accumulations are float32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxlab.attention.linear import causal_chunk, linear_attention_from_features
from jaxlab.attention import masks as masks_lib
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
  masks_lib.check_causal(causal)
  b, tq, tk, n, kh, h = check_qkv(q, k, v)
  if causal and tq != tk:
    raise ValueError(f"causal performer attention needs Tq == Tk, got Tq={tq}, Tk={tk}")
  if projection is None:
    if key is None:
      raise ValueError("key must be a PRNG key when projection is None")
    projection = orthogonal_gaussian_features(key, num_features, h)
  _check_projection(projection, h)
  phi_q = positive_features(q, projection, is_query=True, eps=eps)
  if causal:
    out, _ = _causal_running_max(phi_q, key_exponents(k, projection), v, chunk_size, eps)
  else:
    phi_k = positive_features(k, projection, is_query=False, eps=eps)
    out = linear_attention_from_features(phi_q, phi_k, v, causal=False, eps=eps)
  return out.astype(q.dtype)


def _check_projection(projection, head_dim: int) -> None:
  if projection.ndim != 2 or projection.shape[1] != head_dim:
    raise ValueError(f"projection must be [num_features, head_dim={head_dim}], got "
                     f"{projection.shape}")


def key_exponents(k: jax.Array, projection: jax.Array) -> jax.Array:
  """a = W k' - |k'|^2 / 2 with k' = k * H^-1/4: [B, T, K, M] float32 (phi(k) = exp(a) / sqrt(M))."""
  f32 = jnp.float32
  m, h = projection.shape
  ks = k.astype(f32) * (h ** -0.25)
  wk = jnp.einsum("bthd,md->bthm", ks, projection.astype(f32), preferred_element_type=f32)
  return wk - 0.5 * jnp.sum(ks * ks, axis=-1, keepdims=True)


def _causal_running_max(phi_q, a_k, v, chunk_size: int, eps: float):
  """Causal FAVOR+ with the running-max key shift (module docstring), chunked: ([B, T, N, H] f32,
  the PerformerState after the last token)."""
  b, t, n, m = phi_q.shape
  kh, h = v.shape[2], v.shape[3]
  g = n // kh
  f32 = jnp.float32
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  c = max(1, min(chunk_size, t))  # T = 0: no chunks, not a division by zero
  nc = -(-t // c)
  pad = nc * c - t
  # Padded queries are ones, not zeros: a zero row's num / (den + eps) is 0 / eps, whose gradient
  # -num / (den + eps)^2 is 0 / 0 = NaN once eps^2 underflows (eps = 1e-30), and reached dk.
  pq = jnp.pad(phi_q.reshape(b, t, kh, g, m), [(0, 0), (0, pad), (0, 0), (0, 0), (0, 0)],
               constant_values=1.0)
  ak = jnp.pad(a_k, [(0, 0), (0, pad), (0, 0), (0, 0)], constant_values=-jnp.inf)
  vf = jnp.pad(v.astype(f32), [(0, 0), (0, pad), (0, 0), (0, 0)])
  chunks = lambda x: jnp.moveaxis(x.reshape(b, nc, c, *x.shape[2:]), 1, 0)
  scale = m ** -0.5

  def body(carry, xs):
    s, z, mu = carry  # [B, K, M, H], [B, K, M], [B, K]
    q_i, a_i, v_i = xs
    # The running max at every key of the chunk (padded keys, a = -inf, leave it as it was).
    mu_CK = lax.cummax(jnp.maximum(lax.stop_gradient(jnp.max(a_i, axis=3)), mu[:, None]), axis=1)
    k_i = (jnp.exp(a_i - mu_CK[..., None]) + eps) * scale  # padded keys: eps, masked below
    out, s, z = causal_chunk(q_i, k_i, v_i, s, z, eps, shift_CK=mu_CK, state_shift_K=mu)
    return (s, z, mu_CK[:, -1]), out

  init = (jnp.zeros((b, kh, m, h), f32), jnp.zeros((b, kh, m), f32),
          jnp.full((b, kh), -jnp.inf, f32))
  (s, z, mu), out = lax.scan(body, init, (chunks(pq), chunks(ak), chunks(vf)))  # [nc, B, C, K, G, H]
  # Each padded key (value 0, so S is unaffected) added its eps floor to z: take it out again.
  z = z - eps * scale * pad
  return jnp.moveaxis(out, 0, 1).reshape(b, nc * c, n, h)[:, :t], PerformerState(s, z, mu)


def performer_prefill(q: jax.Array, k: jax.Array, v: jax.Array, *, projection: jax.Array,
                      chunk_size: int = 64, eps: float = 1e-6
                      ) -> tuple[jax.Array, "PerformerState"]:
  """Causal FAVOR+ over a prompt, and the decoding state after it: (out [B, T, N, H], state).

  `performer_attention_step` continues from the state as if the prompt had been decoded token by token
  (the same state, to float rounding).
  """
  b, tq, tk, n, kh, h = check_qkv(q, k, v)
  if tq != tk:
    raise ValueError(f"prefill needs Tq == Tk, got Tq={tq}, Tk={tk}")
  _check_projection(projection, h)
  phi_q = positive_features(q, projection, is_query=True, eps=eps)
  out, state = _causal_running_max(phi_q, key_exponents(k, projection), v, chunk_size, eps)
  return out.astype(q.dtype), state


class PerformerState(NamedTuple):
  """Decoding state of causal FAVOR+: S = sum_j phi_j v_j^T, z = sum_j phi_j with phi_j relative to
  the running max mu of the key exponents (module docstring)."""
  s: jax.Array  # [B, K, M, H] float32
  z: jax.Array  # [B, K, M] float32
  mu: jax.Array  # [B, K] float32, -inf before the first key


def performer_init_state(batch: int, num_kv_heads: int, head_dim: int,
                         num_features: int) -> PerformerState:
  f32 = jnp.float32
  return PerformerState(jnp.zeros((batch, num_kv_heads, num_features, head_dim), f32),
                        jnp.zeros((batch, num_kv_heads, num_features), f32),
                        jnp.full((batch, num_kv_heads), -jnp.inf, f32))


def performer_attention_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, state: PerformerState,
                             *, projection: jax.Array, eps: float = 1e-6
                             ) -> tuple[jax.Array, PerformerState]:
  """One causal decoding step: q_t [B, 1, N, H], k_t/v_t [B, 1, K, H] -> (out [B, 1, N, H], state).

  Equals `performer_attention(..., causal=True)` at that position (to float rounding).
  """
  b, one, n, h = q_t.shape
  check_qkv(q_t, k_t, v_t)
  if one != 1 or k_t.shape[1] != 1:
    raise ValueError(f"step inputs must have length 1, got q_t {q_t.shape}, k_t {k_t.shape}")
  _check_projection(projection, h)
  m = projection.shape[0]
  kh = k_t.shape[2]
  for name, got, want, axes in (("s", state.s.shape, (b, kh, m, h), "[B, K, M, H]"),
                                 ("z", state.z.shape, (b, kh, m), "[B, K, M]"),
                                 ("mu", state.mu.shape, (b, kh), "[B, K]")):
    if tuple(got) != want:  # a [B] mu with B == K would broadcast over the wrong axis
      raise ValueError(f"state.{name} has shape {tuple(got)}, expected {axes} = {want}")
  f32 = jnp.float32
  a = lax.stop_gradient(key_exponents(k_t, projection))[:, 0]  # [B, K, M]
  mu_new = jnp.maximum(state.mu, jnp.max(a, axis=-1))
  decay = jnp.exp(state.mu - mu_new)
  phi_k = (jnp.exp(key_exponents(k_t, projection)[:, 0] - mu_new[..., None]) + eps) * m ** -0.5
  s = state.s * decay[..., None, None] + jnp.einsum("bkm,bkh->bkmh", phi_k,
                                                    v_t[:, 0].astype(f32))
  z = state.z * decay[..., None] + phi_k
  phi_q = positive_features(q_t, projection, is_query=True, eps=eps)[:, 0]
  pq = phi_q.reshape(b, kh, n // kh, m)
  num = jnp.einsum("bkgm,bkmh->bkgh", pq, s, preferred_element_type=f32)
  den = jnp.einsum("bkgm,bkm->bkg", pq, z, preferred_element_type=f32)
  out = (num / (den[..., None] + eps)).reshape(b, 1, n, h)
  return out.astype(q_t.dtype), PerformerState(s, z, mu_new)
