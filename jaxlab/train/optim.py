"""optax optimizer from `config.optim`: AdamW (Loshchilov & Hutter 2019) with linear warmup, cosine decay
and global-norm clipping; weight decay on weight matrices only (`decay_mask`): not on norms, biases,
scales, offsets or embedding and position tables."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

# Weight decay is decided by a parameter's name, never by its rank (a qkv bias is [N, 3, H], GAU's
# per-dimension scale and offset are [4, E], position-bias tables are 2-D):
# + "kernel_<i>": weight matrices / conv kernels ("direct": MADE's input-to-output connections).
WEIGHT_NAMES = ("kernel", "w", "v", "weight", "direct")
# Lookup tables (token and position embeddings, T5's and Swin's relative-position bias tables): decayed
# only with decay_embeddings (Swin's and T5's code never decay their tables).
EMBEDDING_NAMES = ("embedding", "pos_embed", "rel_embedding", "relative_position_bias_table")


def is_weight_name(name: str) -> bool:
  return name in WEIGHT_NAMES or (name.startswith("kernel_") and name[len("kernel_"):].isdigit())


def decay_mask(params, *, decay_embeddings: bool = False):
  """True for the leaves that get weight decay: weight matrices and kernels (leaves named as in
  WEIGHT_NAMES), and the lookup tables of EMBEDDING_NAMES only if `decay_embeddings` (GPT-2/nanoGPT
  -style training decays them too). Everything else (biases of any rank, norm scales, GAU's scales and
  offsets, FLASH's relative bias, the loss's scalars) is never decayed."""
  def keep(path, leaf):
    name = leaf_name(path)
    return is_weight_name(name) or (decay_embeddings and name in EMBEDDING_NAMES)
  return jax.tree_util.tree_map_with_path(keep, params)


def _unboxed_keys(path) -> list[str]:
  """The keys of a pytree key path as strings; a leaf still boxed with its logical axis names (flax's
  LogicallyPartitioned, whose array sits at `.value`) ends at its box's key."""
  if len(path) > 1 and getattr(path[-1], "name", None) == "value":
    path = path[:-1]
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def leaf_name(path) -> str:
  """The name of a parameter leaf at `path` (its last key, seen through a logical-axis box)."""
  return _unboxed_keys(path)[-1]


def leaf_path(path) -> str:
  """The '/'-joined keys of a parameter leaf from the root of the tree, e.g. 'image/proj/kernel'."""
  return "/".join(_unboxed_keys(path))


def clip_above(tx: optax.GradientTransformation, bounds: dict[str, float]) -> optax.GradientTransformation:
  """`tx`, then every parameter leaf whose path from the root (`leaf_path`: 'log_scale' at the top level,
  'a/b/w' deeper) is a key of `bounds` kept at or below its bound after the update: the in-place clamp
  after each step that OpenCLIP applies to CLIP's logit scale, so no optimiser momentum carries the
  parameter past it. A leaf of the same name elsewhere in the tree is not touched. The state is `tx`'s
  own (checkpoints are unchanged). ValueError on the first update if a key names no leaf."""
  if not bounds:
    return tx

  def check_bounds_name_leaves(params):
    paths = {leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(bounds) - paths)
    if missing:
      raise ValueError(f"clip_above: bounds name no parameter: {missing} (paths are '/'-joined from the "
                       f"root, e.g. {sorted(paths)[:3]})")

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("clip_above needs the parameters in update()")
    check_bounds_name_leaves(params)
    updates, state = tx.update(updates, state, params)

    def project(path, u, p):
      bound = bounds.get(leaf_path(path))
      return u if bound is None else jnp.minimum(p + u, bound) - p
    return jax.tree_util.tree_map_with_path(project, updates, params), state

  return optax.GradientTransformation(tx.init, update)


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """0 -> lr linearly over warmup_steps, then cosine to min_lr at total_steps (constant after)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=max(total_steps, optim_cfg.warmup_steps + 1), end_value=optim_cfg.min_lr)


def make_optimizer(optim_cfg, total_steps: int, *,
                   clip_groups: Sequence[Callable[[Any], Any]] = (),
                   upper_bounds: dict[str, float] | None = None) -> optax.GradientTransformation:
  """The optimizer of `config.optim`. clip_groups: masks (params -> a bool per leaf) that partition the
  parameters; when given, each group is clipped by its own global norm. For parameters trained on
  separate losses (extra heads on a detached trunk), whose gradients must not scale each other.
  upper_bounds: leaf path ('/'-joined from the root) -> the largest value that parameter may take after
  a step (`clip_above`)."""
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.grad_clip > 0:
    clip = optax.clip_by_global_norm(optim_cfg.grad_clip)
    parts.extend([optax.masked(clip, mask) for mask in clip_groups] or [clip])
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay,
                           mask=lambda p: decay_mask(p, decay_embeddings=optim_cfg.decay_embeddings)))
  return clip_above(optax.chain(*parts), dict(upper_bounds or {}))
