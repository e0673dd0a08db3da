"""Sinusoidal and learned absolute embeddings, and log-n query scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import positions as P


def test_sinusoidal_known_values():
  pos = np.array([[0, 1, 2], [10, 100, 5000]])
  got = np.asarray(P.sinusoidal_embedding(pos, 4))
  assert got.shape == (2, 3, 4) and got.dtype == np.float32
  np.testing.assert_array_equal(got[0, 0], [0.0, 1.0, 0.0, 1.0])
  # Interleaved: [sin(p), cos(p), sin(p / 100), cos(p / 100)] for d = 4 (10000^(2/4) = 100).
  p = pos.astype(np.float64)
  want = np.stack([np.sin(p), np.cos(p), np.sin(p / 100), np.cos(p / 100)], -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = np.asarray(P.sinusoidal_embedding(pos, 8, max_timescale=16.0))
  np.testing.assert_allclose(got[0, 1, 2:4], [np.sin(0.5), np.cos(0.5)], rtol=1e-6)  # 16^(-2/8) = 1/2
  # Every position has norm sqrt(d / 2).
  np.testing.assert_allclose(np.linalg.norm(np.asarray(P.sinusoidal_embedding(pos, 16)), axis=-1), np.sqrt(8),
                             rtol=1e-5)


def test_sinusoidal_bad_arguments():
  with pytest.raises(ValueError, match="dim"):
    P.sinusoidal_embedding(np.zeros((1, 2)), 5)
  with pytest.raises(ValueError, match="positions"):
    P.sinusoidal_embedding(np.zeros((2,)), 4)
  with pytest.raises(ValueError, match="max_timescale"):
    P.sinusoidal_embedding(np.zeros((1, 2)), 4, max_timescale=0.0)


def test_learned_embedding_lookup_and_range_checks():
  m = P.LearnedPositionEmbedding(max_len=8, dim=4)
  pos = np.array([[0, 1, 7], [3, 3, 2]], np.int32)
  variables = m.init(jax.random.key(0), pos)
  table = np.asarray(variables["params"]["embedding"])
  assert table.shape == (8, 4)
  np.testing.assert_array_equal(np.asarray(m.apply(variables, pos)), table[pos])
  # Concrete out-of-range positions: a clear error.
  with pytest.raises(ValueError, match=r"positions must lie in \[0, max_len=8\), got values in \[1, 8\]"):
    m.apply(variables, pos + 1)
  with pytest.raises(ValueError, match="positions"):
    m.apply(variables, pos - 1)
  with pytest.raises(ValueError, match="integer dtype"):
    m.apply(variables, pos.astype(np.float32))
  # Traced positions cannot be checked: out-of-range rows are NaN (or clipped), in-range rows exact.
  out = np.asarray(jax.jit(m.apply)(variables, pos + 1))
  assert np.isnan(out[0, 2]).all() and not np.isnan(out[0, :2]).any()
  np.testing.assert_array_equal(out[0, :2], table[[1, 2]])
  clip = P.LearnedPositionEmbedding(max_len=8, dim=4, out_of_range="clip")
  np.testing.assert_array_equal(np.asarray(jax.jit(clip.apply)(variables, pos + 1))[0, 2], table[7])


def test_logn_scale():
  got = np.asarray(P.logn_scale(20, 8))
  assert got.shape == (20,) and got.dtype == np.float32
  assert (got >= 1).all()
  np.testing.assert_array_equal(got[:8], 1.0)  # n = position + 1 <= 8
  np.testing.assert_allclose(got[8:], np.log(np.arange(9, 21)) / np.log(8), rtol=1e-6)
  pos = np.array([[0, 5, 7, 63], [100, 2, 0, 8]])
  got = np.asarray(P.logn_scale(pos, 8))
  np.testing.assert_allclose(got, np.maximum(1, np.log(pos + 1) / np.log(8)), rtol=1e-6)
  assert got[0, 3] == pytest.approx(2.0, rel=1e-6)  # log 64 / log 8
  # A scalar array is a position whatever its type (np.int64(63) was read as a length 63).
  for scalar in (np.int64(63), np.int32(63), jnp.int32(63), np.array(63)):
    assert np.asarray(P.logn_scale(scalar, 8)).shape == ()
    assert float(P.logn_scale(scalar, 8)) == pytest.approx(2.0, rel=1e-6)
  with pytest.raises(ValueError, match="train_len"):
    P.logn_scale(4, 1)
  with pytest.raises(ValueError, match="q_len_or_positions"):
    P.logn_scale(np.array(["a"]), 4)
