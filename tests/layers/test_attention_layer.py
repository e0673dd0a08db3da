"""MultiHeadAttention against explicit computations written here: QK-norm, log-n, YaRN temperature,
dynamic NTK under the KV cache, and the block-sparse family (full pass and cached decoding).

Parameters are redrawn at O(1) scale (the 0.02 init makes logits so small that a dropped temperature or
norm scale would hide under the tolerance); every case also checks that dropping the feature from the
explicit computation changes the output by far more than the tolerance, so the comparison can fail.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import positions
from jaxlab.attention import dot_product_attention
from jaxlab.layers import MultiHeadAttention
from jaxlab.layers.attention import causal_block_layout

B, T, D, N, K, H = 2, 10, 16, 4, 2, 8
G = N // K
ATOL = 2e-5


def _layer(**kw):
  return MultiHeadAttention(num_heads=N, num_kv_heads=K, head_dim=H, position="rope", **kw)


def _x(seed=0, t=T):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, t, D)), jnp.float32)


def _positions(t=T, offsets=(0, 0)):
  return jnp.asarray(np.arange(t)[None] + np.asarray(offsets)[:, None], jnp.int32)


def _redraw(params, seed=1):
  """Every leaf replaced by N(0, 0.3^2) (norm scales: 1 + N(0, 0.3^2)), same tree."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  new = []
  for leaf in leaves:
    draw = 0.3 * rng.standard_normal(leaf.shape)
    new.append(jnp.asarray(draw + (1.0 if leaf.ndim == 1 else 0.0), jnp.float32))
  return jax.tree.unflatten(tree, new)


def _init(layer, x, pos, **kw):
  return _redraw(nn.meta.unbox(layer.init(jax.random.key(0), x, pos, **kw)["params"]))


def _project(params, x):
  """The fused projection, read as the layer lays it out: per kv head, G query heads, k, v."""
  qkv = jnp.einsum("btd,dkgh->btkgh", x, params["qkv"]["kernel"])
  return (qkv[:, :, :, :G].reshape(x.shape[0], x.shape[1], N, H), qkv[:, :, :, G],
          qkv[:, :, :, G + 1])


def _out(params, o_BTNH):
  return jnp.einsum("btnh,nhd->btd", o_BTNH, params["out"]["kernel"])


def _rms(x, scale):
  return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _explicit(params, x, pos, *, qk_norm=False, logn_train_len=0, scaling=None,
              temperature=1.0, seq_len=None):
  """QK-norm, then RoPE (with `scaling`), then q *= temperature * logn, k *= temperature."""
  q, k, v = _project(params, x)
  if qk_norm:
    q, k = _rms(q, params["q_norm"]["scale"]), _rms(k, params["k_norm"]["scale"])
  q = positions.apply_rope(q, pos, scaling=scaling, seq_len=seq_len)
  k = positions.apply_rope(k, pos, scaling=scaling, seq_len=seq_len)
  q, k = q * temperature, k * temperature
  if logn_train_len:
    p = np.asarray(pos, np.float64)
    logn = np.maximum(1.0, np.log(p + 1.0) / math.log(logn_train_len))  # Qwen's logn_attn
    q = q * jnp.asarray(logn, jnp.float32)[:, :, None, None]
  return _out(params, dot_product_attention(q, k, v, causal=True, implementation="xla"))


YARN = positions.RopeScaling("yarn", 4.0, original_max_len=4)
YARN_T = 0.1 * math.log(4.0) + 1.0  # sqrt(1/t), YaRN sec. 3.4

# (id, layer kwargs, explicit kwargs)
FEATURES = [
    ("qk_norm", dict(qk_norm=True), dict(qk_norm=True)),
    ("logn", dict(logn_train_len=3), dict(logn_train_len=3)),
    ("yarn", dict(rope_scaling=YARN), dict(scaling=YARN, temperature=YARN_T)),
    ("all", dict(qk_norm=True, logn_train_len=3, rope_scaling=YARN),
     dict(qk_norm=True, logn_train_len=3, scaling=YARN, temperature=YARN_T)),
]
# What "the feature dropped" means for each explicit kwarg.
DROPPED = {"qk_norm": False, "logn_train_len": 0, "temperature": 1.0}


