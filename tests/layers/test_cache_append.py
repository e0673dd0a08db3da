"""The KV cache takes several tokens per call (speculative decoding's verification pass) and can be
rewound: chunked appends equal the full pass (and one-token decoding), for every KV-cache family and
cached position encoding, and for the recurrent states of linear attention and Performer; tokens after
a rewound cache index leave no trace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import positions
from jaxlab.decoding.speculative import _rewind
from jaxlab.layers import MultiHeadAttention

B, T, D, N, K, H = 2, 11, 16, 4, 2, 8
ATOL = 2e-5
CHUNKS = (3, 1, 4, 2, 1)  # the prefill, then appends of 1 to 4 tokens (sum T)

CASES = [
    ("rope", dict(position="rope")),
    ("alibi", dict(position="alibi")),
    ("t5", dict(position="t5")),
    ("learned-none", dict(position="none")),
    ("soft_cap", dict(position="rope", logit_soft_cap=2.0, qk_norm=True)),
    ("local", dict(position="rope", family="local", window=3)),
    ("block_sparse", dict(position="rope", family="block_sparse", sparse_layout="strided",
                          sparse_block_size=2, sparse_local_blocks=1, sparse_stride=2)),
    ("rerope", dict(position="rope", rerope_window=3)),
    # Recurrent states (no KV cache): the state before the last append and its keys/values.
    ("linear", dict(position="rope", family="linear")),
    ("performer", dict(position="rope", family="performer", num_features=16)),
]
SPARE = 5  # the cache is longer than what is written into it (as in speculative decoding)


def _layer(**kw):
  return MultiHeadAttention(num_heads=N, num_kv_heads=K, head_dim=H, **kw)


def _features(family):
  return dict(num_features=16) if family == "performer" else {}


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D)), jnp.float32)


def _pos(start, t):
  return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (B, t))


def _params(layer, x):
  """Parameters redrawn at O(1) scale, so that masking mistakes show far above the tolerance."""
  params = nn.meta.unbox(layer.init(jax.random.key(0), x, _pos(0, T))["params"])
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(1)
  return jax.tree.unflatten(tree, [jnp.asarray(0.4 * rng.standard_normal(a.shape) + (a.ndim == 1),
                                               jnp.float32) for a in leaves])


def _cache_for(layer, x, length):
  """The cache `init` makes for decoding `length` tokens (of x's width), zeroed."""
  cache = layer.init(jax.random.key(0), x[:, :1].repeat(length, axis=1), _pos(0, length),
                     decode=True)["cache"]
  return jax.tree.map(jnp.zeros_like, cache)


def _empty_cache(layer, x):
  return _cache_for(layer, x, T + SPARE)


def _chunked(layer, params, x, chunks, cache=None, start=0, prefill=False):
  """Decodes x[:, start:] in chunks of the given sizes; prefill: the first chunk is a prompt on an
  empty cache, attended as a full pass."""
  cache = _empty_cache(layer, x) if cache is None else cache
  outs = []
  for n, size in enumerate(chunks):
    out, mut = layer.apply({"params": params, "cache": cache}, x[:, start:start + size],
                           _pos(start, size), decode=True, prefill=prefill and n == 0,
                           mutable=["cache"])
    outs.append(out)
    cache, start = mut["cache"], start + size
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_chunked_appends_equal_the_full_pass(name, kw):
  layer, x = _layer(**kw), _x()
  params = _params(layer, x)
  full = layer.apply({"params": params}, x, _pos(0, T))
  for prefill in (False, True):
    got, _ = _chunked(layer, params, x, CHUNKS, prefill=prefill)
    np.testing.assert_allclose(got, full, atol=ATOL, rtol=1e-5)
  # An append that ignored the cache (each chunk attending to itself) would be far off.
  alone = jnp.concatenate([layer.apply({"params": params}, x[:, s:s + n], _pos(s, n))
                           for s, n in zip(np.cumsum((0,) + CHUNKS[:-1]), CHUNKS)], axis=1)
  assert np.abs(np.asarray(alone - full)).max() > 100 * ATOL


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_prefill_on_a_cache_that_holds_tokens_gives_nan(name, kw):
  """prefill=True computes a full pass over the new tokens only, so on a non-empty cache it would
  ignore the cached ones: every output is NaN (the index is traced and cannot raise)."""
  layer, x = _layer(**kw), _x()
  params = _params(layer, x)
  _, cache = _chunked(layer, params, x, (3,), prefill=True)
  again, _ = _chunked(layer, params, x, (4,), cache=cache, start=3, prefill=True)
  assert np.all(np.isnan(np.asarray(again)))
  first, _ = _chunked(layer, params, x, (3,), cache=_rewind(cache, 0), prefill=True)
  np.testing.assert_allclose(first, layer.apply({"params": params}, x[:, :3], _pos(0, 3)),
                             atol=ATOL, rtol=1e-5)


REWIND_CASES = [c for c in CASES if c[0] in ("rope", "t5", "local", "block_sparse", "rerope",
                                              "linear", "performer")]


@pytest.mark.parametrize("name,kw", REWIND_CASES, ids=[c[0] for c in REWIND_CASES])
def test_rewound_cache_forgets_the_tokens_after_its_index(name, kw):
  layer, x = _layer(**kw), _x()
  params = _params(layer, x)
  full = layer.apply({"params": params}, x, _pos(0, T))
  junk = _x(seed=7)
  _, cache = _chunked(layer, params, x, (4,))
  # Four tokens that are then thrown away (rejected drafts), written after position 3.
  _, cache = _chunked(layer, params, junk, (4,), cache=cache, start=4)
  got, _ = _chunked(layer, params, x, (3, 4), cache=_rewind(cache, 4), start=4)
  np.testing.assert_allclose(got, full[:, 4:], atol=ATOL, rtol=1e-5)
  kept, _ = _chunked(layer, params, x, (3, 4), cache=cache, start=4)  # not rewound: index 8
  assert np.abs(np.asarray(kept - full[:, 4:])).max() > 100 * ATOL


@pytest.mark.parametrize("family", ["softmax", "linear", "performer"])
def test_dynamic_ntk_beyond_training_length_appends_like_one_token_steps(family):
  """Beyond the training length each appended token is rotated with L = its position + 1, as when
  it is decoded alone (the prefill keeps L = prompt length); see jaxlab/layers/attention.py."""
  layer = _layer(position="rope", family=family, **_features(family),
                 rope_scaling=positions.RopeScaling("dynamic_ntk", 2.0, original_max_len=4))
  x = _x(3)
  params = _params(layer, x)
  one_by_one, _ = _chunked(layer, params, x, (3,) + (1,) * (T - 3), prefill=True)
  for prefill in (False, True):
    got, _ = _chunked(layer, params, x, CHUNKS, prefill=prefill)
    np.testing.assert_allclose(got, one_by_one, atol=ATOL, rtol=1e-5)
  assert np.abs(np.asarray(got - layer.apply({"params": params}, x, _pos(0, T)))).max() > 100 * ATOL


@pytest.mark.parametrize("name,kw", REWIND_CASES, ids=[c[0] for c in REWIND_CASES])
def test_rewind_into_an_append_keeps_its_first_tokens(name, kw):
  """As after a verification pass that accepted some drafts: of an append of x[4:6] + two junk tokens,
  the rewind to 6 keeps x[4:6]; decoding goes on as if the junk had never been seen."""
  layer, x = _layer(**kw), _x()
  params = _params(layer, x)
  full = layer.apply({"params": params}, x, _pos(0, T))
  _, cache = _chunked(layer, params, x, (4,), prefill=True)
  drafts = jnp.concatenate([x[:, 4:6], _x(seed=7)[:, 6:8]], axis=1)
  appended, cache = _chunked(layer, params, jnp.concatenate([x[:, :4], drafts], axis=1), (4,),
                             cache=cache, start=4)
  np.testing.assert_allclose(appended[:, :2], full[:, 4:6], atol=ATOL, rtol=1e-5)
  got, _ = _chunked(layer, params, x, (2, 3), cache=_rewind(cache, 6), start=6)
  np.testing.assert_allclose(got, full[:, 6:], atol=ATOL, rtol=1e-5)
  kept, _ = _chunked(layer, params, x, (2, 3), cache=cache, start=6)  # not rewound
  assert np.abs(np.asarray(kept - full[:, 6:])).max() > 100 * ATOL


@pytest.mark.parametrize("family", ["linear", "performer"])
def test_recurrent_state_without_its_rewind_entries_decodes_the_same(family):
  """init_cache(..., rewindable=False) leaves out what only a rewind needs; appends give the same."""
  from jaxlab.decoding.sampling import _without
  from jaxlab.layers.attention import REWIND_VARIABLES
  layer, x = _layer(position="rope", family=family, **_features(family)), _x()
  params = _params(layer, x)
  full = layer.apply({"params": params}, x, _pos(0, T))
  lean = _without(_empty_cache(layer, x), REWIND_VARIABLES)
  assert set(lean) == {"state", "cache_index"}
  for prefill in (False, True):
    got, cache = _chunked(layer, params, x, CHUNKS, cache=lean, prefill=prefill)
    np.testing.assert_allclose(got, full, atol=ATOL, rtol=1e-5)
    assert set(cache) == {"state", "cache_index"}


@pytest.mark.parametrize("family", ["linear", "performer"])
def test_recurrent_state_refuses_a_rewind_outside_its_last_append(family):
  """The state keeps only the last append: rewinding into the prefill or into an earlier append
  cannot be honoured, and every output is NaN rather than silently wrong (a rewind to 0 is the empty
  state and is fine)."""
  layer, x = _layer(position="rope", family=family, **_features(family)), _x()
  params = _params(layer, x)
  full = layer.apply({"params": params}, x, _pos(0, T))
  _, prefilled = _chunked(layer, params, x, (5,), prefill=True)
  into_prefill, _ = _chunked(layer, params, x, (2,), cache=_rewind(prefilled, 3), start=3)
  assert np.all(np.isnan(np.asarray(into_prefill)))
  _, cache = _chunked(layer, params, x, (2, 2), cache=prefilled, start=5)  # appends 5..6, 7..8
  earlier, _ = _chunked(layer, params, x, (2,), cache=_rewind(cache, 6), start=6)
  assert np.all(np.isnan(np.asarray(earlier)))
  again, _ = _chunked(layer, params, x, (3,), cache=_rewind(cache, 0), start=0)
  np.testing.assert_allclose(again, full[:, :3], atol=ATOL, rtol=1e-5)


# Recurrent states have no end, and the local family's ring wraps (test_local_ring below).
KV_CASES = [c for c in CASES if c[0] not in ("linear", "performer", "local")]


@pytest.mark.parametrize("name,kw", KV_CASES, ids=[c[0] for c in KV_CASES])
def test_writing_past_the_cache_end_gives_nan(name, kw):
  """A KV cache of T + SPARE slots: appends that fill it exactly stay finite (that they equal the full
  pass is test_chunked_appends_equal_the_full_pass); the append that would run past the last slot
  (dynamic_update_slice would clamp it onto the last slots) gives NaN, not silently wrong outputs."""
  layer, x = _layer(**kw), _x()
  params = _params(layer, x)
  fits = T + SPARE
  x_long = jnp.concatenate([x, x[:, :SPARE + 1]], axis=1)  # one token more than the cache holds
  out, cache = _chunked(layer, params, x_long, (fits - 2, 2), cache=_empty_cache(layer, x))
  assert np.isfinite(np.asarray(out)).all()
  over, _ = _chunked(layer, params, x_long, (1,), cache=cache, start=fits)
  assert np.all(np.isnan(np.asarray(over)))
  # Also when one multi-token append crosses the end.
  _, cache = _chunked(layer, params, x_long, (fits - 2,), cache=_empty_cache(layer, x))
  across, _ = _chunked(layer, params, x_long, (3,), cache=cache, start=fits - 2)
  assert np.all(np.isnan(np.asarray(across)))


@pytest.mark.parametrize("name,kw", [CASES[0], CASES[8]], ids=["kv_cache", "recurrent"])
def test_decoding_without_the_layers_cache_and_with_segment_ids_is_refused(name, kw):
  """Decoding needs the cache that init built: without it, Flax would create an empty one as long
  as the call and the layer would decode with no history. Segment ids were dropped silently in
  decoding (the cache holds one sequence per row)."""
  layer, x = _layer(**kw), _x()
  params = _params(layer, x)
  with pytest.raises(ValueError, match="needs this layer's KV cache"):
    layer.apply({"params": params}, x[:, :1], _pos(0, 1), decode=True, mutable=["cache"])
  segments = jnp.zeros((B, 2), jnp.int32)
  with pytest.raises(ValueError, match="segment_ids_BT do not apply with decode=True"):
    layer.apply({"params": params, "cache": _empty_cache(layer, x)}, x[:, :2], _pos(0, 2),
                segment_ids_BT=segments, decode=True, mutable=["cache"])


# --- The local family's ring (rolling buffer) cache. ---

def _ring_layer(window=3, **kw):
  return _layer(position="rope", family="local", window=window, **kw)


def _long_x(length, seed=2):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, length, D)), jnp.float32)


