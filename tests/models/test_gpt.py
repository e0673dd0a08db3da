"""The GPT: causality by gradients, cached decoding equals recomputation, GQA and positions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import positions
from jaxlab.decoding import sampling
from jaxlab.models.gpt import GPT, GPTConfig


def tiny_gpt(**kw):
  args = dict(vocab_size=11, num_layers=2, width=32, num_heads=4, num_kv_heads=4, max_len=24)
  args.update(kw)
  return GPT(GPTConfig(**args))


ALL_POSITIONS = ["learned", "sinusoidal", "rope", "xpos", "alibi", "t5", "none"]


FAMILIES = [dict(attention="local", attention_window=3), dict(attention="linear"),
            dict(attention="performer", num_features=16),
            dict(attention="flash", gau_qk_dim=8, flash_chunk=4, gau_offset_init=0.5),
            dict(attention="gau", gau_qk_dim=8, gau_offset_init=0.5),
            # Offsets 0.5 (as above): at the paper's init (beta = 0, gamma ~ N(0, 0.02)) the softmax
            # is near uniform and decoding every token a position off changed no logit by 1e-6.
            dict(attention="gau", gau_qk_dim=8, gau_kind="softmax", logn_train_len=4,
                 gau_offset_init=0.5),
            # Blocks of 2; block i sees itself and the odd blocks j <= i (not block 0, from block 2 on).
            dict(attention="block_sparse", sparse_layout="strided", sparse_block_size=2,
                 sparse_local_blocks=1, sparse_stride=2)]
RE_ROPE = [dict(rerope_window=3), dict(rerope_window=3, rerope_leaky_k=4.0)]


@pytest.mark.parametrize("position,kv_heads,extra",
                         [(p, 4, {}) for p in ALL_POSITIONS] + [("rope", 1, {})]
                         + [("rope", 2, f) for f in FAMILIES] + [("rope", 2, RE_ROPE[0])])
def test_causality_by_gradient(position, kv_heads, extra):
  """d logits[:, t] / d input[:, s] is exactly zero for every s > t, and nonzero for s <= t
  (for the local and block-sparse families: only where their masks reach, through the layers)."""
  model = tiny_gpt(position=position, num_kv_heads=kv_heads, **extra)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 11)
  params = model.init(jax.random.key(1), tokens)["params"]
  x_onehot = jax.nn.one_hot(tokens, 11)
  # One Jacobian for every output position: d sum_v logits[b, t, v] / d x[b', s, :].
  jac = jax.jit(jax.jacrev(lambda x: _apply_soft(model, params, x).sum(-1)))(x_onehot)  # [B,T,B,T,V]
  influence = np.abs(np.asarray(jac)).sum(axis=(0, 2, 4))  # [t, s]
  reach = _reach(extra, tokens.shape[1], layers=2)
  for t in range(tokens.shape[1]):
    per_position = influence[t]
    assert np.all(per_position[reach[t]] > 0.0), (t, per_position)
    assert np.all(per_position[~reach[t]] == 0.0), (t, per_position)


@pytest.mark.parametrize("extra", [dict(position=p) for p in ALL_POSITIONS] + FAMILIES
                         + [dict(tie_embeddings=False, qk_norm=True, logit_soft_cap=30.0),
                            dict(mtp_heads=2), dict(medusa_heads=2, tie_embeddings=False)])
def test_every_parameter_has_logical_axis_names(extra):
  """Each parameter is boxed with one logical name per axis, so the mesh rules place all of them
  (an unnamed one would silently be replicated on every device)."""
  boxed = tiny_gpt(**extra).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, (name, leaf.names, leaf.value.shape)


def test_untied_head_is_its_own_parameter():
  """tie_embeddings=False: logits come from a separate [width, vocab] head, not the embedding."""
  tokens = jnp.arange(8)[None] % 11
  tied, untied = tiny_gpt(), tiny_gpt(tie_embeddings=False)
  p_tied = nn.meta.unbox(tied.init(jax.random.key(0), tokens)["params"])
  p_untied = nn.meta.unbox(untied.init(jax.random.key(0), tokens)["params"])
  assert "head" not in p_tied and p_untied["head"]["kernel"].shape == (32, 11)
  count = lambda p: sum(x.size for x in jax.tree.leaves(p))
  assert count(p_untied) == count(p_tied) + 32 * 11
  # The logits move with the head kernel and not with the embedding's transpose.
  grads = jax.grad(lambda p: untied.apply({"params": p}, tokens).sum())(p_untied)
  assert np.abs(grads["head"]["kernel"]).sum() > 0
  zero_head = jax.tree.map(lambda x: x, p_untied)
  zero_head["head"]["kernel"] = jnp.zeros_like(p_untied["head"]["kernel"])
  np.testing.assert_array_equal(untied.apply({"params": zero_head}, tokens), 0.0)


def _reach(extra, t, layers):
  """[t, s] bool: whether input s can influence output t through `layers` attention layers, from the
  masks written out here (causal; local: s >= t - w; strided block-sparse with blocks of b: block(s)
  is within local_blocks of block(t) or a summary block, block % stride == stride - 1)."""
  i, j = np.indices((t, t))
  see = j <= i
  if extra.get("attention") == "local":
    see &= j >= i - extra["attention_window"]
  if extra.get("attention") == "block_sparse":
    assert extra["sparse_layout"] == "strided"
    bi, bj, st = i // extra["sparse_block_size"], j // extra["sparse_block_size"], extra["sparse_stride"]
    see &= (bi - bj < extra["sparse_local_blocks"]) | (bj % st == st - 1)
  reach = see
  for _ in range(layers - 1):
    reach = (reach.astype(int) @ see.astype(int)) > 0
  return reach


def _apply_soft(model, params, x_onehot_BTV):
  """Runs the model with soft one-hot inputs: the embedding lookup replaced by x @ table."""
  import flax.linen as nn

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
      return x_onehot_BTV @ context.module.embedding
    return next_fun(*args, **kwargs)

  tokens = jnp.argmax(x_onehot_BTV, axis=-1)
  with nn.intercept_methods(interceptor):
    return model.apply({"params": params}, tokens)


@pytest.mark.parametrize("position,kv_heads,extra", [(p, 4, {}) for p in ALL_POSITIONS] + [
    ("rope", 2, {}),
    ("rope", 4, {"rotary_fraction": 0.5, "logn_train_len": 4,
                 "rope_scaling": positions.RopeScaling(kind="yarn", factor=2.0, original_max_len=8)}),
] + [("rope", 2, f) for f in FAMILIES] + [
    ("learned", 4, f) for f in FAMILIES if f["attention"] != "block_sparse"] + [
    ("rope", 2, {"qk_norm": True, "logit_soft_cap": 5.0, "tie_embeddings": False}),
    # Dynamic NTK within its training length (beyond it: tests/layers/test_attention_layer.py).
    ("rope", 2, {"rope_scaling": positions.RopeScaling("dynamic_ntk", 2.0, original_max_len=12)}),
] + [("rope", 2, r) for r in RE_ROPE])
def test_cached_decoding_equals_full_recompute(position, kv_heads, extra):
  model = tiny_gpt(position=position, num_kv_heads=kv_heads, **extra)
  b, p, n = 2, 5, 7
  tokens = jax.random.randint(jax.random.key(2), (b, p + n), 0, 11)
  # Sharpened: at the 0.02 init, decoding each token one position off moved RoPE's and xPos's logits
  # by only ~1.4e-4 (14x the tolerance); at O(1) attention logits by far more.
  params = _sharpen(model.init(jax.random.key(3), tokens)["params"])
  full_logits = model.apply({"params": params}, tokens)  # [B, P+N, V]

  step = jax.jit(lambda cache, x, pos: model.apply({"params": params, "cache": cache}, x, pos,
                                                   decode=True, mutable=["cache"]))
  cache = sampling.init_cache(model, b, p + n)
  logits, mutated = step(cache, tokens[:, :p], jnp.broadcast_to(jnp.arange(p), (b, p)))
  np.testing.assert_allclose(logits, full_logits[:, :p], atol=1e-5)
  cache = mutated["cache"]
  for i in range(p, p + n):
    logits, mutated = step(cache, tokens[:, i:i + 1], jnp.full((b, 1), i))
    cache = mutated["cache"]
    np.testing.assert_allclose(logits[:, 0], full_logits[:, i], atol=1e-5)


def test_local_family_decodes_a_long_sequence_in_a_ring_of_window_slots():
  """The local family's cache holds window + APPEND_LIMIT slots per layer, not one per token, and
  decoding 72 tokens one by one through it (it wraps three times) gives the full pass's logits."""
  from jaxlab.layers.attention import APPEND_LIMIT
  model = tiny_gpt(position="rope", attention="local", attention_window=3, max_len=72)
  b, p, total = 2, 5, 72
  tokens = jax.random.randint(jax.random.key(2), (b, total), 0, 11)
  params = _sharpen(model.init(jax.random.key(3), tokens)["params"])
  full_logits = model.apply({"params": params}, tokens)
  cache = sampling.init_cache(model, b, total)
  shapes = {x.shape for x in jax.tree.leaves(cache) if x.ndim == 4}
  assert shapes == {(b, 3 + APPEND_LIMIT, 4, 8)}, shapes
  step = jax.jit(lambda cache, x, pos: model.apply({"params": params, "cache": cache}, x, pos,
                                                   decode=True, mutable=["cache"]))
  logits, mutated = step(cache, tokens[:, :p], jnp.broadcast_to(jnp.arange(p), (b, p)))
  got = [logits]
  for i in range(p, total):
    logits, mutated = step(mutated["cache"], tokens[:, i:i + 1], jnp.full((b, 1), i))
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), full_logits, atol=1e-5)


