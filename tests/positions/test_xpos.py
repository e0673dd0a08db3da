"""xPos: q_m . k_n depends on m - n only, with the per-pair decay zeta_i^((m - n) / scale_base)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import positions as P

B, T, N, H = 2, 6, 2, 8


def _x(seed, shape=(B, T, N, H)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _logits(q, k):
  return np.einsum("bqnh,bknh->bnqk", np.asarray(q, np.float64), np.asarray(k, np.float64))


def test_logits_depend_only_on_relative_position():
  q, k = _x(0), _x(1)
  m = np.array([[0, 3, 5, 9, 2, 7], [4, 4, 1, 0, 8, 3]])
  base = _logits(*P.apply_xpos(q, k, m, m, scale_base=16))
  for shift in (5, 40):
    np.testing.assert_allclose(_logits(*P.apply_xpos(q, k, m + shift, m + shift, scale_base=16)), base,
                               rtol=1e-4, atol=1e-5)
  # Control: shifting the queries only changes the logits.
  assert np.abs(_logits(*P.apply_xpos(q, k, m + 5, m, scale_base=16)) - base).max() > 1e-2
  # The centre cancels in the products but not in q and k themselves.
  q_c, k_c = P.apply_xpos(q, k, m, m, scale_base=16, center=30.0)
  np.testing.assert_allclose(_logits(q_c, k_c), base, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(q_c) - np.asarray(P.apply_xpos(q, k, m, m, scale_base=16)[0])).max() > 1e-2


def test_decay_factor_per_pair_matches_the_formula():
  """With one rotary pair per head the xPos logit is zeta_0^((m-n)/s) times the RoPE logit."""
  q, k = _x(2, (1, 5, 1, 2)), _x(3, (1, 5, 1, 2))
  pos = np.array([[0, 10, 20, 30, 45]])
  gamma, s = 0.4, 8.0
  got = _logits(*P.apply_xpos(q, k, pos, pos, scale_base=s, gamma=gamma))
  rope = _logits(P.apply_rope(q, pos), P.apply_rope(k, pos))
  zeta0 = gamma / (1 + gamma)  # i = 0: (0 + gamma) / (1 + gamma)
  decay = zeta0 ** ((pos[0][:, None] - pos[0][None, :]) / s)
  np.testing.assert_allclose(got, rope * decay, rtol=1e-5, atol=1e-6)
  # The scale vector itself: zeta_i = (2i/d + gamma) / (1 + gamma).
  zeta = (2 * np.arange(H // 2) / H + gamma) / (1 + gamma)
  np.testing.assert_allclose(np.asarray(P.xpos_scale(pos, H, scale_base=s)), zeta ** (pos[..., None] / s),
                             rtol=1e-5)


def test_each_rotary_pair_decays_with_its_own_zeta():
  """Pair i (dims i and i + H/2, rotate-half) of the logit is RoPE's times zeta_i^((m - n)/s): a head
  of several pairs, so that giving the pairs each other's zeta fails."""
  q, k = _x(12, (1, 5, 1, H)), _x(13, (1, 5, 1, H))
  pos = np.array([[0, 7, 19, 30, 44]])
  gamma, s = 0.4, 8.0
  got = _logits(*P.apply_xpos(q, k, pos, pos, scale_base=s, gamma=gamma))
  q_r, k_r = (np.asarray(a, np.float64) for a in (P.apply_rope(q, pos), P.apply_rope(k, pos)))
  per_dim = np.einsum("bqnh,bknh->bnqkh", q_r, k_r)
  per_pair = per_dim[..., :H // 2] + per_dim[..., H // 2:]  # [b, n, q, k, H/2]
  zeta = (2 * np.arange(H // 2) / H + gamma) / (1 + gamma)
  decay = zeta ** ((pos[0][:, None, None] - pos[0][None, :, None]) / s)  # [q, k, H/2]
  np.testing.assert_allclose(got, (per_pair * decay).sum(-1), rtol=1e-5, atol=1e-6)


def test_scale_is_measured_from_the_center():
  pos, s, gamma, c = np.array([[0, 5, 40, 90]]), 16.0, 0.4, 30.0
  zeta = (2 * np.arange(H // 2) / H + gamma) / (1 + gamma)
  np.testing.assert_allclose(np.asarray(P.xpos_scale(pos, H, scale_base=s, center=c)),
                             zeta ** ((pos[..., None] - c) / s), rtol=1e-5)


def test_equal_positions_give_plain_rope_and_dtypes_are_kept():
  q, k = _x(4), _x(5)
  pos = np.broadcast_to(np.arange(T) + 3, (B, T))
  qx, kx = P.apply_xpos(q, k, pos, pos)
  # Same position m: factors zeta^(m/s) * zeta^(-m/s) cancel, so the diagonal equals RoPE's.
  diag = lambda l: np.diagonal(l, axis1=-2, axis2=-1)
  np.testing.assert_allclose(diag(_logits(qx, kx)), diag(_logits(P.apply_rope(q, pos), P.apply_rope(k, pos))),
                             rtol=1e-5, atol=1e-5)
  qb, kb = P.apply_xpos(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), pos, pos)
  assert qb.dtype == kb.dtype == jnp.bfloat16


def test_decoding_one_query_against_cached_keys():
  """A KV cache holds each key as it was scaled at its own step (one call per token); the last query's
  logits against those cached keys equal the full pass's last row."""
  q, k = _x(6), _x(7)
  pos = np.broadcast_to(np.arange(T), (B, T))
  q_full, k_full = P.apply_xpos(q, k, pos, pos)
  cached_k = np.concatenate([np.asarray(P.apply_xpos(q[:, t:t + 1], k[:, t:t + 1], pos[:, t:t + 1],
                                                     pos[:, t:t + 1])[1]) for t in range(T)], axis=1)
  q_last, _ = P.apply_xpos(q[:, -1:], k[:, -1:], pos[:, -1:], pos[:, -1:])
  logits = lambda q_, k_: np.einsum("bqnh,bknh->bnqk", np.asarray(q_), np.asarray(k_))
  np.testing.assert_allclose(logits(q_last, cached_k), logits(q_full, k_full)[:, :, -1:],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, match", [({"scale_base": 0}, "scale_base"), ({"gamma": -1.0}, "gamma"),
                                       ({"center": float("nan")}, "center")])
def test_bad_arguments(kw, match):
  x, pos = _x(8), np.zeros((B, T))
  with pytest.raises(ValueError, match=match):
    P.apply_xpos(x, x, pos, pos, **kw)
  with pytest.raises(ValueError, match="k_positions"):
    P.apply_xpos(x, x, pos, pos[:, :3])
