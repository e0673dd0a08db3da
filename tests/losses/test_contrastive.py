"""Contrastive losses against straightforward float64 NumPy, and the sharded forms against the dense ones
(value and gradient) on the 8 fake CPU devices."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlab.losses import contrastive as C


def _unit(rng, b, d):
  x = rng.normal(size=(b, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


# Caption ids of 16 pairs: 3 is shared by rows 0, 5 and 9, 7 by rows 2 and 15, the rest are distinct.
DUP_IDS = np.array([3, 1, 7, 4, 5, 3, 6, 8, 9, 3, 10, 11, 12, 13, 14, 7], np.int32)


def np_clip(img, txt, log_scale, ids=None):
  """ids: pairs i != j with ids[i] == ids[j] are dropped from each other's softmax (no negatives)."""
  s = math.exp(min(log_scale, math.log(100)))
  logits = s * img @ txt.T
  b = len(img)
  if ids is not None:
    for i in range(b):
      for j in range(b):
        if i != j and ids[i] == ids[j]:
          logits[i, j] = -np.inf
  i2t = -np.mean([_log_softmax(logits[i], 0)[i] for i in range(b)])
  t2i = -np.mean([_log_softmax(logits[:, j], 0)[j] for j in range(b)])
  return 0.5 * (i2t + t2i)


def np_siglip(img, txt, log_t, bias, ids=None):
  total = 0.0
  for i in range(len(img)):
    for j in range(len(txt)):
      if ids is not None and i != j and ids[i] == ids[j]:
        continue  # the same caption twice: no negative
      z = 1.0 if i == j else -1.0
      logit = math.exp(log_t) * float(img[i] @ txt[j]) + bias
      total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
  return total / len(img)


def np_infonce(q, k, tau, cosine=True):
  if cosine:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = q @ k.T / tau
  return -np.mean(np.diag(_log_softmax(logits, 1)))


def np_nt_xent(z1, z2, tau):
  z = np.concatenate([z1, z2])
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  n, b = len(z), len(z1)
  losses = []
  for i in range(n):
    pos = (i + b) % n
    others = [j for j in range(n) if j != i]
    sims = np.array([z[i] @ z[j] / tau for j in others])
    losses.append(-(z[i] @ z[pos] / tau - np.log(np.exp(sims).sum())))
  return np.mean(losses)


@pytest.fixture
def pair():
  rng = np.random.default_rng(0)
  return _unit(rng, 16, 8), _unit(rng, 16, 8)


def test_values_match_numpy(pair):
  img, txt = pair
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(C.clip_loss(f32(img), f32(txt), 2.5), np_clip(img, txt, 2.5), rtol=1e-5)
  np.testing.assert_allclose(C.siglip_loss(f32(img), f32(txt), 1.3, -2.0),
                             np_siglip(img, txt, 1.3, -2.0), rtol=1e-5)
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=(12, 6)), rng.normal(size=(12, 6))
  np.testing.assert_allclose(C.infonce_loss(f32(q), f32(k), temperature=0.2),
                             np_infonce(q, k, 0.2), rtol=1e-5)
  np.testing.assert_allclose(C.infonce_loss(f32(q), f32(k), temperature=0.7, score="dot"),
                             np_infonce(q, k, 0.7, cosine=False), rtol=1e-5)
  np.testing.assert_allclose(C.nt_xent_loss(f32(q), f32(k), temperature=0.5),
                             np_nt_xent(q, k, 0.5), rtol=1e-5)


