"""FVSBN, the fully visible sigmoid belief net (Neal 1992; Frey 1998): a logistic regression per dimension.

p(x_d = 1 | x_<d) = sigmoid(b_d + sum_{j<d} W_jd x_j), the data's own order: D(D+1)/2 effective
parameters (D^2 + D stored).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.losses.likelihood import (ancestral_sample, at_least_float32, bernoulli_log_prob,
                                      check_binary_batch, in_compute_dtype)


def strictly_upper_mask(dim: int, dtype=jnp.float32) -> jax.Array:
  """M[j, d] = 1 if j < d: input j may feed the conditional of dimension d. [D, D]."""
  return jnp.triu(jnp.ones((dim, dim), dtype), k=1)


def fvsbn_logits(x_BD: jax.Array, weight_DD: jax.Array, bias_D: jax.Array) -> jax.Array:
  """Logits of p(x_d = 1 | x_<d): x_BD @ (W * M) + b, M strictly upper triangular. -> [B, D]."""
  return x_BD @ (weight_DD * strictly_upper_mask(x_BD.shape[1], weight_DD.dtype)) + bias_D


class FVSBN(nn.Module):
  """Fully visible sigmoid belief net on D binary dimensions (natural order). dtype: the compute
  dtype (None: the parameters'; they stay float32; logits and log-probabilities: float32 at least)."""

  dim: int
  dtype: Any = None

  def setup(self):
    zeros = lambda axes: nn.with_logical_partitioning(nn.initializers.zeros, axes)
    self.weight = self.param("weight", zeros(("embed", None)), (self.dim, self.dim))
    self.bias = self.param("bias", zeros(("embed",)), (self.dim,))

  def __call__(self, x_BD: jax.Array) -> jax.Array:
    """Conditional logits [B, D]."""
    x_BD = check_binary_batch(x_BD, "x", self.dim)
    return self._logits_fn()(x_BD)

  def _logits_fn(self):
    """x_BD -> logits (float32 at least), computed in self.dtype (a closure over the parameters,
    read here)."""
    dt = self.dtype
    weight, bias = in_compute_dtype(self.weight, dt), in_compute_dtype(self.bias, dt)
    return lambda x_BD: at_least_float32(
        fvsbn_logits(x_BD.astype(weight.dtype), weight, bias))

  def log_prob(self, x_BD: jax.Array) -> jax.Array:
    """log p(x) in nats per example: [B, D] -> [B]."""
    x_BD = check_binary_batch(x_BD, "x", self.dim)
    return bernoulli_log_prob(x_BD, self(x_BD))

  def sample(self, key: jax.Array, n: int) -> jax.Array:
    """n exact samples, float [n, D] in {0, 1}."""
    logits = self._logits_fn()  # the parameters read outside the loop's trace
    order = jnp.broadcast_to(jnp.arange(self.dim), (n, self.dim))
    return ancestral_sample(logits, key, order)
