"""GatedAttentionUnit and FlashLayer (Hua et al. 2022) against plain NumPy forward passes."""

import numpy as np
import pytest
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.layers.gau import FlashLayer, GatedAttentionUnit

B, T, D, E, S = 2, 11, 16, 24, 8


def random_params(module, x, seed, *args, **kwargs):
  """The module's parameter tree, every leaf replaced by N(0, 0.5^2) values (init gives tiny gammas)."""
  params = nn.unbox(module.init(jax.random.key(0), x, *args, **kwargs)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(0.5 * rng.standard_normal(p.shape, np.float32)), params)


def inputs(seed, t=T):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, t, D), np.float32))


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_projections(p, x, m):
  """U, V [B, T, E] and the m scale/offset transforms of Z as a list of [B, T, S] (float64)."""
  x = np.asarray(x, np.float64)
  uv = np_silu(x @ np.asarray(p["uv"]["kernel"], np.float64).reshape(D, 2 * E)).reshape(
      x.shape[0], x.shape[1], 2, E)
  z = np_silu(x @ np.asarray(p["z"]["kernel"], np.float64))
  gamma, beta = np.asarray(p["gamma"], np.float64), np.asarray(p["beta"], np.float64)
  return uv[:, :, 0], uv[:, :, 1], [z * gamma[i] + beta[i] for i in range(m)]


def np_out(params, u, a):
  return (u * a) @ np.asarray(params["out"]["kernel"], np.float64)


@pytest.mark.parametrize("causal,kind,logn", [(True, "relu2", 0), (False, "softmax", 4)])
def test_gau_layer_matches_numpy(causal, kind, logn):
  layer = GatedAttentionUnit(E, S, causal=causal, kind=kind, logn_train_len=logn)
  x = inputs(0)
  params = random_params(layer, x, 1)
  y = jax.jit(layer.apply)({"params": params}, x)
  assert y.shape == (B, T, D)
  u, v, (q, k) = np_projections(params["proj"], x, 2)
  logits = np.einsum("bts,bjs->btj", q, k)
  visible = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)
  if kind == "relu2":
    w = np.where(visible, np.maximum(logits / T, 0.0) ** 2, 0.0)
  else:
    n = visible.sum(-1)
    logits = logits / np.sqrt(S) * np.maximum(1.0, np.log(n) / np.log(logn))[:, None]
    w = np.where(visible, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
    w = w / w.sum(-1, keepdims=True)
  want = np_out(params, u, np.einsum("btj,bje->bte", w, v))
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_layer_matches_numpy(causal):
  c = 4
  layer = FlashLayer(E, S, chunk_size=c, causal=causal, relative_bias=True)
  x = inputs(2)
  params = random_params(layer, x, 3)
  y = jax.jit(layer.apply)({"params": params}, x)
  u, v, (qq, qk, lq, lk) = np_projections(params["proj"], x, 4)
  i, j = np.arange(T)[:, None], np.arange(T)[None]
  table = np.asarray(params["relative_bias"], np.float64)
  local = (i // c == j // c) & ((j <= i) if causal else True)
  far = (j // c < i // c) if causal else np.ones((T, T), bool)
  quad = np.maximum(np.einsum("bts,bjs->btj", qq, qk) / c + table[j % c - i % c + c - 1], 0) ** 2
  w = np.where(local, quad, 0.0) + np.where(far, np.einsum("bts,bjs->btj", lq, lk) / c, 0.0)
  want = np_out(params, u, np.einsum("btj,bje->bte", w, v))
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", [GatedAttentionUnit(E, S, position="rope", scale=0.1),
                                   FlashLayer(E, S, chunk_size=4, position="rope")])
def test_rope_is_shift_invariant(layer):
  """With RoPE every logit (quadratic and linear) depends on position differences only."""
  x = inputs(4)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  params = random_params(layer, x, 5, pos)
  apply = jax.jit(layer.apply)
  y0, y1 = apply({"params": params}, x, pos), apply({"params": params}, x, pos + 37)
  np.testing.assert_allclose(y0, y1, rtol=1e-4, atol=1e-4)
  assert not np.allclose(y0, apply({"params": params}, x, pos * 2), atol=1e-3)


@pytest.mark.parametrize("kind,prefill", [("relu2", 3), ("softmax", 1)])
def test_flash_layer_decoding_equals_forward(kind, prefill):
  layer = FlashLayer(E, S, chunk_size=4, kind=kind, position="rope", relative_bias=True)
  x = inputs(6)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  params = random_params(layer, x, 7, pos)
  want = jax.jit(layer.apply)({"params": params}, x, pos)
  cache = layer.init(jax.random.key(0), x, pos, decode=True)["cache"]
  assert cache["linear"].shape == (B, 1, S, E) and cache["quad_k"].shape == (B, 4, 1, S)
  step = jax.jit(lambda cache, x, pos: layer.apply({"params": params, "cache": cache}, x, pos,
                                                   decode=True, mutable=["cache"]))
  y, new = step(cache, x[:, :prefill], pos[:, :prefill])
  got = [y]
  for p in range(prefill, T):
    y, new = step(new["cache"], x[:, p:p + 1], pos[:, p:p + 1])
    got.append(y)
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, rtol=1e-4, atol=1e-5)
  # Several tokens on a non-empty cache: the chunk state cannot take them, so NaN, not wrong numbers.
  y, _ = step(new["cache"], x[:, :2], pos[:, :2] + T)
  assert np.isnan(np.asarray(y)).all()


