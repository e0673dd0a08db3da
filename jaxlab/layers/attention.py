"""Multi-head (grouped-query) self-attention as a thin Linen wrapper over `jaxlab.attention`.

The module owns the projections and the KV cache; the maths is `attention.dot_product_attention`.
Parameters carry logical axis names ("embed", "heads", "kv"); `jaxlab.train.sharding` maps them to a mesh.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab import attention, positions as positions_lib
from jaxlab.layers.dense import Dense

POSITION_IN_ATTENTION = ("rope",)


class MultiHeadAttention(nn.Module):
  """Self-attention x_BTD -> y_BTD with N query heads and K key/value heads (N % K == 0).

  Attributes:
    num_heads, num_kv_heads, head_dim: N, K, H.
    causal: causal self-attention.
    position: "rope" rotates q and k here; any other value leaves them alone (handled by the model).
    rope_theta: RoPE base.
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
    if self.position == "rope":
      q_BTNH = positions_lib.apply_rope(q_BTNH, positions_BT, theta=self.rope_theta)
      k_BTKH = positions_lib.apply_rope(k_BTKH, positions_BT, theta=self.rope_theta)

    if decode:
      out_BTNH = self._cached_attention(q_BTNH, k_BTKH, v_BTKH)
    else:
      out_BTNH = attention.dot_product_attention(
          q_BTNH, k_BTKH, v_BTKH, causal=self.causal, q_segment_ids=segment_ids_BT,
          kv_segment_ids=segment_ids_BT, implementation=self.implementation)

    return Dense((x_BTD.shape[-1],), ("heads", "kv", "embed"), in_dims=2, use_bias=self.use_bias,
                 init_std=self.out_init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="out")(out_BTNH)

  def _cached_attention(self, q_BTNH, k_BTKH, v_BTKH):
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
                                             implementation=self.implementation)
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BTKH, (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BTKH, (0, i, 0, 0))
    index.value = i + t
    if t > 1:
      # Prefill (the cache was empty): ordinary causal attention over the prompt itself.
      return attention.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, causal=self.causal,
                                             implementation=self.implementation)
    lengths_B = jnp.full((b,), i + 1, jnp.int32)
    return attention.dot_product_attention(q_BTNH, cached_k.value, cached_v.value,
                                           kv_lengths=lengths_B, implementation=self.implementation)