@pytest.mark.parametrize("prompt,prefill", [(3, True), (3, False), (30, True)])  # vs the ring: shorter
def test_local_ring_decodes_past_its_slots_like_the_full_pass(prompt, prefill):  # / longer
  """A ring of window + APPEND_LIMIT slots (not one per token) decodes a sequence 4x longer than it,
  in appends of 1 to 4 tokens after the prompt, to the full pass's outputs; a prompt longer than
  the ring keeps its last tokens. A ring that read a stale slot (an older token in a wrapped slot,
  or a slot not written yet) would be off by far more than the tolerance."""
  from jaxlab.layers.attention import APPEND_LIMIT
  layer, length = _ring_layer(), 80
  x = _long_x(length)
  params = _params(layer, x[:, :T])
  cache = _cache_for(layer, x, length)
  slots = layer.window + APPEND_LIMIT
  assert cache["cached_key"].shape == (B, slots, K, H) and slots * 4 <= length
  chunks = [prompt] + [1, 4, 2, 3] * 40
  chunks = chunks[:next(n for n in range(len(chunks)) if sum(chunks[:n]) >= length)]
  chunks[-1] -= sum(chunks) - length
  got, _ = _chunked(layer, params, x, chunks, cache=cache, prefill=prefill)
  full = layer.apply({"params": params}, x, _pos(0, length))
  np.testing.assert_allclose(got, full, atol=ATOL, rtol=1e-5)


