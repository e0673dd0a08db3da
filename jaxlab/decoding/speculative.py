"""Self-speculative decoding: a GPT's own extra heads (multi-token prediction or Medusa) draft the next
tokens and one cached forward pass verifies them all.

Each step, with the tokens up to position n in the decoding state (a KV cache, or linear attention's
and Performer's recurrent state, which can be rewound too: `MultiHeadAttention._recurrent`; chains
only) and the next token y (position n+1)
already chosen, the extra heads' logits at position n draft candidates for positions n+2..n+1+K: one
per head (a chain d_1..d_K), or a `DraftTree` of them (head d's candidates at depth d; Medusa's tree,
Cai et al. 2024 sec. 2.1.2). The model runs [y, candidates...] in one pass (the cache takes several
tokens at once, and a tree's candidates each see only their ancestors: `append_mask_TT`, see
`MultiHeadAttention._cached_attention`), whose next-token head gives the target distribution after
every candidate. Candidates are accepted from the root:
  * temperature 0 (greedy): a node is kept while it equals the target's argmax after its parent (the
    candidates of a node are the heads' top-ranked tokens, so at most one child matches), so the
    output is greedy decoding's (exactly, up to floating-point near-ties: the verification pass
    computes the logits of many tokens at once, ordinary decoding one at a time; Stern et al. 2018,
    "Blockwise Parallel Decoding for Deep Autoregressive Models"; Cai et al. 2024, Medusa);
  * temperature > 0: speculative sampling (Leviathan et al. 2023, alg. 1; Chen et al. 2023), down a
    tree multi-step speculative sampling (Miao et al. 2024, SpecInfer): every node is an independent
    draw from its head's filtered distribution q; at a kept node with target p its children are
    tried in turn, each kept with probability min(1, p(c) / q(c)), and after a rejection p becomes
    norm(max(p - q, 0)); when no child is kept the next token is drawn from that p (or from the
    target when the path reaches a leaf). The output has exactly the distribution of ordinary
    sampling with the same temperature / top-k / top-p.
  * temperature > 0 with acceptance="typical": Medusa-2's typical acceptance (Cai et al. 2024, sec.
    2.3.1), an approximation that trades exactness for longer accepted paths: the candidates are the
    heads' top-ranked tokens (as for greedy), a node x under parent u is plausible when
    p_u(x) > min(epsilon, delta * exp(-H(p_u))) (p_u the target after u, H its entropy), the deepest
    node whose whole path is plausible is kept (the first in rank order among equals), and the next
    token is drawn from the target after it. Not the model's distribution: tokens the model finds
    plausible but unlikely are kept more often than sampling would keep them.
The first token after the accepted path becomes the next y, so every step yields 1 to depth + 1
tokens for one forward pass; a tree's accepted path is moved to consecutive cache slots. Rows of a
batch share one cache index: each step keeps the fewest tokens any row accepted (for a row that
accepted more, its next accepted node is its next y), which keeps every row exact.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxlab.decoding.draft_tree import DraftTree
from jaxlab.decoding.sampling import (check_decoding_length, check_filters, check_prompt,
                                     checks_prompt_ids, filter_logits, init_cache, scale_logits)
from jaxlab.layers.attention import (KV_CACHE_FAMILIES, APPEND_LIMIT, BOUNDED_STATE_FAMILIES,
                                    RECURRENT_FAMILIES)

# Attention families whose decoding state takes several tokens per call and can be rewound: a KV
# cache (GAU's too), or the recurrent state of linear attention / Performer (which keeps the state
# before its last append). FLASH's chunk state cannot.
SPECULATIVE_FAMILIES = KV_CACHE_FAMILIES + ("gau",) + RECURRENT_FAMILIES


def check_speculative(model, tree: Optional[DraftTree] = None) -> None:
  """Raises ValueError unless `model` (a GPT) has extra heads and a decoding state that can be
  rewound (SPECULATIVE_FAMILIES), and `tree` (default: a chain over every extra head) fits: depth <=
  its extra heads, a tree that is not a chain needs the softmax family without ReRoPE (its tree
  mask), and a bounded decoding state (BOUNDED_STATE_FAMILIES: a recurrent state, the local
  family's ring) takes at most APPEND_LIMIT tokens per pass."""
  c = model.config
  if not c.extra_heads:
    raise ValueError("speculative decoding needs a model with extra heads (mtp_heads or medusa_heads "
                     "> 0); this one has only the next-token head")
  if c.attention not in SPECULATIVE_FAMILIES:
    raise ValueError(f"speculative decoding needs an attention family whose decoding state can be "
                     f"rewound {SPECULATIVE_FAMILIES}, not {c.attention!r} (FLASH's chunk state "
                     "cannot)")
  size = c.extra_heads if tree is None else tree.size
  if c.attention in BOUNDED_STATE_FAMILIES and size + 1 > APPEND_LIMIT:
    raise ValueError(f"a pass of {size} drafts + 1 token is more than the {c.attention!r} family's "
                     f"bounded decoding state takes per call ({APPEND_LIMIT} tokens)")
  if tree is None:
    return
  if tree.depth > c.extra_heads:
    raise ValueError(f"the draft tree is {tree.depth} deep, but the model has {c.extra_heads} extra "
                     "heads to draft with (one per depth)")
  if not tree.is_chain and not tree_attention_supported(c.attention, c.rerope_window,
                                                        c.attention_impl):
    raise ValueError("a draft tree with branches needs the softmax attention family without ReRoPE "
                     "and an implementation that takes segment masks, not 'cudnn' (tree attention "
                     f"masks the cache); got attention={c.attention!r}, "
                     f"attention_impl={c.attention_impl!r}"
                     + (f", rerope_window={c.rerope_window}" if c.rerope_window else "")
                     + "; a chain (one candidate per depth) works with every family of "
                     f"{SPECULATIVE_FAMILIES}")


def tree_attention_supported(attention: str, rerope_window: int, attention_impl) -> bool:
  """Whether a draft tree with branches can be verified: tree attention masks the cache per query
  (`append_mask_TT`), which needs the softmax family without ReRoPE and an attention implementation
  that takes segment masks (not cuDNN's)."""
  return attention == "softmax" and not rerope_window and attention_impl != "cudnn"


def _probs(logits_XV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """The sampling distribution of `sample_token`: softmax of filtered logits / temperature."""
  shape = logits_XV.shape
  flat = filter_logits(scale_logits(logits_XV.reshape(-1, shape[-1]), temperature), top_k=top_k,
                       top_p=top_p)
  return jax.nn.softmax(flat, axis=-1).reshape(shape)


def _draw(key: jax.Array, probs_XV: jax.Array) -> jax.Array:
  return jax.random.categorical(key, jnp.log(probs_XV), axis=-1).astype(jnp.int32)


def _rewind(cache, index: jax.Array):
  """The cache with every layer's "cache_index" set to `index` (later slots are then ignored)."""
  def set_index(path, leaf):
    last = path[-1]
    return jnp.asarray(index, leaf.dtype) if getattr(last, "key", None) == "cache_index" else leaf
  return jax.tree_util.tree_map_with_path(set_index, cache)


def _keep_path(cache, start: jax.Array, path_BP: jax.Array, block: int):
  """Moves each row's accepted path of a tree pass to consecutive slots: the KV cache slots
  start + path_BP[:, j] (block indices within the `block` slots from `start`) go to start + j, in
  every layer (keys, values and their positions)."""
  def keep(path, leaf):
    if getattr(path[-1], "key", None) not in ("cached_key", "cached_value", "cached_positions"):
      return leaf
    window = jax.lax.dynamic_slice_in_dim(leaf, start, block, axis=1)
    index = jnp.broadcast_to(path_BP.reshape(path_BP.shape + (1,) * (leaf.ndim - 2)),
                             path_BP.shape + leaf.shape[2:])
    kept = jnp.take_along_axis(window, index.astype(jnp.int32), axis=1)
    return jax.lax.dynamic_update_slice_in_dim(leaf, kept, start, axis=1)
  return jax.tree_util.tree_map_with_path(keep, cache)


def _rows(x_BT, index_B):
  """x_BT[b, index_B[b]] for every row (x_BT may have trailing axes)."""
  return jnp.take_along_axis(x_BT, index_B.reshape((-1,) + (1,) * (x_BT.ndim - 1)), axis=1)[:, 0]


def _deepest_good_path(tree: DraftTree, good_BT):
  """The deepest node whose path from the root is good all the way (the first in rank order among
  equals; the root counts as good) -> (path_BP, depth_B): path_BP[:, d] the block index of its
  ancestor at depth d (0: the root; 0 past the path), depth_B its depth."""
  ancestors_TT = jnp.asarray(tree.ancestors_TT)
  depth_T = jnp.asarray(tree.depth_T)
  ok_BT = jnp.all(jnp.where(ancestors_TT[None], good_BT.at[:, 0].set(True)[:, None, :], True),
                  axis=-1)
  chosen_B = jnp.argmax(jnp.where(ok_BT, depth_T, -1), axis=-1)
  path_BP = jnp.argmax(ancestors_TT[chosen_B][:, None, :] & (
      depth_T[None, None, :] == jnp.arange(tree.depth + 1)[None, :, None]), axis=-1)
  return path_BP.astype(jnp.int32), depth_T[chosen_B].astype(jnp.int32)


def _accept_greedy(tree: DraftTree, tokens_BT, target_BTV):
  """The longest path whose every node is the target's argmax after its parent (siblings are distinct
  tokens, so there is one) -> (path_BP, depth_B) as `_deepest_good_path`."""
  argmax_BT = jnp.argmax(target_BTV, axis=-1).astype(jnp.int32)
  return _deepest_good_path(tree, tokens_BT == argmax_BT[:, tree.parent_T])


def _accept_typical(tree: DraftTree, tokens_BT, p_BTV, epsilon: float, delta: float):
  """Typical acceptance (module docstring) -> (path_BP, depth_B) as `_deepest_good_path`."""
  logp_BTV = jnp.log(jnp.where(p_BTV > 0, p_BTV, 1.0))
  entropy_BT = -jnp.sum(p_BTV * logp_BTV, axis=-1)
  threshold_BT = jnp.minimum(epsilon, delta * jnp.exp(-entropy_BT))
  parent_T = jnp.asarray(tree.parent_T)
  p_node_BT = jnp.take_along_axis(p_BTV[:, parent_T], tokens_BT[..., None], axis=-1)[..., 0]
  return _deepest_good_path(tree, p_node_BT > threshold_BT[:, parent_T])


def _accept_sampled(tree: DraftTree, tokens_BT, p_BTV, q_BDV, key):
  """Multi-step speculative sampling down the tree (SpecInfer, Miao et al. 2024, alg. 2; Leviathan
  et al. 2023 for one child): at an accepted node with target p, its children c_1, c_2, ...
  (independent draws from the depth's draft q) are tried in rank order, c kept with probability
  min(1, p(c) / q(c)); after a rejection p becomes norm(max(p - q, 0)). The first kept child is the
  next node (with its own target); when none is kept, the next token is drawn from the last p.
  Returns (path_BP, depth_B, next_B): next_B the token after the path (drawn; used for rows whose
  path is the batch's shortest)."""
  b = tokens_BT.shape[0]
  children_TC = jnp.asarray(tree.children_TC)
  keys = jax.random.split(key, tree.depth * children_TC.shape[1] + 1)
  node_B = jnp.zeros((b,), jnp.int32)
  alive_B = jnp.ones((b,), bool)
  p_BV = p_BTV[:, 0]
  path = [node_B]
  for d in range(1, tree.depth + 1):
    q_BV = q_BDV[:, d - 1]
    child_BC = children_TC[node_B]
    moved_B = jnp.zeros((b,), bool)
    for c in range(children_TC.shape[1]):
      child_B = child_BC[:, c]
      token_B = _rows(tokens_BT, jnp.maximum(child_B, 0))
      p_tok_B = _rows(p_BV, token_B)
      q_tok_B = _rows(q_BV, token_B)
      trying_B = alive_B & ~moved_B & (child_B >= 0)
      u_B = jax.random.uniform(keys[(d - 1) * children_TC.shape[1] + c], (b,))
      kept_B = trying_B & (u_B * q_tok_B < p_tok_B)  # q(token) > 0: it was drawn from q
      residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
      mass_B1 = jnp.sum(residual_BV, axis=-1, keepdims=True)
      residual_BV = jnp.where(mass_B1 > 0, residual_BV / jnp.where(mass_B1 > 0, mass_B1, 1.0), p_BV)
      p_BV = jnp.where((trying_B & ~kept_B)[:, None], residual_BV, p_BV)
      node_B = jnp.where(kept_B, child_B, node_B)
      moved_B = moved_B | kept_B
    p_BV = jnp.where(moved_B[:, None], _rows(p_BTV, node_B), p_BV)
    path.append(jnp.where(moved_B, node_B, 0))
    alive_B = moved_B
  path_BP = jnp.stack(path, axis=1)
  depth_B = jnp.sum(path_BP[:, 1:] > 0, axis=1).astype(jnp.int32)
  return path_BP, depth_B, _draw(keys[-1], p_BV)


ACCEPTANCE = ("exact", "typical")


@checks_prompt_ids
@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k", "top_p",
                                             "tree", "acceptance", "typical_epsilon",
                                             "typical_delta"))