def test_shared_captions_are_no_negatives(pair):
  """With text_ids_B, two pairs of one caption leave each other's softmax (CLIP) and sum (SigLIP),
  as in the NumPy references; distinct ids change nothing; and the loss no longer depends on how the
  duplicate pairs' image and text embeddings score against each other."""
  img, txt = pair
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  ids = jnp.asarray(DUP_IDS)
  np.testing.assert_allclose(C.clip_loss(f32(img), f32(txt), 2.5, text_ids_B=ids),
                             np_clip(img, txt, 2.5, DUP_IDS), rtol=1e-5)
  np.testing.assert_allclose(C.siglip_loss(f32(img), f32(txt), 1.3, -2.0, text_ids_B=ids),
                             np_siglip(img, txt, 1.3, -2.0, DUP_IDS), rtol=1e-5)
  assert not np.isclose(np_clip(img, txt, 2.5, DUP_IDS), np_clip(img, txt, 2.5), rtol=1e-3)
  distinct = jnp.arange(16, dtype=jnp.int32)
  np.testing.assert_allclose(C.clip_loss(f32(img), f32(txt), 2.5, text_ids_B=distinct),
                             C.clip_loss(f32(img), f32(txt), 2.5), rtol=1e-6)
  np.testing.assert_allclose(C.siglip_loss(f32(img), f32(txt), 1.3, -2.0, text_ids_B=distinct),
                             C.siglip_loss(f32(img), f32(txt), 1.3, -2.0), rtol=1e-6)
  # Image 0 has no term against texts 5 and 9 (its caption again): its gradient sums over the others.
  grad_img = jax.grad(lambda i: C.siglip_loss(i, f32(txt), 1.3, -2.0, text_ids_B=ids))(f32(img))
  t = np.exp(1.3)
  expected_row0 = sum((1.0 / (1.0 + np.exp(-(t * img[0] @ txt[j] - 2.0))) - (j == 0)) * t * txt[j]
                      for j in range(16) if j == 0 or DUP_IDS[j] != DUP_IDS[0]) / 16
  np.testing.assert_allclose(grad_img[0], expected_row0, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="text_ids_B must be an int array of shape \\(16,\\)"):
    C.clip_loss(f32(img), f32(txt), 2.5, text_ids_B=jnp.zeros(8, jnp.int32))


def test_gradients_match_numpy_finite_differences(pair):
  """Autodiff of the dense losses against central differences of the float64 NumPy versions."""
  img, txt = pair
  jax.config.update("jax_enable_x64", True)
  try:
    g_clip = jax.grad(C.clip_loss, argnums=(0, 2))(jnp.asarray(img), jnp.asarray(txt), 2.5)
    g_sig = jax.grad(C.siglip_loss, argnums=(1, 2, 3))(jnp.asarray(img), jnp.asarray(txt), 1.3, -2.0)
  finally:
    jax.config.update("jax_enable_x64", False)
  eps = 1e-6
  e = np.zeros_like(img); e[3, 5] = eps
  fd = (np_clip(img + e, txt, 2.5) - np_clip(img - e, txt, 2.5)) / (2 * eps)
  np.testing.assert_allclose(g_clip[0][3, 5], fd, rtol=1e-5)
  fd = (np_clip(img, txt, 2.5 + eps) - np_clip(img, txt, 2.5 - eps)) / (2 * eps)
  np.testing.assert_allclose(g_clip[1], fd, rtol=1e-5)
  fd = (np_siglip(img, txt + e, 1.3, -2.0) - np_siglip(img, txt - e, 1.3, -2.0)) / (2 * eps)
  np.testing.assert_allclose(g_sig[0][3, 5], fd, rtol=1e-5)
  fd = (np_siglip(img, txt, 1.3 + eps, -2.0) - np_siglip(img, txt, 1.3 - eps, -2.0)) / (2 * eps)
  np.testing.assert_allclose(g_sig[1], fd, rtol=1e-5)
  fd = (np_siglip(img, txt, 1.3, -2.0 + eps) - np_siglip(img, txt, 1.3, -2.0 - eps)) / (2 * eps)
  np.testing.assert_allclose(g_sig[2], fd, rtol=1e-5)