def test_local_ring_rewinds_within_the_last_append():
  """Speculative decoding sets the index back into its last append: the ring has not overwritten
  anything a later query needs, and the re-appended tokens replace the dropped ones."""
  layer, length = _ring_layer(), 60
  x, other = _long_x(length), _long_x(length, seed=5)
  params = _params(layer, x[:, :T])
  _, cache = _chunked(layer, params, x, [20] + [4] * 8, cache=_cache_for(layer, x, length),
                      prefill=True)  # 52 tokens: the ring of 19 slots has wrapped twice
  _, cache = _chunked(layer, params, other, (4,), cache=cache, start=52)  # drafts, then dropped
  got, _ = _chunked(layer, params, x, (1, 4, 3), cache=_rewind(cache, 52), start=52)
  full = layer.apply({"params": params}, x, _pos(0, length))
  np.testing.assert_allclose(got, full[:, 52:], atol=ATOL, rtol=1e-5)


def test_a_ring_too_short_to_wrap_gives_nan_past_its_end():
  """A ring made for a short sequence (fewer than window + T slots) cannot take an append of T
  tokens past its end: NaN, as for the other KV caches, rather than keys it has overwritten."""
  layer = _ring_layer(window=3)
  x = _long_x(12)
  params = _params(layer, x[:, :T])
  cache = _cache_for(layer, x, 6)  # 6 slots < window 3 + 4 appended tokens
  out, cache = _chunked(layer, params, x, (2, 4), cache=cache, prefill=True)  # fills it exactly
  np.testing.assert_allclose(out, layer.apply({"params": params}, x[:, :6], _pos(0, 6)),
                             atol=ATOL, rtol=1e-5)
  over, _ = _chunked(layer, params, x, (4,), cache=cache, start=6)
  assert np.all(np.isnan(np.asarray(over)))
  ok, _ = _chunked(layer, params, x, (2,), cache=cache, start=6)  # 6 >= 3 + 2: it wraps
  np.testing.assert_allclose(ok, layer.apply({"params": params}, x[:, :8], _pos(0, 8))[:, 6:],
                             atol=ATOL, rtol=1e-5)


