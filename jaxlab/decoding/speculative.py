"""Self-speculative decoding: a GPT's own extra heads (multi-token prediction or Medusa) draft the next
tokens and one cached forward pass verifies them all.

Each step, with the tokens up to position n in the KV cache and the next token y (position n+1)
already chosen, the extra heads' logits at position n draft d_1..d_K for positions n+2..n+1+K. The
model runs [y, d_1, ..., d_K] in one pass (the cache takes several tokens at once; see
`MultiHeadAttention._cached_attention`), whose next-token head gives the target distribution at every
drafted position. Drafts are accepted from the left:
  * temperature 0 (greedy): d_j is kept while it equals the target's argmax, so the output is greedy
    decoding's (exactly, up to floating-point near-ties: the verification pass computes the logits of
    K + 1 tokens at once, ordinary decoding one at a time; Stern et al. 2018, "Blockwise Parallel Decoding for Deep Autoregressive
    Models"; Cai et al. 2024, Medusa, with one candidate instead of a tree);
  * temperature > 0: speculative sampling (Leviathan et al. 2023, alg. 1; Chen et al. 2023): d_j ~ q_j
    (the head's filtered distribution) is kept with probability min(1, p_j(d_j) / q_j(d_j)), the first
    rejected one is replaced by a draw from norm(max(p_j - q_j, 0)), and when all are kept the next
    token is drawn from p. The output has exactly the distribution of ordinary sampling with the same
    temperature / top-k / top-p.
The first token after the accepted ones (the replacement, or the target's own choice) becomes the next
y, so every step yields 1 to K + 1 tokens for one forward pass. Rows of a batch share one cache index:
each step keeps the fewest tokens any row accepted (for a row that accepted more, its next accepted
draft is its next y), which keeps every row exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlab.decoding.sampling import filter_logits, init_cache
from jaxlab.layers.attention import KV_CACHE_FAMILIES


def check_speculative(model) -> None:
  """Raises ValueError unless `model` (a GPT) has extra heads and a KV cache that can be rewound."""
  c = model.config
  if not c.extra_heads:
    raise ValueError("speculative decoding needs a model with extra heads (mtp_heads or medusa_heads "
                     "> 0); this one has only the next-token head")
  if c.attention not in KV_CACHE_FAMILIES:
    raise ValueError(f"speculative decoding needs an attention family with a KV cache "
                     f"{KV_CACHE_FAMILIES}, not {c.attention!r} (its recurrent state cannot be rewound)")


def _probs(logits_XV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """The sampling distribution of `sample_token`: softmax of filtered logits / temperature."""
  shape = logits_XV.shape
  flat = filter_logits(logits_XV.reshape(-1, shape[-1]).astype(jnp.float32) / temperature,
                       top_k=top_k, top_p=top_p)
  return jax.nn.softmax(flat, axis=-1).reshape(shape)


def _draw(key: jax.Array, probs_XV: jax.Array) -> jax.Array:
  return jax.random.categorical(key, jnp.log(probs_XV), axis=-1).astype(jnp.int32)


def _rewind(cache, index: jax.Array):
  """The cache with every layer's "cache_index" set to `index` (later slots are then ignored)."""
  def set_index(path, leaf):
    last = path[-1]
    return jnp.asarray(index, leaf.dtype) if getattr(last, "key", None) == "cache_index" else leaf
  return jax.tree_util.tree_map_with_path(set_index, cache)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k", "top_p"))