def test_infonce_custom_score_and_invariances(pair):
  q, k = (jnp.asarray(x, jnp.float32) for x in pair)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(8, 8)), jnp.float32)
  bilinear = C.infonce_loss(q, k, temperature=1.0, score=lambda a, b: a @ w @ b.T)
  np.testing.assert_allclose(bilinear, np_infonce(np.asarray(q @ w), np.asarray(k), 1.0, cosine=False),
                             rtol=1e-5)
  # A traced temperature (learned or scheduled, under jit) is taken as it is.
  for loss in (C.infonce_loss, C.nt_xent_loss):
    np.testing.assert_allclose(jax.jit(lambda t: loss(q, k, temperature=t))(0.3),
                               loss(q, k, temperature=0.3), rtol=1e-6)
  # CPC's bilinear score between sides of different widths (context 8, future 5).
  w85 = w[:, :5]
  wide = C.infonce_loss(q, k[:, :5], temperature=1.0, score=lambda a, b: a @ w85 @ b.T)
  np.testing.assert_allclose(wide, np_infonce(np.asarray(q @ w85), np.asarray(k[:, :5]), 1.0,
                                              cosine=False), rtol=1e-5)
  with pytest.raises(ValueError, match="same embedding dim"):
    C.infonce_loss(q, k[:, :5])
  # Permuting the pairs together changes nothing; permuting one side breaks the pairing.
  perm = np.random.default_rng(3).permutation(16)
  np.testing.assert_allclose(C.clip_loss(q[perm], k[perm], 2.0), C.clip_loss(q, k, 2.0), rtol=1e-6)
  np.testing.assert_allclose(C.siglip_loss(q[perm], k[perm], 2.0, -3.0), C.siglip_loss(q, k, 2.0, -3.0),
                             rtol=1e-6)
  assert C.clip_loss(q, k, 4.0) > C.clip_loss(k, k, 4.0)  # matched pairs score better than random


def test_clip_temperature_clamp(pair):
  img, txt = (jnp.asarray(x, jnp.float32) for x in pair)
  at_max = C.clip_loss(img, txt, math.log(100))
  np.testing.assert_allclose(C.clip_loss(img, txt, 9.0), at_max, rtol=1e-6)
  np.testing.assert_allclose(C.clip_logit_scale(jnp.float32(9.0)), 100.0, rtol=1e-6)
  grad_scale = jax.grad(C.clip_loss, argnums=2)
  # Matched pairs (txt = img) want a larger scale (negative gradient): past the clamp (here log 5, so
  # the softmax does not saturate) nothing pushes the parameter further up.
  low = math.log(5.0)
  grad_low = jax.grad(lambda a, b, s: C.clip_loss(a, b, s, max_log_scale=low), argnums=2)
  assert float(grad_low(img, img, low - 0.1)) < -1e-3  # below the bound: the plain gradient
  assert float(grad_low(img, img, 3.0)) == 0.0
  # Exactly at the bound too: clip_above leaves a clamped parameter there, so this is its usual state
  # (a gradient that let x == hi through passed the lines above).
  assert float(grad_low(img, img, jnp.float32(low))) == 0.0
  # These random pairs want a smaller scale (positive gradient): past the clamp that gradient still
  # flows, equal to the gradient at the bound, so the parameter can come back down.
  g_at_max = float(grad_scale(img, txt, math.log(100)))
  assert g_at_max > 0
  np.testing.assert_allclose(float(grad_scale(img, txt, 9.0)), g_at_max, rtol=1e-6)
  assert math.isclose(math.exp(C.CLIP_INIT_LOG_SCALE), 1 / 0.07)
  assert C.SIGLIP_INIT_LOG_TEMPERATURE == math.log(10) and C.SIGLIP_INIT_BIAS == -10.0


def _mesh(shape=(4, 2, 1)):
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


@pytest.mark.parametrize("axes,with_ids", [(("data",), False), (("data", "fsdp"), False),
                                           (("data", "fsdp"), True)])
def test_sharded_equal_dense_in_value_and_gradient(axes, with_ids):
  """With caption ids, duplicates sit on the same shard and on different shards (ring and gather)."""
  rng = np.random.default_rng(4)
  img, txt = (jnp.asarray(_unit(rng, 32, 8), jnp.float32) for _ in range(2))
  mesh = _mesh() if axes == ("data", "fsdp") else _mesh((8, 1, 1))
  ids = dict(text_ids_B=jnp.asarray(np.concatenate([DUP_IDS, DUP_IDS[::-1] + 2]))) if with_ids else {}
  clip_dense = lambda i, t, s: C.clip_loss(i, t, s, **ids)
  clip_sharded = jax.jit(lambda i, t, s: C.clip_loss_all_gather(i, t, s, mesh=mesh, axis_names=axes,
                                                                **ids))
  sig_dense = lambda i, t, lt, b: C.siglip_loss(i, t, lt, b, **ids)
  sig_sharded = jax.jit(lambda i, t, lt, b: C.siglip_loss_chunked(i, t, lt, b, mesh=mesh,
                                                                  axis_names=axes, **ids))
  for dense, sharded, scalars in ((clip_dense, clip_sharded, (2.3,)),
                                  (sig_dense, sig_sharded, (1.7, -4.0))):
    args = (img, txt) + tuple(jnp.float32(s) for s in scalars)
    np.testing.assert_allclose(sharded(*args), dense(*args), rtol=2e-6)
    argnums = tuple(range(len(args)))
    g_dense = jax.grad(dense, argnums=argnums)(*args)
    g_sharded = jax.jit(jax.grad(sharded, argnums=argnums))(*args)
    for gd, gs in zip(g_dense, g_sharded):
      np.testing.assert_allclose(gs, gd, rtol=1e-5, atol=1e-6)


