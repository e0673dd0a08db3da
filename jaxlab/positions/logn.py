"""Log-n attention scaling (Chiang & Cholak 2022, "Overcoming a Theoretical Limitation of
Self-Attention": scale logits by log n; Su 2021 "Entropy-invariant scaling", as used in
Qwen's `logn_attn`).

The query at position p sees n = p + 1 tokens in a causal LM; its logits are multiplied by
max(1, log(n) / log(train_len)), i.e. unchanged within the training length and growing slowly beyond
it, which keeps the attention entropy roughly constant as the context grows.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp

from jaxlab.positions import _checks


def logn_scale(q_len_or_positions: Union[int, jax.Array], train_len: int) -> jax.Array:
  """Per-query multiplier max(1, log(n) / log(train_len)), n = position + 1; float32.

  q_len_or_positions: a Python int Tq (positions 0 .. Tq-1; returns [Tq]) or positions of any
    shape, typically [B, Tq] (returns the same shape); any array, NumPy and jax scalars included,
    holds positions (one rule whatever the scalar's type). Positions below 0 count as 0 (n = 1).
  train_len: training context length L >= 2.
  Use: q = q * logn_scale(positions, L)[..., None, None] for q [B, Tq, N, H] (Qwen scales q).
  """
  train_len = _checks.positive_int(train_len, "train_len", minimum=2)
  if isinstance(q_len_or_positions, int) and not isinstance(q_len_or_positions, bool):
    q_len = _checks.positive_int(q_len_or_positions, "q_len_or_positions", minimum=0)
    pos = jnp.arange(q_len, dtype=jnp.float32)
  else:
    pos = _checks.real_array(q_len_or_positions, "q_len_or_positions").astype(jnp.float32)
  n = jnp.maximum(pos + 1.0, 1.0)
  return jnp.maximum(1.0, jnp.log(n) / jnp.log(jnp.float32(train_len)))