def speculative_generate(model, params, prompt_BP: jax.Array, key: jax.Array, *, num_tokens: int,
                         temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Continues prompt_BP (int [B, P], P >= 1) by `num_tokens` tokens, drafting with the model's K extra
  heads (module docstring).

  Returns (tokens int32 [B, P + num_tokens], steps): `steps` is the number of verification passes
  after the prompt's prefill, which yields the first token (ordinary cached decoding needs one pass per
  further token, num_tokens - 1), so (num_tokens - 1) / steps is the mean number of tokens a pass
  yielded. With learned positions, P + num_tokens <= max_len (as for `generate`): drafts past that
  are looked up at position max_len - 1, which changes no returned token.
  """
  check_speculative(model)
  b, p = prompt_BP.shape
  if p < 1:
    raise ValueError("the prompt must hold at least one token")
  k_extra = model.config.extra_heads
  total = p + num_tokens
  length = total + k_extra - 1  # the last step writes up to position total - 2 + K
  max_position = model.config.max_len - 1 if model.config.position == "learned" else None
  if max_position is not None and total > model.config.max_len:
    raise ValueError(f"prompt ({p}) + num_tokens ({num_tokens}) = {total} exceeds the learned "
                     f"position table (max_len={model.config.max_len})")
  greedy = temperature == 0.0
  probs = functools.partial(_probs, temperature=temperature, top_k=top_k, top_p=top_p)
  prompt_BP = prompt_BP.astype(jnp.int32)

  def run(cache, tokens_BT, start, prefill=False):
    positions_BT = jnp.broadcast_to(start + jnp.arange(tokens_BT.shape[1], dtype=jnp.int32),
                                    tokens_BT.shape)
    if max_position is not None:  # only drafts at positions >= total, whose outputs go unused
      positions_BT = jnp.minimum(positions_BT, max_position)
    logits_BTJV, mutated = model.apply({"params": params, "cache": cache}, tokens_BT, positions_BT,
                                       decode=True, prefill=prefill, all_heads=True,
                                       mutable=["cache"])
    return logits_BTJV, mutated["cache"]

  logits_BPJV, cache = run(init_cache(model, b, length), prompt_BP, 0, prefill=True)
  heads_BJV = logits_BPJV[:, -1]
  key, sub = jax.random.split(key)
  y_B = (jnp.argmax(heads_BJV[:, 0], axis=-1).astype(jnp.int32) if greedy
         else _draw(sub, probs(heads_BJV[:, 0])))
  out_BL = jnp.zeros((b, total + k_extra), jnp.int32)  # the last step writes up to total - 1 + K
  out_BL = out_BL.at[:, :p].set(prompt_BP).at[:, p].set(y_B)
  if num_tokens <= 1:
    return out_BL[:, :total], jnp.zeros((), jnp.int32)

  def step(state):
    cache, heads_BJV, y_B, out_BL, n, key, steps = state  # tokens 0..n cached; y_B is token n + 1
    key, k_draft, k_accept, k_next = jax.random.split(key, 4)
    if greedy:
      drafts_BK = jnp.argmax(heads_BJV[:, 1:], axis=-1).astype(jnp.int32)
    else:
      q_BKV = probs(heads_BJV[:, 1:])
      drafts_BK = _draw(k_draft, q_BKV)
    x_BT = jnp.concatenate([y_B[:, None], drafts_BK], axis=1)  # positions n+1 .. n+1+K
    logits_BTJV, cache = run(cache, x_BT, n + 1)
    target_BTV = logits_BTJV[:, :, 0]  # index i: the next-token logits after position n+1+i
    if greedy:
      keep_BK = drafts_BK == jnp.argmax(target_BTV[:, :-1], axis=-1)
    else:
      p_BTV = probs(target_BTV)
      p_of_draft_BK = jnp.take_along_axis(p_BTV[:, :-1], drafts_BK[..., None], axis=-1)[..., 0]
      q_of_draft_BK = jnp.take_along_axis(q_BKV, drafts_BK[..., None], axis=-1)[..., 0]
      # Kept with probability min(1, p / q) (q > 0: the draft was drawn from q).
      keep_BK = jax.random.uniform(k_accept, drafts_BK.shape) * q_of_draft_BK < p_of_draft_BK
    accepted_B = jnp.sum(jnp.cumprod(keep_BK, axis=1), axis=1)
    a = jnp.min(accepted_B)  # drafts d_1..d_a are kept in every row
    if greedy:
      next_B = jnp.argmax(target_BTV[:, a], axis=-1).astype(jnp.int32)
    else:
      p_BV = p_BTV[:, a]
      q_BV = jnp.where(a < k_extra, q_BKV[:, jnp.minimum(a, k_extra - 1)], 0.0)
      residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
      mass_B1 = jnp.sum(residual_BV, axis=-1, keepdims=True)
      residual_BV = jnp.where(mass_B1 > 0, residual_BV / jnp.where(mass_B1 > 0, mass_B1, 1.0), p_BV)
      own_draft_B = drafts_BK[:, jnp.minimum(a, k_extra - 1)]
      next_B = jnp.where(accepted_B > a, own_draft_B, _draw(k_next, residual_BV))
    out_BL = jax.lax.dynamic_update_slice(out_BL, x_BT, (0, n + 1))
    out_BL = jax.lax.dynamic_update_slice(out_BL, next_B[:, None], (0, n + 2 + a))
    n = n + 1 + a
    return (_rewind(cache, n + 1), logits_BTJV[:, a], next_B, out_BL, n, key, steps + 1)

  state = (cache, heads_BJV, y_B, out_BL, jnp.asarray(p - 1, jnp.int32), key,
           jnp.zeros((), jnp.int32))
  state = jax.lax.while_loop(lambda s: s[4] + 1 < total - 1, step, state)
  return state[3][:, :total], state[6]
