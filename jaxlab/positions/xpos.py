"""xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer", and the reference
torchscale `XPOS` module): RoPE whose pairs are also scaled so that attention decays with distance.

For rotary pair i of a head of dim d (rotate-half pairing (i, i + d/2), as `apply_rope`):
  zeta_i = (2i/d + gamma) / (1 + gamma)                       (in (0, 1); gamma = 0.4)
  q at position m:  RoPE(q, m) * zeta_i^((m - c) / scale_base)
  k at position n:  RoPE(k, n) * zeta_i^(-(n - c) / scale_base)
so each pair's contribution to q_m . k_n is multiplied by zeta_i^((m - n) / scale_base): a function of
m - n only, shrinking with distance for m > n (xPos is meant for causal attention; for keys in the
future, n > m, the factor grows).

Centring/offset choice: the constant c cancels in every q.k product. The torchscale reference centres
the exponent on the current window (c = length // 2, via positions -(L//2) .. L - L//2 - 1), which
changes c with the length and so breaks a KV cache (cached keys were scaled with an older c). Here c
is the static argument `center`, default 0: cache-safe and identical in every call. For very long
sequences choose center near the middle of the positions used, to keep zeta^(+-(n - c)/scale_base)
inside float32 range (with c = 0 and scale_base = 512, zeta_0^(n/512) underflows float32 only past
n ~ 35k, since zeta_0 = 2/7 for gamma = 0.4). The outputs have the inputs' dtype: in float16 the key
factor zeta_0^(-(n - c)/512) passes float16's maximum (65504) at n - c ~ 4.5k, sooner for keys with
large entries (inf logits, then NaN), so float16 is for |n - c| up to ~2k (the LM task's config
check, jaxlab.train.lm_task.validate, refuses longer float16 xPos runs; a GPT built directly is not
checked); bfloat16 has float32's range.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from jaxlab.positions import _checks
from jaxlab.positions.rope import _angles, _rotate_half_f32


# The largest |position - center| at which xPos's scales stay usable (scale_base 512, gamma 0.4; see
# the module docstring): float16 overflows at ~4.5k, earlier for keys with large entries; float32 and
# bfloat16 underflow zeta_0^(n/512) at ~36k.
SAFE_OFFSET_FLOAT16 = 2048
SAFE_OFFSET = 32768


def safe_offset(dtype) -> int:
  """The largest |position - center| that xPos keeps in range for q/k of `dtype`."""
  return SAFE_OFFSET_FLOAT16 if jnp.dtype(dtype) == jnp.float16 else SAFE_OFFSET


def xpos_scale(positions: jax.Array, head_dim: int, *, scale_base: float = 512, gamma: float = 0.4,
               center: float = 0.0) -> jax.Array:
  """zeta_i^((positions - center) / scale_base): positions [B, T] -> float32 [B, T, head_dim // 2]."""
  pos = _checks.real_array(positions, "positions")
  if pos.ndim != 2:
    raise ValueError(f"positions must be [batch, length], got shape {tuple(pos.shape)}")
  d = _checks.positive_int(head_dim, "head_dim", minimum=2)
  if d % 2:
    raise ValueError(f"head_dim must be even, got {d}")
  _checks.positive_number(scale_base, "scale_base")
  _checks.positive_number(gamma, "gamma")
  _checks.real_number(center, "center")
  return _scale(pos, d, scale_base, gamma, center)


def apply_xpos(q: jax.Array, k: jax.Array, q_positions: jax.Array, k_positions: jax.Array, *,
               theta: float = 10000.0, scale_base: float = 512, gamma: float = 0.4,
               center: float = 0.0) -> Tuple[jax.Array, jax.Array]:
  """xPos-rotated and scaled (q, k): q [B, Tq, N, H], k [B, Tk, K, H], positions [B, Tq], [B, Tk].

  Returns arrays of q's and k's shapes and dtypes (computed in float32). See the module doc for the
  formula and the meaning of `center`.
  """
  _checks.bhtd(q, "q")
  _checks.bhtd(k, "k")
  if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"q and k must share batch and head_dim, got shapes {q.shape} and {k.shape}")
  h = q.shape[-1]
  if h % 2:
    raise ValueError(f"xPos needs an even head_dim, got {h}")
  qp = _checks.positions_of_shape(q_positions, q.shape[:2], "q_positions")
  kp = _checks.positions_of_shape(k_positions, k.shape[:2], "k_positions")
  _checks.positive_number(scale_base, "scale_base")
  _checks.positive_number(gamma, "gamma")
  _checks.positive_number(theta, "theta")
  _checks.real_number(center, "center")
  if _checks.all_static(theta, scale_base, gamma, center):
    return _xpos_jit(q, k, qp, kp, float(theta), float(scale_base), float(gamma), float(center))
  return _xpos(q, k, qp, kp, theta, scale_base, gamma, center)


def _scale(pos, d, scale_base, gamma, center):
  zeta = (jnp.arange(0, d, 2, dtype=jnp.float32) / d + gamma) / (1.0 + gamma)  # [d/2]
  exponent = (pos.astype(jnp.float32) - center) / scale_base  # [B, T]
  return jnp.exp(exponent[:, :, None] * jnp.log(zeta))


def _xpos(q, k, qp, kp, theta, scale_base, gamma, center):
  h = q.shape[-1]
  q_scale = _scale(qp, h, scale_base, gamma, center)
  k_scale = 1.0 / _scale(kp, h, scale_base, gamma, center)
  q_scale = jnp.concatenate([q_scale, q_scale], axis=-1)[:, :, None, :]
  k_scale = jnp.concatenate([k_scale, k_scale], axis=-1)[:, :, None, :]
  q_out = _rotate_half_f32(q, _angles(qp, None, theta, h, None), h) * q_scale
  k_out = _rotate_half_f32(k, _angles(kp, None, theta, h, None), h) * k_scale
  return q_out.astype(q.dtype), k_out.astype(k.dtype)


_xpos_jit = jax.jit(_xpos, static_argnums=(4, 5, 6, 7))
