"""Linear attention (Katharopoulos et al. 2020) against naive O(T^2) references."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attention_test_utils import naive_feature_attention

from jaxlab.attention.linear import (linear_attention, linear_attention_init_state,
                                     linear_attention_prefill, linear_attention_step)

EPS = 1e-6
# One compile per configuration instead of op-by-op dispatch (keeps the file fast on one core).
la = jax.jit(linear_attention, static_argnames=("causal", "feature_map", "chunk_size", "eps"))


def np_phi(x, name):
  x = np.asarray(x, np.float64)
  if name == "elu+1":
    return np.where(x > 0, x + 1.0, np.exp(x))
  if name == "relu":
    return np.maximum(x, 0.0)
  return np.exp(x - x.max(-1, keepdims=True))


def naive_np(q, k, v, causal, name, eps=EPS):
  """Row-normalised phi(Q) phi(K)^T (masked) times V, in NumPy float64."""
  return naive_feature_attention(np_phi(q, name), np_phi(k, name), v, causal, eps)


def jnp_phi(x, name):
  if name == "elu+1":
    return jax.nn.elu(x) + 1
  if name == "relu":
    return jax.nn.relu(x)
  return jnp.exp(x - x.max(-1, keepdims=True))


def naive_jnp(q, k, v, causal, name, eps=EPS):
  """Quadratic jnp version (differentiable), K/V repeated for GQA."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  a = jnp.einsum("btnm,bsnm->bnts", jnp_phi(q, name), jnp_phi(k, name))
  if causal:
    a = jnp.where(jnp.tril(jnp.ones(a.shape[-2:], bool)), a, 0.0)
  return jnp.einsum("bnts,bsnh->btnh", a, v) / (a.sum(-1)[..., None].swapaxes(1, 2) + eps)


def make(seed, b=2, t=13, n=4, kh=2, h=8, tk=None):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  tk = t if tk is None else tk
  return (jax.random.normal(kq, (b, t, n, h)), jax.random.normal(kk, (b, tk, kh, h)),
          jax.random.normal(kv, (b, tk, kh, h)))


@pytest.mark.parametrize("name,causal,chunk", [("elu+1", False, 64), ("elu+1", True, 5),
                                               ("relu", True, 4), ("exp", False, 64),
                                               ("exp", True, 5)])
def test_matches_naive(name, causal, chunk):
  q, k, v = make(0, t=13, n=4, kh=2)
  out = la(q, k, v, causal=causal, feature_map=name, chunk_size=chunk)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, naive_np(q, k, v, causal, name), rtol=1e-4, atol=1e-5)


def test_noncausal_different_lengths():
  q, k, v = make(1, t=5, tk=11)
  out = la(q, k, v)
  np.testing.assert_allclose(out, naive_np(q, k, v, False, "elu+1"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,causal", [("elu+1", False), ("elu+1", True), ("exp", False),
                                         ("exp", True)])
def test_gradients_match_naive(name, causal):
  q, k, v = make(2, t=11, n=4, kh=2)
  w = jax.random.normal(jax.random.key(9), q.shape)
  f = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v)), argnums=(0, 1, 2)))(
      q, k, v)
  got = f(lambda q, k, v: linear_attention(q, k, v, causal=causal, feature_map=name, chunk_size=4))
  want = f(lambda q, k, v: naive_jnp(q, k, v, causal, name))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["elu+1", "exp"])
def test_gradients_match_finite_differences(name):
  """Independent of any reference's own gradient: directional derivatives in q, k and v against
  central differences of the function itself (the exp map's per-key max is part of it)."""
  q, k, v = make(5, t=9, n=4, kh=2)
  # One entry per row of q and k set 3 above the row's max: no step of the differences crosses the
  # max's kink (near-ties made the differences meaningless).
  lift = lambda x, seed: x + jax.nn.one_hot(
      jax.random.randint(jax.random.key(seed), x.shape[:-1], 0, x.shape[-1]), x.shape[-1]) * (
          x.max(-1, keepdims=True) + 3.0 - x)
  q, k = lift(q, 11), lift(k, 12)
  w = jax.random.normal(jax.random.key(7), q.shape)
  loss = jax.jit(lambda q, k, v: jnp.sum(w * linear_attention(q, k, v, causal=True,
                                                              feature_map=name, chunk_size=4)))
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  h = 1e-2
  for i, g in enumerate(grads):
    d = jax.random.normal(jax.random.key(10 + i), g.shape)
    shifted = lambda s: loss(*[x + s * d if j == i else x for j, x in enumerate((q, k, v))])
    numeric = (shifted(h) - shifted(-h)) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(g, d), numeric, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_mha(causal):
  q, k, v = make(3, t=9, n=6, kh=2)
  w = jax.random.normal(jax.random.key(8), q.shape)
  fn = lambda q, k, v: la(q, k, v, causal=causal, chunk_size=4)
  rep = lambda q, k, v: fn(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2))
  # Value and gradients in one compile per function.
  vg = lambda f: jax.jit(jax.value_and_grad(lambda *a: (jnp.sum(w * f(*a)), f(*a)), argnums=(0, 1, 2),
                                            has_aux=True))(q, k, v)
  ((_, got_out), got_grads), ((_, want_out), want_grads) = vg(fn), vg(rep)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-6)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["elu+1", "exp"])