@pytest.mark.parametrize("name,layer_kw,explicit_kw", FEATURES, ids=[f[0] for f in FEATURES])
def test_layer_equals_explicit_computation(name, layer_kw, explicit_kw):
  layer, x = _layer(**layer_kw), _x()
  pos = _positions(offsets=(0, 5))  # row 1 starts at 5: log-n must use the given positions
  params = _init(layer, x, pos)
  got = layer.apply({"params": params}, x, pos)
  np.testing.assert_allclose(got, _explicit(params, x, pos, **explicit_kw), atol=ATOL, rtol=1e-5)
  for key, off in DROPPED.items():
    if key in explicit_kw:
      without = _explicit(params, x, pos, **dict(explicit_kw, **{key: off}))
      assert np.abs(np.asarray(got - without)).max() > 100 * ATOL, key
  if "qk_norm" in explicit_kw:  # the learned scales matter (they are redrawn away from 1)
    unit = jax.tree.map(lambda a: a, params)
    unit["q_norm"]["scale"] = jnp.ones_like(unit["q_norm"]["scale"])
    without = _explicit(unit, x, pos, **explicit_kw)
    assert np.abs(np.asarray(got - without)).max() > 100 * ATOL


# ---------------------------------------------------------------------------------------------------
# Dynamic NTK under the KV cache.


def _decode(layer, params, x, prompt_len, offset=0):
  """Prefill of prompt_len tokens, then one token per call, at positions offset, offset + 1, ...;
  outputs [B, T, D]."""
  t = x.shape[1]
  cache = layer.init(jax.random.key(0), x, _positions(t), decode=True)["cache"]
  cache = jax.tree.map(jnp.zeros_like, cache)
  outs = []
  out, mut = layer.apply({"params": params, "cache": cache}, x[:, :prompt_len],
                         _positions(prompt_len) + offset, decode=True, mutable=["cache"])
  outs.append(out)
  for i in range(prompt_len, t):
    out, mut = layer.apply({"params": params, "cache": mut["cache"]}, x[:, i:i + 1],
                           jnp.full((B, 1), offset + i, jnp.int32), decode=True, mutable=["cache"])
    outs.append(out)
  return jnp.concatenate(outs, axis=1)


