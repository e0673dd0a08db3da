"""Contrastive Predictive Coding's multi-step InfoNCE (van den Oord et al. 2018, sec. 2.2-2.3).

An encoder gives latents z_t of a sequence and a causal (autoregressive) model summarises them as
contexts c_t. For each prediction step k = 1..K the bilinear score f_k(z, c_t) = z^T W_k c_t (eq. 3,
the log of the density ratio) scores the true future latent z_{t+k} against negatives; InfoNCE (eq. 4)
is the cross-entropy of picking the true one. Negatives are drawn from the batch, as in the paper's
experiments: every other valid (row, position) latent of the batch.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def _check(z_BTD, c_BTC, w_KCD, lengths_B, predicts_B=None):
  z_BTD, c_BTC, w_KCD = jnp.asarray(z_BTD), jnp.asarray(c_BTC), jnp.asarray(w_KCD)
  for x, name, ndim, layout in ((z_BTD, "z_BTD", 3, "[batch, time, latent]"),
                                (c_BTC, "c_BTC", 3, "[batch, time, context]"),
                                (w_KCD, "w_KCD", 3, "[steps, context, latent]")):
    if x.ndim != ndim:
      raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
  (b, t, d), k = z_BTD.shape, w_KCD.shape[0]
  if c_BTC.shape[:2] != (b, t):
    raise ValueError(f"c_BTC must have z_BTD's batch and time {(b, t)}, got {c_BTC.shape[:2]}")
  if w_KCD.shape != (k, c_BTC.shape[2], d):
    raise ValueError(f"w_KCD must be [steps, context, latent] = [K, {c_BTC.shape[2]}, {d}], got "
                     f"shape {tuple(w_KCD.shape)}")
  if not 1 <= k < t:
    raise ValueError(f"w_KCD's K={k} prediction steps must be in [1, time - 1] = [1, {t - 1}]: "
                     "step K needs positions t with t + K inside the sequence")
  if predicts_B is not None:
    predicts_B = jnp.asarray(predicts_B)
    if predicts_B.shape != (b,) or predicts_B.dtype != jnp.bool_:
      raise ValueError(f"predicts_B must be bool [batch] = [{b}], got {predicts_B.dtype} "
                       f"{tuple(predicts_B.shape)}")
  if lengths_B is None:
    return z_BTD, c_BTC, w_KCD, jnp.full((b,), t, jnp.int32), predicts_B
  lengths_B = jnp.asarray(lengths_B)
  if lengths_B.shape != (b,) or not jnp.issubdtype(lengths_B.dtype, jnp.integer):
    raise ValueError(f"lengths_B must be int [batch] = [{b}], got {lengths_B.dtype} "
                     f"{tuple(lengths_B.shape)}")
  return z_BTD, c_BTC, w_KCD, lengths_B, predicts_B


def cpc_loss(z_BTD: jax.Array, c_BTC: jax.Array, w_KCD: jax.Array, *,
             lengths_B: Optional[jax.Array] = None,
             predicts_B: Optional[jax.Array] = None) -> jax.Array:
  """CPC's InfoNCE over K prediction steps; a float32 scalar.

  z_BTD: latents z_t = g_enc(x_t); c_BTC: contexts c_t = g_ar(z_<=t) (causal: c_t must not see
  z_{>t}, or predicting z_{t+k} is trivial); w_KCD: one bilinear map W_k per step k = 1..K.
  lengths_B: valid positions per row (default: all T); latents past a row's length are neither
  predicted nor negatives, and contexts there predict nothing.
  predicts_B: bool [batch] (default: all True); a row with False is only a source of negatives: its
  contexts predict nothing (so a batch that is not full can be filled up with real rows, keeping the
  number of negatives, and the loss's meaning, that of a full batch).

  For step k and valid (b, t) with t + k < lengths_B[b], the prediction p = W_k c_{b,t} scores every
  valid latent of the batch, s(b', t') = z_{b',t'}^T p; the positive is z_{b,t+k}. The loss of step
  k is the mean cross-entropy over its (b, t); the result is the mean over the K steps (the paper
  sums them: K times this). A step with no valid (b, t) (every row shorter than k + 1) counts 0.
  Scores are [K, B, T, B T] float32: memory grows with (B T)^2 K.
  """
  z_BTD, c_BTC, w_KCD, lengths_B, predicts_B = _check(z_BTD, c_BTC, w_KCD, lengths_B, predicts_B)
  (b, t, d), k = z_BTD.shape, w_KCD.shape[0]
  f32 = lambda x: x.astype(jnp.float32)
  pred_KBTD = jnp.einsum("btc,kcd->kbtd", f32(c_BTC), f32(w_KCD))
  scores_KBTN = jnp.einsum("kbtd,nd->kbtn", pred_KBTD, f32(z_BTD).reshape(b * t, d))
  position_T = jnp.arange(t)
  valid_BT = position_T[None, :] < lengths_B[:, None]
  scores_KBTN = jnp.where(valid_BT.reshape(-1), scores_KBTN, -jnp.inf)  # no padding as negative
  step_K = jnp.arange(1, k + 1)
  target_KBT = position_T[None, None, :] + step_K[:, None, None]  # t + k
  scored_KBT = target_KBT < lengths_B[None, :, None]
  if predicts_B is not None:
    scored_KBT &= predicts_B[None, :, None]
  flat_KBT = jnp.arange(b)[None, :, None] * t + jnp.minimum(target_KBT, t - 1)  # row-major index
  positive_KBT = jnp.take_along_axis(scores_KBTN, flat_KBT[..., None], axis=-1)[..., 0]
  # Unscored rows get a finite stand-in (0 - 0), so that -inf rows give no NaN gradient.
  safe_KBTN = jnp.where(scored_KBT[..., None], scores_KBTN, 0.0)
  nll_KBT = jax.nn.logsumexp(safe_KBTN, axis=-1) - jnp.where(scored_KBT, positive_KBT, 0.0)
  nll_KBT = jnp.where(scored_KBT, nll_KBT, 0.0)
  count_K = jnp.sum(scored_KBT, axis=(1, 2))
  per_step_K = jnp.sum(nll_KBT, axis=(1, 2)) / jnp.maximum(count_K, 1)
  return jnp.mean(per_step_K)
