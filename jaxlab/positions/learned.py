"""Learned absolute position embeddings (a trainable table, as in GPT-2 / BERT; Gehring et al. 2017).

Shapes: positions [B, T] (integers) -> embeddings [B, T, dim].
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.positions import _checks

OUT_OF_RANGE = ("nan", "clip")


class LearnedPositionEmbedding(nn.Module):
  """A [max_len, dim] table looked up at integer positions [B, T] -> [B, T, dim].

  Positions outside [0, max_len):
    * concrete positions (not traced: called outside jit, e.g. at `init`): ValueError naming
      `positions`, max_len and the offending range, whatever `out_of_range` says;
    * traced positions (inside jit / vmap / scan) cannot be checked at trace time: with
      out_of_range="nan" (default) their rows are NaN, so the mistake shows up in the loss rather than
      silently reusing a row; with "clip" they read row 0 or max_len - 1 (no NaN, no error). Use
      `jax.experimental.checkify` around the call for a runtime error.

  Attributes:
    max_len: number of positions in the table.
    dim: embedding width.
    embedding_init: initializer of the table (default N(0, 0.02), as GPT-2).
    out_of_range: "nan" or "clip", see above.
    dtype: dtype of the output (default: param_dtype).
    param_dtype: dtype of the table.
  """

  max_len: int
  dim: int
  embedding_init: Callable[..., Any] = nn.initializers.normal(stddev=0.02)
  out_of_range: str = "nan"
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, positions: jax.Array) -> jax.Array:
    max_len = _checks.positive_int(self.max_len, "max_len")
    dim = _checks.positive_int(self.dim, "dim")
    table = self.param("embedding", self.embedding_init, (max_len, dim), self.param_dtype)
    return lookup_positions(table, positions, self.out_of_range).astype(
        self.dtype or self.param_dtype)


def lookup_positions(table: jax.Array, positions: jax.Array, out_of_range: str = "nan") -> jax.Array:
  """Rows of a position table [max_len, dim] at integer positions [B, T] -> [B, T, dim], with
  LearnedPositionEmbedding's rules for positions outside [0, max_len) (ValueError when concrete;
  NaN rows or clipped when traced)."""
  if out_of_range not in OUT_OF_RANGE:
    raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE}, got {out_of_range!r}")
  max_len = table.shape[0]
  pos = _checks.int_array(positions, "positions")
  if pos.ndim != 2:
    raise ValueError(f"positions must be [batch, length], got shape {tuple(pos.shape)}")
  if not _checks.is_traced(positions) and pos.size:
    lo, hi = int(np.min(np.asarray(pos))), int(np.max(np.asarray(pos)))
    if lo < 0 or hi >= max_len:
      raise ValueError(f"positions must lie in [0, max_len={max_len}), got values in [{lo}, {hi}]")
  out = jnp.take(table, jnp.clip(pos, 0, max_len - 1), axis=0)
  if out_of_range == "nan":
    valid = (pos >= 0) & (pos < max_len)
    out = jnp.where(valid[..., None], out, jnp.nan)
  return out
