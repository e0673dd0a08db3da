"""PixelCNN for 1-channel binary images (van den Oord, Kalchbrenner & Kavukcuoglu, ICML 2016, Sec. 3.5
"Pixel Recurrent Neural Networks"; gated version: van den Oord et al., NeurIPS 2016, "Conditional Image
Generation with PixelCNN Decoders", Sec. 2.1-2.2, Fig. 2).

Pixels are generated in raster order; p(x_ij = 1 | pixels before ij) = sigmoid(logit_ij).
- `PixelCNN`: a 7x7 convolution with mask type A (the centre pixel is excluded), residual blocks
  with 3x3 mask-B convolutions (centre included), then two 1x1 layers. Its receptive field has the
  known blind spot (pixels up and to the right that no stack of masked 3x3 kernels reaches).
- `GatedPixelCNN`: a vertical stack ((k//2+1) x k kernels over the rows above and the current row)
  and a horizontal stack (1 x (k//2+1) kernels over the pixels left of and at the current one), joined
  by a 1x1 link from the vertical stack shifted down by one row; gated units tanh(a) * sigmoid(b); no
  blind spot. The first horizontal layer excludes the current pixel (type A).
Inputs are flat vectors x_BD (D = H*W, raster order), like the other binary models.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.losses.likelihood import (ancestral_sample, at_least_float32, bernoulli_log_prob,
                                      check_binary_batch, in_compute_dtype)


def raster_mask(kernel_size: int, mask_type: str) -> np.ndarray:
  """[k, k] mask of a masked convolution: rows above the centre, and the centre row left of the
  centre; the centre itself only for type "B"."""
  if mask_type not in ("A", "B"):
    raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be odd, got {kernel_size}")
  c = kernel_size // 2
  mask = np.zeros((kernel_size, kernel_size), np.float32)
  mask[:c] = 1.0
  mask[c, :c + (mask_type == "B")] = 1.0
  return mask


def conv2d(x_BHWC: jax.Array, kernel_KLIO: jax.Array, padding) -> jax.Array:
  """Plain 2-D convolution (NHWC, HWIO) with explicit ((top, bottom), (left, right)) padding."""
  return jax.lax.conv_general_dilated(x_BHWC, kernel_KLIO, (1, 1), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def shift_down(x_BHWC: jax.Array) -> jax.Array:
  """Row i takes row i-1 (row 0 gets zeros): the vertical stack's link to the horizontal one."""
  return jnp.pad(x_BHWC, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


class Conv(nn.Module):
  """Convolution with an explicit kernel shape, padding and optional fixed 0/1 mask over (kh, kw).
  The output channels have the logical axis `out_axis` ("embed": fsdp shards them)."""

  features: int
  kernel_shape: tuple[int, int]
  padding: tuple = ((0, 0), (0, 0))
  mask: np.ndarray | None = None
  out_axis: str | None = "embed"
  dtype: Any = None  # compute dtype (None: the parameters'; they stay float32)

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    kh, kw = self.kernel_shape
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, None, self.out_axis)),
                        (kh, kw, x_BHWC.shape[-1], self.features))
    if self.mask is not None:
      kernel = kernel * jnp.asarray(self.mask)[:, :, None, None]
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.out_axis,)),
                      (self.features,))
    kernel, bias = in_compute_dtype(kernel, self.dtype), in_compute_dtype(bias, self.dtype)
    return conv2d(x_BHWC.astype(kernel.dtype), kernel, self.padding) + bias


