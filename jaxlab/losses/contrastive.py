"""Contrastive losses as pure functions: InfoNCE, NT-Xent, CLIP and SigLIP, dense and across devices.

Embeddings are [B, D] with row i of the two inputs forming the positive pair; every other row of the
batch is a negative. Dense losses see the whole batch on one device. The `*_sharded` / `*_chunked`
forms take global arrays whose batch axis is split over mesh axes and run under `jax.shard_map`:
  clip_loss_all_gather   all-gathers the other modality, so each device scores its rows against the
                         whole global batch (the gather's backward is a reduce-scatter, so gradients
                         reach the device that owns each embedding);
  siglip_loss_chunked    the chunked sigmoid loss of Zhai et al. 2023 (sec. 3.3): images stay put,
                         text blocks travel around a ring with `ppermute`; no device ever holds more
                         than a [B/P, B/P] block of the similarity matrix.
Both equal their dense counterparts in value and gradient (tests/losses/test_contrastive.py).

Inputs that must be L2-normalised (CLIP, SigLIP, NT-Xent with cosine) are checked when they are concrete
arrays; under `jit` the check cannot look at values and is skipped.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

# CLIP (Radford et al. 2021, sec. 2.5): the temperature is initialised to 0.07 and "clipped to prevent
# scaling the logits by more than 100", i.e. log_scale <= log(100).
CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)
CLIP_MAX_LOG_SCALE = math.log(100.0)
# SigLIP (Zhai et al. 2023, sec. 3.2 and Algorithm 1): t = exp(t'), t' = log 10, b = -10.
SIGLIP_INIT_LOG_TEMPERATURE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
AxisNames = Union[str, Sequence[str]]


# ----------------------------------------------------------------------------- checks and helpers


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||_2, eps) along `axis`; a zero row gives zeros and a finite gradient (rsqrt of the
  clamped squared norm: sqrt's gradient at 0 would be inf, and inf * 0 = NaN)."""
  x = jnp.asarray(x)
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
  return (x * lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)


