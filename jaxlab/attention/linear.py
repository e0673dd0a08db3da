"""Linear (kernelised) attention: O(T) time and memory in the sequence length.

Katharopoulos, Vyas, Pappas & Fleuret 2020, "Transformers are RNNs: fast autoregressive transformers with
linear attention" (arXiv:2006.16236). With a feature map phi >= 0 replacing exp(q.k):

* non-causal (eq. 4-6):  out_i = phi(q_i)^T S / (phi(q_i)^T z),  S = sum_j phi(k_j) v_j^T,
  z = sum_j phi(k_j); computed in O(T * M * H) for M features (M = H for the elementwise maps here);
* causal (eq. 16-20): the same with prefix sums S_i, z_i over j <= i. Here in chunks of `chunk_size`:
  inside a chunk the masked quadratic form phi(Q_c) phi(K_c)^T (with the causal mask), across chunks a
  running state (S [M, H], z [M]) carried by `lax.scan`. Any length: the tail is zero-padded, and
  padded keys have phi = 0 (the features are padded, not the raw keys), so they contribute nothing;
* recurrent decoding (eq. 18-20): `linear_attention_init_state` and `linear_attention_step`, one token
  at a time with the state (S [B, K, M, H], z [B, K, M]); `linear_attention_prefill` runs the causal
  form over a prompt and returns the state after it.

Shapes (the jaxlab attention contract): q: [B, Tq, N, H]; k, v: [B, Tk, K, H] with N % K == 0
(GQA/MQA: query heads grouped as [B, T, K, G, H], G = N // K; K/V are never repeated). Output
[B, Tq, N, H] in q's dtype. Features, states and sums are float32.

Memory: non-causal O(B * T * N * M + B * K * M * H); causal O(B * T * N * (M + H)) plus one
[B, K, G, C, C] chunk of scores and the per-chunk scan state (kept for the backward pass:
O(T / C * B * K * M * H)).

Feature maps (`feature_map=`), all elementwise over head_dim so M = H, all >= 0:
  "elu+1": elu(x) + 1 (the paper's choice; strictly positive).
  "relu":  max(x, 0). Can be all-zero for a row; the normaliser is then 0 and `eps` makes that row's
           output 0 instead of NaN.
  "exp":   exp(x - max_d x_d), the max taken per row (per batch, position, head), which keeps every
           feature in (0, 1]. For queries the row factor cancels between numerator and denominator;
           for keys it is part of the feature map's definition (the kernel becomes
           sum_d exp(q_d - max q) exp(k_d - max k)), so the max is differentiated like the rest
           (with a constant max the keys' gradient was wrong at each row's largest entry).

The public core `linear_attention_from_features` takes already featurised q/k (any feature count M), so
that other kernels (e.g. the Performer's random features, `jaxlab.attention.performer`) reuse it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxlab.attention import masks as masks_lib
from jaxlab.attention.softmax import check_qkv

FEATURE_MAPS = ("elu+1", "relu", "exp")


def _elu_plus_one(x):
  return jax.nn.elu(x) + 1.0


def _relu(x):
  return jax.nn.relu(x)


def _exp(x):
  return jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))


_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "elu+1": _elu_plus_one, "relu": _relu, "exp": _exp}


def get_feature_map(feature_map: str) -> Callable[[jax.Array], jax.Array]:
  """The elementwise feature map called `feature_map` (one of FEATURE_MAPS), applied over the last axis."""
  if not isinstance(feature_map, str) or feature_map not in _MAPS:
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
  return _MAPS[feature_map]


def _check_chunk(chunk_size) -> int:
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  return chunk_size


def linear_attention_from_features(phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, *,
                                   causal: bool = False, chunk_size: int = 64,
                                   eps: float = 1e-6) -> jax.Array:
  """Linear attention given features: out_i = sum_j (phi_q_i . phi_k_j) v_j / (sum_j phi_q_i . phi_k_j + eps).

  Args:
    phi_q: [B, Tq, N, M] query features (>= 0). phi_k: [B, Tk, K, M] key features (>= 0).
    v: [B, Tk, K, H] values, N % K == 0.
    causal: position i sees j <= i (needs Tq == Tk).
    chunk_size: chunk length of the causal form (static positive int; any T works).
    eps: added to the normaliser.

  Returns:
    [B, Tq, N, H] float32.
  """
  masks_lib.check_causal(causal)
  if phi_q.ndim != 4 or phi_k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"phi_q, phi_k, v must be 4-D, got {phi_q.shape}, {phi_k.shape}, {v.shape}")
  b, tq, n, m = phi_q.shape
  _, tk, kh, h = v.shape
  if phi_k.shape[:3] != v.shape[:3] or phi_k.shape[3] != m or phi_k.shape[0] != b:
    raise ValueError(f"phi_k {phi_k.shape} must be [B, Tk, K, M] matching phi_q {phi_q.shape} and "
                     f"v {v.shape}")
  if n % kh:
    raise ValueError(f"q heads ({n}) must be a multiple of k/v heads ({kh}) for GQA/MQA")
  chunk_size = _check_chunk(chunk_size)
  g = n // kh
  f32 = jnp.float32
  pq = phi_q.astype(f32).reshape(b, tq, kh, g, m)
  pk = phi_k.astype(f32)
  vf = v.astype(f32)

  if not causal:
    s = jnp.einsum("bskm,bskh->bkmh", pk, vf, preferred_element_type=f32)
    z = jnp.sum(pk, axis=1)  # [B, K, M]
    num = jnp.einsum("btkgm,bkmh->btkgh", pq, s, preferred_element_type=f32)
    den = jnp.einsum("btkgm,bkm->btkg", pq, z, preferred_element_type=f32)
    return (num / (den[..., None] + eps)).reshape(b, tq, n, h)

  if tq != tk:
    raise ValueError(f"causal linear attention needs Tq == Tk, got Tq={tq}, Tk={tk}")
  return _causal_scan(pq, pk, vf, chunk_size, eps)[0]


def _causal_scan(pq, pk, vf, chunk_size: int, eps: float):
  """The chunked causal form over pq [B, T, K, G, M], pk [B, T, K, M], vf [B, T, K, H] (float32) ->
  (out [B, T, K*G, H], the state (S, z) after the last token)."""
  b, t, kh, g, m = pq.shape
  n, h = kh * g, vf.shape[-1]
  f32 = jnp.float32
  c = max(1, min(chunk_size, t))  # T = 0: no chunks, not a division by zero
  nc = -(-t // c)
  tp = nc * c
  if tp != t:
    pad = lambda x, value=0.0: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2),
                                       constant_values=value)
    pk, vf = pad(pk), pad(vf)  # padded keys: phi = 0, v = 0 -> contribute nothing
    # Padded queries (outputs dropped) are ones: a zero row's 0 / (0 + eps) has the gradient
    # 0 / 0 = NaN once eps^2 underflows (a tiny eps), which reached the keys' gradients.
    pq = pad(pq, 1.0)
  # [nc, B, C, ...] chunks, scanned in order.
  pq_c = jnp.moveaxis(pq.reshape(b, nc, c, kh, g, m), 1, 0)
  pk_c = jnp.moveaxis(pk.reshape(b, nc, c, kh, m), 1, 0)
  v_c = jnp.moveaxis(vf.reshape(b, nc, c, kh, h), 1, 0)

  def body(carry, xs):
    s, z = carry  # [B, K, M, H], [B, K, M]
    q_i, k_i, v_i = xs
    out, s, z = causal_chunk(q_i, k_i, v_i, s, z, eps)
    return (s, z), out

  init = (jnp.zeros((b, kh, m, h), f32), jnp.zeros((b, kh, m), f32))
  state, out = lax.scan(body, init, (pq_c, pk_c, v_c))  # [nc, B, C, K, G, H]
  out = jnp.moveaxis(out, 0, 1).reshape(b, tp, n, h)
  return out[:, :t], state


def causal_chunk(phi_q_CKGM, phi_k_CKM, v_CKH, s_KMH, z_KM, eps: float, *, shift_CK=None,
                 state_shift_K=None):
  """One chunk of causal linear attention (Katharopoulos et al. 2020, eq. 9, chunked; leading batch
  axis B on every argument): queries see the state (S, z) of the earlier chunks and the chunk's keys up
  to their own position. Features phi_q [B, C, K, G, M] (G query heads per K/V head), phi_k [B, C, K, M],
  v [B, C, K, H], S [B, K, M, H], z [B, K, M], all float32.

  shift_CK [B, C, K] (non-decreasing along C; with state_shift_K [B, K], the state's, <= shift_CK):
  key j's features are relative to exp(shift[j]) and the state's to exp(state_shift), so query t
  weighs key j by exp(shift[j] - shift[t]) <= 1 and the state by exp(state_shift - shift[t]) (causal
  FAVOR+'s running max, `jaxlab.attention.performer`); the returned state is relative to shift[-1].
  Returns (out [B, C, K, G, H], S and z with the chunk added)."""
  b, c, kh, _, m = phi_q_CKGM.shape
  h = v_CKH.shape[-1]
  expected = {"phi_k": (phi_k_CKM, (b, c, kh, m)), "v": (v_CKH, (b, c, kh, h)),
              "s": (s_KMH, (b, kh, m, h)), "z": (z_KM, (b, kh, m))}
  if shift_CK is not None:
    expected.update(shift=(shift_CK, (b, c, kh)), state_shift=(state_shift_K, (b, kh)))
  for name, (array, shape) in expected.items():
    if array is None or array.shape != shape:
      raise ValueError(f"causal_chunk: {name} must have shape {shape} (from phi_q "
                       f"{phi_q_CKGM.shape} and v {v_CKH.shape}), got "
                       f"{None if array is None else array.shape}")
  f32 = jnp.float32
  tril = jnp.tril(jnp.ones((c, c), bool))
  scores = jnp.einsum("bckgm,bskm->bkgcs", phi_q_CKGM, phi_k_CKM, preferred_element_type=f32)
  q_state_CKGM, end_weight_CK, state_weight_K = phi_q_CKGM, None, None
  if shift_CK is not None:
    shift_KC = jnp.moveaxis(shift_CK, 1, 2)
    log_weight_KTS = shift_KC[:, :, None, :] - shift_KC[:, :, :, None]  # shift[s] - shift[t]
    scores = scores * jnp.exp(jnp.where(tril, log_weight_KTS, 0.0))[:, :, None]
    q_state_CKGM = phi_q_CKGM * jnp.exp(state_shift_K[:, None] - shift_CK)[..., None, None]
    end_weight_CK = jnp.exp(shift_CK - shift_CK[:, -1:])
    state_weight_K = jnp.exp(state_shift_K - shift_CK[:, -1])
  scores = jnp.where(tril, scores, 0.0)
  num = (jnp.einsum("bkgcs,bskh->bckgh", scores, v_CKH, preferred_element_type=f32) +
         jnp.einsum("bckgm,bkmh->bckgh", q_state_CKGM, s_KMH, preferred_element_type=f32))
  den = (jnp.moveaxis(jnp.sum(scores, axis=-1), -1, 1) +
         jnp.einsum("bckgm,bkm->bckg", q_state_CKGM, z_KM, preferred_element_type=f32))
  out = num / (den[..., None] + eps)
  if shift_CK is not None:  # the state, relative to the chunk's last shift
    phi_k_CKM = phi_k_CKM * end_weight_CK[..., None]
    s_KMH, z_KM = s_KMH * state_weight_K[..., None, None], z_KM * state_weight_K[..., None]
  s_KMH = s_KMH + jnp.einsum("bskm,bskh->bkmh", phi_k_CKM, v_CKH, preferred_element_type=f32)
  return out, s_KMH, z_KM + jnp.sum(phi_k_CKM, axis=1)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                     feature_map: str = "elu+1", chunk_size: int = 64,
                     eps: float = 1e-6) -> jax.Array:
  """Linear attention (Katharopoulos et al. 2020) with an elementwise feature map.

  Args:
    q: [B, Tq, N, H]. k, v: [B, Tk, K, H], N % K == 0 (GQA/MQA by grouping query heads).
    causal: query i sees keys j <= i; needs Tq == Tk (no end alignment, unlike softmax attention).
    feature_map: "elu+1" | "relu" | "exp" (see the module docstring).
    chunk_size: chunk length of the causal form (static positive int; T need not be a multiple).
    eps: added to the normaliser phi(q_i) . sum_j phi(k_j).

  Returns:
    [B, Tq, N, H] in q's dtype (computed in float32).
  """
  masks_lib.check_causal(causal)
  check_qkv(q, k, v)
  phi = get_feature_map(feature_map)
  chunk_size = _check_chunk(chunk_size)
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"causal linear attention needs Tq == Tk, got Tq={q.shape[1]}, Tk={k.shape[1]}")
  f32 = jnp.float32
  out = linear_attention_from_features(phi(q.astype(f32)), phi(k.astype(f32)), v, causal=causal,
                                       chunk_size=chunk_size, eps=eps)
  return out.astype(q.dtype)


def linear_attention_prefill(q: jax.Array, k: jax.Array, v: jax.Array, *, feature_map: str = "elu+1",
                             chunk_size: int = 64, eps: float = 1e-6
                             ) -> tuple[jax.Array, "LinearAttentionState"]:
  """Causal linear attention over a prompt, and the decoding state after it: (out [B, T, N, H] in q's
  dtype, state). `linear_attention_step` continues from the state as if the prompt had been decoded
  token by token (the same state, to float rounding); the features are computed once for both."""
  b, tq, tk, n, kh, h = check_qkv(q, k, v)
  if tq != tk:
    raise ValueError(f"prefill needs Tq == Tk, got Tq={tq}, Tk={tk}")
  phi = get_feature_map(feature_map)
  f32 = jnp.float32
  phi_q, phi_k = phi(q.astype(f32)), phi(k.astype(f32))
  out, (s, z) = _causal_scan(phi_q.reshape(b, tq, kh, n // kh, phi_q.shape[-1]), phi_k,
                             v.astype(f32), _check_chunk(chunk_size), eps)
  return out.astype(q.dtype), LinearAttentionState(s, z)


class LinearAttentionState(NamedTuple):
  """Recurrent state of causal linear attention: S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j)."""
  s: jax.Array  # [B, K, M, H] float32
  z: jax.Array  # [B, K, M] float32


def linear_attention_init_state(batch: int, num_kv_heads: int, head_dim: int,
                                dtype=jnp.float32, *, num_features: int | None = None
                                ) -> LinearAttentionState:
  """Empty decoding state (S [B, K, M, H], z [B, K, M]); M = head_dim unless num_features is given.

  The state is always float32 (accumulation); `dtype` is accepted for the contract and ignored.
  """
  del dtype
  m = head_dim if num_features is None else num_features
  return LinearAttentionState(jnp.zeros((batch, num_kv_heads, m, head_dim), jnp.float32),
                              jnp.zeros((batch, num_kv_heads, m), jnp.float32))


def linear_attention_step_from_features(phi_q_t: jax.Array, phi_k_t: jax.Array, v_t: jax.Array,
                                        state: LinearAttentionState, *, eps: float = 1e-6
                                        ) -> tuple[jax.Array, LinearAttentionState]:
  """One decoding step given features: phi_q_t [B, 1, N, M], phi_k_t [B, 1, K, M], v_t [B, 1, K, H].

  Returns (out [B, 1, N, H] float32, new state); the token attends to itself and all earlier tokens.
  """
  b, one, n, m = phi_q_t.shape
  _, _, kh, h = v_t.shape
  if one != 1 or phi_k_t.shape[1] != 1 or v_t.shape[1] != 1:
    raise ValueError(f"step inputs must have length 1, got {phi_q_t.shape}, {phi_k_t.shape}, "
                     f"{v_t.shape}")
  if state.s.shape != (b, kh, m, h) or state.z.shape != (b, kh, m):
    raise ValueError(f"state shapes {state.s.shape}, {state.z.shape} do not match "
                     f"[B, K, M, H] = {(b, kh, m, h)}")
  f32 = jnp.float32
  pk = phi_k_t[:, 0].astype(f32)  # [B, K, M]
  s = state.s + jnp.einsum("bkm,bkh->bkmh", pk, v_t[:, 0].astype(f32), preferred_element_type=f32)
  z = state.z + pk
  pq = phi_q_t[:, 0].astype(f32).reshape(b, kh, n // kh, m)
  num = jnp.einsum("bkgm,bkmh->bkgh", pq, s, preferred_element_type=f32)
  den = jnp.einsum("bkgm,bkm->bkg", pq, z, preferred_element_type=f32)
  out = (num / (den[..., None] + eps)).reshape(b, 1, n, h)
  return out, LinearAttentionState(s, z)


def linear_attention_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array,
                          state: LinearAttentionState, *, feature_map: str = "elu+1",
                          eps: float = 1e-6) -> tuple[jax.Array, LinearAttentionState]:
  """Recurrent causal linear attention for one token (Katharopoulos et al. 2020, eq. 18-20).

  Args:
    q_t: [B, 1, N, H]. k_t, v_t: [B, 1, K, H]. state: from `linear_attention_init_state` or a previous
      step. feature_map, eps: as in `linear_attention` (must match to reproduce it).

  Returns:
    (out [B, 1, N, H] in q_t's dtype, new state). Step t's output equals
    `linear_attention(..., causal=True)` at position t.
  """
  check_qkv(q_t, k_t, v_t)
  phi = get_feature_map(feature_map)
  f32 = jnp.float32
  out, state = linear_attention_step_from_features(phi(q_t.astype(f32)), phi(k_t.astype(f32)), v_t,
                                                   state, eps=eps)
  return out.astype(q_t.dtype), state
