"""Dual encoder for CLIP / SigLIP (Radford et al. 2021; Zhai et al. 2023): a ViT or Swin image tower and
a causal text Transformer pooled at the end token, each followed by a linear projection to a shared
space and L2-normalised. The module also owns the loss's learnable scalars:
  loss="clip":   log_scale (log 1/temperature), init log(1/0.07), clamped at log 100 inside the loss;
  loss="siglip": log_temperature t' = log 10 and bias b = -10 (SigLIP sec. 3.2).
The losses themselves are the pure functions of `jaxlab.losses.contrastive`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.layers.token_ids import check_token_ids
from jaxlab.losses import contrastive
from jaxlab.models.swin import Swin
from jaxlab.models.vit import ViT, EncoderBlock, layer_norm

LOSSES = ("clip", "siglip")
IMAGE_ENCODERS = ("vit", "swin")
TEXT_POSITIONS = ("learned", "rope")


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
  """Hyperparameters of both towers (hashable).

  image: image_encoder ("vit" | "swin"), patch, image_width, image_layers, image_heads;
    ViT: image_layers blocks of width image_width, image_position (with "rope2d", base
      image_rope_theta);
    Swin (`jaxlab.models.swin`): image_stages stages of image_layers blocks each, windows of
    image_window patches, the first stage image_width wide with image_heads heads, each later stage
    twice as wide with twice the heads (features image_width * 2^(image_stages - 1)); positions are
    its relative position bias (image_position is not used);
  text: vocab_size, text_len (max tokens, end token included), text_width, text_layers, text_heads,
  text_position ("learned" table or "rope" in every attention layer);
  embed_dim: size of the shared space; loss: "clip" | "siglip" (which scalars exist).
  """

  vocab_size: int
  text_len: int
  patch: int = 4
  image_width: int = 64
  image_layers: int = 2
  image_heads: int = 4
  image_position: str = "sincos2d"
  image_rope_theta: float = 100.0
  image_encoder: str = "vit"
  image_window: int = 4
  image_stages: int = 2
  text_width: int = 64
  text_layers: int = 2
  text_heads: int = 4
  text_position: str = "learned"
  mlp_ratio: float = 4.0
  embed_dim: int = 64
  loss: str = "siglip"
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
    if self.image_encoder not in IMAGE_ENCODERS:
      raise ValueError(f"image_encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}")
    if self.text_position not in TEXT_POSITIONS:
      raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")
    for name in ("image", "text"):
      width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
      if width % heads:
        raise ValueError(f"{name}_heads={heads} must divide {name}_width={width}")

  @property
  def image_features(self) -> int:
    """Width of the image tower's pooled features."""
    if self.image_encoder == "swin":
      return self.image_width * 2 ** (self.image_stages - 1)
    return self.image_width


def end_positions(tokens_BT: jax.Array, end_id: int) -> jax.Array:
  """Index of the first `end_id` in each row [B] (the last index when a row has none)."""
  is_end_BT = tokens_BT == end_id
  has_end_B = jnp.any(is_end_BT, axis=1)
  return jnp.where(has_end_B, jnp.argmax(is_end_BT, axis=1), tokens_BT.shape[1] - 1)


class TextEncoder(nn.Module):
  """tokens_BT (int; text, then the end token, then padding) -> features_BD at the end token.

  Causal attention (as in CLIP's text tower), so the end token's state summarises the whole text and
  padding after it is never seen.
  """

  config: DualEncoderConfig
  end_id: int = 1

  @nn.compact
  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    c = self.config
    if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
      raise ValueError(f"tokens_BT must be an int [batch, length] array, got {tokens_BT.dtype} "
                       f"{tuple(tokens_BT.shape)}")
    b, t = tokens_BT.shape
    if not 0 < t <= c.text_len:
      raise ValueError(f"tokens_BT has length {t}; it must be in 1..text_len={c.text_len}")
    check_token_ids(tokens_BT, c.vocab_size, "tokens_BT")
    embed = nn.Embed(c.vocab_size, c.text_width, dtype=c.dtype, name="token_embed",
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 ("vocab", "embed")))
    x_BTD = embed(tokens_BT)
    if c.text_position == "learned":
      table = self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.01), (None, "embed")), (c.text_len, c.text_width))
      x_BTD = x_BTD + table[None, :t].astype(c.dtype)
    positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    for i in range(c.text_layers):
      x_BTD = EncoderBlock(c.text_heads, c.mlp_ratio, causal=True,
                           position="rope" if c.text_position == "rope" else "none",
                           num_layers=c.text_layers, dtype=c.dtype,
                           name=f"block_{i}")(x_BTD, positions_BT)
    x_BTD = layer_norm("ln_final")(x_BTD)
    end_B = end_positions(tokens_BT, self.end_id)
    return jnp.take_along_axis(x_BTD, end_B[:, None, None], axis=1)[:, 0]


class DualEncoder(nn.Module):
  """(images_BHWC, tokens_BT) -> (image_BE, text_BE), both L2-normalised; E = embed_dim.

  `encode_image` / `encode_text` run one tower (for zero-shot classification and retrieval);
  `loss_scalars()` returns the loss's learnable scalars as a dict.
  """

  config: DualEncoderConfig
  end_id: int = 1

  def setup(self):
    c = self.config
    if c.image_encoder == "swin":
      self.image_tower = Swin(patch=c.patch, width=c.image_width, depth=c.image_layers,
                              num_heads=c.image_heads, window=c.image_window,
                              num_stages=c.image_stages, mlp_ratio=c.mlp_ratio, dtype=c.dtype)
    else:
      self.image_tower = ViT(patch=c.patch, width=c.image_width, num_layers=c.image_layers,
                             num_heads=c.image_heads, mlp_ratio=c.mlp_ratio,
                             position=c.image_position, rope_theta=c.image_rope_theta,
                             dtype=c.dtype)
    self.text_tower = TextEncoder(c, end_id=self.end_id)
    proj = lambda width: nn.Dense(c.embed_dim, use_bias=False, dtype=c.dtype,
                                  kernel_init=nn.with_logical_partitioning(
                                      nn.initializers.normal(1 / math.sqrt(width)), ("embed", None)))
    self.image_proj = proj(c.image_features)
    self.text_proj = proj(c.text_width)
    scalar = lambda value: nn.with_logical_partitioning(nn.initializers.constant(value), ())
    if c.loss == "clip":
      self.log_scale = self.param("log_scale", scalar(contrastive.CLIP_INIT_LOG_SCALE), (),
                                  jnp.float32)
    else:
      self.log_temperature = self.param("log_temperature",
                                        scalar(contrastive.SIGLIP_INIT_LOG_TEMPERATURE), (),
                                        jnp.float32)
      self.bias = self.param("bias", scalar(contrastive.SIGLIP_INIT_BIAS), (), jnp.float32)

  def encode_image(self, images_BHWC: jax.Array) -> jax.Array:
    z = self.image_proj(self.image_tower(images_BHWC)).astype(jnp.float32)
    return contrastive.l2_normalize(z)

  def encode_text(self, tokens_BT: jax.Array) -> jax.Array:
    z = self.text_proj(self.text_tower(tokens_BT)).astype(jnp.float32)
    return contrastive.l2_normalize(z)

  def loss_scalars(self) -> dict:
    if self.config.loss == "clip":
      return {"log_scale": self.log_scale}
    return {"log_temperature": self.log_temperature, "bias": self.bias}

  def __call__(self, images_BHWC: jax.Array, tokens_BT: jax.Array):
    self.loss_scalars()  # creates the scalars at init
    return self.encode_image(images_BHWC), self.encode_text(tokens_BT)
