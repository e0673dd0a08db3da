"""Temperature / top-k / top-p filtering against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.decoding.sampling import filter_logits, sample_token


def numpy_filter(logits, top_k, top_p):
  """Top-k first, then the nucleus of the renormalised top-k distribution (the usual order)."""
  out = logits.copy()
  for row in out:
    order = np.argsort(-row, kind="stable")
    if top_k:
      row[order[top_k:]] = -np.inf
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    mass = 0.0
    for i in order:
      if mass >= top_p:
        row[i] = -np.inf
      mass += probs[i]
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.8), (1, 0.9)])
def test_filter_matches_numpy(top_k, top_p):
  logits = np.asarray(jax.random.normal(jax.random.key(0), (4, 10)), np.float32)
  got = np.asarray(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
  want = numpy_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(want), got > -1e30)
  np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)])


def test_sampling_frequencies_follow_the_filtered_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(1), 4000)
  draws = jax.vmap(lambda k: sample_token(k, logits, top_k=2)[0])(keys)
  freq = np.bincount(np.asarray(draws), minlength=4) / len(keys)
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
  assert int(sample_token(keys[0], logits, temperature=0.0)[0]) == 0


def test_bad_arguments():
  with pytest.raises(ValueError, match="top_p"):
    filter_logits(jnp.zeros((1, 3)), top_p=0.0)
  with pytest.raises(ValueError, match="logits must be"):
    filter_logits(jnp.zeros((3,)))