def test_generate_greedy_matches_argmax_of_full_forward():
  """At O(1) weights (the 0.02 init's greedy output ignored positions: decoding at position p + 1
  instead of p passed), so each generated token depends on where it is."""
  model = tiny_gpt(position="rope")
  prompt = jnp.array([[1, 2, 3]])
  params = jax.tree.map(lambda x: 30.0 * x, model.init(jax.random.key(4), prompt)["params"])
  out = sampling.generate(model, params, prompt, jax.random.key(0), num_tokens=6, temperature=0.0)
  assert len(set(np.asarray(out[0, 3:]).tolist())) > 2  # not a constant continuation
  seq = prompt
  full_forward = jax.jit(lambda seq: model.apply({"params": params}, seq))  # not op by op
  for _ in range(6):
    nxt = jnp.argmax(full_forward(seq)[:, -1], axis=-1)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(out, seq)


@pytest.mark.parametrize("prompt_len", [3, 8, 11])
def test_generate_long_goes_past_learned_table(prompt_len):
  """Greedy generate_long == argmax of a full pass over the last max_len tokens at every step, for a
  prompt shorter than, as long as, and longer than the table (returned whole)."""
  model = tiny_gpt(position="learned", max_len=8)
  prompt = jnp.arange(1, 1 + prompt_len)[None] % model.config.vocab_size
  params = model.init(jax.random.key(5), prompt[:, :8])["params"]
  out = sampling.generate_long(model, params, prompt, jax.random.key(0), num_tokens=12,
                               temperature=0.0)
  assert out.shape == (1, prompt_len + 12)
  np.testing.assert_array_equal(out[:, :prompt_len], prompt)
  forward = jax.jit(lambda window: jnp.argmax(model.apply({"params": params}, window)[:, -1], -1))
  seq = prompt
  for _ in range(12):
    seq = jnp.concatenate([seq, forward(seq[:, -8:])[:, None]], axis=1)
  np.testing.assert_array_equal(out, seq)


