"""Gated attention unit (GAU) and FLASH's mixed chunk attention, as pure functions.

Hua, Dai, Liu & Le 2022, "Transformer Quality in Linear Time" (arXiv:2202.10447).

The equations below carry our own labels [G1]..[F4]; the formulas are the paper's (sec. 2 for GAU,
sec. 3.2 for mixed chunk attention, and its pseudo-code in the appendix).

GAU (sec. 2): from the input X, U = silu(X W_u), V = silu(X W_v) [T, e] and one shared low-dimensional
Z = silu(X W_z) [T, s] (s = 128 in the paper). Queries and keys are cheap per-dim transforms of Z
(sec. 2 and the pseudo-code: "per-dim scalars and offsets", like a LayerNorm's scale and offset):

    Q = Z * gamma_q + beta_q,   K = Z * gamma_k + beta_k                  [G1] (`scale_offset`)
    A = relu(scale * Q K^T + b)^2,   O = (U * A V) W_o                     [G2]

with scale = 1/T (the paper's pseudo-code divides the logits by the sequence length) and b an optional
relative position bias. `gau_attention` computes A V for the "relu2" kernel and, as the alternative
the issue asks for, a softmax kernel softmax(m_i * scale * q_i.k_j + b_ij) with scale = 1/sqrt(s) and
the log-n factor m_i = max(1, log n_i / log L) of `jaxlab.positions.logn_scale` (n_i = the number of
keys query i sees; Chiang & Cholak 2022, Su 2021): relu^2 weights do not normalise, so the softmax +
log-n form is the one that transfers to lengths other than the training length. GAU is quadratic:
it materialises [B, N, Tq, Tk] weights, as the paper's GAU does.

FLASH (sec. 3.2, mixed chunk attention): the sequence is cut into G = T/C non-overlapping chunks of C
tokens and four per-dim transforms of Z give quadratic and linear queries/keys. For chunk g:

    V_quad_g = relu(quad_scale * Q^quad_g K^quad_g^T + b)^2 V_g                    [F1] (causal mask
                                                                                    inside the chunk)
    V_lin_g  = linear_scale * Q^lin_g sum_h K^lin_h^T V_h                          [F2] (all chunks h)
    V_lin_g  = linear_scale * Q^lin_g sum_{h<g} K^lin_h^T V_h                      [F3] (causal)
    O_g = [U_g * (V_quad_g + V_lin_g)] W_o                                         [F4]

quad_scale = linear_scale = 1/C by default (the paper's pseudo-code divides both by the group size);
the linear part has no feature map and no normaliser, as in the paper. `mixed_chunk_attention` computes
V_quad + V_lin. Work is O(T * C * (s + e) + T * s * e); memory O(T * C) for the in-chunk weights plus, when
causal, the exclusive cumulative sum of the per-chunk states, [B, T/C, K, s, e], i.e. O(T) for a fixed
chunk size (the paper's cumsum form; no [T, T] tensor anywhere, forward or backward).

Decoding causal FLASH one token at a time (`flash_init_state`, `flash_prefill_state`, `flash_step`)
keeps the linear state of the completed chunks (linear_scale * sum K^lin^T V, [B, K, s, e]) plus the
current chunk's keys and values (at most C tokens), and reproduces `mixed_chunk_attention(...,
causal=True)` exactly (up to float rounding): O(C * s + s * e) state, independent of the length.

Shapes (the jaxlab layout [batch, length, heads, dim]): queries [B, Tq, N, S]; keys [B, Tk, K, S];
values [B, Tk, K, E] (E may differ from S; GAU has e >> s); N % K == 0 (query heads grouped over each
key/value head, K/V never repeated). Outputs [B, Tq, N, E] in the queries' dtype; all weights and sums
are float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxlab.attention import masks as masks_lib
from jaxlab.positions import _checks
from jaxlab.positions.logn import logn_scale

KINDS = ("relu2", "softmax")


def _check_kind(kind) -> str:
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  return kind


def _check_4d(x, name: str, what: str) -> None:
  if not hasattr(x, "ndim") or x.ndim != 4:
    raise ValueError(f"{name} must be {what}, got shape {getattr(x, 'shape', type(x))}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}")


def _check_qkv(q, k, v, qn: str = "q", kn: str = "k", vn: str = "v") -> tuple[int, ...]:
  """Checks q [B, Tq, N, S], k [B, Tk, K, S], v [B, Tk, K, E]; returns (B, Tq, Tk, N, K, S, E)."""
  _check_4d(q, qn, "[batch, q_length, heads, qk_dim]")
  _check_4d(k, kn, "[batch, kv_length, kv_heads, qk_dim]")
  _check_4d(v, vn, "[batch, kv_length, kv_heads, value_dim]")
  b, tq, n, s = q.shape
  if k.shape[0] != b or k.shape[3] != s:
    raise ValueError(f"{kn} {k.shape} must be [B, Tk, K, S] with B={b} and S={s} as in {qn} {q.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"{vn} {v.shape} must be [B, Tk, K, E] with [B, Tk, K] = {k.shape[:3]} as in "
                     f"{kn}")
  kh = k.shape[2]
  if n % kh:
    raise ValueError(f"{qn} heads ({n}) must be a multiple of {kn}/{vn} heads ({kh})")
  return b, tq, k.shape[1], n, kh, s, v.shape[3]


def scale_offset(z: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
  """Per-dim scalars and offsets of the shared Z (Hua et al. 2022, sec. 2, [G1]): out[..., m, :] =
  z * gamma[m] + beta[m].

  Args:
    z: [B, T, S] shared representation. gamma, beta: [M, S] (M transforms: 2 for GAU's Q and K, 4 for
      FLASH's quadratic and linear Q and K).

  Returns:
    [B, T, M, S] in z's dtype; `out[:, :, m:m + 1]` is the m-th transform as a one-head q or k
    [B, T, 1, S].
  """
  if not hasattr(z, "ndim") or z.ndim != 3:
    raise ValueError(f"z must be [batch, length, qk_dim], got shape {getattr(z, 'shape', None)}")
  s = z.shape[-1]
  for name, p in (("gamma", gamma), ("beta", beta)):
    if not hasattr(p, "ndim") or p.ndim != 2 or p.shape[1] != s:
      raise ValueError(f"{name} must be [num_transforms, {s}] (qk_dim of z), got shape "
                       f"{getattr(p, 'shape', None)}")
  if gamma.shape != beta.shape:
    raise ValueError(f"gamma {gamma.shape} and beta {beta.shape} must have the same shape")
  return (z[:, :, None, :] * gamma.astype(z.dtype) + beta.astype(z.dtype)).astype(z.dtype)


def _weights(logits: jax.Array, valid: Optional[jax.Array], kind: str) -> jax.Array:
  """Attention weights over the last axis: relu(logits)^2 or softmax(logits); masked entries and rows
  with no visible key are exactly 0 (value and gradient)."""
  if kind == "relu2":
    w = jnp.square(jax.nn.relu(logits))
    return w if valid is None else jnp.where(valid, w, 0.0)
  from jaxlab.attention.softmax import masked_softmax
  return masked_softmax(logits, valid)


def _bias_grouped(bias, b: int, kh: int, g: int, rows: int, cols: int, name: str) -> jax.Array:
  """bias broadcastable to [B, N, rows, cols] -> float32 [B, K, G, rows, cols]."""
  n = kh * g
  try:
    full = jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (b, n, rows, cols))
  except ValueError:
    raise ValueError(f"{name} must be broadcastable to [B, N, {rows}, {cols}] = "
                     f"{(b, n, rows, cols)}, got shape {jnp.shape(bias)}") from None
  return full.reshape(b, kh, g, rows, cols)


def gau_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                  kind: str = "relu2", scale: Optional[float] = None,
                  bias: Optional[jax.Array] = None, kv_mask: Optional[jax.Array] = None,
                  logn_train_len: int = 0) -> jax.Array:
  """GAU attention A V (Hua et al. 2022, sec. 2, [G2]), quadratic, on q/k from the shared Z.

  Args:
    q: [B, Tq, N, S] queries (e.g. `scale_offset(z, gamma, beta)[:, :, 0:1]`).
    k: [B, Tk, K, S] keys. v: [B, Tk, K, E] values (GAU's V = silu(X W_v), E = e). N % K == 0.
    causal: query i sees keys j <= i + (Tk - Tq) (aligned at the end, as in the attention contract).
    kind: "relu2": A = relu(scale * q.k + b)^2 ([G2]), default scale 1/n (the paper's), n = Tk or,
      with kv_mask, the batch row's number of unmasked keys (causality aside; so padding a batch
      changes no real token);
      "softmax": A = softmax(m_i * scale * q.k + b) over visible keys, default scale 1/sqrt(S).
    scale: logit multiplier (a static float); None = the default above. When decoding relu2 with a
      KV cache, pass the training value (1/T) explicitly.
    bias: broadcastable to [B, N, Tq, Tk], added to the logits (relative position bias b).
    kv_mask: [B, Tk] bool, False keys are invisible (padding, or the unfilled slots of a KV cache).
    logn_train_len: "softmax" only: > 0 multiplies query i's logits q.k (not the bias) by
      max(1, log n_i / log logn_train_len), n_i = the number of keys query i sees.

  Returns:
    [B, Tq, N, E] in q's dtype. A query that sees no key gets zeros (and zero gradients).
  """
  masks_lib.check_causal(causal)
  b, tq, tk, n, kh, s, e = _check_qkv(q, k, v)
  kind = _check_kind(kind)
  g = n // kh
  if logn_train_len and kind != "softmax":
    raise ValueError(f"logn_train_len applies to kind='softmax', not {kind!r}")
  if logn_train_len:
    _checks.positive_int(logn_train_len, "logn_train_len", minimum=2)
  per_row_n = scale is None and kind == "relu2" and kv_mask is not None  # 1/n from the mask below
  if scale is None:
    scale = 1.0 if per_row_n else 1.0 / tk if kind == "relu2" else 1.0 / math.sqrt(s)
  f32 = jnp.float32
  logits = jnp.einsum("btkgs,bjks->bkgtj", q.reshape(b, tq, kh, g, s).astype(f32), k.astype(f32),
                      preferred_element_type=f32) * scale  # [B, K, G, Tq, Tk]
  valid = None
  if causal:
    valid = (jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None] + (tk - tq))[None, None, None]
  if kv_mask is not None:
    kv_mask = jnp.asarray(kv_mask)
    if kv_mask.shape != (b, tk):
      raise ValueError(f"kv_mask must be [B, Tk] = {(b, tk)}, got shape {kv_mask.shape}")
    if kv_mask.dtype != jnp.bool_:  # 0.5 or 2 would count as True
      raise ValueError(f"kv_mask must be boolean (True: a key to attend to), got dtype "
                       f"{kv_mask.dtype}")
    keys = kv_mask[:, None, None, None, :]
    valid = keys if valid is None else valid & keys
    if per_row_n:
      n_B = jnp.maximum(jnp.sum(keys, axis=-1, keepdims=True, dtype=jnp.int32), 1)
      logits = logits / n_B.astype(f32)
  if logn_train_len:
    if valid is None:
      count = jnp.full((1, 1, 1, tq, 1), tk, jnp.int32)
    else:
      count = jnp.sum(jnp.broadcast_to(valid, (valid.shape[0], 1, 1, tq, tk)), axis=-1,
                      keepdims=True, dtype=jnp.int32)
    logits = logits * logn_scale(count - 1, logn_train_len)
  if bias is not None:
    logits = logits + _bias_grouped(bias, b, kh, g, tq, tk, "bias")
  w = _weights(logits, valid, kind)
  out = jnp.einsum("bkgtj,bjke->btkge", w, v.astype(f32), preferred_element_type=f32)
  return out.reshape(b, tq, n, e).astype(q.dtype)


def _chunked(x: jax.Array, nc: int, c: int) -> jax.Array:
  """[B, T, ...] -> [B, nc, c, ...], zero-padding T up to nc * c."""
  t = x.shape[1]
  x = jnp.pad(x, [(0, 0), (0, nc * c - t)] + [(0, 0)] * (x.ndim - 2))
  return x.reshape(x.shape[0], nc, c, *x.shape[2:])


def mixed_chunk_attention(quad_q: jax.Array, quad_k: jax.Array, lin_q: jax.Array, lin_k: jax.Array,
                          v: jax.Array, *, chunk_size: int = 256, causal: bool = False,
                          kind: str = "relu2", quad_scale: Optional[float] = None,
                          linear_scale: Optional[float] = None,
                          bias: Optional[jax.Array] = None) -> jax.Array:
  """FLASH mixed chunk attention (Hua et al. 2022, sec. 3.2, [F1]-[F3]): V_quad + V_lin.

  Quadratic attention inside each chunk of `chunk_size` tokens plus (unnormalised) linear attention
  across chunks: over all chunks (non-causal, [F2]) or over the chunks strictly before the query's
  chunk (causal, [F3]: an exclusive cumulative sum of per-chunk states). Self-attention: all inputs
  share the length T, which need not be a multiple of chunk_size (the tail is zero-padded and padded
  keys are masked out of the quadratic part and contribute zero to the linear part).

  Args:
    quad_q, lin_q: [B, T, N, S]. quad_k, lin_k: [B, T, K, S]. v: [B, T, K, E]. N % K == 0.
    chunk_size: C, a static positive int.
    causal: quadratic part masked to j <= i inside the chunk; linear part over earlier chunks only.
    kind: "relu2" (the paper) or "softmax" (softmax over the visible keys of the chunk) for the
      quadratic part.
    quad_scale: logit multiplier of the quadratic part; default 1/C for relu2 (the paper's
      pseudo-code), 1/sqrt(S) for softmax.
    linear_scale: multiplier of the linear part; default 1/C (the paper's pseudo-code).
    bias: broadcastable to [B, N, C, C]: the same in-chunk relative bias added to every chunk's logits.

  Returns:
    [B, T, N, E] in quad_q's dtype (computed in float32).
  """
  masks_lib.check_causal(causal)
  b, t, _, n, kh, s, e = _check_qkv(quad_q, quad_k, v, "quad_q", "quad_k", "v")
  for name, x, ref in (("lin_q", lin_q, quad_q), ("lin_k", lin_k, quad_k)):
    if not hasattr(x, "shape") or x.shape != ref.shape:
      raise ValueError(f"{name} must have the shape of {'quad_q' if ref is quad_q else 'quad_k'} "
                       f"{ref.shape}, got {getattr(x, 'shape', None)}")
  if quad_q.shape[1] != quad_k.shape[1]:
    raise ValueError(f"mixed chunk attention is self-attention: quad_q length {quad_q.shape[1]} must "
                     f"equal quad_k length {quad_k.shape[1]}")
  c = _checks.positive_int(chunk_size, "chunk_size")
  kind = _check_kind(kind)
  if quad_scale is None:
    quad_scale = 1.0 / c if kind == "relu2" else 1.0 / math.sqrt(s)
  if linear_scale is None:
    linear_scale = 1.0 / c
  g = n // kh
  nc = -(-t // c)
  f32 = jnp.float32
  qq = _chunked(quad_q.astype(f32), nc, c).reshape(b, nc, c, kh, g, s)
  qk = _chunked(quad_k.astype(f32), nc, c)
  lq = _chunked(lin_q.astype(f32), nc, c).reshape(b, nc, c, kh, g, s)
  lk = _chunked(lin_k.astype(f32), nc, c)  # padded keys are 0: no linear contribution
  vc = _chunked(v.astype(f32), nc, c)

  # Quadratic part, [F1]: [B, nc, K, G, C, C] weights, one chunk at a time in parallel.
  logits = jnp.einsum("bnikgs,bnjks->bnkgij", qq, qk, preferred_element_type=f32) * quad_scale
  if bias is not None:
    logits = logits + _bias_grouped(bias, b, kh, g, c, c, "bias")[:, None]
  valid = (jnp.arange(nc * c) < t).reshape(1, nc, 1, 1, 1, c)
  if causal:
    valid = valid & jnp.tril(jnp.ones((c, c), bool))
  w = _weights(logits, valid, kind)
  out = jnp.einsum("bnkgij,bnjke->bnikge", w, vc, preferred_element_type=f32)

  # Linear part, [F2] / [F3].
  if causal:
    state = jnp.einsum("bnjks,bnjke->bnkse", lk, vc, preferred_element_type=f32) * linear_scale
    before = jnp.concatenate([jnp.zeros_like(state[:, :1]), jnp.cumsum(state, axis=1)[:, :-1]],
                             axis=1)  # chunks h < g
    out = out + jnp.einsum("bnikgs,bnkse->bnikge", lq, before, preferred_element_type=f32)
  else:
    state = jnp.einsum("bnjks,bnjke->bkse", lk, vc, preferred_element_type=f32) * linear_scale
    out = out + jnp.einsum("bnikgs,bkse->bnikge", lq, state, preferred_element_type=f32)
  return out.reshape(b, nc * c, n, e)[:, :t].astype(quad_q.dtype)


class FlashDecodeState(NamedTuple):
  """Causal FLASH decoding state after `index` tokens (r = index % C of them in the current chunk)."""
  linear: jax.Array  # [B, K, S, E] float32: linear_scale * sum over completed chunks of lin_k^T v
  quad_k: jax.Array  # [B, C, K, S]: the current chunk's quadratic keys (slots >= r are stale)
  lin_k: jax.Array   # [B, C, K, S]: the current chunk's linear keys
  v: jax.Array       # [B, C, K, E]: the current chunk's values
  index: jax.Array   # int32 scalar: tokens seen so far (the same for the whole batch)


def flash_init_state(batch: int, num_kv_heads: int, qk_dim: int, value_dim: int, chunk_size: int,
                     dtype=jnp.float32) -> FlashDecodeState:
  """Empty decoding state; the chunk buffers have `dtype`, the linear state is float32."""
  c = _checks.positive_int(chunk_size, "chunk_size")
  buf = lambda d: jnp.zeros((batch, c, num_kv_heads, d), dtype)
  return FlashDecodeState(jnp.zeros((batch, num_kv_heads, qk_dim, value_dim), jnp.float32),
                          buf(qk_dim), buf(qk_dim), buf(value_dim), jnp.array(0, jnp.int32))


def flash_prefill_state(quad_k: jax.Array, lin_k: jax.Array, v: jax.Array, *, chunk_size: int,
                        linear_scale: Optional[float] = None) -> FlashDecodeState:
  """The decoding state after the T tokens of a prompt (quad_k, lin_k [B, T, K, S], v [B, T, K, E]).

  Pair with `mixed_chunk_attention(..., causal=True)` on the prompt for its outputs; `flash_step`
  then continues at position T.
  """
  _check_qkv(quad_k, quad_k, v, "quad_k", "quad_k", "v")
  if lin_k.shape != quad_k.shape:
    raise ValueError(f"lin_k must have the shape of quad_k {quad_k.shape}, got {lin_k.shape}")
  c = _checks.positive_int(chunk_size, "chunk_size")
  linear_scale = 1.0 / c if linear_scale is None else linear_scale
  b, t, kh, s = quad_k.shape
  done = (t // c) * c
  f32 = jnp.float32
  linear = jnp.einsum("bjks,bjke->bkse", lin_k[:, :done].astype(f32), v[:, :done].astype(f32),
                      preferred_element_type=f32) * linear_scale
  fill = lambda x: jnp.zeros((b, c) + x.shape[2:], x.dtype).at[:, :t - done].set(x[:, done:])
  return FlashDecodeState(linear, fill(quad_k), fill(lin_k), fill(v), jnp.array(t, jnp.int32))


def flash_step(quad_q_t: jax.Array, quad_k_t: jax.Array, lin_q_t: jax.Array, lin_k_t: jax.Array,
               v_t: jax.Array, state: FlashDecodeState, *, kind: str = "relu2",
               quad_scale: Optional[float] = None, linear_scale: Optional[float] = None,
               bias: Optional[jax.Array] = None) -> tuple[jax.Array, FlashDecodeState]:
  """One token of causal FLASH ([F1] + [F3]): returns (out [B, 1, N, E], new state).

  Args:
    quad_q_t, lin_q_t: [B, 1, N, S]. quad_k_t, lin_k_t: [B, 1, K, S]. v_t: [B, 1, K, E].
    state: from `flash_init_state` / `flash_prefill_state` / a previous step; its chunk size C is the
      buffers' length. kind, quad_scale, linear_scale, bias: as in `mixed_chunk_attention` (must match
      to reproduce it; bias broadcastable to [B, N, C, C], its row r = index % C is used).

  The token at position p = state.index sits in slot r = p % C of the current chunk and attends
  quadratically to slots 0..r and linearly to the completed chunks; when r == C - 1 the chunk is
  folded into the linear state. Output at p equals `mixed_chunk_attention(..., causal=True)` at p.
  """
  b, one, _, n, kh, s, e = _check_qkv(quad_q_t, quad_k_t, v_t, "quad_q_t", "quad_k_t", "v_t")
  if one != 1 or quad_k_t.shape[1] != 1:
    raise ValueError(f"flash_step takes one token: quad_q_t {quad_q_t.shape} and quad_k_t "
                     f"{quad_k_t.shape} must have length 1")
  if lin_q_t.shape != quad_q_t.shape or lin_k_t.shape != quad_k_t.shape:
    raise ValueError(f"lin_q_t {lin_q_t.shape} / lin_k_t {lin_k_t.shape} must match quad_q_t "
                     f"{quad_q_t.shape} / quad_k_t {quad_k_t.shape}")
  kind = _check_kind(kind)
  c = state.quad_k.shape[1]
  if (state.quad_k.shape != (b, c, kh, s) or state.lin_k.shape != (b, c, kh, s)
      or state.v.shape != (b, c, kh, e) or state.linear.shape != (b, kh, s, e)):
    raise ValueError(f"state shapes (linear {state.linear.shape}, quad_k {state.quad_k.shape}, "
                     f"lin_k {state.lin_k.shape}, v {state.v.shape}) do not match B={b}, K={kh}, "
                     f"S={s}, E={e} and chunk size C={c} (quad_k's length)")
  if quad_scale is None:
    quad_scale = 1.0 / c if kind == "relu2" else 1.0 / math.sqrt(s)
  if linear_scale is None:
    linear_scale = 1.0 / c
  g = n // kh
  f32 = jnp.float32
  r = state.index % c
  put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), r, axis=1)
  quad_k, lin_k, v = put(state.quad_k, quad_k_t), put(state.lin_k, lin_k_t), put(state.v, v_t)

  qq = quad_q_t[:, 0].astype(f32).reshape(b, kh, g, s)
  logits = jnp.einsum("bkgs,bjks->bkgj", qq, quad_k.astype(f32), preferred_element_type=f32)
  logits = logits * quad_scale
  if bias is not None:
    row = jax.lax.dynamic_index_in_dim(_bias_grouped(bias, b, kh, g, c, c, "bias"), r, axis=3,
                                       keepdims=False)
    logits = logits + row
  w = _weights(logits, jnp.arange(c) <= r, kind)
  out = jnp.einsum("bkgj,bjke->bkge", w, v.astype(f32), preferred_element_type=f32)
  lq = lin_q_t[:, 0].astype(f32).reshape(b, kh, g, s)
  out = out + jnp.einsum("bkgs,bkse->bkge", lq, state.linear, preferred_element_type=f32)

  chunk = jnp.einsum("bjks,bjke->bkse", lin_k.astype(f32), v.astype(f32),
                     preferred_element_type=f32) * linear_scale
  linear = jnp.where(r == c - 1, state.linear + chunk, state.linear)
  new = FlashDecodeState(linear, quad_k, lin_k, v, state.index + 1)
  return out.reshape(b, 1, n, e).astype(quad_q_t.dtype), new