def _same(k: int):
  return ((k // 2, k // 2), (k // 2, k // 2))


class _ImageModel(nn.Module):
  """log_prob / sample over flat raster-order vectors for the image networks below."""

  def _check_first_kernel(self) -> None:
    # Mask A on a 1x1 kernel is all zeros: PixelCNN would see no pixel, the gated one's horizontal
    # stack no pixel of the current row.
    if self.first_kernel < 3 or self.first_kernel % 2 == 0:
      raise ValueError(f"first_kernel must be odd and >= 3, got {self.first_kernel}")

  def _image(self, x_BD: jax.Array) -> jax.Array:
    h, w = self.image_shape
    x_BD = check_binary_batch(x_BD, "x", h * w)
    return x_BD.reshape(-1, h, w, 1)

  def __call__(self, x_BD: jax.Array) -> jax.Array:
    """Conditional logits [B, D] in raster order (float32 at least; computed in self.dtype)."""
    return at_least_float32(self.network(self._image(x_BD)).reshape(x_BD.shape[0], -1))

  def log_prob(self, x_BD: jax.Array) -> jax.Array:
    """log p(x) in nats per image: [B, H*W] -> [B]."""
    x_BD = check_binary_batch(x_BD, "x", self.image_shape[0] * self.image_shape[1])
    return bernoulli_log_prob(x_BD, self(x_BD))

  def sample(self, key: jax.Array, n: int) -> jax.Array:
    """n exact samples in raster order (H*W network passes), float [n, H*W]."""
    variables = self.variables
    net = self.clone(parent=None)
    d = self.image_shape[0] * self.image_shape[1]
    order = jnp.broadcast_to(jnp.arange(d), (n, d))
    return ancestral_sample(lambda x: net.apply(variables, x), key, order)


class PixelCNN(_ImageModel):
  """PixelCNN: 7x7 mask-A conv, `num_layers` residual blocks (1x1, 3x3 mask B, 1x1), two 1x1 layers."""

  image_shape: Sequence[int] = (28, 28)
  channels: int = 64
  num_layers: int = 7
  first_kernel: int = 7
  dtype: Any = None  # compute dtype (None: the parameters'; logits, log-probabilities: float32+)

  @nn.compact
  def network(self, x_BHW1: jax.Array) -> jax.Array:
    self._check_first_kernel()
    conv = functools.partial(Conv, dtype=self.dtype)
    k = self.first_kernel
    h = conv(2 * self.channels, (k, k), _same(k), raster_mask(k, "A"))(x_BHW1)
    for _ in range(self.num_layers):
      r = conv(self.channels, (1, 1))(jax.nn.relu(h))
      r = conv(self.channels, (3, 3), _same(3), raster_mask(3, "B"))(jax.nn.relu(r))
      h = h + conv(2 * self.channels, (1, 1))(jax.nn.relu(r))
    h = conv(self.channels, (1, 1))(jax.nn.relu(h))
    return conv(1, (1, 1), out_axis=None)(jax.nn.relu(h))[..., 0]


class GatedPixelCNN(_ImageModel):
  """Gated PixelCNN with vertical and horizontal stacks (no blind spot), `num_layers` gated layers."""

  image_shape: Sequence[int] = (28, 28)
  channels: int = 64
  num_layers: int = 7
  first_kernel: int = 7
  dtype: Any = None  # compute dtype (None: the parameters'; logits, log-probabilities: float32+)
  kernel: int = 3

  @nn.compact
  def network(self, x_BHW1: jax.Array) -> jax.Array:
    self._check_first_kernel()
    conv = functools.partial(Conv, dtype=self.dtype)
    if self.kernel < 1 or self.kernel % 2 == 0:
      raise ValueError(f"kernel must be odd and >= 1, got {self.kernel}")
    v = h = x_BHW1
    c = self.channels
    for layer in range(self.num_layers):
      k = self.first_kernel if layer == 0 else self.kernel
      r = k // 2
      v_2C = conv(2 * c, (r + 1, k), ((r, 0), (r, r)))(v)  # rows i-r..i, cols j-r..j+r
      hmask = np.ones((1, r + 1), np.float32)
      if layer == 0:
        hmask[0, -1] = 0.0  # type A: not the current pixel
      h_2C = conv(2 * c, (1, r + 1), ((0, 0), (r, 0)), hmask)(h)  # cols j-r..j
      h_2C = h_2C + conv(2 * c, (1, 1))(shift_down(v_2C))  # rows above only
      v = jnp.tanh(v_2C[..., :c]) * jax.nn.sigmoid(v_2C[..., c:])
      gated = jnp.tanh(h_2C[..., :c]) * jax.nn.sigmoid(h_2C[..., c:])
      out = conv(c, (1, 1))(gated)
      h = out if layer == 0 else h + out
    h = conv(c, (1, 1))(jax.nn.relu(h))
    return conv(1, (1, 1), out_axis=None)(jax.nn.relu(h))[..., 0]