def test_chunked_siglip_never_forms_the_global_matrix():
  """The compiled per-device program holds no [B, B] (or [B/P, B]) array; CLIP's holds [B/P, B]."""
  b, d, mesh = 64, 4, _mesh((8, 1, 1))
  img = jnp.asarray(_unit(np.random.default_rng(5), b, d), jnp.float32)
  sig = jax.jit(jax.grad(lambda i, t: C.siglip_loss_chunked(i, t, 1.0, -1.0, mesh=mesh)))
  clip = jax.jit(jax.grad(lambda i, t: C.clip_loss_all_gather(i, t, 1.0, mesh=mesh)))
  sig_hlo = sig.lower(img, img).compile().as_text()
  clip_hlo = clip.lower(img, img).compile().as_text()
  assert "f32[8,64]" in clip_hlo  # local rows against all 64 candidates
  assert "f32[8,64]" not in sig_hlo and "f32[64,64]" not in sig_hlo
  assert "f32[8,8]" in sig_hlo  # one block at a time


@pytest.mark.parametrize("with_ids,blocks", [(False, 4.0), (True, 5.0)])
def test_chunked_siglip_per_device_scratch_stays_near_a_few_blocks(with_ids, blocks):
  """Loss and all four gradients at B = 16,384 over 8 devices, compiled only: XLA's scratch per
  device stays under a few [B/P, B/P] float32 blocks (today 3.6 without caption ids, 4.5 with
  them, which the training task passes). Building a [r, c] label array in every ring block (as
  7372e24 did, with or without ids) took 5.5 and 6.5 blocks: 92 MiB against 62 MiB in
  experiments/contrastive.py's memory table."""
  b, d, mesh = 16_384, 128, _mesh((8, 1, 1))
  spec = lambda shape, pspec, dtype=jnp.float32: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, pspec))
  emb, scalar, ids = spec((b, d), P("data")), spec((), P()), spec((b,), P("data"), jnp.int32)
  loss = lambda i, t, lt, bb, n: C.siglip_loss_chunked(i, t, lt, bb, mesh=mesh,
                                                       text_ids_B=n if with_ids else None)
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(
      emb, emb, scalar, scalar, ids).compile()
  block_bytes = (b // 8) ** 2 * 4
  assert compiled.memory_analysis().temp_size_in_bytes < blocks * block_bytes


def test_bad_inputs_name_the_argument(pair):
  img, txt = (jnp.asarray(x, jnp.float32) for x in pair)
  with pytest.raises(ValueError, match="image_BD and text_BD must have the same batch size"):
    C.clip_loss(img, txt[:8], 1.0)
  with pytest.raises(ValueError, match="image_BD and text_BD must have the same batch size"):
    C.siglip_loss_chunked(img, txt[:8], 1.0, -1.0, mesh=_mesh((8, 1, 1)))
  with pytest.raises(ValueError, match="text_BD must be L2-normalised"):
    C.siglip_loss(img, 3 * txt, 1.0, -1.0)
  with pytest.raises(ValueError, match="image_BD must be L2-normalised"):
    C.clip_loss_all_gather(img * 2, txt, 1.0, mesh=_mesh((8, 1, 1)))
  with pytest.raises(ValueError, match="image_BD must be \\[batch, dim\\]"):
    C.clip_loss(img[0], txt, 1.0)
  with pytest.raises(ValueError, match="log_scale must be a scalar"):
    C.clip_loss(img, txt, jnp.ones(2))
  with pytest.raises(ValueError, match="image_BD's batch 12 must be divisible by the 8 devices"):
    C.siglip_loss_chunked(img[:12], txt[:12], 1.0, -1.0, mesh=_mesh((8, 1, 1)))
  with pytest.raises(ValueError, match="axis_names: mesh has no axis 'batch'"):
    C.clip_loss_all_gather(img, txt, 1.0, mesh=_mesh((8, 1, 1)), axis_names="batch")
  with pytest.raises(ValueError, match="image_BD has rows that are not finite"):
    C.clip_loss(img.at[2].set(jnp.nan), txt, 1.0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    C.infonce_loss(img, txt, temperature=0.0)
  with pytest.raises(ValueError, match="score must be"):
    C.infonce_loss(img, txt, score="euclid")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_embeddings_from_l2_normalize_are_accepted(dtype):
  """bfloat16 rounding moves a normalised row's norm by up to ~2e-3; the check allows for it and still
  refuses rows that are clearly not normalised."""
  rng = np.random.default_rng(7)
  x = C.l2_normalize(jnp.asarray(rng.normal(size=(256, 64)), dtype))
  C.clip_loss(x, x, 1.0)
  C.siglip_loss(x, x, 1.0, -1.0)
  with pytest.raises(ValueError, match="L2-normalised"):
    C.clip_loss((x * 1.05).astype(dtype), x, 1.0)


def test_l2_normalize_zero_row_has_zeros_and_a_finite_gradient():
  """A zero embedding row stays zero and does not turn every shared weight's gradient into NaN."""
  x = jnp.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
  y = C.l2_normalize(x)
  np.testing.assert_array_equal(y[0], 0.0)
  np.testing.assert_allclose(y[1], [0.6, 0.8, 0.0], rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(C.l2_normalize(x) * jnp.arange(6.0).reshape(2, 3)))(x)
  assert np.isfinite(np.asarray(g)).all()
  # The non-zero row's gradient is the projection's: (I - y y^T) c / ||x||.
  c, y1 = np.arange(3.0, 6.0), np.array([0.6, 0.8, 0.0])
  np.testing.assert_allclose(g[1], (c - y1 * (y1 @ c)) / 5.0, rtol=1e-5)


def test_a_zero_row_from_l2_normalize_is_accepted_eagerly_as_under_jit():
  """l2_normalize maps a zero row to zeros; the eager check refused that row ("apply l2_normalize
  first") while the jitted loss took it. Rows that are neither unit nor zero are still refused."""
  img = C.l2_normalize(jnp.array([[0.0, 0.0], [1.0, 0.0]]))
  txt = C.l2_normalize(jnp.array([[0.0, 1.0], [1.0, 1.0]]))
  np.testing.assert_allclose(C.clip_loss(img, txt, 1.0), jax.jit(C.clip_loss)(img, txt, 1.0),
                             rtol=1e-6)
  C.siglip_loss(img, txt, 1.0, -1.0)
  with pytest.raises(ValueError, match="L2-normalised"):
    C.clip_loss(img.at[0, 0].set(0.5), txt, 1.0)
  with pytest.raises(ValueError, match="L2-normalised"):  # small rows never normalised: refused
    C.clip_loss(img.at[0, 0].set(1e-4), txt, 1.0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_infonce_builtin_scores_are_float32_for_16_bit_inputs(dtype):
  """The dot product ran in the inputs' dtype: float16 rows with squared norm past 65504 gave
  inf scores and a NaN loss, bfloat16 rounded scores of a few hundred (1.3% off the loss)."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(16, 512)) * 12.0
  k = q + rng.normal(size=(16, 512))  # q_i . k_i ~ 512 * 144 = 73,728
  q16, k16 = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
  up = lambda x: x.astype(jnp.float32)
  for score, temperature in (("dot", 1e4), ("cosine", 0.1)):
    got = C.infonce_loss(q16, k16, temperature=temperature, score=score)
    want = C.infonce_loss(up(q16), up(k16), temperature=temperature, score=score)
    assert np.isfinite(float(got))
    np.testing.assert_allclose(got, want, rtol=1e-5)
