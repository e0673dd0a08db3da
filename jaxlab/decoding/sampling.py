"""Autoregressive sampling from a causal LM with a KV cache: temperature, top-k and top-p (nucleus;
Holtzman et al. 2020) filtering, as pure functions plus a jitted generation loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.layers.attention import REWIND_VARIABLES
from jaxlab.layers.token_ids import check_token_ids
from jaxlab.models.gpt import MTP_BLOCK_PREFIX


def filter_logits(logits_BV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k and outside the nucleus to the dtype's lowest value.

  Top-k keeps exactly the k most likely tokens; top-p then keeps the smallest set of the most likely
  tokens whose probability (renormalised after top-k) is >= top_p (Holtzman et al. 2020): a token is
  kept while the mass of the tokens ranked before it is < top_p. Ties between equal logits are ranked
  by token id (the lower id first), so both sets have exactly that size even with tied logits (as in
  low-precision logits). top_k=0 and top_p=1.0 switch the filters off. The most likely token always
  survives.
  """
  if logits_BV.ndim != 2:
    raise ValueError(f"logits must be [batch, vocab], got shape {logits_BV.shape}")
  check_filters(top_k, top_p)
  vocab = logits_BV.shape[-1]
  if not (top_k and top_k < vocab) and top_p >= 1.0:
    return logits_BV
  neg_inf = jnp.finfo(logits_BV.dtype).min
  out_dtype = logits_BV.dtype
  # The nucleus's softmax and running sum in float32: in float16 the sum stalls below top_p (so nothing
  # was cut), in bfloat16 the kept mass could fall short of it.
  logits_BV = logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32))
  rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
  keep_BV = jnp.ones(logits_BV.shape, bool)
  if top_k and top_k < vocab:  # lax.top_k ranks equal values by index, the lower first
    top_BK = jax.lax.top_k(logits_BV, top_k)[1]
    keep_BV = jnp.zeros(logits_BV.shape, bool).at[rows_B1, top_BK].set(True)
  if top_p < 1.0:
    # The order of decreasing logit (ties by token id: a stable sort) and each token's rank in it.
    order_BV = jnp.argsort(jnp.where(keep_BV, -logits_BV, jnp.inf), axis=-1, stable=True)
    rank_BV = jnp.zeros(order_BV.shape, jnp.int32).at[rows_B1, order_BV].set(
        jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), order_BV.shape))
    sorted_BV = jnp.take_along_axis(jnp.where(keep_BV, logits_BV, neg_inf), order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_B1 = jnp.sum(mass_before_BV < top_p, axis=-1, keepdims=True)  # a prefix of the order
    keep_BV = keep_BV & (rank_BV < kept_B1)
  return jnp.where(keep_BV, logits_BV, neg_inf).astype(out_dtype)


def check_filters(top_k: int, top_p: float) -> None:
  """top_k >= 0 and 0 < top_p <= 1 (checked at temperature 0 too, where no filter runs)."""
  if (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0
      or not 0.0 < top_p <= 1.0):
    raise ValueError(f"need an integer top_k >= 0 and 0 < top_p <= 1, got top_k={top_k!r}, "
                     f"top_p={top_p!r}")


def scale_logits(logits_BV: jax.Array, temperature: float) -> jax.Array:
  """float32 logits / temperature (> 0), computed relative to each row's maximum, so that a tiny
  temperature sends the other tokens to -inf instead of overflowing (or, below float32's normal
  range, dividing by a flushed zero): the most likely tokens keep logit 0, the limit of T -> 0."""
  if not 0.0 < temperature < float("inf"):
    raise ValueError(f"temperature must be finite and > 0 here (0 is greedy decoding), got "
                     f"{temperature}")
  logits_BV = logits_BV.astype(jnp.float32)
  shifted_BV = logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)
  return jnp.where(shifted_BV == 0.0, 0.0, shifted_BV / temperature)


