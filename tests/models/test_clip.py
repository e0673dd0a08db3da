"""ViT and dual encoder: patching and 2-D positions against explicit loops, invariances, pooling at the
end token, normalised outputs and the loss scalars' initial values."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models.clip import DualEncoder, DualEncoderConfig, TextEncoder, end_positions
from jaxlab.models.vit import ViT, patchify, sincos_2d


def test_patchify_matches_loops():
  x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  out = np.asarray(patchify(jnp.asarray(x), 4))
  assert out.shape == (2, 6, 48)
  for b in range(2):
    for r in range(2):
      for c in range(3):
        np.testing.assert_array_equal(out[b, r * 3 + c], x[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(-1))
  with pytest.raises(ValueError, match="images_BHWC"):
    patchify(jnp.zeros((1, 6, 8, 1)), 4)


def test_sincos_2d_formula():
  table = np.asarray(sincos_2d(3, 4, 8))[0]  # [12, 8]
  for t in range(12):
    row, col = divmod(t, 4)
    for half, p in ((0, row), (4, col)):
      for i in range(2):
        freq = 10000.0 ** (-2 * i / 4)
        np.testing.assert_allclose(table[t, half + 2 * i], math.sin(p * freq), atol=1e-6)
        np.testing.assert_allclose(table[t, half + 2 * i + 1], math.cos(p * freq), atol=1e-6)


def test_vit_without_positions_is_patch_permutation_invariant():
  """Mean pooling + no position encoding: reordering whole patches must not change the features;
  with sincos2d or rope2d positions it must (weights scaled up, so that attention is far from the
  uniform weighting of a fresh init, where rope2d's rotations barely show)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
  # Swap the top-left and bottom-right 4x4 patches.
  y = x.at[:, :4, :4].set(x[:, 4:, 4:]).at[:, 4:, 4:].set(x[:, :4, :4])
  for position, invariant in (("none", True), ("sincos2d", False), ("rope2d", False)):
    vit = ViT(patch=4, width=16, num_layers=1, num_heads=2, position=position)
    params = jax.tree.map(lambda p: 10 * p, nn.unbox(vit.init(jax.random.PRNGKey(0), x)))
    apply = jax.jit(vit.apply)
    fx, fy = apply(params, x), apply(params, y)
    assert fx.shape == (2, 16)
    assert np.allclose(fx, fy, atol=1e-4) == invariant, position


@pytest.mark.parametrize("position", ["sincos2d", "rope2d"])
def test_vit_positions_on_a_non_square_image(position):
  """An 8x12 image in 4-px patches is a 2x3 grid: block 0 gets patch_embed + sincos_2d(2, 3) and
  (rope2d) the (row, col) = divmod(t, 3) of each patch. Every other test image was square, where
  swapping the grid's height and width changes nothing."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 12, 1)), jnp.float32)
  vit = ViT(patch=4, width=16, num_layers=1, num_heads=2, position=position)
  params = nn.unbox(vit.init(jax.random.PRNGKey(0), x))
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.name in ("patch_embed", "block_0"):
      seen[context.module.name] = (args, out)
    return out

  with nn.intercept_methods(record):
    vit.apply(params, x)
  embedded = seen["patch_embed"][1]
  block_x, block_positions = seen["block_0"][0]
  want_positions = np.stack(np.divmod(np.arange(6), 3), axis=-1)[None]  # [1, 6, 2]
  if position == "sincos2d":
    np.testing.assert_allclose(block_x - embedded, sincos_2d(2, 3, 16), atol=1e-6)
  else:
    np.testing.assert_array_equal(block_x, embedded)
    np.testing.assert_array_equal(block_positions, want_positions)


def test_rope2d_attention_depends_only_on_patch_offsets():
  """Axial 2-D RoPE in the attention layer: moving every patch by the same (row, col) offset leaves the
  output unchanged (logits depend on offsets only), while moving one patch changes it; positions must
  be [B, T, 2] for it and [B, T] otherwise."""
  from jaxlab.layers import MultiHeadAttention
  layer = MultiHeadAttention(num_heads=2, num_kv_heads=2, head_dim=8, causal=False,
                             position="rope2d")
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 16)), jnp.float32)
  rows, cols = np.divmod(np.arange(6), 3)
  pos = jnp.asarray(np.stack([rows, cols], -1)[None])
  params = jax.tree.map(lambda p: 30 * p, nn.unbox(layer.init(jax.random.key(0), x, pos)))
  apply = jax.jit(layer.apply)
  base = apply(params, x, pos)
  np.testing.assert_allclose(apply(params, x, pos + jnp.array([3, 5])), base, atol=1e-5)
  assert not np.allclose(apply(params, x, pos.at[0, 0].set(jnp.array([1, 2]))), base, atol=1e-3)
  with pytest.raises(ValueError, match=r"\[B, T, 2\]"):
    layer.apply(params, x, pos[..., 0])


def _config(**kw):
  base = dict(vocab_size=20, text_len=10, patch=4, image_width=16, image_layers=1, image_heads=2,
              text_width=16, text_layers=1, text_heads=2, embed_dim=8)
  return DualEncoderConfig(**{**base, **kw})


@pytest.mark.parametrize("text_position", ["learned", "rope"])
def test_text_encoder_pools_at_the_end_token(text_position):
  cfg = _config(text_position=text_position)
  enc = TextEncoder(cfg, end_id=1)
  tokens = jnp.array([[5, 6, 7, 1, 0, 0, 0, 0], [5, 6, 7, 8, 9, 1, 0, 0]], jnp.int32)
  params = enc.init(jax.random.PRNGKey(0), tokens)
  apply = jax.jit(enc.apply)
  base = apply(params, tokens)
  after_end = tokens.at[0, 4].set(9).at[1, 6].set(3)  # the slot right after the end token changes
  np.testing.assert_allclose(apply(params, after_end), base, atol=1e-6)
  # Pooling one slot off passed the lines above (a causal state never sees later slots): moving the
  # pad token's embedding must change nothing, moving the end token's must change every row.
  def shifted_row(row):
    table = params["params"]["token_embed"]["embedding"]  # boxed with its logical axes
    moved = table.replace(value=table.value.at[row].add(1.0))
    return {**params, "params": {**params["params"], "token_embed": {"embedding": moved}}}
  np.testing.assert_allclose(apply(shifted_row(0), tokens), base, atol=1e-6)
  moved = np.abs(np.asarray(apply(shifted_row(1), tokens)) - np.asarray(base)).max(axis=-1)
  assert (moved > 1e-4).all(), moved
  before_end = tokens.at[0, 1].set(9)
  assert not np.allclose(apply(params, before_end)[0], base[0], atol=1e-4)
  np.testing.assert_allclose(apply(params, before_end)[1], base[1], atol=1e-6)  # rows independent
  np.testing.assert_array_equal(end_positions(tokens, 1), [3, 5])
  np.testing.assert_array_equal(end_positions(jnp.full((1, 4), 7), 1), [3])


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_dual_encoder_outputs_and_scalars(loss):
  model = DualEncoder(_config(loss=loss))
  images = jnp.asarray(np.random.default_rng(2).normal(size=(3, 8, 8, 1)), jnp.float32)
  tokens = jnp.array([[4, 5, 1, 0], [6, 1, 0, 0], [7, 8, 9, 1]], jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images, tokens)["params"]
  params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                  is_leaf=lambda x: hasattr(x, "value"))
  img, txt = jax.jit(model.apply)({"params": params}, images, tokens)
  assert img.shape == txt.shape == (3, 8)
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
  if loss == "clip":
    np.testing.assert_allclose(params["log_scale"], math.log(1 / 0.07), rtol=1e-6)
  else:
    np.testing.assert_allclose(params["log_temperature"], math.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(params["bias"], -10.0)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="loss must be one of"):
    _config(loss="triplet")
  with pytest.raises(ValueError, match="image_heads=3 must divide image_width=16"):
    _config(image_heads=3)
  enc = TextEncoder(_config())
  with pytest.raises(ValueError, match=r"tokens_BT has length 12; it must be in 1\.\.text_len=10"):
    enc.init(jax.random.PRNGKey(0), jnp.ones((1, 12), jnp.int32))
  with pytest.raises(ValueError, match=r"tokens_BT has length 0"):  # was an argmax error
    enc.init(jax.random.PRNGKey(0), jnp.ones((1, 0), jnp.int32))
  # An id >= vocab_size gave NaN features, a negative one another token's (the lookup wraps).
  params = enc.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
  for bad in (20, -1):
    with pytest.raises(ValueError, match=r"tokens_BT holds token ids outside \[0, 20\)"):
      enc.apply(params, jnp.array([[5, bad, 1, 0]], jnp.int32))


def test_vit_heads_must_divide_the_width():
  """width 20 with 3 heads built an 18-wide attention (head_dim = 20 // 3), silently."""
  from jaxlab.models.vit import ViT
  vit = ViT(width=20, num_heads=3, num_layers=1, patch=4)
  with pytest.raises(ValueError, match="num_heads=3 must divide the width 20"):
    vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