def _first_stop(row, start, stop):
  """The index just past the first occurrence of `stop` in row[start:], or None."""
  for end in range(start + len(stop), len(row) + 1):
    if tuple(row[end - len(stop):end]) == stop:
      return end
  return None


@pytest.mark.parametrize("position,prompt_len", [("rope", 3), ("learned", 3), ("learned", 6)])
def test_decoding_ends_at_stop_ids_with_the_tokens_it_had_without_them(position, prompt_len):
  """stop_ids end generation once every row's continuation holds them (not counting the prompt),
  with the same tokens up to there as without; the rest is 0. Stops are cut from the output itself
  so that they end inside the cached part, across the switch from the cache to full passes (a
  learned table of 8 positions: the prompt leaves 8 - P cached tokens) and after it; two rows stop
  at different steps; ids never sampled leave the output as it was."""
  model = tiny_gpt(position=position, max_len=8, vocab_size=5)
  prompt = (jnp.arange(prompt_len)[None] + jnp.arange(2)[:, None]) % 5  # 2 rows
  params = model.init(jax.random.key(1), prompt)["params"]
  run = lambda p, **kw: np.asarray(sampling.generate_long(model, params, p, jax.random.key(2),
                                                          num_tokens=30, temperature=1.0, **kw))
  full = run(prompt[:1])
  cached = 8 - prompt_len  # new tokens decoded with the cache (learned table)
  row = full[0].tolist()
  ends_seen = set()
  for first, last in ((0, 2), (cached - 1, cached + 2), (20, 24)):  # cached / the switch / beyond
    stop = tuple(row[prompt_len + first:prompt_len + last])
    end = _first_stop(row, prompt_len, stop)  # this occurrence or an earlier one
    ends_seen.add(end - prompt_len)
    got = run(prompt[:1], stop_ids=stop)
    np.testing.assert_array_equal(got[:, :end], full[:, :end])
    assert (got[:, end:] == 0).all(), (stop, end)
  assert min(ends_seen) <= cached and max(ends_seen) > cached + 1, ends_seen
  # two rows: each keeps sampling until both have the stop; ids never sampled change nothing
  both = run(prompt)
  stop = (int(both[1, -1]),)
  ends = [_first_stop(r.tolist(), prompt_len, stop) for r in both]
  got = run(prompt, stop_ids=stop)
  np.testing.assert_array_equal(got[:, :max(ends)], both[:, :max(ends)])
  assert (got[:, max(ends):] == 0).all()
  assert (run(prompt, stop_ids=(5,)) == both).all()  # an id outside the vocabulary
  # An occurrence that starts in the prompt does not count, also when the full passes begin at
  # once (a prompt as long as the table: the window holds prompt tokens).
  long_prompt = jnp.asarray([[1, 2, 3, 4, 0, 1, 2, 3]])
  whole = run(long_prompt)
  stop = (3, int(whole[0, 8]))
  end = _first_stop(whole[0].tolist(), 8, stop)
  got = run(long_prompt, stop_ids=stop)
  if end is None:
    np.testing.assert_array_equal(got, whole)
  else:
    assert end > 9 and (got[:, :end] == whole[:, :end]).all() and (got[:, end:] == 0).all()