def sample_token(key: jax.Array, logits_BV: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> jax.Array:
  """One token id per row, int32 [B]; temperature 0 is greedy (argmax), a negative one is refused."""
  if jnp.ndim(logits_BV) != 2:
    raise ValueError(f"logits_BV must be [batch, vocab], got shape {jnp.shape(logits_BV)}")
  check_filters(top_k, top_p)  # at temperature 0 too, where no filter runs
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(scale_logits(logits_BV, temperature), top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def init_cache(model, batch_size: int, max_len: int, *, all_heads: bool = True,
               rewindable: bool = True):
  """A zeroed KV cache for `model` (a GPT) decoding up to `max_len` tokens.

  all_heads=False leaves out the caches of the multi-token-prediction blocks, which only
  `model.apply(..., all_heads=True)` reads. rewindable=False leaves out what linear attention's and
  Performer's recurrent state keeps only to be rewound (REWIND_VARIABLES; speculative decoding needs
  them, ordinary decoding then skips their bookkeeping). A KV cache is rewindable either way.
  """
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch_size, max_len), jnp.int32),
                         decode=True)["cache"])
  if not all_heads:
    shapes = {name: s for name, s in shapes.items() if not name.startswith(MTP_BLOCK_PREFIX)}
  if not rewindable:
    shapes = _without(shapes, REWIND_VARIABLES)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _without(tree, names):
  """The nested dict `tree` without the entries called one of `names`, at any depth."""
  if not isinstance(tree, dict):
    return tree
  return {key: _without(value, names) for key, value in tree.items() if key not in names}


def check_prompt(prompt_BP, num_tokens: int) -> tuple[jax.Array, int, int]:
  """(prompt as an array, B, P) of an integer [B, P] prompt with P >= 1 (an array or nested lists);
  ValueError naming the argument otherwise, or when num_tokens < 0."""
  prompt_BP = jnp.asarray(prompt_BP)
  if prompt_BP.ndim != 2:
    raise ValueError(f"prompt_BP must be [batch, prompt length], got shape {prompt_BP.shape}")
  if not jnp.issubdtype(prompt_BP.dtype, jnp.integer):
    raise ValueError(f"prompt_BP must hold integer token ids, got dtype {prompt_BP.dtype}")
  b, p = prompt_BP.shape
  if p < 1:
    raise ValueError("the prompt must hold at least one token")
  if b < 1:
    raise ValueError(f"prompt_BP must hold at least one row, got shape {prompt_BP.shape}")
  if num_tokens < 0:
    raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
  return prompt_BP, b, p


def check_prompt_ids(prompt_BP, vocab_size: int) -> None:
  """ValueError naming prompt_BP if a concrete prompt holds a token id outside [0, vocab_size) (see
  check_token_ids). A traced prompt (generation inside the caller's own jit) is not checked here."""
  check_token_ids(prompt_BP, vocab_size, "prompt_BP")


def checks_prompt_ids(generate_fn):
  """Decorator for a jitted fn(model, params, prompt_BP, ...): checks the prompt's ids against
  model.config.vocab_size before the call (inside jit they are traced)."""
  @functools.wraps(generate_fn)
  def checked(model, params, prompt_BP, *args, **kwargs):
    check_prompt_ids(prompt_BP, model.config.vocab_size)
    return generate_fn(model, params, prompt_BP, *args, **kwargs)
  for name in ("lower", "trace", "eval_shape"):  # the jitted function's own (unchecked) entry points
    if hasattr(generate_fn, name):
      setattr(checked, name, getattr(generate_fn, name))
  return checked


def check_decoding_length(config, total: int, *, drafts: int = 0) -> None:
  """ValueError when a GPT of `config` cannot decode `total` positions (prompt + new tokens, 0 ..
  total - 1) in one KV cache: past a learned position table, or past xPos's numeric range (its key
  scales overflow: NaN logits, sampled as token 0, from there on). `drafts`: positions that
  speculative decoding's drafts reach beyond the last token (a learned table clips them; xPos
  computes them)."""
  if config.position == "learned" and total > config.max_len:
    raise ValueError(f"prompt + num_tokens = {total} exceeds the learned position table "
                     f"(max_len={config.max_len})")
  if config.position == "xpos":
    from jaxlab.positions.xpos import safe_offset
    center, limit = config.max_len // 2, safe_offset(config.dtype)
    if center > limit:  # position 0 is already out of range (the LM task's config check refuses it)
      raise ValueError(f"max_len={config.max_len}: xPos centres its scales on max_len // 2 = "
                       f"{center}, and position 0 is past {jnp.dtype(config.dtype).name}'s range "
                       f"of {limit} positions from it")
    if total + drafts - 1 - center > limit:
      raise ValueError(f"prompt + num_tokens = {total}"
                       f"{f' (+ {drafts} draft positions)' if drafts else ''}: xPos scales keys at "
                       f"position n by zeta^(-(n - c)/512) with c = max_len // 2 = {center}, which "
                       f"leaves {jnp.dtype(config.dtype).name}'s range past n - c = {limit}: at most "
                       f"{center + limit + 1 - drafts} tokens here")


