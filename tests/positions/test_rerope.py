"""ReRoPE / leaky ReRoPE logits against plain RoPE inside the window and a NumPy formula outside."""

import numpy as np
import pytest

from jaxlab import positions as P

B, T, N, K, H = 2, 9, 4, 2, 8


def _x(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _np_logits(q, k, rel, theta=10000.0):
  """sum_i Re(conj(zq) zk e^{-i r theta_i}) / sqrt(H) for a given relative position r = m - n per pair."""
  h = q.shape[-1]
  zq = q[..., :h // 2] + 1j * q[..., h // 2:]  # [B, Tq, N, H/2]
  zk = np.repeat(k[..., :h // 2] + 1j * k[..., h // 2:], q.shape[2] // k.shape[2], axis=2)
  inv = theta ** (-2.0 * np.arange(h // 2) / h)
  phase = np.exp(-1j * rel[:, None, :, :, None] * inv)  # [B, 1, Tq, Tk, H/2]
  prod = np.einsum("bqnf,bknf->bnqkf", np.conj(zq), zk)
  return (prod * phase).real.sum(-1) / np.sqrt(h)


def _setup(seed=0):
  q, k = _x(seed, (B, T, N, H)), _x(seed + 1, (B, T, K, H))
  pos = np.stack([np.arange(T), np.arange(T) + 100])  # the second row has an offset
  return q, k, pos, pos[:, :, None] - pos[:, None, :]


def test_rerope_is_plain_rope_inside_the_window_and_clamped_outside():
  q, k, pos, d = _setup()
  w = 3
  got = np.asarray(P.rerope_logits(q, k, pos, pos, window=w), np.float64)
  plain = _np_logits(q, k, d.astype(np.float64))
  inside = np.broadcast_to((np.abs(d) < w)[:, None], got.shape)
  np.testing.assert_allclose(got[inside], plain[inside], rtol=1e-4, atol=1e-5)
  clamped = np.where(d >= w, w, d).astype(np.float64)
  np.testing.assert_allclose(got, _np_logits(q, k, clamped), rtol=1e-4, atol=1e-5)
  assert np.abs(got - plain)[~inside].max() > 1e-2


def test_leaky_rerope_formula_and_k_one_is_plain_rope():
  q, k, pos, d = _setup(2)
  w, lk = 2, 4.0
  got = np.asarray(P.rerope_logits(q, k, pos, pos, window=w, leaky_k=lk), np.float64)
  rel = np.where(d >= w, w + (d - w) / lk, d).astype(np.float64)
  np.testing.assert_allclose(got, _np_logits(q, k, rel), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(P.rerope_logits(q, k, pos, pos, window=w, leaky_k=1.0)),
                             _np_logits(q, k, d.astype(np.float64)), rtol=1e-4, atol=1e-5)


def test_bidirectional_clamps_both_sides_and_scale():
  q, k, pos, d = _setup(4)
  w = 2
  got = np.asarray(P.rerope_logits(q, k, pos, pos, window=w, bidirectional=True, scale=1.0), np.float64)
  rel = np.clip(d, -w, w).astype(np.float64)
  np.testing.assert_allclose(got, _np_logits(q, k, rel) * np.sqrt(H), rtol=1e-4, atol=1e-5)


def test_logits_are_shift_invariant_and_usable_for_decoding():
  q, k, pos, _ = _setup(6)
  full = np.asarray(P.rerope_logits(q, k, pos, pos, window=4, leaky_k=8.0))
  shifted = np.asarray(P.rerope_logits(q, k, pos + 1000, pos + 1000, window=4, leaky_k=8.0))
  np.testing.assert_allclose(shifted, full, rtol=1e-3, atol=1e-4)
  last = np.asarray(P.rerope_logits(q[:, -1:], k, pos[:, -1:], pos, window=4, leaky_k=8.0))
  np.testing.assert_allclose(last, full[:, :, -1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, match", [({"window": 0}, "window"), ({"window": 2, "leaky_k": 0.5}, "leaky_k"),
                                       ({"window": 2, "scale": -1.0}, "scale")])
def test_bad_arguments(kw, match):
  q, k, pos, _ = _setup()
  with pytest.raises(ValueError, match=match):
    P.rerope_logits(q, k, pos, pos, **kw)
  with pytest.raises(ValueError, match="multiple of k heads"):
    P.rerope_logits(q, _x(9, (B, T, 3, H)), pos, pos, window=2)
