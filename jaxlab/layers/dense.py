"""A dense layer that contracts the last `in_dims` axes of x with a kernel of shape in_shape + features.

Computed as one 2-D matmul ([prod(leading), prod(in)] @ [prod(in), prod(features)]): on CPU, XLA
lowers this (and its backward) without the transposing copies that a 3-D `dot_general` brings, which
made the LM step more than twice as slow (see experiments/results/lm_char_cpu.md).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Dense(nn.Module):
  """x[..., *in] -> y[..., *features]; kernel [*in, *features] with logical axis names `axes`."""

  features: Sequence[int]
  axes: Sequence[str | None]
  in_dims: int = 1
  use_bias: bool = False
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    lead = x.shape[:x.ndim - self.in_dims]
    if len(self.axes) != self.in_dims + len(features):
      raise ValueError(f"axes {self.axes} must name {self.in_dims + len(features)} kernel dims")
    kernel = self.param("kernel",
                        nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                     tuple(self.axes)),
                        in_shape + features, self.param_dtype)
    x2 = x.reshape(math.prod(lead), math.prod(in_shape)).astype(self.dtype)
    y = x2 @ kernel.reshape(math.prod(in_shape), math.prod(features)).astype(self.dtype)
    if self.use_bias:
      bias = self.param("bias",
                        nn.with_logical_partitioning(nn.initializers.zeros,
                                                     tuple(self.axes[self.in_dims:])),
                        features, self.param_dtype)
      y = y + bias.reshape(-1).astype(self.dtype)
    return y.reshape(lead + features)
