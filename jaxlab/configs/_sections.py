"""Config sections that every task's config has in the same form (optim, mesh); not a config itself.
Each base config calls these with its own values, so a key is defined, and commented, once."""

import ml_collections


def optim(*, lr: float, min_lr: float, warmup_steps: int, b2: float, weight_decay: float,
          grad_clip: float, b1: float = 0.9, eps: float = 1e-8,
          decay_embeddings: bool = False) -> ml_collections.ConfigDict:
  """AdamW with linear warmup and cosine decay from lr to min_lr (jaxlab/train/optim.py)."""
  c = ml_collections.ConfigDict()
  c.lr = lr
  c.min_lr = min_lr
  c.warmup_steps = warmup_steps
  c.b1 = b1
  c.b2 = b2
  c.eps = eps
  c.weight_decay = weight_decay  # on matrices only: never on norms or biases
  c.decay_embeddings = decay_embeddings  # also decay embedding tables (as GPT-2/nanoGPT do)
  c.grad_clip = grad_clip  # global-norm clipping; 0 = off
  # Dynamic loss scaling (jaxlab/train/loss_scale.py): auto = on when model.dtype is float16
  c.loss_scale = "auto"  # auto | dynamic | none
  c.loss_scale_init = 2.0**15
  c.loss_scale_period = 2000  # finite steps in a row before the scale doubles
  return c


def mesh() -> ml_collections.ConfigDict:
  """The device mesh (jaxlab/train/sharding.py): all devices data-parallel by default."""
  c = ml_collections.ConfigDict()
  c.data = -1  # -1 = all remaining devices
  c.fsdp = 1
  c.tensor = 1
  # CPU only, set by the `jaxlab` command before JAX starts: XLA host devices (one per core is
  # fastest for small models); 0 = as many as there are cores that the mesh and batch split over.
  c.cpu_devices = 0
  return c
