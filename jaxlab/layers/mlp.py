"""Position-wise feed-forward block (Vaswani et al. 2017, eq. 2) with a choice of activation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.layers.dense import Dense

ACTIVATIONS = {
    # Exact GELU (Hendrycks & Gimpel 2016) written with erf: equal to jax.nn.gelu(approximate=False)
    # to 1e-6, and faster on CPU than its erfc form.
    "gelu": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476)),
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
    dense = lambda features, axes, std, name: Dense(
        (features,), axes, use_bias=self.use_bias, init_std=std, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    h_BTF = dense(self.hidden, ("embed", "mlp"), self.init_std, "wi")(x_BTD)
    h_BTF = ACTIVATIONS[self.activation](h_BTF)
    return dense(x_BTD.shape[-1], ("mlp", "embed"), self.out_init_std, "wo")(h_BTF)
