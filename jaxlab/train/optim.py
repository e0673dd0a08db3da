"""optax optimizer from `config.optim`: AdamW (Loshchilov & Hutter 2019) with linear warmup, cosine decay
and global-norm clipping; no weight decay on norms, biases or embeddings."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import optax

EMBEDDING_NAMES = ("embedding", "pos_embed")


def decay_mask(params, *, decay_embeddings: bool = False):
  """True for the leaves that get weight decay: matrices (ndim >= 2), so never norms or biases;
  embedding tables only if `decay_embeddings` (GPT-2/nanoGPT-style training decays them too)."""
  def keep(path, leaf):
    names = [getattr(p, "key", getattr(p, "name", str(p))) for p in path]
    is_embedding = any(n in EMBEDDING_NAMES for n in names)
    return leaf.ndim >= 2 and (decay_embeddings or not is_embedding)
  return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """0 -> lr linearly over warmup_steps, then cosine to min_lr at total_steps (constant after)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=max(total_steps, optim_cfg.warmup_steps + 1), end_value=optim_cfg.min_lr)


def make_optimizer(optim_cfg, total_steps: int, *,
                   clip_groups: Sequence[Callable[[Any], Any]] = ()) -> optax.GradientTransformation:
  """The optimizer of `config.optim`. clip_groups: masks (params -> a bool per leaf) that partition the
  parameters; when given, each group is clipped by its own global norm. For parameters trained on
  separate losses (extra heads on a detached trunk), whose gradients must not scale each other."""
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.grad_clip > 0:
    clip = optax.clip_by_global_norm(optim_cfg.grad_clip)
    parts.extend([optax.masked(clip, mask) for mask in clip_groups] or [clip])
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay,
                           mask=lambda p: decay_mask(p, decay_embeddings=optim_cfg.decay_embeddings)))
  return optax.chain(*parts)
