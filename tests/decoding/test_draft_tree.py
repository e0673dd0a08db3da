"""Draft trees: their structure, Medusa's best-first sparse tree, and tree attention: one cached pass
over a tree of candidates gives every node the logits of a full pass over its own path."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import positions
from jaxlab.decoding.draft_tree import DraftTree
from jaxlab.decoding.sampling import init_cache
from jaxlab.decoding.speculative import _keep_path, _rewind
from jaxlab.models.gpt import GPT, GPTConfig


def test_product_tree_structure():
  tree = DraftTree.product((2, 3))
  assert tree.size == 2 + 6 and tree.depth == 2 and not tree.is_chain and tree.max_rank == 2
  assert tree.paths[:3] == ((0,), (1,), (0, 0))  # by depth, then ranks
  np.testing.assert_array_equal(tree.depth_T, [0, 1, 1, 2, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(tree.parent_T, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(tree.rank_T, [0, 0, 1, 0, 1, 2, 0, 1, 2])
  np.testing.assert_array_equal(tree.children_TC[:3], [[1, 2, -1], [3, 4, 5], [6, 7, 8]])
  assert np.all(tree.children_TC[3:] == -1)
  anc = tree.ancestors_TT
  # Node (1, 2) (block index 8) sees the root, (1,) and itself; (0,) sees the root and itself.
  np.testing.assert_array_equal(np.flatnonzero(anc[8]), [0, 2, 8])
  np.testing.assert_array_equal(np.flatnonzero(anc[1]), [0, 1])
  assert np.all(np.tril(anc) == anc)  # an ancestor comes before its descendants
  assert DraftTree.parse("2,3") == tree and hash(DraftTree.parse("2,3")) == hash(tree)
  assert DraftTree(tuple(reversed(tree.paths))) == tree  # order of the nodes given is irrelevant
  assert tree.spec == "paths: 0 1 0,0 0,1 0,2 1,0 1,1 1,2" and DraftTree.parse(tree.spec) == tree
  assert DraftTree.parse("paths: 0 2 0,0").paths == ((0,), (2,), (0, 0))


def test_chain_is_the_tree_with_one_candidate_per_depth():
  chain = DraftTree.chain(3)
  assert chain.is_chain and chain == DraftTree.product((1, 1, 1)) and chain.size == 3
  np.testing.assert_array_equal(chain.ancestors_TT, np.tril(np.ones((4, 4), bool)))
  assert not DraftTree(((0,), (1,))).is_chain and not DraftTree(((0,), (0, 1))).is_chain


@pytest.mark.parametrize("paths,match", [
    ((), "at least one node"),
    (((0,), (0, 0), (0, 0)), "distinct"),
    (((0,), (1, 0)), r"no parent \(1,\)"),
    (((0,), (-1,)), "ranks"),
    (((),), "non-empty"),
    (((0.5,),), "ranks"),
])
def test_bad_trees_are_refused(paths, match):
  with pytest.raises(ValueError, match=match):
    DraftTree(paths)


@pytest.mark.parametrize("spec", ["", "3,x", "2,0", "-1", "1000,1000,1000", "paths: 0 x",
                                  "paths:", "paths: 0 1,0", "paths: " + " ".join(map(str, range(300)))])
def test_bad_tree_specs_are_refused(spec):
  with pytest.raises(ValueError, match="draft tree"):
    DraftTree.parse(spec)


def test_sparse_tree_holds_the_likeliest_nodes():
  accuracy = np.asarray([[0.6, 0.3], [0.5, 0.25], [0.4, 0.1]])
  tree = DraftTree.from_accuracies(accuracy, 6)
  full = DraftTree.product((2, 2, 2))
  prob = {p: np.prod([accuracy[d, r] for d, r in enumerate(p)]) for p in full.paths}
  best = sorted(prob.values(), reverse=True)[:6]
  np.testing.assert_allclose(sorted((prob[p] for p in tree.paths), reverse=True), best)
  assert tree.expected_accepted(accuracy) == pytest.approx(sum(best))
  assert (0,) in tree.paths and (0, 0) in tree.paths and (0, 0, 0) in tree.paths
  # No prefix-closed tree of 6 nodes from the full one expects more (every 6-subset checked).
  closed = [s for s in itertools.combinations(full.paths, 6)
            if all(len(p) == 1 or p[:-1] in s for p in s)]
  assert max(sum(prob[p] for p in s) for s in closed) == pytest.approx(sum(best))
  with pytest.raises(ValueError, match="accuracy_DR"):
    DraftTree.from_accuracies([0.5, 0.2], 3)
  with pytest.raises(ValueError, match="accuracy_DR .* with NaN"):  # a tree was built from NaN
    DraftTree.from_accuracies([[np.nan, 0.5], [0.5, 0.2]], 3)
  for bad in (2.5, True, 0):
    with pytest.raises(ValueError, match="num_nodes must be an int >= 1"):
      DraftTree.from_accuracies(accuracy, bad)


# Tree attention at the model level: every position encoding whose cache path differs, and MTP
# blocks (which have caches of their own).
CASES = [("rope", dict(medusa_heads=2, position="rope")),
         ("alibi-mtp", dict(mtp_heads=2, position="alibi")),
         ("t5", dict(medusa_heads=2, position="t5")),
         ("learned", dict(medusa_heads=2, position="learned")),
         ("xpos-qknorm", dict(mtp_heads=1, position="xpos", qk_norm=True)),
         # (theta 10: the length changes the low frequencies enough to show at these positions)
         ("dynamic_ntk", dict(medusa_heads=2, position="rope", rope_theta=10.0,
                              rope_scaling=positions.RopeScaling("dynamic_ntk", 2.0,
                                                                 original_max_len=4)))]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_tree_pass_gives_each_node_the_logits_of_its_own_path(name, kw):
  """Each node's logits (every head) equal those of a full pass over prompt + its path; with dynamic
  NTK past the training length (where a cache cannot equal a full pass by design, see
  jaxlab/layers/attention.py) those of ordinary one-token cached decoding along the path."""
  model = GPT(GPTConfig(**{**dict(vocab_size=11, num_layers=2, width=16, num_heads=2,
                                  num_kv_heads=1, max_len=24), **kw}))
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  # Scaled up from the 0.02 init, so that attention is far from uniform and positions matter.
  params = jax.tree.map(lambda a: a * 8.0 if a.ndim > 1 else a, params)
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, 11, (2, 6)), jnp.int32)
  tree = DraftTree(((0,), (1,), (2,), (0, 0), (0, 1), (2, 0), (0, 0, 0), (2, 0, 0)))
  nodes = jnp.asarray(rng.integers(0, 11, (2, tree.size + 1)), jnp.int32)  # root + candidates
  positions_BT = jnp.broadcast_to(6 + jnp.asarray(tree.depth_T), nodes.shape)
  cache = init_cache(model, 2, 6 + tree.size + 1)
  apply = lambda cache, x, pos, **kw: model.apply({"params": params, "cache": cache}, x, pos,
                                                  decode=True, all_heads=True, mutable=["cache"],
                                                  **kw)
  _, mutated = apply(cache, prompt, jnp.broadcast_to(jnp.arange(6), (2, 6)), prefill=True)
  tree_logits, after = apply(mutated["cache"], nodes, positions_BT,
                             append_mask_TT=jnp.asarray(tree.ancestors_TT))
  one_token = name == "dynamic_ntk"

  def reference(tokens_BL):
    """The logits after the last of tokens_BL (prompt + a path)."""
    if not one_token:
      return model.apply({"params": params}, tokens_BL, all_heads=True)[:, -1]
    logits, cache = apply(init_cache(model, 2, tokens_BL.shape[1]), tokens_BL[:, :6],
                          jnp.broadcast_to(jnp.arange(6), (2, 6)), prefill=True)
    cache = cache["cache"]
    for j in range(6, tokens_BL.shape[1]):
      logits, cache = apply(cache, tokens_BL[:, j:j + 1], jnp.full((2, 1), j, jnp.int32))
      cache = cache["cache"]
    return logits[:, -1]

  for i in range(tree.size + 1):
    path = np.flatnonzero(tree.ancestors_TT[i])  # root .. node i
    want = reference(jnp.concatenate([prompt, nodes[:, path]], axis=1))
    np.testing.assert_allclose(tree_logits[:, i], want, atol=2e-5, rtol=2e-5, err_msg=f"node {i}")
  # Keeping the path root -> (2,) -> (2, 0) (block indices 0, 3, 6) in row 0 (row 1 keeps another
  # path, root -> (0,), whose tail the shared rewind leaves stale; row 0 is checked), then decoding
  # one more token, equals the reference over that path.
  path_BP = jnp.asarray([[0, 3, 6, 8], [0, 1, 0, 0]], jnp.int32)
  kept = _rewind(_keep_path(after["cache"], jnp.asarray(6), path_BP, tree.size + 1), 6 + 3)
  nxt = jnp.asarray([[5], [7]], jnp.int32)
  step_logits, _ = apply(kept, nxt, jnp.full((2, 1), 9, jnp.int32))
  want = reference(jnp.concatenate([prompt, nodes[:, np.asarray([0, 3, 6])], nxt], axis=1))
  np.testing.assert_allclose(step_logits[0, 0], want[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(attention="local", attention_window=2), "softmax family"),
    (dict(position="rope", rerope_window=2), "rerope_window=2")])
def test_append_mask_is_refused_where_it_does_not_apply(kw, match):
  mask = jnp.tril(jnp.ones((3, 3), bool))
  model = GPT(GPTConfig(vocab_size=5, num_layers=1, width=8, num_heads=2, num_kv_heads=2,
                        max_len=8, **kw))
  params = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
  cache = init_cache(model, 1, 8, all_heads=False)
  with pytest.raises(ValueError, match=match):
    model.apply({"params": params, "cache": cache}, jnp.zeros((1, 3), jnp.int32),
                jnp.arange(3)[None], decode=True, append_mask_TT=mask, mutable=["cache"])
  with pytest.raises(ValueError, match="decode=False"):
    model.apply({"params": params}, jnp.zeros((1, 3), jnp.int32), append_mask_TT=mask)


def test_tree_from_rank_paths_keeps_the_nodes_most_often_right():
  # Heads that are right together: whenever head 1's top token is right, so is head 2's.
  ranks = np.asarray([[0, 0]] * 6 + [[1, 5]] * 4)
  tree = DraftTree.from_rank_paths(ranks, 2)
  assert tree.paths == ((0,), (0, 0))  # right 6 and 6 times; (1,) 4 times
  assert tree.frequency_sum(ranks) == pytest.approx(1.2)
  # Per-head rates multiplied (from_accuracies: (1,) 0.4 > (0, 0) 0.6 x 0.6) pick a worse tree here.
  independent = DraftTree.from_accuracies([[0.6, 0.4], [0.6, 0.0]], 2)
  assert independent.paths == ((0,), (1,)) and independent.frequency_sum(ranks) == pytest.approx(1.0)
  # A child never comes before its parent, even at equal counts; ranks >= max_rank are not drafted.
  assert DraftTree.from_rank_paths(np.asarray([[4, 0]] * 2), 1).paths == ((4,),)
  assert DraftTree.from_rank_paths(ranks, 20, max_rank=2).paths == ((0,), (1,), (0, 0))
  with pytest.raises(ValueError, match="ranks_ND"):
    DraftTree.from_rank_paths(np.zeros((3,), int), 2)
  with pytest.raises(ValueError, match="max_rank=1"):
    DraftTree.from_rank_paths(np.asarray([[2, 0]]), 2, max_rank=1)
