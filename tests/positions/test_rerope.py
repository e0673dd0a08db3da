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
  # Leaky (Su 2023) on both sides: d beyond +-w grows by 1/k, i.e. -(w + (|d| - w)/k) below -w.
  leaky_k = 4.0
  got = np.asarray(P.rerope_logits(q, k, pos, pos, window=w, leaky_k=leaky_k, bidirectional=True,
                                   scale=1.0), np.float64)
  rel = np.where(d >= w, w + (d - w) / leaky_k, np.where(d <= -w, -(w + (-d - w) / leaky_k), d))
  np.testing.assert_allclose(got, _np_logits(q, k, rel.astype(np.float64)) * np.sqrt(H), rtol=1e-4,
                             atol=1e-5)


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


def _naive_attention(logits, v, causal_offset=0):
  """softmax(logits + causal mask) @ v with v repeated per query head: [B, Tq, N, H]."""
  b, n, tq, tk = logits.shape
  allowed = np.arange(tk)[None, :] <= np.arange(tq)[:, None] + causal_offset
  logits = np.where(allowed, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  v = np.repeat(v, n // v.shape[2], axis=2)
  return np.einsum("bnqk,bknh->bqnh", p, v)


@pytest.mark.parametrize("leaky_k", [None, 3.0])
def test_rerope_attention_equals_softmax_over_the_clamped_logits(leaky_k):
  """Value against softmax(NumPy clamped-relative logits) @ v; gradient against a plain jnp version."""
  import jax
  import jax.numpy as jnp
  q, k, pos, d = _setup(6)
  v = _x(9, (B, T, K, H))
  w = 3
  rel = np.where(d >= w, w if leaky_k is None else w + (d - w) / leaky_k, d).astype(np.float64)
  want = _naive_attention(_np_logits(q, k, rel), v)
  got = P.rerope_attention(q, k, v, pos, pos, window=w, leaky_k=leaky_k)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)

  def reference(q, k, v):  # the same maths from rerope_logits, masked and normalised plainly
    logits = P.rerope_logits(q, k, pos, pos, window=w, leaky_k=leaky_k)
    logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnqk,bknh->bqnh", p, jnp.repeat(v, N // K, axis=2))

  loss = lambda f: lambda *a: jnp.sum(f(*a) * jnp.cos(jnp.arange(H)))
  g_got = jax.grad(loss(lambda q, k, v: P.rerope_attention(q, k, v, pos, pos, window=w,
                                                           leaky_k=leaky_k)), (0, 1, 2))(q, k, v)
  g_want = jax.grad(loss(reference), (0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_rerope_attention_masks_padding_and_rejects_bad_shapes():
  q, k, pos, _ = _setup(8)
  v = _x(10, (B, T, K, H))
  lengths = np.array([T, 4])
  got = np.asarray(P.rerope_attention(q, k, v, pos, pos, window=2, causal=False,
                                      kv_lengths=lengths))
  # Row 1 sees only its first 4 keys: changing the others changes nothing.
  v2 = v.copy()
  v2[1, 4:] += 5.0
  k2 = k.copy()
  k2[1, 4:] -= 3.0
  got2 = np.asarray(P.rerope_attention(q, k2, v2, pos, pos, window=2, causal=False,
                                       kv_lengths=lengths))
  np.testing.assert_allclose(got2[1], got[1], atol=1e-6)
  with pytest.raises(ValueError, match="k and v"):
    P.rerope_attention(q, k, v[:, :5], pos, pos, window=2)