def test_dynamic_ntk_cached_decoding_within_and_beyond_the_training_length():
  """Within the training length the cache equals the full pass. Beyond it (the documented Hugging Face
  convention) token s is rotated with L_s = max(prompt, s + 1) and keeps that rotation in the cache,
  which is not the full pass (that rotates every token with L = T)."""
  x, p = _x(3), 6
  within = _layer(rope_scaling=positions.RopeScaling("dynamic_ntk", 2.0, original_max_len=T))
  params = _init(within, x, _positions())
  np.testing.assert_allclose(_decode(within, params, x, p),
                             within.apply({"params": params}, x, _positions()), atol=ATOL)

  scaling = positions.RopeScaling("dynamic_ntk", 2.0, original_max_len=4)
  beyond = _layer(rope_scaling=scaling)
  cached = _decode(beyond, params, x, p)
  lengths = np.broadcast_to(np.maximum(p, np.arange(T) + 1), (B, T))
  want = _explicit(params, x, _positions(), scaling=scaling, seq_len=lengths)
  np.testing.assert_allclose(cached, want, atol=ATOL, rtol=1e-5)
  # The prompt is rotated with L = P (not s + 1), the later tokens with their own L:
  naive = _explicit(params, x, _positions(), scaling=scaling, seq_len=lengths * 0 + np.arange(T) + 1)
  assert np.abs(np.asarray(cached - naive)[:, :p]).max() > 100 * ATOL
  full = beyond.apply({"params": params}, x, _positions())
  assert np.abs(np.asarray(cached - full)).max() > 100 * ATOL
  # L follows the positions, not the cache slots (as in the full pass): a stream continued at
  # position 100 is beyond the training length from its first token.
  for layer, offset in ((within, 100), (beyond, 100)):
    lengths = np.broadcast_to(np.maximum(offset + p, offset + np.arange(T) + 1), (B, T))
    want = _explicit(params, x, _positions() + offset, scaling=layer.rope_scaling, seq_len=lengths)
    np.testing.assert_allclose(_decode(layer, params, x, p, offset), want, atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Block-sparse family.


def _layout_by_hand(kind, nb, local, stride):
  """The causal window / strided layouts written out (independent of the library helpers)."""
  i, j = np.indices((nb, nb))
  see = (j <= i) & (i - j < local)
  if kind == "strided":
    see |= (j <= i) & (j % stride == stride - 1)
  return see


def test_causal_block_layout():
  for kind in ("window", "strided"):
    np.testing.assert_array_equal(causal_block_layout(kind, 9, local_blocks=2, stride=3),
                                  _layout_by_hand(kind, 9, 2, 3))
  big = causal_block_layout("bigbird", 12, local_blocks=2, num_global=2, num_random=2, seed=5)
  assert not np.triu(big, 1).any()  # causal
  base = _layout_by_hand("window", 12, 2, 1)
  base[:, :2] |= np.tri(12, dtype=bool)[:, :2]
  assert (big >= base).all()
  extra = (big & ~base).sum(axis=1)
  free = (~base & np.tri(12, dtype=bool)).sum(axis=1)
  np.testing.assert_array_equal(extra, np.minimum(2, free))  # num_random per row where possible
  # Prefix-consistent (cached decoding uses the layout of the cache length), and seeded.
  np.testing.assert_array_equal(
      causal_block_layout("bigbird", 7, local_blocks=2, num_global=2, num_random=2, seed=5),
      big[:7, :7])
  assert any(not np.array_equal(big, causal_block_layout("bigbird", 12, local_blocks=2, num_global=2,
                                                         num_random=2, seed=s)) for s in (6, 7, 8))


SPARSE = [
    ("window", dict(sparse_layout="window", sparse_block_size=3, sparse_local_blocks=2)),
    ("strided", dict(sparse_layout="strided", sparse_block_size=2, sparse_local_blocks=1,
                     sparse_stride=2)),
    ("bigbird", dict(sparse_layout="bigbird", sparse_block_size=2, sparse_local_blocks=1,
                     sparse_num_global=1, sparse_num_random=1, sparse_seed=3)),
]


@pytest.mark.parametrize("name,kw", SPARSE, ids=[s[0] for s in SPARSE])
def test_block_sparse_layer_equals_masked_softmax_and_its_cache(name, kw):
  layer, x, pos = _layer(family="block_sparse", **kw), _x(4), _positions()
  params = _init(layer, x, pos)
  got = layer.apply({"params": params}, x, pos)
  bs = kw["sparse_block_size"]
  nb = -(-T // bs)
  if name == "bigbird":
    layout = causal_block_layout("bigbird", nb, local_blocks=1, num_global=1, num_random=1, seed=3)
    assert (layout.sum(1)[2:] == 3).all()  # own block, the global one and one random earlier one
  else:
    layout = _layout_by_hand(name, nb, kw["sparse_local_blocks"], kw.get("sparse_stride", 1))
  i, j = np.indices((T, T))
  mask = layout[i // bs, j // bs] & (j <= i)
  q, k, v = _project(params, x)
  q, k = positions.apply_rope(q, pos), positions.apply_rope(k, pos)
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  logits = jnp.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(H)
  probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  want = _out(params, jnp.einsum("bnqk,bknh->bqnh", probs, v))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
  dense = _out(params, dot_product_attention(q, k, v, causal=True, implementation="xla"))
  assert np.abs(np.asarray(got - dense)).max() > 100 * ATOL  # the layout masks something
  np.testing.assert_allclose(_decode(layer, params, x, 3), got, atol=ATOL)


@pytest.mark.parametrize("kw,match", [
    (dict(sparse_layout="dilated"), "sparse_layout"),
    (dict(sparse_block_size=0), "sparse_block_size"),
    (dict(sparse_local_blocks=0), "sparse_local_blocks"),
    (dict(sparse_layout="strided", sparse_stride=0), "sparse_stride"),
    (dict(sparse_layout="bigbird", sparse_num_random=-1), "sparse_num_random"),
    (dict(causal=False), "causal"),
])
def test_block_sparse_bad_options_name_the_option(kw, match):
  layer = _layer(family="block_sparse", **kw)
  with pytest.raises(ValueError, match=match):
    layer.init(jax.random.key(0), _x(), _positions())


def test_block_sparse_rejects_segment_ids():
  layer = _layer(family="block_sparse", sparse_block_size=2)
  with pytest.raises(ValueError, match="segment ids"):
    layer.init(jax.random.key(0), _x(), _positions(), segment_ids_BT=jnp.zeros((B, T), jnp.int32))


@pytest.mark.parametrize("kw,match", [
    (dict(position="RoPE"), "position must be one of"),  # was silently no position at all
    (dict(position="xpos", rope_scaling=positions.RopeScaling("linear", 2.0)), "rope_scaling"),
    (dict(position="alibi", rope_scaling={"kind": "ntk", "factor": 2.0}), "rope_scaling"),
    (dict(position="xpos", rotary_fraction=0.5), "rotary_fraction"),
    (dict(rerope_window=4, rope_scaling=positions.RopeScaling("linear", 2.0)), "rerope_window"),
    (dict(rerope_leaky_k=4.0), "rerope_leaky_k"),
    (dict(logn_train_len=4, causal=False), "causal"),
])
def test_settings_the_position_would_ignore_are_refused(kw, match):
  layer = MultiHeadAttention(num_heads=N, num_kv_heads=K, head_dim=H,
                             **{"position": "rope", **kw})
  with pytest.raises(ValueError, match=match):
    layer.init(jax.random.key(0), _x(), _positions())


@pytest.mark.parametrize("kind", ["linear", "yarn", "dynamic_ntk"])
def test_rope_scaling_as_a_dict_equals_the_dataclass(kind):
  """Flax stores a dict attribute as a FrozenDict: the layer converts it (it read .kind and failed)."""
  fields = {"kind": kind, "factor": 2.0, "original_max_len": 4}
  x, pos = _x(), _positions()
  by_class = _layer(rope_scaling=positions.RopeScaling(**fields))
  params = _redraw(by_class.init(jax.random.key(0), x, pos))
  want = by_class.apply(params, x, pos)
  got = _layer(rope_scaling=dict(fields)).apply(params, x, pos)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert np.abs(np.asarray(want - _layer().apply(params, x, pos))).max() > 1e-3  # scaling acts


def test_xpos_center_keeps_far_positions_finite_and_cancels_in_the_logits():
  """xPos scales keys by zeta^(-(n - c)/512): at n ~ 40k with c = 0 they pass float32's range (NaN
  outputs); centred at c = 40000 the same window gives exactly the outputs of positions 0.. with
  c = 0 (xPos logits depend on m - n only, and the centre cancels)."""
  x = _x()
  near, far = _positions(), _positions() + 40_000
  xpos = lambda center: MultiHeadAttention(num_heads=N, num_kv_heads=K, head_dim=H, position="xpos",
                                           xpos_center=center)
  params = _init(xpos(0), x, near)
  reference = xpos(0).apply({"params": params}, x, near)
  assert np.isnan(np.asarray(xpos(0).apply({"params": params}, x, far))).any()  # the failure it fixes
  # (float32 RoPE angles of ~4e4 radians are good to ~2e-3: measured 3e-4 apart)
  np.testing.assert_allclose(xpos(40_000).apply({"params": params}, x, far), reference, atol=1e-3)
  np.testing.assert_allclose(xpos(17).apply({"params": params}, x, near), reference, atol=ATOL)


@pytest.mark.parametrize("kw, match", [
    (dict(window=2), "window=2 applies to the 'local' family, not 'softmax'"),
    (dict(feature_map="relu"), "feature_map='relu' applies to the 'linear' family"),
    (dict(num_features=7), "num_features=7 applies to the 'performer' family"),
    (dict(sparse_block_size=0), "sparse_block_size=0 applies to the 'block_sparse' family"),
    (dict(family="linear", window=4), "window=4 applies to the 'local' family, not 'linear'"),
    (dict(family="linear", implementation="pallas"),
     "implementation='pallas' applies to the 'softmax' family, not 'linear'"),
    (dict(family="performer", implementation="xla"), "implementation='xla' applies to the 'softmax'"),
])
def test_options_of_another_family_are_refused(kw, match):
  """Before, each was accepted and had no effect (window=2 gave full softmax attention)."""
  x = _x()
  with pytest.raises(ValueError, match=match):
    _layer(**kw).init(jax.random.key(0), x, _positions())


@pytest.mark.parametrize("family", ["softmax", "local", "linear"])
def test_decoding_a_bidirectional_layer_is_refused(family):
  """A cache sees only earlier tokens: decoding a causal=False layer gave causal outputs that
  differed from its full pass."""
  layer = _layer(causal=False, family=family, **(dict(window=2) if family == "local" else {}))
  x = _x()
  with pytest.raises(ValueError, match="decode=True needs causal=True"):
    layer.init(jax.random.key(0), x, _positions(), decode=True)
