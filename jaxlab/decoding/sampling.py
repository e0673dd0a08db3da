"""Autoregressive sampling from a causal LM with a KV cache: temperature, top-k and top-p (nucleus;
Holtzman et al. 2020) filtering, as pure functions plus a jitted generation loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlab.layers.attention import REWIND_VARIABLES
from jaxlab.models.gpt import MTP_BLOCK_PREFIX


def filter_logits(logits_BV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k and outside the smallest set with probability >= top_p to -inf.

  top_k=0 and top_p=1.0 switch the filters off. The most likely token always survives.
  """
  if logits_BV.ndim != 2:
    raise ValueError(f"logits must be [batch, vocab], got shape {logits_BV.shape}")
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
  neg_inf = jnp.finfo(logits_BV.dtype).min
  if top_k and top_k < logits_BV.shape[-1]:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, neg_inf, logits_BV)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep a sorted token if the mass strictly before it is < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold, neg_inf, logits_BV)
  return logits_BV


def sample_token(key: jax.Array, logits_BV: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> jax.Array:
  """One token id per row, int32 [B]; temperature 0 is greedy (argmax)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
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


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k", "top_p"))
def generate(model, params, prompt_BP: jax.Array, key: jax.Array, *, num_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Samples `num_tokens` continuations of prompt_BP (int [B, P], P >= 1) -> int32 [B, P + num_tokens].

  The prompt is run once (prefill); each new token then costs one cached step.
  """
  b, p = prompt_BP.shape
  if p < 1:
    raise ValueError("the prompt must hold at least one token")
  total = p + num_tokens
  if model.config.position == "learned" and total > model.config.max_len:
    raise ValueError(f"prompt + num_tokens = {total} exceeds the learned position table "
                     f"(max_len={model.config.max_len})")
  cache = init_cache(model, b, total, all_heads=False, rewindable=False)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits, mutated = model.apply({"params": params, "cache": cache}, prompt_BP, positions,
                                decode=True, prefill=True, mutable=["cache"])
  sampler = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)

  def step(carry, i):
    cache, last_logits, key = carry
    key, sub = jax.random.split(key)
    token_B = sampler(sub, last_logits)
    pos = jnp.full((b, 1), p + i, jnp.int32)
    logits, mutated = model.apply({"params": params, "cache": cache}, token_B[:, None], pos,
                                  decode=True, mutable=["cache"])
    return (mutated["cache"], logits[:, -1], key), token_B

  _, tokens = jax.lax.scan(step, (mutated["cache"], logits[:, -1], key), jnp.arange(num_tokens))
  return jnp.concatenate([prompt_BP.astype(jnp.int32), tokens.T], axis=1)


def generate_long(model, params, prompt_BP: jax.Array, key: jax.Array, *, num_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Like `generate`, but for a model with a learned position table of `max_len` it may go past max_len:
  it decodes with the KV cache up to max_len tokens, then conditions each further token on the last
  max_len - 1 tokens (a full forward pass per token; the context is cropped as in GPT-2 sampling)."""
  limit = model.config.max_len if model.config.position == "learned" else None
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  if limit is not None and prompt_BP.shape[1] > limit - 1:
    prompt_BP = prompt_BP[:, -(limit - 1):]
  first = num_tokens if limit is None else min(num_tokens, limit - prompt_BP.shape[1])
  key, sub = jax.random.split(key)
  tokens = generate(model, params, prompt_BP, sub, num_tokens=first, temperature=temperature,
                    top_k=top_k, top_p=top_p)
  remaining = num_tokens - first
  if remaining <= 0:
    return tokens

  @jax.jit
  def next_token(window_BT, key):
    logits = model.apply({"params": params}, window_BT)
    return sample_token(key, logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p)

  out = [tokens]
  window = tokens[:, -(limit - 1):]
  for _ in range(remaining):
    key, sub = jax.random.split(key)
    token = next_token(window, sub)[:, None]
    out.append(token)
    window = jnp.concatenate([window[:, 1:], token], axis=1)
  return jnp.concatenate(out, axis=1)
