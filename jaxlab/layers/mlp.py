"""Position-wise feed-forward block (Vaswani et al. 2017, eq. 2) with a choice of activation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class MLP(nn.Module):
  """x_BTD -> act(x W_in + b) W_out + b, hidden width `hidden`."""

  hidden: int
  activation: str = "gelu"
  use_bias: bool = False
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
    h_BTF = nn.Dense(
        self.hidden, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        name="wi",
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                 ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x_BTD)
    h_BTF = ACTIVATIONS[self.activation](h_BTF)
    return nn.Dense(
        x_BTD.shape[-1], use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        name="wo",
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(self.out_init_std),
                                                 ("mlp", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h_BTF)
