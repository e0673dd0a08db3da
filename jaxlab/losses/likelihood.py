"""Bernoulli likelihoods of binary vectors and exact ancestral sampling for autoregressive models.

An autoregressive binary model gives, for each dimension d, the logit of p(x_d = 1 | x_<o(d)), where
o is the model's ordering. Then log p(x) = sum_d [x_d * l_d - softplus(l_d)] (nats).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def check_binary_batch(x, name: str = "x", dim: int | None = None) -> jax.Array:
  """x as a float array of shape [B, D] (D = dim when given) whose entries are 0 or 1; ValueError
  naming `name` otherwise. The values are checked when x is concrete (not under a jax transform):
  a grey level or 255 would be scored as if it were a likelihood (x * l - softplus(l) grows without
  bound in x)."""
  x = jnp.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must have shape [batch, dim], got shape {x.shape}")
  if dim is not None and x.shape[1] != dim:
    raise ValueError(f"{name} has {x.shape[1]} dimensions, the model expects {dim}")
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
          or x.dtype == jnp.bool_):
    raise ValueError(f"{name} must be a binary (bool/int/float) array, got dtype {x.dtype}")
  check_binary_values(x, name)
  return x.astype(jnp.result_type(float)) if not jnp.issubdtype(x.dtype, jnp.floating) else x


def check_binary_values(x, name: str = "x") -> None:
  """ValueError naming `name` unless every entry of x (numpy or jax array) is 0 or 1; skipped for
  a traced x or one this process does not hold whole."""
  if isinstance(x, jax.core.Tracer) or not getattr(x, "is_fully_addressable", True):
    return
  x = np.asarray(x)  # NumPy, not jnp: jnp ops on a constant inside a jit would give tracers
  bad = ~((x == 0) | (x == 1))
  count = int(bad.sum())
  if count:
    raise ValueError(f"{name} must hold only 0 and 1: {count} entries do not (the first is "
                     f"{x[bad][0].item()!r})")


def bernoulli_log_prob(x_BD: jax.Array, logits_BD: jax.Array) -> jax.Array:
  """sum_d log Bernoulli(x_d; sigmoid(l_d)) per example: [B, D], [B, D] -> [B] (nats), in float32 at
  least whatever the logits' dtype (a bfloat16 sum over 784 pixels would keep ~3 significant digits)."""
  logits_BD = at_least_float32(logits_BD)
  x_BD = x_BD.astype(logits_BD.dtype)
  return jnp.sum(x_BD * logits_BD - jax.nn.softplus(logits_BD), axis=-1)


def at_least_float32(x: jax.Array) -> jax.Array:
  """x in float32, or in its own dtype if wider (float64 under jax_enable_x64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def in_compute_dtype(x: jax.Array, dtype) -> jax.Array:
  """x cast to a model's compute `dtype`; None: as it is (the parameters' own dtype)."""
  return x if dtype is None else x.astype(dtype)


def log_mean_exp(a: jax.Array, axis: int = 0) -> jax.Array:
  """log(mean(exp(a), axis)), stable: the log-likelihood of an equal mixture of models."""
  return jax.nn.logsumexp(a, axis=axis) - jnp.log(a.shape[axis])


def ancestral_sample(logits_fn: Callable[[jax.Array], jax.Array], key: jax.Array,
                     order_ND: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Exact samples x ~ prod_t p(x_{o(t)} | x_{o(<t)}), one dimension per step.

  logits_fn: x_ND -> logits_ND, where logits[:, d] depends only on the dimensions before d in the
  example's ordering. order_ND: int [N, D], row n lists example n's dimensions in generation order
  (rows may differ, e.g. MADE's mask per sample). Returns float [N, D] in {0, 1}. D model passes.
  """
  n, d = order_ND.shape
  keys = jax.random.split(key, d)

  def step(t, x_ND):
    dim_N = order_ND[:, t]
    logits_N = jnp.take_along_axis(logits_fn(x_ND), dim_N[:, None], axis=1)[:, 0]
    p_N = jax.nn.sigmoid(at_least_float32(logits_N))  # a bfloat16 model's logits too
    bit_N = jax.random.bernoulli(keys[t], p_N).astype(dtype)
    return x_ND + jax.nn.one_hot(dim_N, d, dtype=dtype) * bit_N[:, None]

  return jax.lax.fori_loop(0, d, step, jnp.zeros((n, d), dtype))
