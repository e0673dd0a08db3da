"""Self-speculative decoding: greedy output is exactly greedy decoding's, sampled output has exactly
the distribution of ordinary sampling (checked against sequence probabilities computed by full
passes), and heads that predict well make fewer passes."""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from jaxlab import positions
from jaxlab.decoding.draft_tree import DraftTree
from jaxlab.decoding import speculative
from jaxlab.decoding.sampling import filter_logits, generate, sample_token
from jaxlab.decoding.speculative import speculative_generate
from jaxlab.models.gpt import GPT, GPTConfig
from jaxlab.train.lm_task import heads_loss

BASE = dict(vocab_size=7, num_layers=2, width=16, num_heads=2, num_kv_heads=1, max_len=48,
            position="rope")


def gpt(**kw):
  return GPT(GPTConfig(**{**BASE, **kw}))


def _sharp_params(model, seed=0, scale=8.0):
  """Random parameters scaled up, so that the distributions are far from uniform and the extra heads
  disagree with head 0 (drafts get rejected as well as accepted)."""
  params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
  params = jax.tree.map(lambda a: a * scale if a.ndim > 1 else a, params)
  rng = np.random.default_rng(seed)
  for name in params:
    if name.startswith("medusa_"):
      params[name]["res"]["kernel"] = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)
  return params


# Each kind of cache path once at the model level (every family and position encoding is checked
# chunk by chunk at the layer level, tests/layers/test_cache_append.py).
GREEDY = [("mtp", dict(mtp_heads=2)),
          ("medusa-learned", dict(medusa_heads=3, position="learned")),
          ("mtp-alibi", dict(mtp_heads=3, position="alibi")),
          ("medusa-t5", dict(medusa_heads=2, position="t5")),
          ("mtp-block_sparse", dict(mtp_heads=2, attention="block_sparse", sparse_block_size=4,
                                    sparse_layout="strided", sparse_local_blocks=1,
                                    sparse_stride=2)),
          # The local family decodes in a ring of window + 16 slots: 33 tokens wrap it.
          ("mtp-local", dict(mtp_heads=2, attention="local", attention_window=3)),
          ("mtp-dynamic_ntk", dict(mtp_heads=2, rope_scaling=positions.RopeScaling(
              "dynamic_ntk", 2.0, original_max_len=8))),
          # Gated attention units (two per block) with their own KV cache.
          ("mtp-gau", dict(mtp_heads=2, attention="gau", gau_qk_dim=8)),
          # Recurrent states (no KV cache): rewound by refolding the kept tokens.
          ("mtp-linear", dict(mtp_heads=2, attention="linear")),
          ("mtp-performer", dict(mtp_heads=2, attention="performer", num_features=16))]


@pytest.mark.parametrize("name,kw", GREEDY, ids=[g[0] for g in GREEDY])
def test_greedy_speculative_decoding_is_greedy_decoding(name, kw):
  model = gpt(**kw)
  params = _sharp_params(model)
  prompt = jnp.asarray([[1, 2, 3], [4, 0, 6]])  # two rows that accept different numbers of drafts
  want = generate(model, params, prompt, jax.random.key(0), num_tokens=30, temperature=0.0)
  got, steps = speculative_generate(model, params, prompt, jax.random.key(0), num_tokens=30,
                                    temperature=0.0)
  np.testing.assert_array_equal(got, want)
  assert 0 < int(steps) < 29  # some drafts were kept (and the cache or state rewound past others)
  one, _ = speculative_generate(model, params, prompt[:1], jax.random.key(0), num_tokens=1,
                                temperature=0.0)
  np.testing.assert_array_equal(one, want[:1, :4])
  if model.config.attention == "softmax":  # a tree of candidates (tree attention), too
    tree = DraftTree.product((3, 2)[:model.config.extra_heads])
    got_tree, tree_steps = speculative_generate(model, params, prompt, jax.random.key(0),
                                                num_tokens=30, temperature=0.0, tree=tree)
    np.testing.assert_array_equal(got_tree, want)
    assert int(tree_steps) <= int(steps)  # (for these parameters: more candidates, fewer passes)