def test_a_rewind_deeper_than_the_ring_allows_gives_nan():
  """A rewind of up to APPEND_LIMIT tokens from the furthest one written decodes as the full pass;
  one token deeper, the ring has overwritten a key of the query's window (with the tokens past the
  rewind still in their slots): NaN, not finite wrong values (they were off by ~0.4)."""
  from jaxlab.layers.attention import APPEND_LIMIT
  layer, length = _ring_layer(), 60
  x = _long_x(length)
  params = _params(layer, x[:, :T])
  _, cache = _chunked(layer, params, x, (40,), cache=_cache_for(layer, x, length), prefill=True)
  full = layer.apply({"params": params}, x, _pos(0, length))
  back = 40 - APPEND_LIMIT
  ok, _ = _chunked(layer, params, x, (1, 1), cache=_rewind(cache, back), start=back)
  np.testing.assert_allclose(ok, full[:, back:back + 2], atol=ATOL, rtol=1e-5)
  deep, _ = _chunked(layer, params, x, (1,), cache=_rewind(cache, back - 1), start=back - 1)
  assert np.all(np.isnan(np.asarray(deep)))
  # Before the ring has wrapped, the tokens past a rewind sit in slots no query reads: fine.
  _, cache = _chunked(layer, params, x, (19,), cache=_cache_for(layer, x, length), prefill=True)
  early, _ = _chunked(layer, params, x, (1, 1), cache=_rewind(cache, 1), start=1)
  np.testing.assert_allclose(early, full[:, 1:3], atol=ATOL, rtol=1e-5)


def test_a_ring_of_exactly_window_plus_t_slots_wraps():
  layer = _ring_layer(window=3)
  x = _long_x(12)
  params = _params(layer, x[:, :T])
  _, cache = _chunked(layer, params, x, (5,), cache=_cache_for(layer, x, 5), prefill=True)
  got, _ = _chunked(layer, params, x, (2, 2, 2), cache=cache, start=5)  # 5 slots = 3 + 2
  np.testing.assert_allclose(got, layer.apply({"params": params}, x[:, :11], _pos(0, 11))[:, 5:],
                             atol=ATOL, rtol=1e-5)
