"""The check every token-embedding model makes on concrete input ids."""

from __future__ import annotations

import jax
import numpy as np


def check_token_ids(tokens, vocab_size: int, name: str) -> None:
  """ValueError naming `name` if concrete `tokens` hold an id outside [0, vocab_size): the embedding
  lookup would give NaN rows (id >= V) or silently another token's row (a negative id wraps). Traced
  ids (inside the caller's jit), and a global array this process does not hold whole, pass."""
  if isinstance(tokens, jax.core.Tracer) or not getattr(tokens, "is_fully_addressable", True):
    return
  ids = np.asarray(tokens)
  if ids.size and np.issubdtype(ids.dtype, np.integer) and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"{name} holds token ids outside [0, {vocab_size}) (the model's vocabulary): "
                     f"min {ids.min()}, max {ids.max()}")