def test_recurrent_step_matches_causal(name):
  q, k, v = make(4, t=7, n=4, kh=2)
  full = la(q, k, v, causal=True, feature_map=name, chunk_size=3)
  state = linear_attention_init_state(2, 2, 8, jnp.float32)
  assert state.s.shape == (2, 2, 8, 8) and state.z.shape == (2, 2, 8)
  step = jax.jit(lambda *a: linear_attention_step(*a, feature_map=name))
  for t in range(7):
    out, state = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state)
    np.testing.assert_allclose(out[:, 0], full[:, t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["elu+1", "exp"])
def test_prefill_state_continues_like_step_by_step_decoding(name):
  q, k, v = make(8, t=10, n=4, kh=2)
  full = la(q, k, v, causal=True, feature_map=name, chunk_size=3)
  out, state = linear_attention_prefill(q[:, :7], k[:, :7], v[:, :7], feature_map=name, chunk_size=3)
  np.testing.assert_allclose(out, full[:, :7], rtol=1e-5, atol=1e-6)
  step = jax.jit(lambda *a: linear_attention_step(*a, feature_map=name))
  step_state = linear_attention_init_state(2, 2, 8)
  for t in range(7):
    step_state = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], step_state)[1]
  for a, b in zip(state, step_state):  # the same state, to float rounding
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for t in range(7, 10):
    got, state = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state)
    np.testing.assert_allclose(got[:, 0], full[:, t], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="Tq == Tk"):
    linear_attention_prefill(q[:, :3], k, v)


@pytest.mark.parametrize("chunk", [2, 5])
def test_causality_by_gradient(chunk):
  q, k, v = make(5, t=9, n=2, kh=1)
  grads_at = jax.jit(lambda t: jax.grad(lambda q, k, v: jnp.sum(jnp.take(
      linear_attention(q, k, v, causal=True, chunk_size=chunk), t, axis=1)), argnums=(0, 1, 2))(
          q, k, v))
  for t in (0, 4, 8):
    for g in grads_at(t):
      assert np.all(np.asarray(g)[:, t + 1:] == 0.0)
      assert np.any(np.asarray(g)[:, :t + 1] != 0.0)


def test_chunk_size_invariance():
  q, k, v = make(6, t=13)
  outs = [la(q, k, v, causal=True, chunk_size=c) for c in (1, 4, 13)]
  for o in outs[1:]:
    np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-6)


def test_bad_arguments():
  q, k, v = make(7, t=5)
  with pytest.raises(ValueError, match="feature_map"):
    linear_attention(q, k, v, feature_map="softmax")
  with pytest.raises(ValueError, match="chunk_size"):
    linear_attention(q, k, v, causal=True, chunk_size=0)
  with pytest.raises(ValueError, match="Tq == Tk"):
    linear_attention(q[:, :3], k, v, causal=True)
  with pytest.raises(ValueError, match="multiple"):
    linear_attention(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match="k and v"):
    linear_attention(q, k, v[:, :4])
  with pytest.raises(ValueError, match="q must be"):
    linear_attention(q[0], k, v)


def test_causal_memory_is_linear_in_length():
  """Forward + backward of causal linear attention: the largest intermediate grows like T (doubling T
  doubles it: measured 32768 -> 65536 elements at H=16, chunk 64) and stays far below T^2, while the
  quadratic reference forms a [T, T] tensor (so the check can fail)."""
  from attention_test_utils import max_intermediate_size

  def biggest(fn, t, h=16):
    spec = jax.ShapeDtypeStruct((1, t, 1, h), jnp.float32)
    grad = jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
    return max_intermediate_size(jax.make_jaxpr(grad)(spec, spec, spec).jaxpr)

  fn = lambda q, k, v: linear_attention(q, k, v, causal=True)
  small, large = biggest(fn, 512), biggest(fn, 1024)
  assert 1.8 * small <= large <= 2.2 * small, (small, large)
  assert large <= 1024 * 1024 // 8, large
  assert biggest(lambda q, k, v: naive_jnp(q, k, v, True, "elu+1"), 1024) >= 1024 * 1024


def test_causal_chunk_names_a_misshapen_argument():
  from jaxlab.attention.linear import causal_chunk
  b, c, k, g, m, h = 2, 4, 2, 3, 5, 6
  args = [jnp.ones((b, c, k, g, m)), jnp.ones((b, c, k, m)), jnp.ones((b, c, k, h)),
          jnp.ones((b, k, m, h)), jnp.ones((b, k, m))]
  out, s, z = causal_chunk(*args, 1e-6)
  assert out.shape == (b, c, k, g, h) and s.shape == (b, k, m, h) and z.shape == (b, k, m)
  with pytest.raises(ValueError, match=r"causal_chunk: z must have shape \(2, 2, 5\)"):
    causal_chunk(*args[:4], jnp.ones((b, k, m + 1)), 1e-6)
  with pytest.raises(ValueError, match="causal_chunk: state_shift"):
    causal_chunk(*args, 1e-6, shift_CK=jnp.zeros((b, c, k)))


def test_a_tiny_eps_with_padded_chunks_keeps_gradients_finite():
  """Padded query rows were zeros: 0 / (0 + eps) has the gradient 0 / 0 = NaN once eps^2 underflows
  (eps = 1e-30), and it reached the keys' gradients."""
  ks = jax.random.split(jax.random.key(5), 3)
  q, k, v = (jax.random.normal(key, (1, 13, 2, 8)) for key in ks)
  loss = lambda chunk: lambda q, k, v: jnp.sum(linear_attention(
      q, k, v, causal=True, chunk_size=chunk, eps=1e-30) ** 2)
  padded = jax.grad(loss(4), argnums=(0, 1, 2))(q, k, v)  # 13 = 3 chunks of 4 + 1: 3 padded rows
  whole = jax.grad(loss(13), argnums=(0, 1, 2))(q, k, v)
  for name, got, want in zip("qkv", padded, whole):
    assert np.isfinite(np.asarray(got)).all(), name
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