def _cyclic_model(kw, steps=150):
  """A model trained (next-token + heads loss) on the cycle 0, 1, ..., 6, 0, 1, ...: every head can
  predict its token exactly."""
  model = gpt(**kw)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  starts = np.arange(14)
  seqs = jnp.asarray((starts[:, None] + np.arange(17)[None]) % 7)
  inputs, targets = seqs[:, :-1], seqs[:, 1:]
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = model.apply({"params": p}, inputs, all_heads=True)
      nt = optax.softmax_cross_entropy_with_integer_labels(logits[:, :, 0], targets).mean()
      return nt + heads_loss(logits, targets, 1.0)
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return model, params


def test_heads_that_predict_well_cut_the_passes():
  model, params = _cyclic_model(dict(medusa_heads=3))
  k = model.config.extra_heads
  prompt = jnp.asarray([[3, 4], [0, 1]])
  want = generate(model, params, prompt, jax.random.key(0), num_tokens=25, temperature=0.0)
  np.testing.assert_array_equal(want[:, 2:], (np.asarray(want[:, 1:2]) + np.arange(1, 26)) % 7)
  got, steps = speculative_generate(model, params, prompt, jax.random.key(0), num_tokens=25,
                                    temperature=0.0)
  np.testing.assert_array_equal(got, want)
  assert int(steps) == -(-24 // (k + 1))  # every draft accepted: K + 1 tokens per pass
  # Sampling at a low temperature accepts (almost) everything too.
  _, sampled_steps = speculative_generate(model, params, prompt, jax.random.key(1), num_tokens=25,
                                          temperature=0.5)
  assert int(sampled_steps) <= -(-24 // (k + 1)) + 2
  # A tree whose first candidates are right: the same output and passes.
  got_tree, tree_steps = speculative_generate(model, params, prompt, jax.random.key(0),
                                              num_tokens=25, temperature=0.0,
                                              tree=DraftTree.product((2, 2, 1)))
  np.testing.assert_array_equal(got_tree, want)
  assert int(tree_steps) == int(steps)
  # Typical acceptance at a near-zero temperature (one-hot targets; threshold 0.5 keeps exactly the
  # argmax path) is greedy decoding: it took the token after the accepted path from the root's
  # target and passed the tests below.
  got_typical, typical_steps = speculative_generate(
      model, params, prompt, jax.random.key(0), num_tokens=25, temperature=1e-4,
      acceptance="typical", typical_epsilon=0.5, typical_delta=1e9)
  np.testing.assert_array_equal(got_typical, want)
  assert int(typical_steps) == int(steps)


def _exact_distribution(model, params, prompt, n, temperature, top_k, top_p):
  """P(continuation) for every continuation of n tokens, from full passes (no cache)."""
  v = model.config.vocab_size
  conts = np.asarray(list(itertools.product(range(v), repeat=n)), np.int32)
  seqs = jnp.concatenate([jnp.broadcast_to(prompt, (len(conts), prompt.shape[1])), conts], axis=1)
  logits = model.apply({"params": params}, seqs)[:, prompt.shape[1] - 1:-1]  # [C, n, V]
  flat = filter_logits(logits.reshape(-1, v) / temperature, top_k=top_k, top_p=top_p)
  logp = jax.nn.log_softmax(flat, axis=-1).reshape(len(conts), n, v)
  picked = jnp.take_along_axis(logp, jnp.asarray(conts)[..., None], axis=-1)[..., 0]
  return conts, np.exp(np.asarray(picked.sum(axis=1), np.float64))


# The second draws a chain with temperature and both filters (the target and the drafts filtered
# alike); the third from a tree (multi-step speculative sampling: up to 3 candidates per node).
SAMPLED = [("medusa", dict(medusa_heads=2), 1.0, 0, 1.0, None),
           ("mtp-topk-topp-chain", dict(mtp_heads=2), 0.7, 3, 0.85, None),
           ("mtp-topk-topp-tree", dict(mtp_heads=2), 0.8, 3, 0.9,
            DraftTree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0))))]