@pytest.mark.parametrize("kind,options", [("relu2", dict(scale=1 / T)),
                                          ("softmax", dict(logn_train_len=4))])
def test_gau_layer_decoding_equals_forward(kind, options):
  """A prompt, one token, several tokens on a non-empty cache, the rest; then a rewind of
  "cache_index" and the same tokens again: each time the full causal pass's outputs."""
  layer = GatedAttentionUnit(E, S, kind=kind, position="rope", **options)
  x = inputs(11)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T)) + 3
  params = random_params(layer, x, 12, pos)
  want = jax.jit(layer.apply)({"params": params}, x, pos)
  cache = layer.init(jax.random.key(0), x, pos, decode=True)["cache"]
  assert cache["cached_key"].shape == (B, T, 1, S) and cache["cached_value"].shape == (B, T, 1, E)
  step = jax.jit(lambda cache, x, pos: layer.apply({"params": params, "cache": cache}, x, pos,
                                                   decode=True, mutable=["cache"]))
  got = []
  for start, stop in ((0, 4), (4, 5), (5, 8), (8, T)):
    y, cache = step(cache, x[:, start:stop], pos[:, start:stop])
    cache = cache["cache"]
    got.append(y)
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, rtol=1e-4, atol=1e-5)
  assert int(cache["cache_index"]) == T
  y, _ = step(dict(cache, cache_index=jnp.array(5, jnp.int32)), x[:, 5:], pos[:, 5:])
  np.testing.assert_allclose(y, want[:, 5:], rtol=1e-4, atol=1e-5)
  # Past the cache's end (T slots): NaN, not outputs of keys written over the last slots.
  y, _ = step(cache, x[:, :1], pos[:, :1] + T)
  assert np.isnan(np.asarray(y)).all()
  y, _ = step(dict(cache, cache_index=jnp.array(T - 1, jnp.int32)), x[:, :2], pos[:, :2] + T)
  assert np.isnan(np.asarray(y)).all()


def test_gau_layer_decoding_refuses_what_it_cannot_reproduce():
  x = inputs(13)
  with pytest.raises(ValueError, match="needs a fixed `scale`"):
    GatedAttentionUnit(E, S).init(jax.random.key(0), x, decode=True)
  with pytest.raises(ValueError, match="needs causal=True"):
    GatedAttentionUnit(E, S, causal=False, scale=0.1).init(jax.random.key(0), x, decode=True)
  with pytest.raises(ValueError, match="kv_mask_BT does not apply"):
    GatedAttentionUnit(E, S, scale=0.1).init(jax.random.key(0), x, decode=True,
                                             kv_mask_BT=jnp.ones((B, T), bool))


@pytest.mark.parametrize("which", ["gau", "flash"])
def test_layer_causality_by_gradient(which):
  layer = (GatedAttentionUnit(E, S) if which == "gau" else
           FlashLayer(E, S, chunk_size=3, relative_bias=True))
  x = inputs(8)
  params = random_params(layer, x, 9)
  grad_at = jax.jit(lambda t: jax.grad(lambda x: jnp.sum(jnp.take(
      layer.apply({"params": params}, x), t, axis=1)))(x))
  for t in (0, 5, T - 1):
    g = np.asarray(grad_at(t))
    assert np.all(g[:, t + 1:] == 0.0) and np.any(g[:, t] != 0.0)


def test_parameters_and_errors():
  x = inputs(10)
  params = nn.unbox(FlashLayer(E, S, chunk_size=4, relative_bias=True).init(
      jax.random.key(0), x)["params"])
  assert params["proj"]["uv"]["kernel"].shape == (D, 2, E)
  assert params["proj"]["z"]["kernel"].shape == (D, S)
  assert params["proj"]["gamma"].shape == params["proj"]["beta"].shape == (4, S)
  assert params["relative_bias"].shape == (7,) and params["out"]["kernel"].shape == (E, D)
  assert np.all(params["proj"]["beta"] == 0.0)  # the paper's init
  gau_params = nn.unbox(GatedAttentionUnit(E, S, offset_init=0.5).init(
      jax.random.key(0), x)["params"])
  assert gau_params["proj"]["gamma"].shape == (2, S)
  assert np.all(gau_params["proj"]["beta"] == 0.5)
  with pytest.raises(ValueError, match="position"):
    GatedAttentionUnit(E, S, position="alibi").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="positions_BT"):
    FlashLayer(E, S, position="rope").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="causal"):
    FlashLayer(E, S, causal=False).init(jax.random.key(0), x, decode=True)
  with pytest.raises(ValueError, match="x_BTD"):
    FlashLayer(E, S).init(jax.random.key(0), x[0])
  with pytest.raises(ValueError, match="kind"):
    GatedAttentionUnit(E, S, kind="relu").init(jax.random.key(0), x)
