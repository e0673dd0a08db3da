"""RoPE context-extension scalings (PI, NTK, dynamic NTK, YaRN) against formulas written here in NumPy."""

import math

import numpy as np
import pytest

from jaxlab import positions as P

B, T, N, H = 2, 6, 2, 16


def _x(seed=0, shape=(B, T, N, H)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _pos(t=T, offset=0):
  return np.broadcast_to(np.arange(t) + offset, (B, t)).astype(np.int32)


def _inv_freq(scaling, r=H, theta=10000.0, **kw):
  """The (scaled) inverse frequencies, read off the angles at position 1."""
  return np.asarray(P.rope_angles(np.ones((1, 1), np.float32), r, theta=theta, scaling=scaling, **kw))[0, 0]


@pytest.mark.parametrize("scaling", [
    {"kind": "linear", "factor": 1.0}, {"kind": "ntk", "factor": 1.0},
    {"kind": "yarn", "factor": 1.0, "original_max_len": 8},
    {"kind": "yarn", "factor": 1.0, "original_max_len": 8, "yarn_ramp": "reference"},
    {"kind": "dynamic_ntk", "factor": 1.0, "original_max_len": T}])
def test_factor_one_is_plain_rope(scaling):
  x, pos = _x(), _pos(offset=0)  # dynamic_ntk: L = T = original_max_len
  np.testing.assert_array_equal(np.asarray(P.apply_rope(x, pos, scaling=scaling)),
                                np.asarray(P.apply_rope(x, pos)))
  assert P.yarn_attention_factor(1.0) == 1.0


def test_linear_is_plain_rope_at_positions_over_factor():
  x = _x(1)
  pos = _pos(offset=5)
  got = np.asarray(P.apply_rope(x, pos, scaling=P.RopeScaling("linear", 4.0)))
  np.testing.assert_allclose(got, np.asarray(P.apply_rope(x, pos / 4.0)), rtol=1e-6, atol=1e-6)
  assert np.abs(got - np.asarray(P.apply_rope(x, pos))).max() > 1e-2


def test_ntk_changes_the_base_and_divides_the_lowest_frequency_by_the_factor():
  x, pos, s = _x(2), _pos(offset=3), 8.0
  got = np.asarray(P.apply_rope(x, pos, scaling={"kind": "ntk", "factor": s}))
  want = np.asarray(P.apply_rope(x, pos, theta=10000.0 * s ** (H / (H - 2))))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  inv, plain = _inv_freq({"kind": "ntk", "factor": s}), 1e4 ** (-np.arange(0, H, 2) / H)
  assert inv[0] == plain[0] == 1.0  # highest frequency kept
  np.testing.assert_allclose(inv[-1], plain[-1] / s, rtol=1e-5)  # lowest interpolated like PI
  # Partial rotary: the exponent uses the rotary dims R, not the head dim.
  got = np.asarray(P.apply_rope(x, pos, scaling={"kind": "ntk", "factor": s}, rotary_fraction=0.5))
  want = np.asarray(P.apply_rope(x, pos, theta=10000.0 * s ** (8 / 6), rotary_fraction=0.5))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dynamic_ntk_is_plain_within_the_training_length_and_ntk_beyond():
  x, s, lt = _x(3), 4.0, 6
  sc = P.RopeScaling("dynamic_ntk", s, original_max_len=lt)
  for t in (1, 4, 6):  # L = t <= L_train
    pos = _pos(t)
    np.testing.assert_array_equal(np.asarray(P.apply_rope(x[:, :t], pos, scaling=sc)),
                                  np.asarray(P.apply_rope(x[:, :t], pos)))
  # Beyond: rows of different lengths use their own alpha = s * L / L_train - (s - 1).
  xx = _x(4, shape=(2, 12, N, H))
  pos = np.stack([np.arange(12), np.minimum(np.arange(12), 8)]).astype(np.int32)  # L = 12 and 9
  got = np.asarray(P.apply_rope(xx, pos, scaling=sc))
  for b, length in enumerate((12, 9)):
    alpha = s * length / lt - (s - 1)
    want = np.asarray(P.apply_rope(xx[b:b + 1], pos[b:b + 1], theta=1e4 * alpha ** (H / (H - 2))))
    np.testing.assert_allclose(got[b:b + 1], want, rtol=1e-5, atol=1e-5)
  # An explicit seq_len (e.g. the full cache length when decoding one token) overrides max + 1.
  got = np.asarray(P.apply_rope(xx[:, -1:], pos[:, -1:], scaling=sc, seq_len=np.array([12, 9])))
  full = np.asarray(P.apply_rope(xx, pos, scaling=sc))
  np.testing.assert_allclose(got[0], full[0, -1:], rtol=1e-5, atol=1e-6)
  alpha = s * 20 / lt - (s - 1)
  got = np.asarray(P.apply_rope(xx, pos, scaling=sc, seq_len=20))
  want = np.asarray(P.apply_rope(xx, pos, theta=1e4 * alpha ** (H / (H - 2))))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _yarn_paper(r, theta, s, lt, alpha=1.0, beta=32.0):
  """YaRN sec. 3.2: lambda_d = 2 pi b^(2d/|D|), r(d) = L / lambda_d, gamma ramp, h(theta_d)."""
  d = np.arange(r // 2)
  theta_d = theta ** (-2.0 * d / r)
  ratio = lt / (2 * np.pi * theta ** (2.0 * d / r))
  gamma = np.where(ratio < alpha, 0.0, np.where(ratio > beta, 1.0, (ratio - alpha) / (beta - alpha)))
  return (1 - gamma) * theta_d / s + gamma * theta_d, ratio


def _yarn_reference_code(dim, base, scale, orig, beta_fast=32, beta_slow=1):
  """Transcription of jquesnelle/yarn `LlamaYaRNScaledRotaryEmbedding` (extrapolation_factor=1)."""
  def find_correction_dim(num_rotations):
    return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))
  low = max(math.floor(find_correction_dim(beta_fast)), 0)
  high = min(math.ceil(find_correction_dim(beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  pos_freqs = base ** (np.arange(0, dim, 2) / dim)
  inv_freq_mask = 1 - ramp
  return (1 / (scale * pos_freqs)) * (1 - inv_freq_mask) + (1 / pos_freqs) * inv_freq_mask


@pytest.mark.parametrize("r, theta, s, lt", [(16, 10000.0, 4.0, 4096), (64, 10000.0, 8.0, 2048),
                                             (32, 500000.0, 2.0, 512)])
def test_yarn_frequencies_match_the_paper_and_the_reference_code(r, theta, s, lt):
  sc = P.RopeScaling("yarn", s, original_max_len=lt)
  got = _inv_freq(sc, r=r, theta=theta)
  want, ratio = _yarn_paper(r, theta, s, lt)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  plain = _inv_freq(None, r=r, theta=theta)
  np.testing.assert_array_equal(got[ratio > 32], plain[ratio > 32])  # high frequencies unchanged
  np.testing.assert_allclose(got[ratio < 1], plain[ratio < 1] / s, rtol=1e-6)  # low ones interpolated
  assert (ratio > 32).any() and (ratio < 1).any()
  got_ref = _inv_freq({"kind": "yarn", "factor": s, "original_max_len": lt, "yarn_ramp": "reference"},
                      r=r, theta=theta)
  np.testing.assert_allclose(got_ref, _yarn_reference_code(r, theta, s, lt), rtol=1e-5)


def test_yarn_leaves_high_frequency_dims_of_x_unchanged_and_temperature_formula():
  x, pos = _x(5), _pos(offset=100)
  sc = P.RopeScaling("yarn", 16.0, original_max_len=4096)
  got, plain = np.asarray(P.apply_rope(x, pos, scaling=sc)), np.asarray(P.apply_rope(x, pos))
  _, ratio = _yarn_paper(H, 1e4, 16.0, 4096)
  hi = np.flatnonzero(ratio > 32)
  assert 0 < hi.size < H // 2
  cols = np.concatenate([hi, hi + H // 2])
  np.testing.assert_array_equal(got[..., cols], plain[..., cols])
  assert np.abs(got - plain).max() > 1e-2
  for s in (1.0, 2.0, 4.0, 16.0, 40.0):
    assert P.yarn_attention_factor(s) == pytest.approx(0.1 * np.log(s) + 1.0, rel=1e-12)
  assert P.yarn_attention_factor(0.5) == 1.0
  with pytest.raises(ValueError, match="factor"):
    P.yarn_attention_factor(0.0)


@pytest.mark.parametrize("scaling", [{"kind": "ntk", "factor": 4.0},
                                     {"kind": "dynamic_ntk", "factor": 4.0, "original_max_len": 2},
                                     {"kind": "yarn", "factor": 4.0, "original_max_len": 16}])
def test_scaled_rope_keeps_norms_and_matches_the_complex_form(scaling):
  x, pos = _x(6), _pos(offset=7)
  got = np.asarray(P.apply_rope(x, pos, scaling=scaling), np.float64)
  np.testing.assert_allclose(got, np.asarray(P.apply_rope_complex(x, pos, scaling=scaling)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_dynamic_ntk_per_token_seq_len():
  """seq_len [B, T] (one L per token, e.g. packed segments) rotates each token as a scalar L would,
  with alpha = s * L / L_train - (s - 1) written out here."""
  s, lt = 2.0, 4
  sc = P.RopeScaling("dynamic_ntk", s, original_max_len=lt)
  x, pos = _x(7, shape=(2, 6, N, H)), _pos(6, offset=1)[:, :6]
  lengths = np.array([[3, 4, 5, 6, 9, 9], [7, 7, 7, 2, 2, 12]], np.int32)
  got = np.asarray(P.apply_rope(x, pos, scaling=sc, seq_len=lengths))
  for b in range(2):
    for t in range(6):
      alpha = max(1.0, s * lengths[b, t] / lt - (s - 1))
      want = np.asarray(P.apply_rope(x[b:b + 1, t:t + 1], pos[b:b + 1, t:t + 1],
                                     theta=1e4 * alpha ** (H / (H - 2))))
      np.testing.assert_allclose(got[b, t], want[0, 0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="seq_len"):
    P.apply_rope(x, pos, scaling=sc, seq_len=lengths[:, :5])