def test_stop_ids_edges_zero_padding_rows_and_the_first_generated_tokens():
  """Edges the equivalence test does not reach (found by mutating the code): a stop ending in id 0
  must not match the buffer's unfilled zeros; a row that stopped inside the table stays stopped
  while another goes on past it; with a prompt as long as the table, a stop made of the first L
  generated tokens ends decoding there; a stop of exactly max_len ids is accepted; ids may be any
  sequence of ints, and ids outside int32 are refused by name."""
  model = tiny_gpt(position="learned", max_len=8, vocab_size=5)
  params = model.init(jax.random.key(1), jnp.zeros((1, 3), jnp.int32))["params"]
  run = lambda p, seed=2, **kw: np.asarray(sampling.generate_long(
      model, params, jnp.asarray(p), jax.random.key(seed), num_tokens=24, temperature=1.0, **kw))
  prompt = [[1, 2, 3]]
  full = run(prompt)
  pairs = {tuple(full[0, k:k + 2]) for k in range(3, full.shape[1] - 1)}
  a = int(full[0, 3])  # the first generated token, followed by the buffer's zeros at first
  assert (a, 0) not in pairs
  np.testing.assert_array_equal(run(prompt, stop_ids=(a, 0)), full)
  # two rows: row 0 stops inside the table (5 cached tokens), row 1 only after it
  rows = [[1, 2, 3], [4, 0, 1]]
  both = run(rows, seed=3)  # (seed 2 draws no such stop)
  found = None
  for stop in [(t, u) for t in range(5) for u in range(5)] + [(t, u, v) for t in range(5)
                                                              for u in range(5) for v in range(5)]:
    ends = [_first_stop(r.tolist(), 3, stop) for r in both]
    if None in ends or not ends[0] - 3 <= 5 < ends[1] - 3:
      continue
    again = _first_stop(both[0, :ends[1]].tolist(), ends[0], stop)  # row 0 once more, by then
    if again is None:  # so row 0 must stay stopped after the switch for decoding to end
      found = stop, ends
      break
  assert found is not None
  stop, ends = found
  got = run(rows, seed=3, stop_ids=list(stop))  # a list works as well as a tuple
  np.testing.assert_array_equal(got[:, :ends[1]], both[:, :ends[1]])
  assert (got[:, ends[1]:] == 0).all()
  # a prompt of the table's length: full passes from the first token
  long_prompt = [[1, 2, 3, 4, 0, 1, 2, 3]]
  whole = run(long_prompt)
  stop = tuple(int(t) for t in whole[0, 8:11])
  got = run(long_prompt, stop_ids=stop)
  np.testing.assert_array_equal(got[:, :11], whole[:, :11])
  assert (got[:, 11:] == 0).all()
  eight = tuple(int(t) for t in whole[0, 8:16])  # exactly max_len ids
  np.testing.assert_array_equal(run(long_prompt, stop_ids=eight)[:, :16], whole[:, :16])
  with pytest.raises(ValueError, match="stop_ids must be int32 token ids, got 4294967296"):
    sampling.generate(model, params, jnp.asarray(prompt), jax.random.key(0), num_tokens=2,
                      stop_ids=[2**32])


