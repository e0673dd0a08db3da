"""Argument validation shared by the position-encoding functions (private).

Every check raises ValueError (or TypeError for a wrong kind of object) whose message names the
argument, so a bad call fails at trace time with a sentence rather than deep inside a broadcast.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value: Any) -> bool:
  """True when `value` is an abstract tracer (inside jit/vmap/grad), i.e. its values are unknown."""
  return isinstance(value, jax.core.Tracer)


def static_number(value: Any) -> Optional[float]:
  """`value` as a Python float when it is a concrete real scalar; None when it is traced."""
  if is_traced(value):
    return None
  if isinstance(value, bool):
    raise TypeError("expected a number, got a bool")
  try:
    arr = np.asarray(value)
  except Exception:  # pragma: no cover - exotic objects
    return None
  if arr.shape != () or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
    raise TypeError(f"expected a real scalar, got {value!r}")
  return float(arr)


def positive_number(value: Any, name: str, *, minimum_exclusive: float = 0.0) -> Any:
  """Checks a real scalar > minimum_exclusive (finite); traced scalars pass unchecked."""
  try:
    v = static_number(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a real number, got {value!r}") from e
  if v is not None and (not math.isfinite(v) or v <= minimum_exclusive):
    raise ValueError(f"{name} must be a finite number > {minimum_exclusive}, got {value!r}")
  return value


def real_number(value: Any, name: str) -> Any:
  """Checks a finite real scalar (any sign); traced scalars pass unchecked."""
  try:
    v = static_number(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a real number, got {value!r}") from e
  if v is not None and not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {value!r}")
  return value


def boolean(value: Any, name: str) -> bool:
  """A Python or NumPy bool (a string such as "no" would read as True)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {value!r}")
  return bool(value)


def positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
  """Checks a static Python/NumPy integer >= minimum and returns it as int."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
  return int(value)


def real_array(value: Any, name: str) -> jax.Array:
  """`value` (positions or lengths) as a jax array of an integer or >= 32-bit floating dtype: a 16-bit
  float holds integers exactly only up to 256 (bfloat16) or 2048 (float16), so it is refused."""
  try:
    arr = jnp.asarray(value)
  except TypeError as e:
    raise ValueError(f"{name} must be an array, got {type(value).__name__}") from e
  if not (jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)):
    raise ValueError(f"{name} must have an integer or floating dtype, got {arr.dtype}")
  if jnp.issubdtype(arr.dtype, jnp.floating) and arr.dtype.itemsize < 4:
    raise ValueError(f"{name} must be integers or float32, got {arr.dtype}, which rounds positions "
                     "(bfloat16 from 256 on, float16 from 2048 on)")
  return arr


def int_array(value: Any, name: str) -> jax.Array:
  arr = real_array(value, name)
  if not jnp.issubdtype(arr.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {arr.dtype}")
  return arr


def bhtd(x: Any, name: str) -> jax.Array:
  """Checks a [batch, length, heads, head_dim] floating array."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array [batch, length, heads, head_dim], got {type(x).__name__}")
  if len(x.shape) != 4:
    raise ValueError(f"{name} must be [batch, length, heads, head_dim], got shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
  return x


def positions_of_shape(positions: Any, shape: Sequence[int], name: str) -> jax.Array:
  """Checks positions of exactly `shape` with a real dtype (returned as is, not cast)."""
  arr = real_array(positions, name)
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")
  return arr


def all_static(*values: Any) -> bool:
  """True when every value is a concrete number (so it can be a jit static argument)."""
  return all(v is None or static_number(v) is not None for v in values)
