"""Multi-head (grouped-query) self-attention as a thin Linen wrapper over `jaxlab.attention`.

The module owns the projections, the KV cache and any learned position table (T5); the maths is
`attention.dot_product_attention` and `jaxlab.positions`. Parameters carry logical axis names
("embed", "kv_heads", "kv"); `jaxlab.train.sharding` maps them to a mesh.

Position encodings handled here (the model adds absolute ones to the embeddings):
  "rope" / "xpos" rotate (and for xPos scale) q and k; "alibi" / "t5" add a bias to the logits.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab import attention, positions as positions_lib
from jaxlab.layers.dense import Dense

class MultiHeadAttention(nn.Module):
  """Self-attention x_BTD -> y_BTD with N query heads and K key/value heads (N % K == 0).

  Attributes:
    num_heads, num_kv_heads, head_dim: N, K, H.
    causal: causal self-attention.
    position: "rope"/"xpos" rotate q and k, "alibi"/"t5" add a logit bias; others: handled by the model.
    rope_theta, rope_scaling, rotary_fraction: RoPE base, context extension (PI/NTK/YaRN...) and
      the fraction of head_dim rotated. YaRN's attention temperature is applied to q and k here.
    implementation: passed to `attention.dot_product_attention`.
    use_bias: biases in the projections.
    out_init_std: init std of the output projection (GPT-2 scales it by 1/sqrt(2 * layers)).
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  causal: bool = True
  position: str = "learned"
  rope_theta: float = 10000.0
  rope_scaling: Optional[positions_lib.RopeScaling] = None
  rotary_fraction: float = 1.0
  logn_train_len: int = 0  # > 0: scale queries by max(1, log n / log train_len) (log-n scaling)
  implementation: Optional[str] = None
  use_bias: bool = False
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, *,
               segment_ids_BT: Optional[jax.Array] = None, decode: bool = False) -> jax.Array:
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    b, t, _ = x_BTD.shape
    k_heads, group = self.num_kv_heads, self.num_heads // self.num_kv_heads
    # One fused projection; per kv head: its `group` query heads, then its key, then its value, so
    # that sharding the kv-head axis keeps every group (and its K/V) on one device.
    qkv_BTKGH = Dense((k_heads, group + 2, self.head_dim), ("embed", "kv_heads", None, "kv"),
                      use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="qkv")(x_BTD)
    q_BTNH = qkv_BTKGH[:, :, :, :group].reshape(b, t, self.num_heads, self.head_dim)
    k_BTKH = qkv_BTKGH[:, :, :, group]
    v_BTKH = qkv_BTKGH[:, :, :, group + 1]
    q_BTNH, k_BTKH = self._rotate(q_BTNH, k_BTKH, positions_BT)
    if self.logn_train_len:
      q_BTNH = q_BTNH * positions_lib.logn_scale(positions_BT, self.logn_train_len)[
          :, :, None, None].astype(q_BTNH.dtype)

    if decode:
      out_BTNH = self._cached_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT)
    else:
      out_BTNH = attention.dot_product_attention(
          q_BTNH, k_BTKH, v_BTKH, causal=self.causal, q_segment_ids=segment_ids_BT,
          kv_segment_ids=segment_ids_BT, bias=self._bias(positions_BT, positions_BT),
          implementation=self.implementation)

    return Dense((x_BTD.shape[-1],), ("heads", "kv", "embed"), in_dims=2, use_bias=self.use_bias,
                 init_std=self.out_init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="out")(out_BTNH)

  def _rotate(self, q_BTNH, k_BTKH, positions_BT):
    if self.position == "rope":
      rope = lambda x: positions_lib.apply_rope(x, positions_BT, theta=self.rope_theta,
                                                scaling=self.rope_scaling,
                                                rotary_fraction=self.rotary_fraction)
      q_BTNH, k_BTKH = rope(q_BTNH), rope(k_BTKH)
      if self.rope_scaling is not None and self.rope_scaling.kind == "yarn":
        # YaRN sec. 3.4: logits scaled by 1/t with sqrt(1/t) = 0.1 ln(s) + 1, on q and k.
        temperature = positions_lib.yarn_attention_factor(self.rope_scaling.factor)
        q_BTNH, k_BTKH = q_BTNH * temperature, k_BTKH * temperature
    elif self.position == "xpos":
      q_BTNH, k_BTKH = positions_lib.apply_xpos(q_BTNH, k_BTKH, positions_BT, positions_BT,
                                                theta=self.rope_theta)
    return q_BTNH, k_BTKH

  def _bias(self, q_positions_BT, kv_positions_BT) -> Optional[jax.Array]:
    """ALiBi or T5 logit bias [B, N, Tq, Tk] from explicit positions; None for other encodings."""
    if self.position == "alibi":
      return positions_lib.alibi_bias_from_positions(self.num_heads, q_positions_BT,
                                                     kv_positions_BT, causal=self.causal)
    if self.position == "t5":
      return positions_lib.T5RelativeBias(self.num_heads, bidirectional=not self.causal,
                                          name="relative_bias")(
          q_positions_BT.shape[1], kv_positions_BT.shape[1], q_positions=q_positions_BT,
          kv_positions=kv_positions_BT)
    return None

  def _cached_attention(self, q_BTNH, k_BTKH, v_BTKH, positions_BT):
    """Attention against a KV cache in the "cache" collection.

    The cache is created by `init` with the full decoding length as T (call `model.init(..., decode=True)`
    with an input of shape [B, max_len]). Afterwards a call with T > 1 is a prefill of an empty cache, and a
    call with T == 1 appends one token and attends to everything cached so far.
    """
    is_initialized = self.has_variable("cache", "cached_key")
    b, t, kh, h = k_BTKH.shape
    cached_k = self.variable("cache", "cached_key", jnp.zeros, (b, t, kh, h), k_BTKH.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, (b, t, kh, h), v_BTKH.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      # Initialisation pass: shapes only, plain causal attention.
      return attention.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, causal=self.causal,
                                             bias=self._bias(positions_BT, positions_BT),
                                             implementation=self.implementation)
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BTKH, (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BTKH, (0, i, 0, 0))
    index.value = i + t
    if t > 1:
      # Prefill (the cache was empty): ordinary causal attention over the prompt itself.
      return attention.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, causal=self.causal,
                                             bias=self._bias(positions_BT, positions_BT),
                                             implementation=self.implementation)
    # Cache slot j holds position j (tokens are written in order from 0).
    max_len = cached_k.value.shape[1]
    kv_positions_BT = jnp.broadcast_to(jnp.arange(max_len, dtype=positions_BT.dtype), (b, max_len))
    lengths_B = jnp.full((b,), i + 1, jnp.int32)
    return attention.dot_product_attention(q_BTNH, cached_k.value, cached_v.value,
                                           kv_lengths=lengths_B,
                                           bias=self._bias(positions_BT, kv_positions_BT),
                                           implementation=self.implementation)
