"""Swin Transformer window attention (Liu et al. 2021, "Swin Transformer: Hierarchical Vision
Transformer using Shifted Windows", sec. 3.2, Fig. 4 and the relative position bias of sec. 3.2).

Feature maps are channels-last, [B, H, W, C]. Per-head vectors on a map are [B, H, W, N, Hd]; inside a
window they become the library's attention layout [B * nW, window * window, N, Hd] and go through
`jaxlab.attention.dot_product_attention`.

Shifted windows (W-MSA / SW-MSA): the map is cyclically shifted by (-shift, -shift) (`jnp.roll`), split
into non-overlapping windows, attended within each window, and rolled back. After the shift a window on
the bottom/right boundary holds tokens from up to four regions that were not adjacent in the original
map; the paper masks attention between them. Here each token gets the region label of the paper's
scheme (3 x 3 regions: rows [0, H-window), [H-window, H-shift), [H-shift, H), same for columns) and the
regions are passed to `dot_product_attention` as segment ids per window — an exact mask (no finite
"-100" bias as in the reference code). `shifted_window_mask` gives the same mask as a boolean array.

Shapes: H and W must be multiples of `window` (a ValueError naming the argument otherwise); nothing is
padded. 0 <= shift < window. Unlike the reference code, a map no larger than the window is not
special-cased (pass window=H, shift=0 yourself).
"""

from __future__ import annotations

from typing import Any, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.attention.softmax import dot_product_attention
from jaxlab.layers.dense import Dense

__all__ = ["window_partition", "window_reverse", "shifted_window_region_ids", "shifted_window_mask",
           "relative_position_index", "relative_position_bias", "window_attention", "SwinAttention",
           "PatchMerging"]


def _check_window_shift(window: int, shift: int = 0) -> None:
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"window must be a positive int, got {window!r}")
  if (isinstance(shift, bool) or not isinstance(shift, (int, np.integer))
      or not 0 <= shift < window):
    raise ValueError(f"shift must be an int with 0 <= shift < window ({window}), got {shift!r}")


def _check_spatial(name: str, height: int, width: int, window: int) -> None:
  if height % window or width % window:
    raise ValueError(f"{name}: height H={height} and width W={width} must be multiples of "
                     f"window={window} (pad the map first; swin does not pad)")


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """[B, H, W, *C] -> [B * nW, window * window, *C], windows in row-major order, batch outermost.

  C may be several trailing axes (e.g. heads, head_dim). nW = (H // window) * (W // window).
  """
  _check_window_shift(window)
  if x.ndim < 4:
    raise ValueError(f"x must be [B, H, W, C, ...], got shape {x.shape}")
  _check_spatial("x", x.shape[1], x.shape[2], window)
  return einops.rearrange(x, "b (nh wh) (nw ww) ... -> (b nh nw) (wh ww) ...", wh=window, ww=window)


