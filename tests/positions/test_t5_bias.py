"""T5 relative-position buckets against an independent NumPy transcription, and the bias module."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlab import positions as P


def _mesh_tf_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
  """Element-wise transcription of mesh_tensorflow `_relative_position_bucket` (float32 log, like TF)."""
  out = []
  for rp in np.asarray(relative_position).ravel():
    ret, n, nb = 0, -int(rp), num_buckets
    if bidirectional:
      nb //= 2
      ret += (n < 0) * nb
      n = abs(n)
    else:
      n = max(n, 0)
    max_exact = nb // 2
    if n < max_exact:
      ret += n
    else:
      val = np.log(np.float32(n) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
      ret += min(max_exact + int(np.float32(val * np.float32(nb - max_exact))), nb - 1)
    out.append(ret)
  return np.asarray(out).reshape(np.shape(relative_position))


@pytest.mark.parametrize("bidirectional", [True, False])
# (32, 17), (12, 7): configurations where the offsets at max_distance and beyond land in the
# last bucket only through the clamp at max_distance (the others put max_distance - 1 there too).
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (24, 100), (8, 20), (64, 64),
                                                       (32, 17), (12, 7)])
def test_buckets_match_the_reference_function(bidirectional, num_buckets, max_distance):
  rel = np.arange(-700, 701)
  got = np.asarray(P.t5_relative_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                        max_distance=max_distance))
  want = _mesh_tf_bucket(rel, bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(got, want)
  assert got.min() == 0 and got.max() == num_buckets - 1


def test_known_bucket_values_default_configuration():
  b = lambda r, bi: int(P.t5_relative_bucket(np.array(r), bidirectional=bi))
  # Bidirectional: 16 buckets per side, 8 exact, log-spaced to 128.
  assert [b(r, True) for r in (0, -1, -7, -8, -127, -128, -10_000)] == [0, 1, 7, 8, 15, 15, 15]
  assert [b(r, True) for r in (1, 7, 8, 16, 10_000)] == [17, 23, 24, 26, 31]
  # Unidirectional: 32 buckets for the past, 16 exact; the future is bucket 0.
  # n = 32: 16 + int(16 * log(32 / 16) / log(128 / 16)) = 16 + int(5.33) = 21.
  assert [b(r, False) for r in (5, 0, -1, -15, -16, -32, -10_000)] == [0, 0, 1, 15, 16, 21, 31]



def test_extreme_offsets_fall_in_the_last_buckets():
  """int32's minimum and (with x64) offsets beyond int32 are the farthest buckets: they wrapped in the
  int32 cast or overflowed on negation (-2**31 went to bucket 16 bidirectional, 0 causal)."""
  b = lambda r, bi: np.asarray(P.t5_relative_bucket(r, bidirectional=bi)).tolist()
  extremes = np.array([np.iinfo(np.int32).min, -2**31 + 1, np.iinfo(np.int32).max], np.int32)
  assert b(extremes, True) == [15, 15, 31]
  assert b(extremes, False) == [31, 31, 0]
  # Unsigned offsets (keys at or after the query): clipping at -(max_distance + 1) wrapped for them
  # and sent every offset to the last bucket.
  assert b(np.arange(5, dtype=np.uint32), True) == [0, 17, 18, 19, 20]
  assert b(np.array([3, 2**32 - 1], np.uint32), True) == [19, 31]
  with jax.enable_x64(True):
    far = np.array([-2**32, -2**32 - 5, 2**32 + 3], np.int64)
    assert b(far, True) == [15, 15, 31]
    assert b(far, False) == [31, 31, 0]

def test_module_bias_is_the_table_at_end_aligned_buckets():
  m = P.T5RelativeBias(num_heads=3, num_buckets=16, max_distance=32, bidirectional=False)
  variables = m.init(jax.random.key(0), 4, 9)
  table = np.asarray(nn.meta.unbox(variables["params"])["rel_embedding"])  # boxed: (None, "heads")
  assert table.shape == (16, 3)
  got = np.asarray(m.apply(variables, 4, 9))
  assert got.shape == (1, 3, 4, 9) and got.dtype == np.float32
  i = np.arange(4)[:, None] + (9 - 4)
  buckets = _mesh_tf_bucket(np.arange(9)[None, :] - i, False, 16, 32)
  np.testing.assert_array_equal(got[0], np.transpose(table[buckets], (2, 0, 1)))
  # Decoding one token against 9 keys is the last row of the full square bias.
  np.testing.assert_array_equal(np.asarray(m.apply(variables, 1, 9)),
                                np.asarray(m.apply(variables, 9, 9))[:, :, -1:])
  # Explicit positions: a packed row restarting at 0 gives the square bias of each segment.
  pos = np.array([[0, 1, 2, 3, 0, 1]])
  got = np.asarray(m.apply(variables, 6, 6, q_positions=pos, kv_positions=pos))
  np.testing.assert_array_equal(got[:, :, 4:, 4:], np.asarray(m.apply(variables, 2, 2)))


@pytest.mark.parametrize("call, match", [
    (lambda: P.t5_relative_bucket(np.array([1.5]), bidirectional=True), "relative_position"),
    (lambda: P.t5_relative_bucket(np.array([1]), bidirectional=True, num_buckets=7), "num_buckets"),
    (lambda: P.t5_relative_bucket(np.array([1]), bidirectional=False, max_distance=4, num_buckets=16),
     "max_distance"),
    (lambda: P.t5_relative_bucket(np.array([1]), bidirectional=1), "bidirectional"),
    (lambda: P.T5RelativeBias(2).init(jax.random.key(0), 0, 3), "q_len"),
    (lambda: P.T5RelativeBias(2).init(jax.random.key(0), 2, 3, q_positions=np.zeros((1, 2), int)),
     "both q_positions and kv_positions"),
])
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()