def _check_pair(a, b, name_a: str, name_b: str, same_dim: bool = True
                ) -> tuple[jax.Array, jax.Array]:
  """Both [B, D] float arrays with the same B (and D, with same_dim); ValueError naming the argument
  otherwise."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  for x, name in ((a, name_a), (b, name_b)):
    if x.ndim != 2:
      raise ValueError(f"{name} must be [batch, dim], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"{name_a} and {name_b} must have the same batch size (row i of each is a "
                     f"positive pair), got {a.shape[0]} and {b.shape[0]}")
  if same_dim and a.shape[1] != b.shape[1]:
    raise ValueError(f"{name_a} and {name_b} must have the same embedding dim, got {a.shape[1]} and "
                     f"{b.shape[1]}")
  if a.shape[0] < 1:
    raise ValueError(f"{name_a} must hold at least one example")
  return a, b


def _check_normalized(x: jax.Array, name: str) -> None:
  """Raises if a concrete x has a row whose L2 norm is neither 1 nor 0 (l2_normalize maps a zero row
  to zeros), or is not finite; no-op under tracing (nothing is checked under jit).
  The tolerance is 1e-3, or a 16-bit float x's machine epsilon if larger (rounding each entry of a
  normalised row to bfloat16 moves its norm by up to eps / 2 ~ 4e-3)."""
  if isinstance(x, jax.core.Tracer):
    return
  atol = max(1e-3, float(jnp.finfo(x.dtype).eps)) if x.dtype.itemsize <= 2 else 1e-3
  norms = np.linalg.norm(np.asarray(x, np.float64), axis=-1)
  if not np.isfinite(norms).all():
    raise ValueError(f"{name} has rows that are not finite (NaN or inf)")
  off = np.where(norms == 0.0, 0.0, np.abs(norms - 1.0))  # a zero row: l2_normalize's output too
  worst = float(np.max(off)) if norms.size else 0.0
  if worst > atol:
    raise ValueError(f"{name} must be L2-normalised along its last axis (row norms differ from 1 by "
                     f"up to {worst:.3g}); apply l2_normalize first")


def _check_text_ids(text_ids_B, batch: int) -> jax.Array | None:
  """None, or int [B] caption identities; ValueError naming text_ids_B otherwise."""
  if text_ids_B is None:
    return None
  text_ids_B = jnp.asarray(text_ids_B)
  if text_ids_B.shape != (batch,) or not jnp.issubdtype(text_ids_B.dtype, jnp.integer):
    raise ValueError(f"text_ids_B must be an int array of shape ({batch},) (one caption id per pair), "
                     f"got {text_ids_B.dtype}{list(text_ids_B.shape)}")
  return text_ids_B.astype(jnp.int32)


def _check_image_text(image_BD, text_BD, text_ids_B):
  """(image_BD, text_BD, text_ids_B) of the image-text losses, checked: a [B, D] pair, each row
  L2-normalised, and None or B int caption ids."""
  image_BD, text_BD = _check_pair(image_BD, text_BD, "image_BD", "text_BD")
  _check_normalized(image_BD, "image_BD")
  _check_normalized(text_BD, "text_BD")
  return image_BD, text_BD, _check_text_ids(text_ids_B, image_BD.shape[0])


def _not_negative(ids_row, ids_col, row_index, col_index):
  """True where pair (row, col) is no negative: another pair with the same caption id. [r, c] bool."""
  return (ids_row[:, None] == ids_col[None, :]) & (row_index[:, None] != col_index[None, :])


def _check_temperature(temperature) -> None:
  """temperature > 0 when it is concrete; a traced one (a learnable or scheduled temperature under jit)
  cannot be checked here."""
  if not isinstance(temperature, jax.core.Tracer) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_scalar(x, name: str) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got shape {tuple(x.shape)}")
  return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _clamp_max(x: jax.Array, hi: float) -> jax.Array:
  return jnp.minimum(x, hi)


def _clamp_max_fwd(x, hi):
  return jnp.minimum(x, hi), x


def _clamp_max_bwd(hi, x, g):
  # At or above the bound, keep only the part of the gradient that moves x back down (g > 0 under
  # gradient descent): the projected gradient of a parameter clipped in place after every step.
  return (jnp.where(x < hi, g, jnp.maximum(g, 0.0)),)


_clamp_max.defvjp(_clamp_max_fwd, _clamp_max_bwd)


def clip_logit_scale(log_scale: jax.Array, max_log_scale: float = CLIP_MAX_LOG_SCALE) -> jax.Array:
  """exp(min(log_scale, max_log_scale)): CLIP's multiplier of the cosine similarities (<= 100).

  At or past the clamp, the gradient with respect to log_scale keeps only its part that lowers
  log_scale: a parameter that sits at the bound can still come back down, and gradients that push it
  up are not accumulated. This alone does not keep the parameter at the bound (an optimiser's momentum
  can still carry it past): the trainer also clips it in place after each step, as OpenCLIP does
  (`ContrastiveTask.upper_bounds`, `train.optim.clip_above`).
  """
  return jnp.exp(_clamp_max(log_scale, float(max_log_scale)))


def _axes(axis_names: AxisNames) -> tuple[str, ...]:
  return (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)


def _num_shards(mesh: Mesh, axes: tuple[str, ...]) -> int:
  for a in axes:
    if a not in mesh.shape:
      raise ValueError(f"axis_names: mesh has no axis {a!r} (axes: {tuple(mesh.shape)})")
  return math.prod(mesh.shape[a] for a in axes)


def _check_divisible(batch: int, shards: int, name: str) -> None:
  if batch % shards:
    raise ValueError(f"{name}'s batch {batch} must be divisible by the {shards} devices of the "
                     "sharded axes")


# ----------------------------------------------------------------------------- InfoNCE / NT-Xent


def _score_fn(score: Union[str, ScoreFn]) -> ScoreFn:
  if callable(score):
    return score
  # In float32 whatever the inputs' dtype: a float16 dot product overflows past 65504, and bfloat16
  # rounds scores of a few hundred to steps of 2-4 before the temperature divides them.
  f32 = lambda x: x.astype(jnp.float32)
  if score == "dot":
    return lambda q, k: f32(q) @ f32(k).T
  if score == "cosine":
    return lambda q, k: l2_normalize(f32(q)) @ l2_normalize(f32(k)).T
  raise ValueError(f"score must be 'dot', 'cosine' or a callable (q_BD, k_BD) -> [B, B], got {score!r}")


def infonce_loss(queries_BD: jax.Array, keys_BD: jax.Array, *, temperature: float = 0.1,
                 score: Union[str, ScoreFn] = "cosine") -> jax.Array:
  """InfoNCE / CPC (van den Oord et al. 2018, eq. 4) with in-batch negatives; a float32 scalar.

  L = -1/B sum_i log( exp(f(q_i, k_i)/tau) / sum_j exp(f(q_i, k_j)/tau) ),
  f = `score`: "cosine", "dot" (both computed in float32), or any callable (q_BD, k_BD) -> scores
  [B, B] (e.g. CPC's bilinear q W k^T with W bound in; it gets the inputs in their own dtype). Row i
  of keys is the positive of query i; the other rows are negatives.
  """
  # A callable score may compare sides of different widths (CPC's bilinear q W k^T, W [Dq, Dk]).
  queries_BD, keys_BD = _check_pair(queries_BD, keys_BD, "queries_BD", "keys_BD",
                                    same_dim=not callable(score))
  _check_temperature(temperature)
  scores_BB = _score_fn(score)(queries_BD, keys_BD)
  b = queries_BD.shape[0]
  if scores_BB.shape != (b, b):
    raise ValueError(f"score must return [B, B] = {(b, b)}, got {tuple(scores_BB.shape)}")
  logits_BB = scores_BB.astype(jnp.float32) / temperature
  log_probs_BB = jax.nn.log_softmax(logits_BB, axis=-1)
  return -jnp.mean(jnp.diagonal(log_probs_BB))


def nt_xent_loss(z1_BD: jax.Array, z2_BD: jax.Array, *, temperature: float = 0.5) -> jax.Array:
  """NT-Xent of SimCLR (Chen et al. 2020, eq. 1) for two views of the same B examples; a scalar.

  The 2B views are L2-normalised; for each view the other view of its example is the positive and the
  remaining 2B - 2 views are negatives (itself excluded). The loss is the mean over all 2B views.
  """
  z1_BD, z2_BD = _check_pair(z1_BD, z2_BD, "z1_BD", "z2_BD")
  _check_temperature(temperature)
  b = z1_BD.shape[0]
  z_ND = l2_normalize(jnp.concatenate([z1_BD, z2_BD]).astype(jnp.float32))  # N = 2B
  logits_NN = (z_ND @ z_ND.T) / temperature
  logits_NN = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, logits_NN)
  positive_N = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])
  log_probs_NN = jax.nn.log_softmax(logits_NN, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs_NN, positive_N[:, None], axis=1))


# ----------------------------------------------------------------------------- CLIP


def clip_loss(image_BD: jax.Array, text_BD: jax.Array, log_scale: jax.Array, *,
              max_log_scale: float = CLIP_MAX_LOG_SCALE, text_ids_B: jax.Array | None = None
              ) -> jax.Array:
  """CLIP's symmetric InfoNCE (Radford et al. 2021, Figure 3) on one device; a float32 scalar.

  image_BD, text_BD: L2-normalised embeddings (row i of each is a pair). log_scale: learnable scalar
  log(1/temperature), clamped at max_log_scale (= log 100) by `clip_logit_scale`.
  logits = s * I T^T; L = (CE(logits, diag) over rows + CE(logits^T, diag) over rows) / 2, each a mean.
  text_ids_B: optional int caption id per pair; pairs i != j with the same id (the same caption twice
  in a batch) are left out of each other's softmax, as they are no negatives. Without it every
  off-diagonal pair is a negative, as in the paper.
  """
  image_BD, text_BD, text_ids_B = _check_image_text(image_BD, text_BD, text_ids_B)
  scale = clip_logit_scale(_check_scalar(log_scale, "log_scale"), max_log_scale)
  logits_BB = scale * (image_BD.astype(jnp.float32) @ text_BD.astype(jnp.float32).T)
  if text_ids_B is not None:
    rows = jnp.arange(image_BD.shape[0])
    logits_BB = jnp.where(_not_negative(text_ids_B, text_ids_B, rows, rows), -jnp.inf, logits_BB)
  image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits_BB, axis=1)))
  text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits_BB, axis=0)))
  return 0.5 * (image_to_text + text_to_image)


def _clip_local(image_bD, text_bD, log_scale, ids_b, *, axes, global_batch, max_log_scale):
  """Per-device body: local rows against the all-gathered other modality; returns the global loss."""
  b = image_bD.shape[0]
  scale = clip_logit_scale(log_scale, max_log_scale)
  all_image_BD = jax.lax.all_gather(image_bD, axes, tiled=True)
  all_text_BD = jax.lax.all_gather(text_bD, axes, tiled=True)
  offset = jax.lax.axis_index(axes) * b  # global row index of local row 0
  labels_b = offset + jnp.arange(b)
  logits_i2t_bB = scale * (image_bD @ all_text_BD.T)
  logits_t2i_bB = scale * (text_bD @ all_image_BD.T)
  if ids_b is not None:
    all_ids_B = jax.lax.all_gather(ids_b, axes, tiled=True)
    hidden_bB = _not_negative(ids_b, all_ids_B, labels_b, jnp.arange(global_batch))
    logits_i2t_bB = jnp.where(hidden_bB, -jnp.inf, logits_i2t_bB)
    logits_t2i_bB = jnp.where(hidden_bB, -jnp.inf, logits_t2i_bB)
  pick = lambda logits: jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels_b[:, None],
                                            axis=1)
  local_sum = -(jnp.sum(pick(logits_i2t_bB)) + jnp.sum(pick(logits_t2i_bB)))
  return jax.lax.psum(local_sum, axes) / (2 * global_batch)


def clip_loss_all_gather(image_BD: jax.Array, text_BD: jax.Array, log_scale: jax.Array, *,
                         mesh: Mesh, axis_names: AxisNames = ("data",),
                         max_log_scale: float = CLIP_MAX_LOG_SCALE,
                         text_ids_B: jax.Array | None = None) -> jax.Array:
  """`clip_loss` with the batch split over `axis_names` of `mesh`; negatives from the global batch.

  Each device holds B/P rows of each modality, all-gathers both modalities ([B, D] each, not [B, B])
  and computes its B/P rows of the image->text and text->image cross-entropies against all B
  candidates (the usual "local loss + gather with gradient" of open_clip). Under `shard_map` the
  gather's transpose is a reduce-scatter, so every embedding gets the gradient of the global loss.
  Peak per device: two [B/P, B] logit blocks. text_ids_B: as in `clip_loss` (all-gathered too).
  """
  image_BD, text_BD, text_ids_B = _check_image_text(image_BD, text_BD, text_ids_B)
  log_scale = _check_scalar(log_scale, "log_scale")
  axes = _axes(axis_names)
  _check_divisible(image_BD.shape[0], _num_shards(mesh, axes), "image_BD")
  body = lambda i, t, s, ids: _clip_local(i.astype(jnp.float32), t.astype(jnp.float32), s, ids,
                                          axes=axes, global_batch=image_BD.shape[0],
                                          max_log_scale=max_log_scale)
  return jax.shard_map(body, mesh=mesh, in_specs=(P(axes), P(axes), P(), P(axes)), out_specs=P())(
      image_BD, text_BD, log_scale, text_ids_B)


# ----------------------------------------------------------------------------- SigLIP


def siglip_loss(image_BD: jax.Array, text_BD: jax.Array, log_temperature: jax.Array,
                bias: jax.Array, *, text_ids_B: jax.Array | None = None) -> jax.Array:
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, eq. 1 / Algorithm 1) on one device; a scalar.

  logits_ij = exp(t') <x_i, y_j> + b, z_ij = +1 if i == j else -1;
  L = -1/B sum_i sum_j log sigmoid(z_ij logits_ij)   (normalised by the batch size, as in the paper).
  image_BD, text_BD: L2-normalised embeddings. log_temperature t' (init log 10), bias b (init -10).
  text_ids_B: optional int caption id per pair; pairs i != j with the same id are left out of the sum
  (no negatives; the normalisation stays 1/B).
  """
  image_BD, text_BD, text_ids_B = _check_image_text(image_BD, text_BD, text_ids_B)
  t = jnp.exp(_check_scalar(log_temperature, "log_temperature"))
  bias = _check_scalar(bias, "bias")
  return _siglip_block(image_BD.astype(jnp.float32), text_BD.astype(jnp.float32), t, bias,
                       text_ids_B, text_ids_B, own=True) / image_BD.shape[0]


def _siglip_block(image_bD, text_bD, t, bias, image_ids, text_ids, *, own: bool):
  """Sum over one block of -log sigmoid(z * logits). own=True: the block of matching rows (z = +1 on
  its diagonal, else -1); own=False: a block of other rows' texts, all negatives (z = -1, no [r, c]
  label array is made: that kept the chunked loss's peak memory at its pre-ids size). Pairs whose
  ids (if given) are equal, other than the diagonal of an own block, are left out."""
  logits_rc = t * (image_bD @ text_bD.T) + bias
  if own:
    diagonal_rc = jnp.eye(logits_rc.shape[0], logits_rc.shape[1], dtype=bool)
    terms_rc = -jax.nn.log_sigmoid(jnp.where(diagonal_rc, logits_rc, -logits_rc))
  else:
    terms_rc = -jax.nn.log_sigmoid(-logits_rc)
  if image_ids is not None:
    hidden_rc = image_ids[:, None] == text_ids[None, :]
    if own:
      hidden_rc = hidden_rc & ~diagonal_rc
    terms_rc = jnp.where(hidden_rc, 0.0, terms_rc)
  return jnp.sum(terms_rc)


def _siglip_ring(image_bD, text_bD, log_temperature, bias, ids_b, *, axes, num_shards,
                 global_batch):
  """Per-device body of the chunked loss: own block (with positives), then P - 1 ring steps, whose
  blocks hold other devices' rows only (all negatives)."""
  t = jnp.exp(log_temperature)
  total = _siglip_block(image_bD, text_bD, t, bias, ids_b, ids_b, own=True)
  # Device k sends its current text block (with its ids) to k + 1 (any fixed cyclic shift visits
  # every block once).
  perm = [(k, (k + 1) % num_shards) for k in range(num_shards)]
  # Recomputed in the backward pass, so only the [b, D] text blocks are saved, never P logit blocks.
  block = jax.checkpoint(lambda i, tx, tt, bb, ti: _siglip_block(i, tx, tt, bb, ids_b, ti, own=False))

  def step(carry, _):
    acc, text_block, text_ids = carry
    text_block, text_ids = jax.lax.ppermute((text_block, text_ids), axes, perm)
    return (acc + block(image_bD, text_block, t, bias, text_ids), text_block, text_ids), None

  if num_shards > 1:
    (total, *_), _ = jax.lax.scan(step, (total, text_bD, ids_b), None, length=num_shards - 1)
  return jax.lax.psum(total, axes) / global_batch


def siglip_loss_chunked(image_BD: jax.Array, text_BD: jax.Array, log_temperature: jax.Array,
                        bias: jax.Array, *, mesh: Mesh, axis_names: AxisNames = ("data",),
                        text_ids_B: jax.Array | None = None) -> jax.Array:
  """`siglip_loss` with the batch split over `axis_names` of `mesh`, never forming the [B, B] matrix.

  Zhai et al. 2023, sec. 3.3 ("efficient chunked implementation"): device k keeps its B/P images and
  computes the block against its own texts (the positives), then P - 1 times passes its current
  text block to its ring neighbour with `ppermute` and adds the negatives-only block against the
  block it received. Each device holds one [B/P, B/P] block at a time (the blocks are recomputed in
  the backward pass); the partial sums are psum-med and divided by the global B. text_ids_B: as in
  `siglip_loss` (the ids travel round the ring with their text block).
  """
  image_BD, text_BD, text_ids_B = _check_image_text(image_BD, text_BD, text_ids_B)
  log_temperature = _check_scalar(log_temperature, "log_temperature")
  bias = _check_scalar(bias, "bias")
  axes = _axes(axis_names)
  shards = _num_shards(mesh, axes)
  _check_divisible(image_BD.shape[0], shards, "image_BD")
  body = lambda i, tx, lt, bb, ids: _siglip_ring(i.astype(jnp.float32), tx.astype(jnp.float32), lt,
                                                 bb, ids, axes=axes, num_shards=shards,
                                                 global_batch=image_BD.shape[0])
  return jax.shard_map(body, mesh=mesh, in_specs=(P(axes), P(axes), P(), P(), P(axes)),
                       out_specs=P())(image_BD, text_BD, log_temperature, bias, text_ids_B)
