"""ALiBi: attention with linear biases (Press et al. 2022, "Train Short, Test Long", sec. 3).

The logit of query i for key j gets -m_h * (i - j) for head h with slope m_h. Slopes follow the
reference code (github.com/ofirpress/attention_with_linear_biases, `get_slopes`):
  n a power of two: m_h = 2^(-8 (h + 1) / n), h = 0 .. n-1 (geometric, start = ratio = 2^(-8/n));
  otherwise, with c = 2^floor(log2 n): the c slopes for c heads, followed by the slopes for 2c heads
  taken at indices 0, 2, 4, ... (the first n - c of them).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlab.positions import _checks


def _slopes_power_of_2(n: int) -> list:
  start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
  return [start * start ** i for i in range(n)]


def _slopes(n: int) -> list:
  if math.log2(n).is_integer():
    return _slopes_power_of_2(n)
  closest = 2 ** math.floor(math.log2(n))
  return _slopes_power_of_2(closest) + _slopes(2 * closest)[0::2][: n - closest]


def alibi_slopes(num_heads: int) -> jax.Array:
  """Head slopes m_h, float32 [num_heads], exactly as the ALiBi reference code (see module doc)."""
  n = _checks.positive_int(num_heads, "num_heads")
  return jnp.asarray(_slopes(n), dtype=jnp.float32)


def _bias(slopes: jax.Array, distance: jax.Array, causal: bool) -> jax.Array:
  dist = jnp.maximum(distance, 0) if causal else jnp.abs(distance)
  return -slopes[:, None, None] * dist.astype(jnp.float32)


def alibi_bias(num_heads: int, q_len: int, kv_len: int, *, causal: bool = True) -> jax.Array:
  """ALiBi bias, float32 [1, num_heads, q_len, kv_len], to add to attention logits.

  End-aligned like `attention.dot_product_attention(causal=True)`: query i sits at key coordinate
  i' = i + kv_len - q_len (so q_len=1 is the last token when decoding), distance d = i' - j.
    causal=True:  bias = -m_h * d for keys j <= i'; keys j > i' get 0 (they must be removed by the
                  causal mask, which this bias does not apply).
    causal=False: bias = -m_h * |d| (the symmetric bidirectional variant).
  """
  n = _checks.positive_int(num_heads, "num_heads")
  q_len = _checks.positive_int(q_len, "q_len")
  kv_len = _checks.positive_int(kv_len, "kv_len")
  return _alibi_bias_jit(n, q_len, kv_len, _checks.boolean(causal, "causal"))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _alibi_bias_jit(num_heads, q_len, kv_len, causal):
  slopes = jnp.asarray(_slopes(num_heads), jnp.float32)
  q = jnp.arange(q_len, dtype=jnp.int32)[:, None] + (kv_len - q_len)
  k = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
  return _bias(slopes, q - k, causal)[None]


def alibi_bias_from_positions(num_heads: int, q_positions: jax.Array, kv_positions: jax.Array, *,
                              causal: bool = True) -> jax.Array:
  """ALiBi bias from explicit positions (packed segments, offsets): [B, Tq], [B, Tk] -> [B, N, Tq, Tk].

  d = q_positions[b, i] - kv_positions[b, j]; bias as in `alibi_bias`. float32.
  """
  n = _checks.positive_int(num_heads, "num_heads")
  qp = _checks.real_array(q_positions, "q_positions")
  kp = _checks.real_array(kv_positions, "kv_positions")
  if qp.ndim != 2 or kp.ndim != 2 or qp.shape[0] != kp.shape[0]:
    raise ValueError(f"q_positions and kv_positions must be [B, Tq] and [B, Tk] with the same B, got "
                     f"{tuple(qp.shape)} and {tuple(kp.shape)}")
  return _alibi_from_positions_jit(qp, kp, n, _checks.boolean(causal, "causal"))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _alibi_from_positions_jit(qp, kp, num_heads, causal):
  slopes = jnp.asarray(_slopes(num_heads), jnp.float32)
  d = qp.astype(jnp.float32)[:, :, None] - kp.astype(jnp.float32)[:, None, :]
  return jax.vmap(lambda dd: _bias(slopes, dd, causal))(d)
