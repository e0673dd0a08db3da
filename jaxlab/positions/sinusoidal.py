"""Fixed sinusoidal position encoding (Vaswani et al. 2017, "Attention Is All You Need", sec. 3.5).

PE(pos, 2i)     = sin(pos / max_timescale^(2i/d))
PE(pos, 2i + 1) = cos(pos / max_timescale^(2i/d))

This is the paper's *interleaved* form (sin on even feature indices, cos on odd ones), not the
concatenated [sin..., cos...] form of tensor2tensor (which also spaces the timescales differently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.positions import _checks


def sinusoidal_embedding(positions: jax.Array, dim: int, *,
                         max_timescale: float = 10000.0) -> jax.Array:
  """positions [B, T] (ints or floats, e.g. diffusion times) -> float32 [B, T, dim], dim even.

  out[b, t, 2i] = sin(p / max_timescale^(2i/dim)), out[b, t, 2i+1] = cos(same), p = positions[b, t].
  """
  pos = _checks.real_array(positions, "positions")
  if pos.ndim != 2:
    raise ValueError(f"positions must be [batch, length], got shape {tuple(pos.shape)}")
  dim = _checks.positive_int(dim, "dim", minimum=2)
  if dim % 2:
    raise ValueError(f"dim must be even, got {dim}")
  _checks.positive_number(max_timescale, "max_timescale")
  if _checks.all_static(max_timescale):
    return _sinusoidal_jit(pos, dim, float(max_timescale))
  return _sinusoidal(pos, dim, max_timescale)


def _sinusoidal(pos, dim, max_timescale):
  if isinstance(max_timescale, float):  # static: float64 table, rounded once
    inv_timescale = jnp.asarray(max_timescale ** (-np.arange(0, dim, 2, dtype=np.float64) / dim),
                                jnp.float32)
  else:
    inv_timescale = max_timescale ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [dim/2]
  angles = pos.astype(jnp.float32)[:, :, None] * inv_timescale  # [B, T, dim/2]
  out = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, T, dim/2, 2]
  return out.reshape(*pos.shape, dim)


_sinusoidal_jit = jax.jit(_sinusoidal, static_argnums=(1, 2))
