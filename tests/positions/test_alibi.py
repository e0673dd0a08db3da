"""ALiBi slopes against the paper's closed forms, and biases against a NumPy loop."""

import numpy as np
import pytest

from jaxlab import positions as P

# Closed forms from Press et al. (2022), sec. 3 and the reference `get_slopes`, written out by hand.
EXPECTED_SLOPES = {
    1: [2.0 ** -8],
    2: [2.0 ** -4, 2.0 ** -8],
    6: [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3],  # 4 heads, then 8-head slopes 0, 2
    8: [2.0 ** -k for k in range(1, 9)],  # 1/2, 1/4, ..., 1/256
    12: [2.0 ** -k for k in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5],
    16: [2.0 ** (-k / 2) for k in range(1, 17)],
}


@pytest.mark.parametrize("n", sorted(EXPECTED_SLOPES))
def test_slopes_match_the_paper(n):
  got = np.asarray(P.alibi_slopes(n))
  assert got.dtype == np.float32 and got.shape == (n,)
  np.testing.assert_allclose(got, np.asarray(EXPECTED_SLOPES[n], np.float32), rtol=1e-7)


def _np_bias(n, tq, tk, causal):
  slopes = np.asarray(EXPECTED_SLOPES[n])
  out = np.zeros((1, n, tq, tk))
  for h in range(n):
    for i in range(tq):
      for j in range(tk):
        d = (i + tk - tq) - j
        out[0, h, i, j] = -slopes[h] * (max(d, 0) if causal else abs(d))
  return out


@pytest.mark.parametrize("tq, tk", [(5, 5), (1, 7), (3, 6), (4, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_bias_for_several_lengths(tq, tk, causal):
  got = np.asarray(P.alibi_bias(6, tq, tk, causal=causal))
  assert got.shape == (1, 6, tq, tk) and got.dtype == np.float32
  np.testing.assert_allclose(got, _np_bias(6, tq, tk, causal), rtol=1e-6, atol=0)


def test_causal_softmax_equals_the_reference_codes_form():
  """The reference code adds +m * j (key index only); after the causal mask the softmax is the same."""
  n, t = 8, 7
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((1, n, t, t))
  mask = np.tril(np.ones((t, t), bool))
  def softmax(z):
    z = np.where(mask, z, -np.inf)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  ours = softmax(logits + np.asarray(P.alibi_bias(n, t, t), np.float64))
  slopes = np.asarray(EXPECTED_SLOPES[n])[None, :, None, None]
  ref = softmax(logits + slopes * np.arange(t)[None, None, None, :])
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
  assert np.abs(ours - softmax(logits)).max() > 1e-2  # the bias does something


def test_bias_from_positions_handles_packed_segments_and_offsets():
  pos = np.array([[0, 1, 2, 0, 1], [7, 8, 9, 10, 11]])
  got = np.asarray(P.alibi_bias_from_positions(2, pos, pos))
  assert got.shape == (2, 2, 5, 5)
  # Second row (offset 7) equals the plain end-aligned bias; first row uses distances within positions.
  np.testing.assert_allclose(got[1:], np.asarray(P.alibi_bias(2, 5, 5)), rtol=1e-7)
  d = np.maximum(pos[0][:, None] - pos[0][None, :], 0)
  np.testing.assert_allclose(got[0], -np.asarray(EXPECTED_SLOPES[2])[:, None, None] * d, rtol=1e-7)


@pytest.mark.parametrize("call, match", [
    (lambda: P.alibi_slopes(0), "num_heads"),
    (lambda: P.alibi_slopes(2.5), "num_heads"),
    (lambda: P.alibi_bias(4, 0, 3), "q_len"),
    (lambda: P.alibi_bias(4, 3, -1), "kv_len"),
    (lambda: P.alibi_bias_from_positions(4, np.zeros((2, 3)), np.zeros((3, 3))), "q_positions"),
])
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()