def _chi2_p_value(tokens_BL, conts, exact, prompt_len):
  """Pearson's chi-square test of the continuations' counts against the exact probabilities."""
  index = {tuple(c): i for i, c in enumerate(conts)}
  counts = np.zeros(len(conts))
  for row in np.asarray(tokens_BL)[:, prompt_len:]:
    counts[index[tuple(row)]] += 1
  expected = exact * len(tokens_BL)
  assert np.all(counts[expected == 0] == 0)
  seen = expected > 0
  chi2 = ((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum()
  return scipy.stats.chi2.sf(chi2, seen.sum() - 1)


@pytest.mark.parametrize("name,kw,temperature,top_k,top_p,tree", SAMPLED,
                         ids=[s[0] for s in SAMPLED])
def test_speculative_sampling_has_the_models_distribution(name, kw, temperature, top_k, top_p,
                                                          tree):
  """6,000 continuations of 4 tokens (vocabulary 4: up to 256 outcomes) against the exact
  probabilities, one row at a time and as rows of one batch (one shared cache index). Drafts are
  both accepted and rejected. (Wrong samplers fail this test: one drawing the replacement of a
  rejected draft from p instead of max(p - q, 0), one ignoring a row's own kept draft in a batch,
  one trying a node's next candidate against p instead of the residual.)"""
  model = gpt(**{**kw, "vocab_size": 4})
  params = _sharp_params(model, seed=3, scale=3.0)
  prompt = jnp.asarray([[1, 2]])
  n, draws = 4, 6_000
  conts, exact = _exact_distribution(model, params, prompt, n, temperature, top_k, top_p)
  one_row = jax.vmap(lambda key: speculative_generate(
      model, params, prompt, key, num_tokens=n, temperature=temperature, top_k=top_k,
      top_p=top_p, tree=tree))
  tokens, steps = one_row(jax.random.split(jax.random.key(0), draws))
  steps = np.asarray(steps)
  assert steps.min() < n - 1 <= steps.max()  # some passes accepted drafts, some accepted none
  assert _chi2_p_value(tokens[:, 0], conts, exact, 2) > 1e-3
  # Rows of a batch of 3 (one shared cache index: a step keeps the fewest drafts any row accepted).
  rows = 3
  three_rows = jax.vmap(lambda key: speculative_generate(
      model, params, jnp.broadcast_to(prompt, (rows, 2)), key, num_tokens=n,
      temperature=temperature, top_k=top_k, top_p=top_p, tree=tree))
  batch, batch_steps = three_rows(jax.random.split(jax.random.key(1), draws // rows))
  assert np.asarray(batch_steps).min() < n - 1  # some batches kept drafts in every row
  assert _chi2_p_value(batch.reshape(-1, 2 + n), conts, exact, 2) > 1e-3


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 3, 0.9)])
def test_generate_samples_the_models_distribution(temperature, top_k, top_p):
  """`generate` (the cached sampler of `jaxlab sample`) at T > 0: 20,000 continuations of 3 tokens
  against the exact probabilities (a sampler that reused one key at every step fails this)."""
  model = gpt(vocab_size=4)
  params = _sharp_params(model, seed=3, scale=3.0)
  prompt, n = jnp.asarray([[1, 2]]), 3
  conts, exact = _exact_distribution(model, params, prompt, n, temperature, top_k, top_p)
  tokens = jax.vmap(lambda key: generate(model, params, prompt, key, num_tokens=n,
                                         temperature=temperature, top_k=top_k, top_p=top_p))(
      jax.random.split(jax.random.key(0), 20_000))
  assert _chi2_p_value(tokens[:, 0], conts, exact, 2) > 1e-3


def test_siblings_are_accepted_with_independent_uniforms():
  """One node with 3 sibling drafts drawn i.i.d. from q (multi-candidate speculative sampling, SpecInfer
  / Miao et al. 2024): the first token kept is distributed as p exactly, for random p and q. (One
  uniform shared by the siblings biases it: |z| about 8 at 200,000 draws; the model-level test above
  sees such a bias only weakly.)"""
  tree = DraftTree(((0,), (1,), (2,)))
  v, draws = 5, 200_000
  rng = np.random.default_rng(0)
  for trial in range(4):
    p_V = jnp.asarray(rng.dirichlet(np.ones(v)), jnp.float32)
    q_V = jnp.asarray(rng.dirichlet(np.ones(v)), jnp.float32)

    def first_token(key):
      k_draft, k_accept = jax.random.split(key)
      drafts = jax.random.categorical(k_draft, jnp.broadcast_to(jnp.log(q_V), (1, 3, v)), axis=-1)
      tokens = jnp.concatenate([jnp.zeros((1, 1), jnp.int32), drafts.astype(jnp.int32)], axis=1)
      path, depth, following = speculative._accept_sampled(
          tree, tokens, jnp.broadcast_to(p_V, (1, 4, v)), q_V[None, None], k_accept)
      return jnp.where(depth[0] >= 1, tokens[0, path[0, 1]], following[0])

    got = np.asarray(jax.jit(jax.vmap(first_token))(jax.random.split(jax.random.key(trial), draws)))
    freq, p = np.bincount(got, minlength=v) / draws, np.asarray(p_V, np.float64)
    z = (freq - p) / np.sqrt(p * (1 - p) / draws)
    assert np.abs(z).max() < 5.0, (trial, p, freq)


def test_decoding_arguments_are_checked_by_name():
  model = gpt(medusa_heads=2)
  params = _sharp_params(model)
  for fn in (generate, speculative_generate):
    with pytest.raises(ValueError, match="prompt_BP"):
      fn(model, params, jnp.asarray([1, 2]), jax.random.key(0), num_tokens=2)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
      fn(model, params, jnp.asarray([[1, 2]]), jax.random.key(0), num_tokens=-1)
    with pytest.raises(ValueError, match="prompt_BP must hold integer token ids"):
      fn(model, params, jnp.asarray([[1.0, 2.0]]), jax.random.key(0), num_tokens=2)
    # speculative_generate crashed in a reduction on an empty batch
    with pytest.raises(ValueError, match="prompt_BP must hold at least one row"):
      fn(model, params, jnp.zeros((0, 3), jnp.int32), jax.random.key(0), num_tokens=4)
    # at temperature 0 no filter runs, but a bad one is refused (speculative_generate ran)
    for bad in (dict(top_p=5.0), dict(top_k=-3)):
      with pytest.raises(ValueError, match="need an integer top_k >= 0 and 0 < top_p <= 1"):
        fn(model, params, jnp.asarray([[1, 2]]), jax.random.key(0), num_tokens=3,
           temperature=0.0, **bad)
  # Nested Python lists are prompts too: the same tokens as the array.
  for fn in (generate, speculative_generate):
    from_list = fn(model, params, [[1, 2]], jax.random.key(0), num_tokens=3, temperature=0.0)
    from_array = fn(model, params, jnp.asarray([[1, 2]]), jax.random.key(0), num_tokens=3,
                    temperature=0.0)
    chex.assert_trees_all_equal(from_list, from_array)
  with pytest.raises(ValueError, match="logits_BV"):
    sample_token(jax.random.key(0), jnp.zeros(4), temperature=0.0)


def test_speculative_decoding_refuses_what_it_cannot_do():
  prompt = jnp.asarray([[1, 2]])
  plain = gpt()
  with pytest.raises(ValueError, match="extra heads"):
    speculative_generate(plain, _sharp_params(plain), prompt, jax.random.key(0), num_tokens=4)
  flash = gpt(medusa_heads=2, attention="flash")
  with pytest.raises(ValueError, match="FLASH's chunk state"):
    speculative_generate(flash, _sharp_params(flash), prompt, jax.random.key(0), num_tokens=4)
  linear = gpt(medusa_heads=2, attention="linear")
  with pytest.raises(ValueError, match="tree attention"):
    speculative_generate(linear, _sharp_params(linear), prompt, jax.random.key(0), num_tokens=4,
                         tree=DraftTree.product((2,)))
  medusa = gpt(medusa_heads=2)
  with pytest.raises(ValueError, match="3 deep, but the model has 2 extra heads"):
    speculative_generate(medusa, _sharp_params(medusa), prompt, jax.random.key(0), num_tokens=4,
                         tree=DraftTree.chain(3))
  with pytest.raises(ValueError, match="beyond the vocabulary"):
    speculative_generate(medusa, _sharp_params(medusa), prompt, jax.random.key(0), num_tokens=4,
                         tree=DraftTree.product((8,)))
  many = gpt(medusa_heads=16, attention="local", attention_window=3)  # its ring takes <= 16 per pass
  with pytest.raises(ValueError, match="a pass of 16 drafts"):
    speculative_generate(many, _sharp_params(many), prompt, jax.random.key(0), num_tokens=4)
  local = gpt(medusa_heads=2, attention="local", attention_window=3)
  with pytest.raises(ValueError, match="softmax attention family"):
    speculative_generate(local, _sharp_params(local), prompt, jax.random.key(0), num_tokens=4,
                         tree=DraftTree.product((2,)))
  learned = gpt(medusa_heads=2, position="learned", max_len=10)
  params = _sharp_params(learned)
  with pytest.raises(ValueError, match="max_len=10"):
    speculative_generate(learned, params, prompt, jax.random.key(0), num_tokens=9)
  # Up to the table's end, as ordinary decoding (drafts past it are looked up at its last row).
  np.testing.assert_array_equal(
      speculative_generate(learned, params, prompt, jax.random.key(0), num_tokens=8,
                           temperature=0.0)[0],
      generate(learned, params, prompt, jax.random.key(0), num_tokens=8, temperature=0.0))


def test_typical_acceptance_keeps_the_deepest_plausible_path():
  """Medusa-2's rule on hand-made targets (tree: top 2 x top 2; plausible here: p > 0.2)."""
  from jaxlab.decoding.speculative import _accept_typical
  tree = DraftTree.product((2, 2))  # block indices: 1 (0,), 2 (1,), 3 (0,0), 4 (0,1), 5 (1,0), 6 (1,1)
  p = np.full((2, 7, 4), 0.25, np.float32)
  tokens = np.asarray([[0, 0, 1, 0, 2, 0, 3], [0, 0, 1, 1, 2, 0, 3]], np.int32)
  # Row 0: (0,) is implausible (0.1), so its plausible child (0,0) is not kept; (1,) -> (1,1).
  p[0, 0] = [0.1, 0.5, 0.2, 0.2]
  p[0, 1] = [0.7, 0.1, 0.1, 0.1]
  p[0, 2] = [0.05, 0.05, 0.3, 0.6]
  # Row 1: (0,) -> (0,1) and (1,) -> (1,0) are both plausible paths: the first in rank order wins.
  p[1, 0] = [0.3, 0.3, 0.2, 0.2]
  p[1, 1] = [0.1, 0.1, 0.7, 0.1]
  p[1, 2] = [0.7, 0.1, 0.1, 0.1]
  path, depth = _accept_typical(tree, jnp.asarray(tokens), jnp.asarray(p), 0.2, 1e9)
  np.testing.assert_array_equal(path, [[0, 2, 6], [0, 1, 4]])
  np.testing.assert_array_equal(depth, [2, 2])
  # The entropy term: threshold min(1, 0.8 exp(-H)) is 0.2 for a uniform target, 0.31 for a peaked one.
  chain = DraftTree.chain(1)
  target = jnp.asarray([[[0.25] * 4, [0.25] * 4], [[0.7, 0.1, 0.1, 0.1], [0.25] * 4]])
  for token, want in ((0, [1, 1]), (1, [1, 0])):
    _, depth = _accept_typical(chain, jnp.asarray([[9, token], [9, token]]), target, 1.0, 0.8)
    np.testing.assert_array_equal(depth, want)
  # Each node against its parent's threshold: a depth-2 draft with p = 0.25 under a uniform parent
  # target (threshold 0.2) is plausible even though the root's target is peaked (threshold 0.31; a
  # rule using the root's threshold for every node stopped at depth 1).
  chain2 = DraftTree.chain(2)
  target = jnp.asarray([[[0.7, 0.1, 0.1, 0.1], [0.25] * 4, [0.25] * 4]])
  _, depth = _accept_typical(chain2, jnp.asarray([[9, 0, 1]]), target, 1.0, 0.8)
  np.testing.assert_array_equal(depth, [2])


def test_typical_acceptance_thresholds_at_their_extremes():
  model = gpt(medusa_heads=2)
  params = _sharp_params(model)
  prompt = jnp.asarray([[1, 2, 3]])
  run = lambda **kw: speculative_generate(model, params, prompt, jax.random.key(0), num_tokens=30,
                                          temperature=1.0, tree=DraftTree.product((2, 2)),
                                          acceptance="typical", **kw)
  # Threshold 0: every candidate with p > 0 is plausible, so every pass keeps a whole path.
  _, steps = run(typical_epsilon=0.0, typical_delta=0.0)
  assert int(steps) == -(-29 // 3)
  # Threshold 1: nothing is, so every pass yields one token (ordinary sampling).
  _, steps = run(typical_epsilon=1.0, typical_delta=1e9)
  assert int(steps) == 29
  with pytest.raises(ValueError, match="temperature > 0"):
    speculative_generate(model, params, prompt, jax.random.key(0), num_tokens=4,
                         temperature=0.0, acceptance="typical")
  with pytest.raises(ValueError, match="acceptance must be one of"):
    speculative_generate(model, params, prompt, jax.random.key(0), num_tokens=4,
                         acceptance="lenient")