def _ends_with(tokens_BN: jax.Array, count, stop: jax.Array) -> jax.Array:
  """bool [B]: whether the first `count` tokens of each row end with `stop` (int32 [L], count >= L)."""
  length = stop.shape[0]
  tail_BL = jax.lax.dynamic_slice_in_dim(tokens_BN, jnp.maximum(count - length, 0), length, axis=1)
  return (count >= length) & jnp.all(tail_BL == stop, axis=1)


def _decode_loop(step, carry, *, num_tokens: int, batch: int, finished=None, done_B=None):
  """Runs step(carry, i) -> (carry, token_B) for i = 0 .. num_tokens - 1 -> (int32 [B, num_tokens],
  bool [B]). finished(carry, tokens_BN, i) -> bool [B] (the rows whose continuation holds the stop
  once token i is in): a while_loop that ends when every row has finished (done_B: rows that had
  before), the tokens after that step 0; without it a scan (done: all False)."""
  if finished is None:
    _, tokens_NB = jax.lax.scan(step, carry, jnp.arange(num_tokens))
    return tokens_NB.T, jnp.zeros((batch,), bool)

  def body(state):
    carry, i, tokens_BN, done_B = state
    carry, token_B = step(carry, i)
    tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, token_B[:, None], i, axis=1)
    return carry, i + 1, tokens_BN, done_B | finished(carry, tokens_BN, i)

  done_B = jnp.zeros((batch,), bool) if done_B is None else done_B
  state = (carry, jnp.int32(0), jnp.zeros((batch, num_tokens), jnp.int32), done_B)
  _, _, tokens_BN, done_B = jax.lax.while_loop(lambda s: (s[1] < num_tokens) & ~jnp.all(s[3]),
                                               body, state)
  return tokens_BN, done_B


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k", "top_p",
                                             "stop_ids"))
def _generate(model, params, prompt_BP, key, *, num_tokens, temperature, top_k, top_p, stop_ids):
  """`generate`'s work -> (int32 [B, P + num_tokens], bool [B]: the row produced stop_ids)."""
  prompt_BP, b, p = check_prompt(prompt_BP, num_tokens)
  total = p + num_tokens
  check_decoding_length(model.config, total)
  cache = init_cache(model, b, total, all_heads=False, rewindable=False)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits, mutated = model.apply({"params": params, "cache": cache}, prompt_BP, positions,
                                decode=True, prefill=True, mutable=["cache"])
  sampler = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
  if len(stop_ids) > num_tokens:  # no continuation can hold them
    stop_ids = ()

  def step(carry, i):
    """One token: the same key splitting with or without stop_ids, so the same tokens."""
    cache, last_logits, key = carry
    key, sub = jax.random.split(key)
    token_B = sampler(sub, last_logits)
    pos = jnp.full((b, 1), p + i, jnp.int32)
    logits, mutated = model.apply({"params": params, "cache": cache}, token_B[:, None], pos,
                                  decode=True, mutable=["cache"])
    return (mutated["cache"], logits[:, -1], key), token_B

  finished = None
  if stop_ids:
    stop = jnp.asarray(stop_ids, jnp.int32)
    finished = lambda carry, tokens_BN, i: _ends_with(tokens_BN, i + 1, stop)
  tokens_BN, done_B = _decode_loop(step, (mutated["cache"], logits[:, -1], key),
                                   num_tokens=num_tokens, batch=b, finished=finished)
  return jnp.concatenate([prompt_BP.astype(jnp.int32), tokens_BN], axis=1), done_B


def _stop_tuple(stop_ids) -> tuple:
  """stop_ids as a tuple of Python ints (a static jit argument must be hashable); ValueError naming
  the argument for ids outside int32 (ids outside the vocabulary are allowed: never sampled)."""
  ids = tuple(int(i) for i in stop_ids)
  bad = [i for i in ids if not -2**31 <= i < 2**31]
  if bad:
    raise ValueError(f"stop_ids must be int32 token ids, got {bad[0]}")
  return ids