def window_reverse(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: [B * nW, window * window, *C] -> [B, H, W, *C]."""
  _check_window_shift(window)
  _check_spatial("height/width", height, width, window)
  nh, nw = height // window, width // window
  if windows.ndim < 3 or windows.shape[1] != window * window or windows.shape[0] % (nh * nw):
    raise ValueError(f"windows must be [B * {nh * nw}, {window * window}, C, ...] for a "
                     f"{height}x{width} map and window={window}, got shape {windows.shape}")
  return einops.rearrange(windows, "(b nh nw) (wh ww) ... -> b (nh wh) (nw ww) ...", nh=nh, nw=nw,
                          wh=window)


def shifted_window_region_ids(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[nW, window * window] int32 region label of each token of each window of the *shifted* map.

  The paper's labelling: in the rolled map, rows split into [0, H - window), [H - window, H - shift),
  [H - shift, H), columns likewise; label = 3 * row_region + col_region. shift == 0: all zeros.
  """
  _check_window_shift(window, shift)
  _check_spatial("height/width", height, width, window)
  labels = np.zeros((height, width), np.int32)
  if shift:
    def region(n):
      r = np.zeros(n, np.int32)
      r[n - window:n - shift] = 1
      r[n - shift:] = 2
      return r
    labels = 3 * region(height)[:, None] + region(width)[None, :]
  # window_partition in NumPy (a static constant, also under jit).
  labels = labels.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
  return labels.reshape(-1, window * window)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[nW, window*window, window*window] bool, True where token i of a window may attend to token j.

  All True when shift == 0; otherwise True iff both tokens have the same region label
  (`shifted_window_region_ids`). A NumPy constant (it depends only on static ints).
  """
  ids = shifted_window_region_ids(height, width, window, shift)
  return ids[:, :, None] == ids[:, None, :]


def relative_position_index(window: int) -> np.ndarray:
  """[window*window, window*window] int32 index into a (2*window - 1)**2 bias table.

  Token i of a window sits at (y_i, x_i) = divmod(i, window); index[i, j] encodes
  (dy, dx) = (y_i - y_j, x_i - x_j) as (dy + window - 1) * (2*window - 1) + (dx + window - 1).
  """
  _check_window_shift(window)
  coords = np.stack(np.divmod(np.arange(window * window), window), axis=-1)  # [T, 2]
  rel = coords[:, None, :] - coords[None, :, :] + (window - 1)  # [T, T, 2] in [0, 2w-2]
  return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int32)


def relative_position_bias(rel_bias_table: jax.Array, window: int) -> jax.Array:
  """Table [(2w-1)**2, N] -> bias [N, w*w, w*w] (the paper's B in softmax(QK^T/sqrt(d) + B)V)."""
  size = (2 * window - 1) ** 2
  if rel_bias_table.ndim != 2 or rel_bias_table.shape[0] != size:
    raise ValueError(f"rel_bias_table must be [(2*window-1)**2, heads] = [{size}, N], got shape "
                     f"{rel_bias_table.shape}")
  index = relative_position_index(window)
  return jnp.transpose(rel_bias_table[index], (2, 0, 1))


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int, shift: int = 0,
                     rel_bias_table: Optional[jax.Array] = None, scale: Optional[float] = None,
                     implementation: Optional[str] = None) -> jax.Array:
  """(Shifted) window attention over a map of per-head vectors.

  Args:
    q: [B, H, W, N, Hd]; k, v: [B, H, W, K, Hd] (N % K == 0, as in `dot_product_attention`).
    window: window side; H and W must be multiples of it.
    shift: cyclic shift (0 <= shift < window); > 0 rolls by -shift, masks across region boundaries
      and rolls back (SW-MSA); 0 is plain W-MSA.
    rel_bias_table: [(2*window-1)**2, N] learned relative position bias, or None.
    scale: logit scale, default 1/sqrt(Hd).
    implementation: passed to `dot_product_attention`.

  Returns:
    [B, H, W, N, Hd] in q's dtype.
  """
  _check_window_shift(window, shift)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 5:
      raise ValueError(f"{name} must be [batch, height, width, heads, head_dim], got shape {x.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  if k.shape[:3] != q.shape[:3]:
    raise ValueError(f"k [B, H, W] = {k.shape[:3]} does not match q [B, H, W] = {q.shape[:3]}")
  b, h, w, n, _ = q.shape
  _check_spatial("q", h, w, window)
  bias = None
  if rel_bias_table is not None:
    if rel_bias_table.ndim != 2 or rel_bias_table.shape[1] != n:
      raise ValueError(f"rel_bias_table must be [(2*window-1)**2, heads={n}], got shape "
                       f"{rel_bias_table.shape}")
    bias = relative_position_bias(rel_bias_table, window)[None]  # [1, N, T, T]

  if shift:
    q, k, v = (jnp.roll(x, (-shift, -shift), axis=(1, 2)) for x in (q, k, v))
  qw, kw, vw = (window_partition(x, window) for x in (q, k, v))  # [B * nW, T, N, Hd]
  seg = None
  if shift:
    ids = shifted_window_region_ids(h, w, window, shift)  # [nW, T]
    seg = jnp.asarray(np.tile(ids, (b, 1)))  # windows are batch-major
  out = dot_product_attention(qw, kw, vw, q_segment_ids=seg, kv_segment_ids=seg, bias=bias,
                              scale=scale, implementation=implementation)
  out = window_reverse(out, window, h, w)
  if shift:
    out = jnp.roll(out, (shift, shift), axis=(1, 2))
  return out


class SwinAttention(nn.Module):
  """(S)W-MSA block body x [B, H, W, C] -> [B, H, W, C]: qkv projection, window attention with a
  learned relative position bias, output projection (no norm / residual / MLP / dropout).

  Attributes:
    num_heads: N; head_dim defaults to C // N (C must then be divisible by N).
    window, shift: as in `window_attention`.
    use_bias: biases in the qkv and output projections (the paper's code: qkv_bias=True).
    init_std: std of the projection kernels and (truncated normal, +-2 std) of the bias table.
  """

  num_heads: int
  window: int
  shift: int = 0
  head_dim: Optional[int] = None
  use_bias: bool = True
  init_std: float = 0.02
  implementation: Optional[str] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"x must be [batch, height, width, channels], got shape {x.shape}")
    c = x.shape[-1]
    head_dim = self.head_dim
    if head_dim is None:
      if c % self.num_heads:
        raise ValueError(f"channels ({c}) must be divisible by num_heads ({self.num_heads}) "
                         "when head_dim is not given")
      head_dim = c // self.num_heads
    _check_window_shift(self.window, self.shift)
    _check_spatial("x", x.shape[1], x.shape[2], self.window)
    qkv = Dense((3, self.num_heads, head_dim), ("embed", None, "heads", "kv"),
                use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype,
                param_dtype=self.param_dtype, name="qkv")(x)  # [B, H, W, 3, N, Hd]
    table = self.param(
        "relative_position_bias_table",
        nn.with_logical_partitioning(nn.initializers.truncated_normal(self.init_std),
                                     (None, "heads")),
        ((2 * self.window - 1) ** 2, self.num_heads), self.param_dtype)
    out = window_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
                           window=self.window, shift=self.shift,
                           rel_bias_table=table,  # added to float32 logits: kept in param_dtype
                           implementation=self.implementation)
    return Dense((c,), ("heads", "kv", "embed"), in_dims=2, use_bias=self.use_bias,
                 init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="out")(out)


def patch_merge_concat(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H/2, W/2, 4C], channel blocks in the paper code's order
  (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2])."""
  if x.ndim != 4:
    raise ValueError(f"x must be [batch, height, width, channels], got shape {x.shape}")
  if x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f"x: height ({x.shape[1]}) and width ({x.shape[2]}) must be even for "
                     "patch merging")
  return jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                         axis=-1)


class PatchMerging(nn.Module):
  """Downsampling between Swin stages: [B, H, W, C] -> [B, H/2, W/2, 2C] by concatenating 2x2
  neighbours (4C), LayerNorm (eps 1e-5), and a linear 4C -> 2C without bias (as the paper's code)."""

  init_std: float = 0.02
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = patch_merge_concat(x)
    y = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                     name="norm")(y)
    return Dense((2 * x.shape[-1],), ("embed", None), init_std=self.init_std, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="reduction")(y)