def test_stop_ids_longer_than_the_learned_context_are_refused():
  model = tiny_gpt(position="learned", max_len=8, vocab_size=5)
  params = model.init(jax.random.key(1), jnp.zeros((1, 3), jnp.int32))["params"]
  with pytest.raises(ValueError, match="stop_ids: 9 ids, more than the model's context"):
    sampling.generate_long(model, params, jnp.zeros((1, 3), jnp.int32), jax.random.key(0),
                           num_tokens=20, stop_ids=(1,) * 9)
  # the plain generate with a rope model: more ids than new tokens can never be completed
  model = tiny_gpt(position="rope", max_len=8, vocab_size=5)
  params = model.init(jax.random.key(1), jnp.zeros((1, 3), jnp.int32))["params"]
  prompt = jnp.ones((1, 3), jnp.int32)
  np.testing.assert_array_equal(
      sampling.generate(model, params, prompt, jax.random.key(0), num_tokens=4, stop_ids=(1,) * 5),
      sampling.generate(model, params, prompt, jax.random.key(0), num_tokens=4))


def test_bad_token_shape_and_config_are_reported():
  model = tiny_gpt()
  with pytest.raises(ValueError, match="tokens must be"):
    model.init(jax.random.key(0), jnp.zeros((2, 3, 4), jnp.int32))
  with pytest.raises(ValueError, match="position must be"):
    tiny_gpt(position="rotary")
  with pytest.raises(ValueError, match="num_kv_heads"):
    tiny_gpt(num_kv_heads=3)
  for name, bad in (("medusa_heads", 2.5), ("mtp_heads", True)):
    with pytest.raises(ValueError, match=f"{name} must be an int"):
      tiny_gpt(**{name: bad})
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  for bad in (model.config.vocab_size, -1):  # NaN logits, or another token's row
    with pytest.raises(ValueError, match=r"tokens_BT holds token ids outside \[0, "):
      model.apply(params, jnp.array([[1, bad, 2]], jnp.int32))


def test_sizes_dropout_and_positions_shape_are_checked():
  """Direct API users got ZeroDivisionError / "math domain error" for zero or negative sizes, a
  0-wide MLP or dropout 1.5 were accepted, and positions of another shape were ignored ("none") or
  failed to broadcast ("learned")."""
  for name, bad in (("num_layers", 0), ("num_layers", -1), ("num_heads", 0), ("num_kv_heads", 0),
                    ("width", 0), ("num_layers", 2.0)):
    with pytest.raises(ValueError, match=rf"{name} must be an int >= 1, got {bad!r}"):
      tiny_gpt(**{name: bad})
  with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
    tiny_gpt(dropout=1.5)
  with pytest.raises(ValueError, match="mlp_ratio \\* width must give an MLP at least 1 wide"):
    tiny_gpt(mlp_ratio=0.0)
  tokens = jnp.zeros((2, 6), jnp.int32)
  for position in ("none", "learned"):
    model = tiny_gpt(position=position)
    params = model.init(jax.random.key(0), tokens)
    for bad in (jnp.zeros((2, 5), jnp.int32), jnp.zeros((6,), jnp.int32)):
      with pytest.raises(ValueError, match=r"positions_BT must have the shape of tokens_BT \(2, 6\)"):
        model.apply(params, tokens, bad)


