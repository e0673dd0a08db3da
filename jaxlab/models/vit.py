"""A small Vision Transformer (Dosovitskiy et al. 2021) and the pre-norm encoder block it shares with
the text tower of `jaxlab.models.clip`.

images_BHWC -> non-overlapping P x P patches -> linear patch embedding (sec. 3.1, eq. 1) -> + 2-D
position encoding -> pre-norm Transformer blocks -> LayerNorm -> mean over patches ("GAP", as in
SigLIP's and Beyer et al. 2022's plain ViT baselines) -> features_BD.
Position encodings: "sincos2d" (fixed; half of the width encodes the patch row and half the column
with `jaxlab.positions.sinusoidal_embedding`, as MAE and the plain-ViT baselines do), "learned"
(one vector per patch), "rope2d" (no absolute encoding; axial 2-D RoPE on q and k in every attention
layer, Heo et al. 2024, so the logits depend on the patches' (row, col) offset; base `rope_theta`,
100 as in their code for images, whose positions are small), or "none".
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab import positions as positions_lib
from jaxlab.layers import MLP, MultiHeadAttention
from jaxlab.layers.dense import Dense

VIT_POSITIONS = ("sincos2d", "learned", "rope2d", "none")


def layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class EncoderBlock(nn.Module):
  """x_BTD -> x + Attn(LN(x)) -> x + MLP(LN(x)); bidirectional unless `causal`."""

  num_heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  position: str = "none"  # "rope" (text, positions_BT [B, T]) or "rope2d" (patches, [B, T, 2])
  rope_theta: float = 10000.0
  num_layers: int = 1  # for the scaled residual init 0.02 / sqrt(2 * num_layers)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
    width = x_BTD.shape[-1]
    if self.num_heads < 1 or width % self.num_heads:  # head_dim = width // heads would drop the rest
      raise ValueError(f"num_heads={self.num_heads} must divide the width {width}")
    out_std = 0.02 / math.sqrt(2 * self.num_layers)
    h_BTD = MultiHeadAttention(num_heads=self.num_heads, num_kv_heads=self.num_heads,
                               head_dim=width // self.num_heads, causal=self.causal,
                               position=self.position, rope_theta=self.rope_theta,
                               out_init_std=out_std, use_bias=True,
                               dtype=self.dtype, name="attn")(layer_norm("ln_attn")(x_BTD),
                                                              positions_BT)
    x_BTD = x_BTD + h_BTD
    h_BTD = MLP(int(self.mlp_ratio * width), use_bias=True, out_init_std=out_std, dtype=self.dtype,
                name="mlp")(layer_norm("ln_mlp")(x_BTD))
    return nn.with_logical_constraint(x_BTD + h_BTD, ("act_batch", "act_length", "act_embed"))


def patchify(images_BHWC: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/P)(W/P), P*P*C], patches in row-major order, pixels (row, col, channel)."""
  b, h, w, c = images_BHWC.shape
  if h % patch or w % patch:
    raise ValueError(f"images_BHWC: height {h} and width {w} must be multiples of patch={patch}")
  return einops.rearrange(images_BHWC, "b (nh ph) (nw pw) c -> b (nh nw) (ph pw c)", ph=patch,
                          pw=patch)


def sincos_2d(grid_h: int, grid_w: int, width: int) -> jax.Array:
  """Fixed 2-D encoding [1, grid_h * grid_w, width]: first half sinusoidal(row), second sinusoidal(col)."""
  if width % 4:
    raise ValueError(f"sincos2d needs width divisible by 4, got {width}")
  rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
  row_1TD = positions_lib.sinusoidal_embedding(rows.reshape(1, -1), width // 2)
  col_1TD = positions_lib.sinusoidal_embedding(cols.reshape(1, -1), width // 2)
  return jnp.concatenate([row_1TD, col_1TD], axis=-1)


class ViT(nn.Module):
  """images_BHWC (float) -> pooled features_BD (D = width)."""

  patch: int
  width: int
  num_layers: int
  num_heads: int
  mlp_ratio: float = 4.0
  position: str = "sincos2d"
  rope_theta: float = 100.0  # "rope2d" only
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_BHWC: jax.Array) -> jax.Array:
    if images_BHWC.ndim != 4:
      raise ValueError(f"images_BHWC must be [batch, height, width, channels], got shape "
                       f"{tuple(images_BHWC.shape)}")
    if self.position not in VIT_POSITIONS:
      raise ValueError(f"position must be one of {VIT_POSITIONS}, got {self.position!r}")
    b, h, w, _ = images_BHWC.shape
    patches_BTP = patchify(images_BHWC.astype(self.dtype), self.patch)
    t = patches_BTP.shape[1]
    x_BTD = Dense((self.width,), (None, "embed"), use_bias=True,
                  init_std=1 / math.sqrt(patches_BTP.shape[-1]), dtype=self.dtype,
                  name="patch_embed")(patches_BTP)
    if self.position == "sincos2d":
      x_BTD = x_BTD + sincos_2d(h // self.patch, w // self.patch, self.width).astype(self.dtype)
    elif self.position == "learned":
      table = self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, "embed")), (t, self.width))
      x_BTD = x_BTD + table[None].astype(self.dtype)
    positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    if self.position == "rope2d":  # (row, col) of each patch, row-major as patchify
      grid_w = w // self.patch
      positions_BT = jnp.stack([positions_BT // grid_w, positions_BT % grid_w], axis=-1)
    for i in range(self.num_layers):
      x_BTD = EncoderBlock(self.num_heads, self.mlp_ratio, causal=False,
                           position="rope2d" if self.position == "rope2d" else "none",
                           rope_theta=self.rope_theta,
                           num_layers=self.num_layers, dtype=self.dtype,
                           name=f"block_{i}")(x_BTD, positions_BT)
    return jnp.mean(layer_norm("ln_final")(x_BTD), axis=1)
