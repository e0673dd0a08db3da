"""Contrastive Predictive Coding (van den Oord et al. 2018, Figure 1): a thin Linen wrapper around
`jaxlab.losses.cpc.cpc_loss`.

x_BTF (T steps of F features: audio frames, image rows or patches, token embeddings) -> latents
z_t = g_enc(x_t) (a per-step MLP here) -> contexts c_t = g_ar(z_<=t) (a GRU, as in the paper) -> one
bilinear map W_k per prediction step k = 1..K. The loss is CPC's InfoNCE with negatives from the
batch; c_t (or z_t) is the representation for downstream tasks.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.layers.dense import Dense
from jaxlab.losses.cpc import cpc_loss


def _named(init, *axes):
  return nn.with_logical_partitioning(init, axes)


class CPC(nn.Module):
  """x_BTF -> (z_BTD, c_BTC); `loss` gives CPC's InfoNCE over `steps` prediction steps.

  Attributes:
    latent_dim, context_dim: D (z) and C (c).
    steps: K, the prediction steps (1 <= K < T).
    encoder_hidden: hidden width of the per-step encoder MLP (0: one linear layer).
  """

  latent_dim: int
  context_dim: int
  steps: int
  encoder_hidden: int = 0

  def setup(self):
    for name in ("latent_dim", "context_dim", "steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    layers = []
    if self.encoder_hidden:
      layers.append(Dense((self.encoder_hidden,), ("embed", "mlp"), use_bias=True, init_std=0.1,
                          name="enc_hidden"))
    self.encoder_layers = layers
    self.encoder_out = Dense((self.latent_dim,), ("mlp", "embed"), use_bias=True, init_std=0.1,
                             name="enc_out")
    self.context = nn.RNN(nn.GRUCell(
        self.context_dim, kernel_init=_named(nn.initializers.lecun_normal(), "embed", "mlp"),
        recurrent_kernel_init=_named(nn.initializers.orthogonal(), None, "mlp"),
        bias_init=_named(nn.initializers.zeros, "mlp")), name="gru")
    self.predictors = self.param("predictors", _named(nn.initializers.normal(0.1), None, "mlp",
                                                      "embed"),
                                 (self.steps, self.context_dim, self.latent_dim))

  def encode(self, x_BTF: jax.Array) -> jax.Array:
    """z_t = g_enc(x_t), each step alone: [B, T, F] -> [B, T, D]."""
    h = x_BTF
    for layer in self.encoder_layers:
      h = jax.nn.relu(layer(h))
    return self.encoder_out(h)

  def __call__(self, x_BTF: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(z_BTD, c_BTC): c_t sees z_1..z_t only (a left-to-right GRU)."""
    x_BTF = jnp.asarray(x_BTF)
    if x_BTF.ndim != 3 or not jnp.issubdtype(x_BTF.dtype, jnp.floating):
      raise ValueError(f"x_BTF must be a float [batch, time, features] array, got "
                       f"{x_BTF.dtype} {tuple(x_BTF.shape)}")
    z_BTD = self.encode(x_BTF)
    return z_BTD, self.context(z_BTD)

  def loss(self, x_BTF: jax.Array, lengths_B: Optional[jax.Array] = None,
           predicts_B: Optional[jax.Array] = None) -> jax.Array:
    """CPC's InfoNCE (jaxlab.losses.cpc.cpc_loss) of the sequences x_BTF; a float32 scalar."""
    z_BTD, c_BTC = self(x_BTF)
    return cpc_loss(z_BTD, c_BTC, self.predictors, lengths_B=lengths_B, predicts_B=predicts_B)