def test_residual_projections_start_at_gpt2_scale():
  """GPT-2 (Radford et al. 2019, sec. 2.3): the projections into the residual stream (attention
  output, MLP output) start with std 0.02 / sqrt(2L); the others with 0.02."""
  layers = 8
  model = tiny_gpt(num_layers=layers, width=64, num_heads=4, num_kv_heads=4, mlp_ratio=8.0)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  residual = [v for k, v in flat.items() if k.endswith(("attn/out/kernel", "mlp/wo/kernel"))]
  others = [v for k, v in flat.items() if k.endswith(("qkv/kernel", "mlp/wi/kernel"))]
  assert len(residual) == 2 * layers and len(others) == 2 * layers, sorted(flat)
  np.testing.assert_allclose(np.std(np.concatenate([v.ravel() for v in residual])),
                             0.02 / np.sqrt(2 * layers), rtol=0.05)
  np.testing.assert_allclose(np.std(np.concatenate([v.ravel() for v in others])), 0.02, rtol=0.05)


def test_dropout_runs_in_training_only():
  model = tiny_gpt(dropout=0.5)
  tokens = jnp.array([[1, 2, 3, 4, 5, 6]], jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  run = lambda key, train: model.apply(params, tokens, train=train, rngs={"dropout": key})
  np.testing.assert_array_equal(run(jax.random.key(1), False), run(jax.random.key(2), False))
  np.testing.assert_array_equal(run(jax.random.key(1), False), model.apply(params, tokens))
  assert not np.allclose(run(jax.random.key(1), True), run(jax.random.key(2), True))


def test_xpos_model_centres_its_scales_on_half_max_len():
  """A 64k-position xPos GPT at positions ~40k: uncentred, the key scales zeta^(-n/512) pass float32's
  range there (NaN logits); the GPT centres them on max_len // 2."""
  model = tiny_gpt(position="xpos", max_len=65536)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  logits = model.apply(params, tokens, positions_BT=jnp.arange(40_000, 40_004)[None])
  assert np.isfinite(np.asarray(logits)).all()


def test_positions_outside_the_learned_table_never_wrap():
  """-1 read the table's last row and max_len and beyond gave NaN only by accident of the gather."""
  model = tiny_gpt(max_len=8)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match=r"positions must lie in \[0, max_len=8\)"):
    model.apply(params, tokens, positions_BT=jnp.asarray([[-1, 0, 1, 2]]))
  apply = jax.jit(model.apply)
  assert np.isfinite(np.asarray(apply(params, tokens, positions_BT=jnp.asarray([[4, 5, 6, 7]])))).all()
  for outside in (-1, 8):  # traced: a NaN row (the loss shows it) instead of another row's vector
    logits = apply(params, tokens, positions_BT=jnp.asarray([[0, 1, 2, outside]]))
    assert np.isnan(np.asarray(logits)[0, 3]).all()


@pytest.mark.parametrize("position", ALL_POSITIONS)
def test_packed_sequences_equal_separate_runs(position):
  """Two sequences packed in one row (segment ids, positions restarting at 0) give the logits that
  each gives alone."""
  model = tiny_gpt(position=position)
  a = jax.random.randint(jax.random.key(6), (1, 5), 0, 11)
  b = jax.random.randint(jax.random.key(7), (1, 7), 0, 11)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[0] * 5 + [1] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  params = model.init(jax.random.key(8), packed)["params"]
  out = model.apply({"params": params}, packed, pos, segments)
  np.testing.assert_allclose(out[:, :5], model.apply({"params": params}, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], model.apply({"params": params}, b), atol=1e-5)


def _sharpen(params, factor=8.0):
  """qkv kernels times `factor`: O(1) attention logits, so position effects show far above 1e-5.
  GAU/FLASH layers: their query/key scales gamma and their output kernel times `factor` (decoding
  a position off then moves the logits by 3e-4 to 3e-3, not 3e-5)."""
  def sharpened(path, x):
    name = jax.tree_util.keystr(path)
    gau = "['gau_" in name and ("['gamma']" in name or "['out']" in name)
    return x * factor if "qkv" in name or gau else x
  return jax.tree_util.tree_map_with_path(sharpened, params)


