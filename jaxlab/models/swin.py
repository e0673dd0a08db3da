"""A small Swin Transformer image encoder (Liu et al. 2021, "Swin Transformer: Hierarchical Vision
Transformer using Shifted Windows", sec. 3.1 and Fig. 3), the hierarchical alternative to `ViT` as the
image tower of `jaxlab.models.clip` (`image_encoder="swin"`).

images_BHWC -> non-overlapping P x P patches -> linear patch embedding + LayerNorm -> stages; stage s
(s = 0 .. S-1) works on a (G / 2^s) x (G / 2^s) map (G = H / P) of width C * 2^s with heads N * 2^s,
and holds `depth` Swin blocks alternating W-MSA (shift 0) and SW-MSA (shift window // 2) (eq. 3);
between stages `PatchMerging` halves the map and doubles the width -> LayerNorm -> mean over the map
-> features_BD, D = C * 2^(S-1). Position information is the relative position bias of each window
attention (sec. 3.2); there is no absolute encoding (the paper's default).

As in the paper's code, a stage whose map is no larger than the window attends over the whole map
with that window and no shift (`stage_window`); otherwise the window must divide the map (no padding).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.attention.swin import PatchMerging, SwinAttention
from jaxlab.layers import MLP
from jaxlab.layers.dense import Dense
from jaxlab.models.vit import layer_norm, patchify


def stage_window(grid: int, window: int) -> tuple[int, int]:
  """(window, shift of the shifted blocks) on a grid x grid map: (grid, 0) when grid <= window (one
  window over the whole map), else (window, window // 2)."""
  if grid <= window:
    return grid, 0
  return window, window // 2


def check_swin_geometry(image_size: int, patch: int, window: int, num_stages: int) -> Optional[str]:
  """None when a square image of `image_size` pixels fits the encoder, else one line saying why not:
  the patch must divide the image, every stage's window its map, and every map before a patch merging
  must have an even side."""
  if patch < 1 or window < 1 or num_stages < 1:
    return f"patch ({patch}), window ({window}) and num_stages ({num_stages}) must be >= 1"
  if image_size % patch:
    return f"patch={patch} does not divide the {image_size}-px images"
  grid = image_size // patch
  for stage in range(num_stages):
    if stage:
      if grid % 2:
        return (f"stage {stage} would merge an odd {grid}x{grid} map (image {image_size} px, patch "
                f"{patch}, {num_stages} stages)")
      grid //= 2
    w, _ = stage_window(grid, window)
    if grid % w:
      return f"window={window} does not divide stage {stage}'s {grid}x{grid} map"
  return None


class SwinBlock(nn.Module):
  """x [B, H, W, C] -> x + (S)W-MSA(LN(x)) -> x + MLP(LN(x)) (Liu et al. 2021, eq. 3)."""

  num_heads: int
  window: int
  shift: int = 0
  mlp_ratio: float = 4.0
  out_init_std: float = 0.02
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    b, h, w, c = x_BHWC.shape
    x_BHWC = x_BHWC + SwinAttention(self.num_heads, self.window, self.shift, dtype=self.dtype,
                                    name="attn")(layer_norm("ln_attn")(x_BHWC))
    y_BTC = MLP(int(self.mlp_ratio * c), use_bias=True, out_init_std=self.out_init_std,
                dtype=self.dtype, name="mlp")(layer_norm("ln_mlp")(x_BHWC).reshape(b, h * w, c))
    y_BTC = nn.with_logical_constraint(x_BHWC.reshape(b, h * w, c) + y_BTC,
                                       ("act_batch", "act_length", "act_embed"))
    return y_BTC.reshape(b, h, w, c)


class Swin(nn.Module):
  """images_BHWC (float, square) -> pooled features_BD (D = width * 2^(num_stages - 1)); with
  pool=False the final map [B, G', G', D] before the final LayerNorm's pooling (for inspection)."""

  patch: int
  width: int
  depth: int  # Swin blocks per stage (alternating W-MSA / SW-MSA)
  num_heads: int  # in the first stage; doubled by each later stage
  window: int = 4
  num_stages: int = 2
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_BHWC: jax.Array, *, pool: bool = True) -> jax.Array:
    if images_BHWC.ndim != 4 or images_BHWC.shape[1] != images_BHWC.shape[2]:
      raise ValueError(f"images_BHWC must be square [batch, height, width, channels], got shape "
                       f"{tuple(images_BHWC.shape)}")
    problem = check_swin_geometry(images_BHWC.shape[1], self.patch, self.window, self.num_stages)
    if problem:
      raise ValueError(f"images_BHWC {tuple(images_BHWC.shape)}: {problem}")
    b, h = images_BHWC.shape[:2]
    patches_BTP = patchify(images_BHWC.astype(self.dtype), self.patch)
    grid = h // self.patch
    x_BTC = Dense((self.width,), (None, "embed"), use_bias=True,
                  init_std=1 / math.sqrt(patches_BTP.shape[-1]), dtype=self.dtype,
                  name="patch_embed")(patches_BTP)
    x_BHWC = layer_norm("ln_patch")(x_BTC).reshape(b, grid, grid, self.width)
    out_std = 0.02 / math.sqrt(2 * self.depth * self.num_stages)
    for stage in range(self.num_stages):
      if stage:
        x_BHWC = PatchMerging(dtype=self.dtype, name=f"merge_{stage}")(x_BHWC)
      window, shift = stage_window(x_BHWC.shape[1], self.window)
      for i in range(self.depth):
        x_BHWC = SwinBlock(self.num_heads * 2 ** stage, window, shift if i % 2 else 0,
                           self.mlp_ratio, out_init_std=out_std, dtype=self.dtype,
                           name=f"stage_{stage}_block_{i}")(x_BHWC)
    if not pool:
      return x_BHWC
    return jnp.mean(layer_norm("ln_final")(x_BHWC), axis=(1, 2))
