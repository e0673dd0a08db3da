"""The Swin image encoder: which inputs each output token can see (windows, then shifted windows with the
region mask), equivariance of W-MSA to whole-window shifts, stage geometry and widths, and the dual
encoder with `image_encoder="swin"`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models.clip import DualEncoder, DualEncoderConfig
from jaxlab.models.swin import Swin, check_swin_geometry, stage_window


def _input(seed=0, size=8, batch=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 1)), jnp.float32)


def _sees(depth: int):
  """seen[r, c, i, j]: whether output token (r, c) of one stage (patch 1, window 4, 8x8 map) depends
  on input pixel (i, j) (its Jacobian is nonzero)."""
  model = Swin(patch=1, width=8, depth=depth, num_heads=2, window=4, num_stages=1)
  x = _input()
  params = model.init(jax.random.key(0), x)
  jac = jax.jit(jax.jacobian(lambda x: model.apply(params, x, pool=False)))(x)  # [1,8,8,C,1,8,8,1]
  return np.abs(np.asarray(jac)[0, :, :, :, 0, :, :, 0]).max(axis=2) > 0


def test_window_attention_sees_only_its_window():
  seen = _sees(depth=1)
  for r in range(8):
    for c in range(8):
      in_window = np.zeros((8, 8), bool)
      in_window[r // 4 * 4:r // 4 * 4 + 4, c // 4 * 4:c // 4 * 4 + 4] = True
      np.testing.assert_array_equal(seen[r, c], in_window, err_msg=f"token {(r, c)}")


def test_shifted_windows_connect_windows_but_not_across_the_cyclic_wrap():
  """After W-MSA then SW-MSA (shift 2): token (3, 3)'s shifted window spans rows/cols 2..5, which
  reach all four windows, so it sees the whole map; token (0, 0)'s shifted window wraps around to rows
  and columns 6, 7, which the region mask hides, so it still sees only its first window."""
  seen = _sees(depth=2)
  assert seen[3, 3].all()
  first_window = np.zeros((8, 8), bool)
  first_window[:4, :4] = True
  np.testing.assert_array_equal(seen[0, 0], first_window)
  assert not seen[7, 7, :4, :4].any() and seen[7, 7, 4:, 4:].all()


def test_window_attention_is_equivariant_to_whole_window_shifts():
  """One W-MSA block with only a relative position bias: rolling the map by a window moves the output
  with it. The shifted block's region mask breaks this (the wrap is special), which the check sees."""
  x = _input(1)
  rolled = lambda a: jnp.roll(a, 4, axis=2)
  for depth, equivariant in ((1, True), (2, False)):
    model = Swin(patch=1, width=8, depth=depth, num_heads=2, window=4, num_stages=1)
    params = model.init(jax.random.key(1), x)
    apply = jax.jit(lambda x: model.apply(params, x, pool=False))
    assert np.allclose(apply(rolled(x)), rolled(apply(x)), atol=1e-5) == equivariant


def test_stages_merge_patches_and_double_width_and_heads():
  model = Swin(patch=2, width=8, depth=2, num_heads=2, window=2, num_stages=3)
  x = _input(2, size=16, batch=3)
  params = nn.unbox(model.init(jax.random.key(2), x)["params"])
  assert model.apply({"params": params}, x).shape == (3, 32)
  assert model.apply({"params": params}, x, pool=False).shape == (3, 2, 2, 32)
  for stage, heads in ((0, 2), (1, 4), (2, 8)):
    kernel = params[f"stage_{stage}_block_1"]["attn"]["qkv"]["kernel"]
    assert kernel.shape == (8 * 2 ** stage, 3, heads, 4)  # head_dim stays 4
  assert "merge_0" not in params and params["merge_2"]["reduction"]["kernel"].shape == (64, 32)


def test_stage_window_and_geometry_checks():
  assert stage_window(8, 4) == (4, 2) and stage_window(4, 4) == (4, 0) and stage_window(2, 4) == (2, 0)
  assert check_swin_geometry(32, 2, 4, 3) is None  # maps 16, 8, 4
  assert "does not divide the 30-px" in check_swin_geometry(30, 4, 4, 1)
  assert "window=3 does not divide stage 0's 8x8" in check_swin_geometry(8, 1, 3, 1)
  assert "stage 2 would merge an odd 3x3" in check_swin_geometry(12, 2, 6, 3)
  with pytest.raises(ValueError, match="images_BHWC"):
    Swin(patch=1, width=8, depth=1, num_heads=2, window=3).init(jax.random.key(0), _input())


def test_dual_encoder_with_a_swin_tower():
  cfg = DualEncoderConfig(vocab_size=20, text_len=10, patch=1, image_width=8, image_layers=2,
                          image_heads=2, image_encoder="swin", image_window=4, image_stages=2,
                          text_width=16, text_layers=1, text_heads=2, embed_dim=8)
  assert cfg.image_features == 16
  model = DualEncoder(cfg)
  images, tokens = _input(3, batch=2), jnp.array([[5, 6, 1, 0], [7, 1, 0, 0]], jnp.int32)
  params = nn.unbox(model.init(jax.random.key(3), images, tokens)["params"])
  assert params["image_proj"]["kernel"].shape == (16, 8)
  assert "stage_1_block_1" in params["image_tower"]
  image_BE, text_BE = jax.jit(model.apply)({"params": params}, images, tokens)
  np.testing.assert_allclose(np.linalg.norm(image_BE, axis=-1), 1.0, rtol=1e-5)
  assert image_BE.shape == text_BE.shape == (2, 8)
  with pytest.raises(ValueError, match="image_encoder"):
    DualEncoderConfig(vocab_size=20, text_len=10, image_encoder="resnet")
