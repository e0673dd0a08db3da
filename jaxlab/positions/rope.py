"""Rotary position embedding (RoPE; Su et al. 2021, RoFormer, eq. 34), rotate-half form."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
  """Inverse frequencies theta^(-2i/d), i = 0 .. d/2-1, shape [head_dim // 2]."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0,
               scaling: Optional[dict] = None) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + H/2]) of x [B, T, N, H] by angle positions[b, t] * freq_i.

  positions: [B, T] (ints or floats). scaling: reserved for context-extension methods; None = plain RoPE.
  Returns an array of x's shape and dtype.
  """
  if x.ndim != 4:
    raise ValueError(f"x must be [batch, length, heads, head_dim], got shape {x.shape}")
  if positions.shape != x.shape[:2]:
    raise ValueError(f"positions must have shape [B, T] = {x.shape[:2]}, got {positions.shape}")
  if scaling is not None:
    raise NotImplementedError("RoPE scaling is not implemented yet; use scaling=None")
  freqs = rope_frequencies(x.shape[-1], theta)
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, T, 1, H/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