def generate(model, params, prompt_BP: jax.Array, key: jax.Array, *, num_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids=()) -> jax.Array:
  """Samples `num_tokens` continuations of prompt_BP (int [B, P], P >= 1) -> int32 [B, P + num_tokens].

  The prompt is run once (prefill); each new token then costs one cached step.
  stop_ids (token ids): decoding ends early once every row's continuation contains them (a row
  that has them goes on sampling until all have); the positions after that last step hold 0, so a
  caller cuts each row at its stop. The tokens before are those decoded without stop_ids.
  """
  check_prompt_ids(prompt_BP, model.config.vocab_size)
  return _generate(model, params, prompt_BP, key, num_tokens=num_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, stop_ids=_stop_tuple(stop_ids))[0]


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k", "top_p",
                                             "stop_ids"))
def _continue_by_full_passes(model, params, window_BT, key, *, num_tokens, temperature, top_k,
                             top_p, stop_ids=(), generated=0, done_B=None) -> jax.Array:
  """int32 [B, num_tokens]: each next token sampled from a full forward pass over the last T tokens
  (window_BT, then shifted by one per token), in one compiled loop (a Python loop kept a device
  array per token: ~110 KB each on CPU, 11 GB for 100k tokens). stop_ids (at most T of them): ends
  once every row has them at the end of its window, counting only generated tokens (`generated`
  before this call; done_B: rows that had them already); the rest is 0, as in `generate`."""

  def step(carry, _):
    window_BT, key = carry
    key, sub = jax.random.split(key)
    logits = model.apply({"params": params}, window_BT)
    token_B = sample_token(sub, logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p)
    return (jnp.concatenate([window_BT[:, 1:], token_B[:, None]], axis=1), key), token_B

  finished = None
  if stop_ids:
    stop = jnp.asarray(stop_ids, jnp.int32)
    t = window_BT.shape[1]
    finished = lambda carry, tokens_BN, i: (_ends_with(carry[0], t, stop)
                                            & (generated + i + 1 >= stop.shape[0]))
  return _decode_loop(step, (window_BT, key), num_tokens=num_tokens, batch=window_BT.shape[0],
                      finished=finished, done_B=done_B)[0]


def generate_long(model, params, prompt_BP: jax.Array, key: jax.Array, *, num_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  stop_ids: tuple = ()) -> jax.Array:
  """Like `generate` (-> int32 [B, P + num_tokens], the whole prompt first), but a model with a learned
  position table of `max_len` may go past it: while the sequence fits the table, tokens are decoded
  with the KV cache; after that each further token is conditioned on the last max_len tokens (a full
  forward pass per token; the context is cropped as in GPT-2 / nanoGPT sampling). A prompt longer than
  max_len is cropped the same way for the model, and returned whole. stop_ids: as in `generate`
  (at most max_len ids for a learned table)."""
  prompt_BP = check_prompt(prompt_BP, num_tokens)[0]
  # Checked once, before the cast (int64 ids could wrap); `_generate` (jitted) below does not check
  # again.
  check_prompt_ids(prompt_BP, model.config.vocab_size)
  prompt_BP = prompt_BP.astype(jnp.int32)
  stop_ids = _stop_tuple(stop_ids)
  options = dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids)
  if model.config.position != "learned":
    return _generate(model, params, prompt_BP, key, num_tokens=num_tokens, **options)[0]
  limit = model.config.max_len
  if len(stop_ids) > limit:
    raise ValueError(f"stop_ids: {len(stop_ids)} ids, more than the model's context "
                     f"(max_len={limit}) that decoding past the position table keeps")
  first = max(0, min(num_tokens, limit - prompt_BP.shape[1]))  # cached, inside the table
  key, sub = jax.random.split(key)
  tokens, done_B = prompt_BP, jnp.zeros((prompt_BP.shape[0],), bool)
  if first:
    tokens, done_B = _generate(model, params, prompt_BP, sub, num_tokens=first, **options)
  if num_tokens == first:
    return tokens
  if stop_ids and bool(jnp.all(done_B)):  # every row stopped inside the table
    return jnp.concatenate([tokens, jnp.zeros((tokens.shape[0], num_tokens - first), jnp.int32)],
                           axis=1)
  rest = _continue_by_full_passes(model, params, tokens[:, -limit:], key,
                                  num_tokens=num_tokens - first, generated=first,
                                  done_B=done_B if stop_ids else None, **options)
  return jnp.concatenate([tokens, rest], axis=1)