@pytest.mark.parametrize("extra", [
    {"logn_train_len": 3},  # the query scale depends on its absolute position
    {"rope_scaling": positions.RopeScaling("dynamic_ntk", 2.0, original_max_len=4)},  # on the length
], ids=["logn", "dynamic_ntk"])
def test_packed_sequences_restart_absolute_position_effects(extra):
  """With encodings that depend on absolute positions (relative RoPE alone does not), packed rows
  equal separate runs, and would not if the restart were ignored: continuing positions, or (dynamic
  NTK) the row's length instead of each segment's."""
  model = tiny_gpt(position="rope", **extra)
  a = jax.random.randint(jax.random.key(6), (1, 5), 0, 11)
  b = jax.random.randint(jax.random.key(7), (1, 7), 0, 11)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[0] * 5 + [1] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  params = _sharpen(model.init(jax.random.key(8), packed)["params"])
  run = lambda *args: np.asarray(model.apply({"params": params}, *args))
  alone_a, alone_b, out = run(a), run(b), run(packed, pos, segments)
  np.testing.assert_allclose(out[:, :5], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], alone_b, atol=1e-5)
  continuing = run(packed, jnp.arange(12)[None], segments)
  assert np.abs(continuing[:, 5:] - alone_b).max() > 1e-3
  if "rope_scaling" in extra:  # no segment ids: a is rotated with the row's length 7, not its 5
    assert np.abs(run(packed, pos)[:, :5] - alone_a).max() > 1e-3


def test_rerope_is_plain_rope_within_its_window_and_differs_beyond():
  """A window covering the whole sequence gives plain RoPE's logits exactly; a short one changes them
  only at positions that have keys further back than the window."""
  tokens = jax.random.randint(jax.random.key(9), (2, 12), 0, 11)
  rope = tiny_gpt(position="rope", num_kv_heads=2)
  params = rope.init(jax.random.key(10), tokens)["params"]
  plain = rope.apply({"params": params}, tokens)
  wide = tiny_gpt(position="rope", num_kv_heads=2, rerope_window=12)
  np.testing.assert_allclose(wide.apply({"params": params}, tokens), plain, atol=1e-5)
  short = tiny_gpt(position="rope", num_kv_heads=2, rerope_window=4).apply({"params": params}, tokens)
  # Positions t <= 4 have no key with t - s > 4 (ReRoPE's clamp starts at t - s >= window = 4 ...
  # which at t = 4 is s = 0, clamped to 4 = t - s itself): unchanged. Later ones change (small logits
  # at init, so small but far above float noise).
  np.testing.assert_allclose(short[:, :5], plain[:, :5], atol=1e-6)
  assert np.abs(np.asarray(short[:, 5:] - plain[:, 5:])).max() > 2e-5


@pytest.mark.parametrize("setting", [dict(position="xpos"), dict(position="alibi"),
                                     dict(position="rope", rotary_fraction=0.5),
                                     dict(position="rope", logn_train_len=8),
                                     dict(position="rope", rerope_window=3)])
@pytest.mark.parametrize("family", ["flash", "gau"])
def test_gau_blocks_refuse_position_settings_they_would_ignore(setting, family):
  """FLASH and GAU layers take RoPE (its theta) or no position in attention; anything else was
  dropped (log-n: GAU with softmax weights only)."""
  with pytest.raises(ValueError, match=f"attention='{family}' takes"):
    tiny_gpt(attention=family, gau_qk_dim=8, flash_chunk=4, **setting)
  tiny_gpt(attention="gau", gau_qk_dim=8, gau_kind="softmax", logn_train_len=8)


def _with_gau_scales(fn):
  """(fn(), the set of `scale` attributes of the GatedAttentionUnits that fn called)."""
  scales = set()

  def record_scale(next_fun, args, kwargs, context):
    if type(context.module).__name__ == "GatedAttentionUnit":
      scales.add(context.module.scale)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record_scale):
    return fn(), scales


