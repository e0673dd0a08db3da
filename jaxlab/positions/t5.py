"""T5 relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", sec. 2.1), bucketing as in the reference
`mesh_tensorflow.transformer.transformer_layers._relative_position_bucket` (and Hugging Face T5).

relative_position = key position - query position. Bidirectional: half the buckets for each sign
(positive offsets get +num_buckets/2). Of the (remaining) B buckets, offsets 0 .. B/2 - 1 have their
own bucket; larger offsets n share log-spaced buckets
  B/2 + int(log(n / (B/2)) / log(max_distance / (B/2)) * (B - B/2)), capped at B - 1,
evaluated in float32 like the reference, once per configuration in NumPy (a table over
n = 0 .. max_distance; larger n are in the last bucket), so ids do not depend on the backend's log.
Unidirectional (causal): only offsets into the past count, future offsets fall in bucket 0.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.positions import _checks


def _check_buckets(num_buckets: int, max_distance: int, bidirectional: bool) -> int:
  nb = _checks.positive_int(num_buckets, "num_buckets", minimum=4 if bidirectional else 2)
  if bidirectional and nb % 2:
    raise ValueError(f"num_buckets must be even when bidirectional, got {nb}")
  max_exact = (nb // 2 if bidirectional else nb) // 2
  md = _checks.positive_int(max_distance, "max_distance")
  if md <= max_exact:
    raise ValueError(f"max_distance must exceed the exact range {max_exact}, got {md}")
  return nb


def t5_relative_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int = 32,
                       max_distance: int = 128) -> jax.Array:
  """Bucket ids (int32, same shape) of integer relative positions (key - query); see module doc."""
  rel = _checks.int_array(relative_position, "relative_position")
  if not isinstance(bidirectional, bool):
    raise ValueError(f"bidirectional must be a bool, got {bidirectional!r}")
  nb = _check_buckets(num_buckets, max_distance, bidirectional)
  # Every |offset| >= max_distance is in a last bucket: clipping first keeps int64 offsets (x64) from
  # wrapping in the int32 cast and -INT32_MIN from overflowing, and changes no bucket.
  far = int(max_distance) + 1
  rel = (jnp.minimum(rel, far) if jnp.issubdtype(rel.dtype, jnp.unsignedinteger)  # -far would wrap
         else jnp.clip(rel, -far, far)).astype(jnp.int32)
  return _bucket_jit(rel, bidirectional, nb, int(max_distance))


@functools.lru_cache(maxsize=64)
def _large_offset_buckets(nb: int, max_distance: int) -> np.ndarray:
  """Bucket of each offset n = 0 .. max_distance within one side (nb buckets), int32 NumPy.

  The reference's float32 arithmetic, evaluated once in NumPy: the same ids on every backend,
  whatever its log approximation. Offsets >= max_distance always fall in the last bucket.
  """
  max_exact = nb // 2
  n = np.arange(max_distance + 1)
  nf = np.maximum(n, 1).astype(np.float32)
  large = max_exact + (np.log(nf / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
                       * np.float32(nb - max_exact)).astype(np.int32)
  large = np.minimum(large, nb - 1)
  return np.where(n < max_exact, n, large).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _bucket_jit(rel, bidirectional, nb, max_distance):
  n = -rel  # mesh-tensorflow convention: n > 0 for keys in the past
  ret = jnp.zeros_like(n)
  if bidirectional:
    nb //= 2
    ret = ret + (n < 0).astype(jnp.int32) * nb
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  table = jnp.asarray(_large_offset_buckets(nb, max_distance))
  return ret + table[jnp.minimum(n, max_distance)]


class T5RelativeBias(nn.Module):
  """Learned per-head bias for each relative-position bucket: (q_len, kv_len) -> [1, N, Tq, Tk].

  Query i sits at key coordinate i + kv_len - q_len (end-aligned, as for causal decoding), so
  bias[0, h, i, j] = table[bucket(j - (i + kv_len - q_len)), h]. With explicit q_positions [B, Tq]
  and kv_positions [B, Tk] (packed segments, offsets) the relative position is
  kv_positions[b, j] - q_positions[b, i] and the result is [B, N, Tq, Tk]. float32 (param_dtype).

  Attributes: num_heads, num_buckets (32), max_distance (128), bidirectional (True for encoders,
  False for decoders), embedding_init (N(0, 1) by default; T5 scales it via its init factor),
  param_dtype. The table is the param "rel_embedding" of shape [num_buckets, num_heads].
  """

  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True
  embedding_init: Callable[..., Any] = nn.with_logical_partitioning(  # [buckets, heads]
      nn.initializers.normal(stddev=1.0), (None, "heads"))
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_len: int, kv_len: int, *, q_positions: Optional[jax.Array] = None,
               kv_positions: Optional[jax.Array] = None) -> jax.Array:
    n = _checks.positive_int(self.num_heads, "num_heads")
    nb = _check_buckets(self.num_buckets, self.max_distance, bool(self.bidirectional))
    q_len = _checks.positive_int(q_len, "q_len")
    kv_len = _checks.positive_int(kv_len, "kv_len")
    table = self.param("rel_embedding", self.embedding_init, (nb, n), self.param_dtype)
    if (q_positions is None) != (kv_positions is None):
      raise ValueError("give both q_positions and kv_positions, or neither")
    if q_positions is None:
      q = jnp.arange(q_len, dtype=jnp.int32)[:, None] + (kv_len - q_len)
      rel = (jnp.arange(kv_len, dtype=jnp.int32)[None, :] - q)[None]  # [1, Tq, Tk]
    else:
      qp = _checks.int_array(q_positions, "q_positions")
      kp = _checks.int_array(kv_positions, "kv_positions")
      if qp.ndim != 2 or qp.shape[1] != q_len:
        raise ValueError(f"q_positions must be [B, q_len={q_len}], got {tuple(qp.shape)}")
      if kp.shape != (qp.shape[0], kv_len):
        raise ValueError(f"kv_positions must be [B={qp.shape[0]}, kv_len={kv_len}], got {tuple(kp.shape)}")
      rel = kp[:, None, :].astype(jnp.int32) - qp[:, :, None].astype(jnp.int32)  # [B, Tq, Tk]
    buckets = t5_relative_bucket(rel, bidirectional=bool(self.bidirectional), num_buckets=nb,
                                 max_distance=self.max_distance)
    bias = jnp.take(table, buckets, axis=0)  # [B, Tq, Tk, N]
    return jnp.transpose(bias, (0, 3, 1, 2))