def speculative_generate(model, params, prompt_BP: jax.Array, key: jax.Array, *, num_tokens: int,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         tree: Optional[DraftTree] = None, acceptance: str = "exact",
                         typical_epsilon: float = 0.09,
                         typical_delta: float = 0.3) -> tuple[jax.Array, jax.Array]:
  """Continues prompt_BP (int [B, P], P >= 1) by `num_tokens` tokens, drafting with the model's K extra
  heads (module docstring): one candidate per head (tree=None, a chain) or a DraftTree of candidates
  (depth <= K) verified in one pass with tree attention. acceptance="exact" (greedy decoding at
  temperature 0, else speculative sampling: the model's distribution) or "typical" (temperature > 0:
  Medusa's typical acceptance with thresholds typical_epsilon and typical_delta, not exact; the
  defaults are those of Medusa's `medusa_generate`, posterior_threshold 0.09 and posterior_alpha 0.3).

  Returns (tokens int32 [B, P + num_tokens], steps): `steps` is the number of verification passes
  after the prompt's prefill, which yields the first token (ordinary cached decoding needs one pass per
  further token, num_tokens - 1), so (num_tokens - 1) / steps is the mean number of tokens a pass
  yielded. With learned positions, P + num_tokens <= max_len (as for `generate`): drafts past that
  are looked up at position max_len - 1, which changes no returned token.
  """
  check_speculative(model, tree)
  prompt_BP, b, p = check_prompt(prompt_BP, num_tokens)
  check_filters(top_k, top_p)
  tree = tree or DraftTree.chain(model.config.extra_heads)
  if tree.max_rank >= model.config.vocab_size:  # greedy drafts distinct top-ranked tokens
    raise ValueError(f"the draft tree has rank {tree.max_rank}, beyond the vocabulary "
                     f"({model.config.vocab_size} tokens)")
  depth, block = tree.depth, tree.size + 1
  total = p + num_tokens
  length = total + block - 2  # the last step writes up to slot total - 2 + (block - 1)
  max_position = model.config.max_len - 1 if model.config.position == "learned" else None
  check_decoding_length(model.config, total, drafts=depth)  # drafts reach `depth` positions past
  greedy = temperature == 0.0
  if acceptance not in ACCEPTANCE:
    raise ValueError(f"acceptance must be one of {ACCEPTANCE}, got {acceptance!r}")
  typical = acceptance == "typical"
  if typical and (greedy or not typical_epsilon >= 0 or not typical_delta >= 0):
    raise ValueError("typical acceptance needs temperature > 0 (at 0, greedy acceptance is exact) "
                     f"and thresholds >= 0; got temperature={temperature}, "
                     f"typical_epsilon={typical_epsilon}, typical_delta={typical_delta}")
  probs = functools.partial(_probs, temperature=temperature, top_k=top_k, top_p=top_p)
  prompt_BP = prompt_BP.astype(jnp.int32)
  append_mask_TT = None if tree.is_chain else jnp.asarray(tree.ancestors_TT)

  def run(cache, tokens_BT, positions_BT, prefill=False):
    if max_position is not None:  # only drafts at positions >= total, whose outputs go unused
      positions_BT = jnp.minimum(positions_BT, max_position)
    logits_BTJV, mutated = model.apply({"params": params, "cache": cache}, tokens_BT, positions_BT,
                                       decode=True, prefill=prefill, all_heads=True,
                                       append_mask_TT=None if prefill else append_mask_TT,
                                       mutable=["cache"])
    return logits_BTJV, mutated["cache"]

  prompt_positions_BP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits_BPJV, cache = run(init_cache(model, b, length), prompt_BP, prompt_positions_BP,
                           prefill=True)
  heads_BJV = logits_BPJV[:, -1]
  key, sub = jax.random.split(key)
  y_B = (jnp.argmax(heads_BJV[:, 0], axis=-1).astype(jnp.int32) if greedy
         else _draw(sub, probs(heads_BJV[:, 0])))
  out_BL = jnp.zeros((b, total + depth), jnp.int32)  # the last step writes up to total - 1 + depth
  out_BL = out_BL.at[:, :p].set(prompt_BP).at[:, p].set(y_B)
  if num_tokens <= 1:
    return out_BL[:, :total], jnp.zeros((), jnp.int32)
  node_depth_M, node_rank_M = tree.depth_T[1:] - 1, tree.rank_T[1:]

  def step(state):
    cache, heads_BJV, y_B, out_BL, n, key, steps = state  # tokens 0..n cached; y_B is token n + 1
    key, k_draft, k_accept = jax.random.split(key, 3)
    if greedy or typical:  # node (.., r) at depth d: head d's (r+1)-th most likely token
      ranked_BDR = jax.lax.top_k(heads_BJV[:, 1:depth + 1], tree.max_rank + 1)[1]
      drafts_BM = ranked_BDR[:, node_depth_M, node_rank_M].astype(jnp.int32)
    else:  # every node an independent draw from its depth's head
      q_BDV = probs(heads_BJV[:, 1:depth + 1])
      drafts_BM = _draw(k_draft, q_BDV[:, node_depth_M])
    x_BT = jnp.concatenate([y_B[:, None], drafts_BM], axis=1)  # y, then the nodes
    positions_BT = jnp.broadcast_to(n + 1 + jnp.asarray(tree.depth_T), x_BT.shape)
    logits_BTJV, cache = run(cache, x_BT, positions_BT)
    target_BTV = logits_BTJV[:, :, 0]  # the next-token logits after each node
    if greedy:
      path_BP, accepted_B = _accept_greedy(tree, x_BT, target_BTV)
    elif typical:
      p_BTV = probs(target_BTV)
      path_BP, accepted_B = _accept_typical(tree, x_BT, p_BTV, typical_epsilon, typical_delta)
      drawn_B = _draw(k_accept, _rows(p_BTV, _rows(path_BP, accepted_B)))
    else:
      path_BP, accepted_B, drawn_B = _accept_sampled(tree, x_BT, probs(target_BTV), q_BDV,
                                                     k_accept)
    a = jnp.min(accepted_B)  # every row keeps the first a nodes of its path
    last_B = path_BP[:, a]  # the a-th node (the root if a == 0)
    path_tokens_BP = jnp.take_along_axis(x_BT, path_BP, axis=1)
    if greedy:
      next_B = jnp.argmax(_rows(target_BTV, last_B), axis=-1).astype(jnp.int32)
    else:  # a row whose path goes on takes its own next node
      own_B = path_tokens_BP[:, jnp.minimum(a + 1, depth)]
      next_B = jnp.where(accepted_B > a, own_B, drawn_B)
    out_BL = jax.lax.dynamic_update_slice(out_BL, path_tokens_BP, (0, n + 1))
    out_BL = jax.lax.dynamic_update_slice(out_BL, next_B[:, None], (0, n + 2 + a))
    if not tree.is_chain:
      cache = _keep_path(cache, n + 1, path_BP, block)
    n = n + 1 + a
    return (_rewind(cache, n + 1), _rows(logits_BTJV, last_B), next_B, out_BL, n, key, steps + 1)

  state = (cache, heads_BJV, y_B, out_BL, jnp.asarray(p - 1, jnp.int32), key,
           jnp.zeros((), jnp.int32))
  state = jax.lax.while_loop(lambda s: s[4] + 1 < total - 1, step, state)
  return state[3][:, :total], state[6]
