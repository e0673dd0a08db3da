"""Linen wrappers for the gated attention unit and FLASH (Hua et al. 2022, "Transformer Quality in
Linear Time", arXiv:2202.10447); the maths is in `jaxlab.attention.gau`.

Both layers map x_BTD -> y_BTD and replace a transformer block's attention AND its MLP (the paper
stacks GAUs only, each as x + layer(norm(x)); the pre-norm and the residual belong to the block, as for
`MultiHeadAttention`). They own the parameters of (labels [G1]-[F4] as in `jaxlab.attention.gau`):

    U = silu(X W_u), V = silu(X W_v)   [B, T, e]        Dense "uv", kernel [D, 2, e]
    Z = silu(X W_z)                    [B, T, s]        Dense "z", kernel [D, s]
    per-dim scale/offset of Z          gamma, beta [M, s] (M = 2 for GAU: q, k;
                                                       M = 4 for FLASH: quad q, quad k, lin q, lin k)
    O = (U * attention(...)) W_o       [B, T, D]        Dense "out", kernel [e, D]

Positions: `position="rope"` rotates every query/key transform with RoPE (the paper's FLASH uses RoPE;
the linear part stays exact because it only sums dot products of rotated vectors). FlashLayer can also
learn an in-chunk relative position bias (`relative_bias=True`: one scalar per offset j - i, the
paper's rel_pos_bias inside a chunk).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab import positions as positions_lib
from jaxlab.attention import gau as gau_lib
from jaxlab.layers.attention import cache_exists
from jaxlab.layers.dense import Dense

POSITIONS = ("none", "rope")


class _GauProjections(nn.Module):
  """U, V [B, T, e] and `num_transforms` scale/offset transforms of Z, [B, T, M, s] (sec. 2, [G1])."""

  expansion_dim: int
  qk_dim: int
  num_transforms: int
  offset_init: float
  use_bias: bool
  init_std: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x_BTD):
    dense = lambda features, axes, name: Dense(features, axes, use_bias=self.use_bias,
                                               init_std=self.init_std, dtype=self.dtype,
                                               param_dtype=self.param_dtype, name=name)
    uv_BT2E = nn.silu(dense((2, self.expansion_dim), ("embed", None, "mlp"), "uv")(x_BTD))
    z_BTS = nn.silu(dense((self.qk_dim,), ("embed", "kv"), "z")(x_BTD))
    shape = (self.num_transforms, self.qk_dim)
    gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             (None, "kv")), shape, self.param_dtype)
    beta = self.param("beta", nn.with_logical_partitioning(
        nn.initializers.constant(self.offset_init), (None, "kv")), shape, self.param_dtype)
    return uv_BT2E[:, :, 0], uv_BT2E[:, :, 1], gau_lib.scale_offset(z_BTS, gamma, beta)


def _check_common(module, positions_BT, x_BTD):
  if x_BTD.ndim != 3:
    raise ValueError(f"x_BTD must be [batch, length, width], got shape {x_BTD.shape}")
  if module.position not in POSITIONS:
    raise ValueError(f"position must be one of {POSITIONS}, got {module.position!r}")
  if module.position == "rope" and positions_BT is None:
    raise ValueError("positions_BT is required with position='rope'")
  if positions_BT is not None and positions_BT.shape != x_BTD.shape[:2]:
    raise ValueError(f"positions_BT must be [B, T] = {x_BTD.shape[:2]}, got {positions_BT.shape}")


def _rotate(module, x_BTMS, positions_BT):
  if module.position == "rope":
    return positions_lib.apply_rope(x_BTMS, positions_BT, theta=module.rope_theta)
  return x_BTMS


class GatedAttentionUnit(nn.Module):
  """GAU (Hua et al. 2022, sec. 2, [G1]-[G2]): y = (U * A V) W_o with A from a shared Z [B, T, s].

  Attributes:
    expansion_dim: e (the paper: 2 * width). qk_dim: s (the paper: 128).
    causal: causal self-attention.
    kind: "relu2" (A = relu(scale q.k)^2, scale = 1/T, or with kv_mask_BT 1/(the row's unmasked
      tokens), unless `scale` is given) or "softmax"
      (scale 1/sqrt(s), optional log-n factor with logn_train_len > 0).
    scale: logit multiplier; None = the `gau_attention` default. The relu2 default depends on the
      input length T: set it (e.g. 1/train_len) for a layer that must behave the same at other lengths.
    position: "none" | "rope" (then positions_BT is required).
    offset_init: initial value of every offset beta (the paper: 0). With the paper's init
      (gamma ~ N(0, 0.02), beta = 0) the relu^2 logits start near 1e-6, where relu^2 has almost no
      gradient, and a GAU-only LM barely trains (experiments/results/gau_flash_lm.md: val loss 3.0
      against 2.0 for softmax attention); offset_init=0.5 (positive logits from the start) or
      kind="softmax" train normally. FlashLayer's linear part has no such dead zone.
  Quadratic in T (it is the paper's GAU; `FlashLayer` is the linear-time form).

  Decoding (causal only): call with `decode=True`. `init(..., decode=True)` with an input of the full
  decoding length L creates the "cache" collection: the rotated keys [B, L, 1, s] and values
  [B, L, 1, e] of the tokens so far and "cache_index" (the next free slot). Each call then appends its
  T tokens there, and each attends to the slots up to its own (a prompt on an empty cache, one token,
  or several on a non-empty one as in speculative decoding; setting "cache_index" back drops the
  tokens after it). It reproduces the full causal pass when the relu2 `scale` is fixed (None would
  mean 1/(tokens so far) at each step instead of 1/T), so decoding refuses relu2 without one.
  """

  expansion_dim: int
  qk_dim: int = 128
  causal: bool = True
  kind: str = "relu2"
  scale: Optional[float] = None
  logn_train_len: int = 0
  position: str = "none"
  rope_theta: float = 10000.0
  offset_init: float = 0.0
  use_bias: bool = False
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: Optional[jax.Array] = None, *,
               kv_mask_BT: Optional[jax.Array] = None, decode: bool = False) -> jax.Array:
    """x_BTD [B, T, D] -> [B, T, D]. kv_mask_BT: [B, T] bool, False tokens are not attended to.
    decode=True: against the KV cache (see the class docstring)."""
    _check_common(self, positions_BT, x_BTD)
    if decode:
      if not self.causal:
        raise ValueError("decode=True needs causal=True (non-causal GAU sees the whole sequence)")
      if kv_mask_BT is not None:
        raise ValueError("kv_mask_BT does not apply with decode=True (the cache masks its own "
                         "unfilled slots)")
      if self.kind == "relu2" and self.scale is None:
        raise ValueError("decode=True with kind='relu2' needs a fixed `scale` (the training "
                         "length's 1/T): the default 1/T would change with every decoding step")
    u_BTE, v_BTE, qk_BT2S = _GauProjections(self.expansion_dim, self.qk_dim, 2, self.offset_init,
                                            self.use_bias, self.init_std, self.dtype,
                                            self.param_dtype, name="proj")(x_BTD)
    qk_BT2S = _rotate(self, qk_BT2S, positions_BT)
    q_BT1S, k_BT1S, v_BT1E = qk_BT2S[:, :, 0:1], qk_BT2S[:, :, 1:2], v_BTE[:, :, None]
    attend = lambda q, k, v, kv_mask, causal: gau_lib.gau_attention(
        q, k, v, causal=causal, kind=self.kind, scale=self.scale, kv_mask=kv_mask,
        logn_train_len=self.logn_train_len)
    if decode:
      a_BT1E = self._cached_attention(q_BT1S, k_BT1S, v_BT1E, attend)
    else:
      a_BT1E = attend(q_BT1S, k_BT1S, v_BT1E, kv_mask_BT, self.causal)
    return Dense((x_BTD.shape[-1],), ("mlp", "embed"), use_bias=self.use_bias,
                 init_std=self.out_init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="out")(u_BTE * a_BT1E[:, :, 0])

  def _cached_attention(self, q_BT1S, k_BT1S, v_BT1E, attend):
    """Appends k and v at "cache_index"; appended token i attends to the cache slots <= index + i."""
    is_initialized = cache_exists(self, "cached_key")
    b, t = k_BT1S.shape[:2]
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BT1S.shape, k_BT1S.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BT1E.shape, v_BT1E.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:  # initialisation pass: the cache's shapes only (L = this input's T)
      return attend(q_BT1S, k_BT1S, v_BT1E, None, True)
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BT1S.astype(cached_k.value.dtype),
                                                  (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BT1E.astype(cached_v.value.dtype),
                                                  (0, i, 0, 0))
    index.value = i + t
    slots_L = jnp.arange(cached_k.value.shape[1])

    def one_query(q_B11S, last_slot):
      kv_mask_BL = jnp.broadcast_to(slots_L <= last_slot, (b, slots_L.shape[0]))
      return attend(q_B11S, cached_k.value, cached_v.value, kv_mask_BL, False)

    a_TB11E = jax.vmap(one_query, in_axes=(1, 0))(q_BT1S[:, :, None], i + jnp.arange(t))
    # Past the cache's end dynamic_update_slice clamps the write onto the last slots: NaN rather
    # than silently wrong outputs, as MultiHeadAttention's cache (the index is traced: no raise).
    return jnp.where(i + t > slots_L.shape[0], jnp.nan, jnp.moveaxis(a_TB11E[:, :, 0], 0, 1))


class FlashLayer(nn.Module):
  """FLASH (Hua et al. 2022, sec. 3.2, [F1]-[F4]): GAU with mixed chunk attention, linear in T.

  Attributes:
    expansion_dim, qk_dim: e, s as in GatedAttentionUnit.
    chunk_size: C (the paper: 256). causal: [F3] instead of [F2].
    kind: quadratic part, "relu2" (the paper) or "softmax".
    quad_scale, linear_scale: None = 1/C (relu2; 1/sqrt(s) for softmax) and 1/C, as in the paper.
    relative_bias: learn one bias per in-chunk offset j - i (2C - 1 scalars), added to the quadratic
      logits.
    position: "none" | "rope".
    offset_init: initial value of the offsets beta (the paper: 0; see GatedAttentionUnit).

  Decoding (causal only): call with `decode=True`. `init(..., decode=True)` creates the "cache"
  collection (a `jaxlab.attention.gau.FlashDecodeState`: the linear state of completed chunks and the
  current chunk's keys/values, O(C * s + s * e) per sequence, independent of the length). Then a call
  with T > 1 is the prefill of an empty cache and a call with T == 1 appends one token (pass its
  position in positions_BT for RoPE).
  """

  expansion_dim: int
  qk_dim: int = 128
  chunk_size: int = 256
  causal: bool = True
  kind: str = "relu2"
  quad_scale: Optional[float] = None
  linear_scale: Optional[float] = None
  relative_bias: bool = False
  position: str = "none"
  rope_theta: float = 10000.0
  offset_init: float = 0.0
  use_bias: bool = False
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: Optional[jax.Array] = None, *,
               decode: bool = False) -> jax.Array:
    """x_BTD [B, T, D] -> [B, T, D]."""
    _check_common(self, positions_BT, x_BTD)
    if decode and not self.causal:
      raise ValueError("decode=True needs causal=True (non-causal FLASH sees the whole sequence)")
    c = self.chunk_size
    u_BTE, v_BTE, t_BT4S = _GauProjections(self.expansion_dim, self.qk_dim, 4, self.offset_init,
                                           self.use_bias, self.init_std, self.dtype,
                                           self.param_dtype, name="proj")(x_BTD)
    t_BT4S = _rotate(self, t_BT4S, positions_BT)
    qq, qk, lq, lk = (t_BT4S[:, :, i:i + 1] for i in range(4))  # each [B, T, 1, s]
    v_BT1E = v_BTE[:, :, None]
    bias_CC = None
    if self.relative_bias:
      table = self.param("relative_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                        (None,)),
                         (2 * c - 1,), self.param_dtype)
      bias_CC = table[jnp.arange(c)[None, :] - jnp.arange(c)[:, None] + c - 1]
    opts = dict(kind=self.kind, quad_scale=self.quad_scale, linear_scale=self.linear_scale,
                bias=bias_CC)
    full = lambda: gau_lib.mixed_chunk_attention(qq, qk, lq, lk, v_BT1E, chunk_size=c,
                                                 causal=self.causal, **opts)
    if decode:
      a_BT1E = self._decode(qq, qk, lq, lk, v_BT1E, full, opts)
    else:
      a_BT1E = full()
    return Dense((x_BTD.shape[-1],), ("mlp", "embed"), use_bias=self.use_bias,
                 init_std=self.out_init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="out")(u_BTE * a_BT1E[:, :, 0])

  def _decode(self, qq, qk, lq, lk, v, full, opts):
    """Causal FLASH against the decoding state in the "cache" collection (see the class docstring)."""
    is_initialized = cache_exists(self, "linear")
    b, t, kh, s = qk.shape
    zero = gau_lib.flash_init_state(b, kh, s, v.shape[-1], self.chunk_size, qk.dtype)
    cache = [self.variable("cache", name, lambda x=x: x) for name, x in zip(zero._fields, zero)]
    if not is_initialized:  # initialisation pass: shapes only
      return full()
    if t == 1:
      out, state = gau_lib.flash_step(qq, qk, lq, lk, v, gau_lib.FlashDecodeState(
          *(var.value for var in cache)), **opts)
    else:  # a prefill, which needs an empty cache: several tokens appended to a non-empty one
      # (which the chunk state cannot take) make the outputs NaN rather than silently wrong
      out = jnp.where(cache[-1].value == 0, full(), jnp.nan)
      state = gau_lib.flash_prefill_state(qk, lk, v, chunk_size=self.chunk_size,
                                          linear_scale=self.linear_scale)
    for var, value in zip(cache, state):
      var.value = value
    return out