def test_relu2_gau_scales_by_the_training_length():
  """1/T at the training length (data.seq_len), not 1/max_len: a larger position table for longer
  sampling made the initial relu^2 weights (max_len / seq_len)^2 times smaller."""
  from jaxlab.configs import load_config
  from jaxlab.models.gpt import gpt_from_config
  config = load_config("lm_char", ["--config.model.attention=gau", "--config.data.seq_len=128",
                                   "--config.model.max_len=1024"], check_devices=False)
  model = gpt_from_config(config.model, 11, max_len=1024, train_len=128)
  _, scales = _with_gau_scales(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  assert scales == {1 / 128}
  with pytest.raises(ValueError, match="gau_train_len must be an int >= 0"):
    tiny_gpt(attention="gau", gau_train_len=-1)


@pytest.mark.parametrize("extra", [dict(position="rope"), dict(position="learned"),
                                   dict(position="rope", gau_kind="softmax", logn_train_len=4)])
def test_gau_gpt_decodes_as_the_full_pass_at_o1_weights(extra):
  """attention='gau' at O(1) weights (at init its attention output is ~1e-6 and would hide a wrong
  cache): a prompt, single tokens, then several tokens on a non-empty cache (a speculative pass)
  and a rewind, against the full pass. relu2's scale is 1/max_len (no training length given) in
  both."""
  model = tiny_gpt(attention="gau", gau_qk_dim=8, max_len=16, **extra)
  b, t = 2, 16
  tokens = jax.random.randint(jax.random.key(4), (b, t), 0, 11)
  params = nn.unbox(model.init(jax.random.key(5), tokens)["params"])
  rng = np.random.default_rng(6)
  params = jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), params)
  full, scales = _with_gau_scales(lambda: np.asarray(model.apply({"params": params}, tokens)))
  assert scales == ({None} if extra.get("gau_kind") == "softmax" else {1 / 16})  # 1 / max_len
  step = jax.jit(lambda cache, x, pos: model.apply({"params": params, "cache": cache}, x, pos,
                                                   decode=True, mutable=["cache"]))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  cache = sampling.init_cache(model, b, t)
  got = []
  for start, stop in ((0, 5), (5, 6), (6, 9), (9, 16)):
    logits, cache = step(cache, tokens[:, start:stop], pos[:, start:stop])
    cache = cache["cache"]
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=1e-4, atol=1e-4)
  assert np.abs(full[:, 1:] - full[:, :1]).max() > 0.1  # the logits depend on the context
  # Rewind to 9 tokens (as a rejected draft does) and append the rest again: the same logits.
  rewound = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(9, x.dtype) if path[-1].key == "cache_index" else x, cache)
  logits, _ = step(rewound, tokens[:, 9:], pos[:, 9:])
  np.testing.assert_allclose(logits, full[:, 9:], rtol=1e-4, atol=1e-4)


def test_options_of_another_attention_family_are_refused():
  """attention_window=2 with softmax attention was full attention, silently."""
  with pytest.raises(ValueError, match="attention_window=2 applies to attention='local', not "
                                       "'softmax'"):
    tiny_gpt(attention_window=2)
  with pytest.raises(ValueError, match="num_features=8 applies to attention='performer'"):
    tiny_gpt(attention="linear", num_features=8)
  with pytest.raises(ValueError, match="attention_impl='xla' applies to attention='softmax', not "
                                       "'linear'"):
    tiny_gpt(attention="linear", attention_impl="xla")  # the kernel choice was dropped
  tiny_gpt(attention="local", attention_window=2)  # its own family's: fine
  tiny_gpt(attention="local", attention_window=2, attention_impl="blockwise")  # its cached decoding's
  tiny_gpt(attention_impl="blockwise")


def test_sample_text_hands_its_stop_to_the_decoder(tiny_lm_config, monkeypatch):
  """`jaxlab sample --stop` ends decoding at the stop (its ids reach generate_long) and prints the
  text it printed when all num_tokens were sampled and then cut; a stop outside the vocabulary or
  longer than the context is no reason to end."""
  import flax.linen as nn
  from jaxlab.train import lm_task
  task = lm_task.LMTask(tiny_lm_config("--config.model.position=rope"))
  params = nn.unbox(task.init_params(jax.random.key(0)))
  sample = lambda stop: lm_task.sample_text(task, params, prompt="the ", num_tokens=60,
                                            temperature=1.0, top_k=0, top_p=1.0, seed=0, stop=stop)
  whole = sample("")
  stop = whole[10:12]
  seen = []
  generate_long = sampling.generate_long
  monkeypatch.setattr(sampling, "generate_long",
                      lambda *a, **kw: seen.append(kw["stop_ids"]) or generate_long(*a, **kw))
  assert sample(stop) == whole[:whole.find(stop, 4)]
  assert seen == [tuple(int(i) for i in task.vocab.encode(stop))]
  assert lm_task._stop_ids(task, "\u2603") == () and lm_task._stop_ids(task, "") == ()
  long_stop = "e" * (task.model.config.max_len + 1)  # rope: no table, any length can end decoding
  assert lm_task._stop_ids(task, long_stop) == tuple([int(task.vocab.encode("e")[0])] * len(long_stop))
  learned = lm_task.LMTask(tiny_lm_config("--config.model.position=learned"))
  assert lm_task._stop_ids(learned, long_stop) == ()
