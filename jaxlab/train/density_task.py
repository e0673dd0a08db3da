"""Density estimation on binary vectors/images: FVSBN, NADE, MADE, PixelCNN for the generic trainer.

The loss is the negative log-likelihood in nats per example (mean over the batch); evaluation sums it
over a fixed split (validation during training, test in `finish`). MADE draws one of its K mask sets
per training step and evaluates with the log-mean-exp over all K (Germain et al. 2015, Sec. 4).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.configs import MAX_LAYERS, MAX_SAMPLE
from jaxlab.data import binary_images
from jaxlab.losses.likelihood import check_binary_values
from jaxlab.train import sharding

MODELS = ("fvsbn", "nade", "made", "pixelcnn", "gated_pixelcnn")
DTYPES = ("float32", "bfloat16", "float16")  # config.model.dtype: the models' compute dtype
IMAGE_MODELS = ("pixelcnn", "gated_pixelcnn")


def build_model(model_cfg, dim: int, image_shape):
  """The Linen module of `config.model` for D = dim inputs."""
  from jaxlab.models.fvsbn import FVSBN
  from jaxlab.models.made import MADE
  from jaxlab.models.nade import NADE
  from jaxlab.models.pixelcnn import GatedPixelCNN, PixelCNN
  m = model_cfg
  # None (float32, and a config saved before model.dtype): the parameters' own dtype
  dtype = None if m.get("dtype", "float32") == "float32" else jnp.dtype(m.dtype)
  if m.name == "fvsbn":
    return FVSBN(dim, dtype=dtype)
  if m.name == "nade":
    return NADE(dim, hidden=m.hidden[0], dtype=dtype)
  if m.name == "made":
    return MADE(dim, hidden=tuple(m.hidden), num_masks=m.num_masks,
                order_agnostic=m.order_agnostic, connectivity_agnostic=m.connectivity_agnostic,
                direct=m.direct, mask_seed=m.mask_seed, dtype=dtype)
  if image_shape is None:
    raise ValueError(f"config.model.name={m.name!r} needs image data")
  cls = PixelCNN if m.name == "pixelcnn" else GatedPixelCNN
  return cls(tuple(image_shape), channels=m.channels, num_layers=m.num_layers,
             first_kernel=m.first_kernel, dtype=dtype)


def validate(config, require) -> None:
  """The density task's config checks (see jaxlab/train/tasks.py)."""
  from jaxlab.configs.validate import require_choice, require_defaults, require_positive_ints
  require_choice(config, "data.name", binary_images.NAMES)
  require_choice(config, "model.name", MODELS)
  require_choice(config, "model.dtype", DTYPES)
  require_positive_ints(config, ("model.num_masks", "model.channels", "model.num_layers",
                                 "model.first_kernel", "sample.num"))
  m = config.model
  require(len(m.hidden) >= 1 and all(isinstance(h, int) and h > 0 for h in m.hidden),
          f"config.model.hidden={tuple(m.hidden)!r} must be one or more positive ints")
  # Upper bounds far beyond the papers' sizes (MADE: 8000 units, 32 masks; PixelCNN: 15 layers):
  # larger values failed as a NumPy MemoryError building MADE's masks, or hung in tracing.
  require(config.sample.num <= MAX_SAMPLE,
          f"config.sample.num={config.sample.num} must be <= {MAX_SAMPLE}")
  for key, value, limit in (("model.hidden", tuple(m.hidden), MAX_HIDDEN),
                            ("model.num_masks", m.num_masks, MAX_MASKS),
                            ("model.num_layers", m.num_layers, MAX_LAYERS)):
    require(max(value if isinstance(value, tuple) else (value,)) <= limit,
            f"config.{key}={value!r} must be <= {limit}"
            + (" per layer" if key == "model.hidden" else "") + " (far beyond the papers' sizes)")
  if m.name == "nade":
    require(len(m.hidden) == 1, f"config.model.hidden={tuple(m.hidden)!r}: NADE has one hidden "
                                "layer")
  if m.name in IMAGE_MODELS:
    require(config.data.name in binary_images.IMAGE_NAMES,
            f"config.data.name={config.data.name!r} is not image data, which "
            f"config.model.name={m.name!r} needs")
    require(m.first_kernel % 2 == 1, f"config.model.first_kernel={m.first_kernel} must be odd")
    require(m.first_kernel >= 3,
            f"config.model.first_kernel={m.first_kernel}: the first (mask A) layer needs >= 3 (a 1x1 "
            "one sees no earlier pixel; in the gated PixelCNN no pixel of the current row)")
  if m.name != "made":
    require(m.num_masks == 1, f"config.model.num_masks={m.num_masks} applies to MADE only")
    require_defaults(config, {"model.direct": False, "model.order_agnostic": True,
                              "model.connectivity_agnostic": True}, "applies to MADE only")
  else:
    require(m.num_masks == 1 or m.order_agnostic or m.connectivity_agnostic,
            f"config.model.num_masks={m.num_masks} with order_agnostic and connectivity_agnostic "
            "both False gives identical mask sets (K times the cost, no ensemble)")
  require(not config.data.static_binarization or config.data.name == "mnist",
          f"config.data.static_binarization=True applies to mnist only (config.data.name="
          f"{config.data.name!r} is binary already)")
  require(config.eval.batch_size > 0, f"config.eval.batch_size={config.eval.batch_size} must be > 0")


# The keys each model, and each dataset, reads (others keep base_config's values: validate_new_run).
MAX_HIDDEN, MAX_MASKS = 100_000, 4096
MODEL_KEYS = {"fvsbn": (), "nade": ("hidden",), "made": ("hidden", "mask_seed"),
              "pixelcnn": ("channels", "num_layers", "first_kernel"),
              "gated_pixelcnn": ("channels", "num_layers", "first_kernel")}
OPTIONAL_MODEL_KEYS = ("hidden", "mask_seed", "channels", "num_layers", "first_kernel")
DATA_KEYS = {"digits": ("split_seed",), "mnist": ("path", "data_dir", "binarize_seed"),
             "binarized_mnist": ("data_dir",), "caltech": ("path", "split_seed")}
OPTIONAL_DATA_KEYS = ("path", "data_dir", "binarize_seed", "split_seed")


def validate_new_run(config, require) -> None:
  """Checks for a config about to start a run (a saved workdir may hold what an older jaxlab
  allowed): options the chosen model or dataset does not read must keep their defaults (MADE's
  hidden sizes given to a PixelCNN, a data.path given to digits were ignored without a word), and
  sample.grid_path must name a .png file (it failed after training)."""
  from jaxlab.configs import available_configs
  from jaxlab.configs._density import base_config
  from jaxlab.configs.validate import require_unread_at_default
  m, d = config.model, config.data
  defaults = base_config(m.name if m.name in MODEL_KEYS else "made")
  for key in OPTIONAL_MODEL_KEYS:
    if key not in MODEL_KEYS.get(m.name, OPTIONAL_MODEL_KEYS):
      own_config = (f" (or train {m.name}'s own config: `jaxlab train {m.name}`)"
                    if m.name in available_configs() else "")
      readers = tuple(n for n, keys in MODEL_KEYS.items() if key in keys)
      require_unread_at_default(config, f"model.{key}", defaults.model[key],
                                f"config.model.name in {readers}", m.name, own_config)
  read = DATA_KEYS.get(d.name, ("path",) if d.name in binary_images.UCI_NAMES else OPTIONAL_DATA_KEYS)
  for key in OPTIONAL_DATA_KEYS:
    if key not in read:
      require(d[key] == defaults.data[key],
              f"config.data.{key}={d[key]!r} is not read for config.data.name={d.name!r} (it "
              f"would be ignored); set it to {defaults.data[key]!r}")
  grid = str(config.sample.grid_path)
  if grid:
    require(grid.lower().endswith(".png"),
            f"config.sample.grid_path={grid!r} must name a .png file (the grid of samples written "
            "at the end of training)")
    require(not pathlib.Path(grid).is_dir(),
            f"config.sample.grid_path={grid!r} is a folder; give a .png file name")
    existing = pathlib.Path(grid).absolute().parent
    while not existing.exists():
      existing = existing.parent
    # (Whether it is writable is left to the end: only process 0 writes, on its own file system.)
    require(existing.is_dir(),
            f"config.sample.grid_path={grid!r} cannot be written: {existing} is not a folder")
    require(config.data.name in binary_images.IMAGE_NAMES,
            f"config.sample.grid_path={grid!r} applies to the image datasets "
            f"{binary_images.IMAGE_NAMES}, not config.data.name={config.data.name!r} (no grid would "
            "be written)")


def tensor_units(config) -> None:
  return None  # data parallel only


def build(config) -> "DensityTask":
  return DensityTask(config)


class DensityTask:
  """Maximum likelihood on a binary dataset (config.data.name) with config.model.name."""

  def __init__(self, config, data: binary_images.BinaryDataset | None = None):
    self.config = config
    d = config.data
    self.data = data or binary_images.load(d.name, path=d.path, data_dir=d.data_dir,
                                           binarize_seed=d.binarize_seed, split_seed=d.split_seed,
                                           static=d.static_binarization)
    # Evaluation pads its last batch (binary_images.eval_batches), so only training needs a full one;
    # say so here, before anything is compiled, not when the trainer first asks for batches.
    if len(self.data.train) < d.batch_size:
      from jaxlab.configs import ConfigError
      raise ConfigError(f"config.data.batch_size={d.batch_size} is more than the "
                        f"{len(self.data.train)} training examples of config.data.name={d.name!r}")
    self.model = build_model(config.model, self.data.dim, self.data.image_shape)
    self.batch_size = d.batch_size

  @property
  def tokens_per_batch(self) -> int:
    return self.batch_size  # "tokens" = examples

  def data_fingerprint(self) -> str:
    from jaxlab.train.distributed import fingerprint
    return fingerprint(self.data.train, self.data.valid, self.data.test)

  def structure_fingerprint(self) -> str | None:
    """MADE: a digest of its mask sets (orders and degrees, drawn from config.model.mask_seed by
    NumPy), kept in the workdir so that a NumPy drawing other masks cannot resume it; else None."""
    m = self.config.model
    if m.name != "made":
      return None
    from jaxlab.models.made import made_degrees
    from jaxlab.train.distributed import fingerprint
    orders, inputs, hiddens = made_degrees(
        self.data.dim, tuple(m.hidden), m.num_masks, seed=m.mask_seed,
        order_agnostic=m.order_agnostic, connectivity_agnostic=m.connectivity_agnostic)
    # int64 throughout: the same masks give the same digest whatever NumPy's default integer is
    return fingerprint(*(np.asarray(a, np.int64) for a in (orders, inputs, *hiddens)))

  def train_iterator(self):
    return binary_images.TrainBatches(self.data.train, batch_size=self.batch_size,
                                      seed=self.config.seed, dynamic=self.data.dynamic,
                                      rows=sharding.config_process_rows(self.config.mesh,
                                                                        self.batch_size))

  def eval_iterator(self):
    return binary_images.eval_batches(self.data.valid, batch_size=self.batch_size,
                                      max_batches=self.config.train.eval_batches,
                                      rows=sharding.config_process_rows(self.config.mesh,
                                                                        self.batch_size))

  def init_params(self, rng: jax.Array):
    return self.model.init({"params": rng}, jnp.zeros((1, self.data.dim)))["params"]

  def log_prob(self, params, x_BD: jax.Array, *, mask_index=None) -> jax.Array:
    """log p(x) in nats per example (MADE: mask set `mask_index`, or None = all K averaged)."""
    args = () if self.config.model.name != "made" else (mask_index,)
    return self.model.apply({"params": params}, x_BD, *args, method=self.model.log_prob)

  def loss(self, params, batch: dict, rng: jax.Array, *, train: bool):
    """Mean NLL (nats per example); aux (summed NLL, number of examples). MADE trains on one of its
    K mask sets drawn from `rng`: one per step, or one per microbatch (the trainer folds the
    microbatch index into the key), so with train.microbatches > 1 a step averages the gradients of
    several mask sets: the same in expectation, not the same step."""
    mask_index = None
    if self.config.model.name == "made" and train:
      mask_index = jax.random.randint(rng, (), 0, self.config.model.num_masks)
    nll_B = -self.log_prob(params, batch["x"], mask_index=mask_index)
    w_B = batch["weights"]
    total, count = jnp.sum(nll_B * w_B), jnp.sum(w_B)
    return total / jnp.maximum(count, 1.0), (total, count)

  def nll(self, params, split: np.ndarray) -> float:
    """Mean NLL in nats over every example of a fixed split (the test-time evaluation), computed
    here on this host's copy of `params` (in a multi-process run `finish` runs on process 0 only)."""
    check_binary_values(split, "split")  # the model's own check does not see values under jit
    fn = jax.jit(lambda p, x: -self.log_prob(p, x))
    total, n = 0.0, 0
    # A batch larger than the split is cut to it (more rows would be zero-weight padding only).
    batch_size = min(self.config.eval.batch_size, len(split))
    for batch in binary_images.eval_batches(split, batch_size=batch_size):
      nll = np.asarray(fn(params, batch["x"]), np.float64)
      total += float(np.sum(nll * batch["weights"]))
      n += int(batch["weights"].sum())
    return total / n

  def samples(self, params, n: int, seed: int) -> np.ndarray:
    """n exact samples, float [n, D]."""
    fn = jax.jit(lambda p, key: self.model.apply({"params": p}, key, n, method=self.model.sample))
    return np.asarray(fn(params, jax.random.PRNGKey(seed)))

  def finish(self, params) -> str:
    """Test NLL (nats per example) and, if config.sample.grid_path, a PNG grid of samples."""
    lines = [f"jaxlab: test NLL {self.nll(params, self.data.test):.3f} nats per example "
             f"({self.data.note})"]
    s = self.config.sample
    if s.grid_path and self.data.image_shape:
      try:
        save_grid(self.samples(params, s.num, s.seed), self.data.image_shape, s.grid_path)
      except Exception as e:  # the test NLL was lost with it
        message = (f"{lines[0][len('jaxlab: '):]}; but the samples could not be drawn or written "
                   f"to config.sample.grid_path={s.grid_path!r}: "
                   f"{getattr(e, 'strerror', None) or e}")
        if isinstance(e, OSError):
          raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from None
        raise RuntimeError(message) from e
      lines.append(f"jaxlab: {s.num} samples written to {s.grid_path}")
    return "\n".join(lines)

  def sample_command(self, params, args) -> str:
    """`jaxlab sample WORKDIR [--seed S] [--num-tokens N]`: N samples (default config.sample.num)
    drawn exactly, printed as text (# = 1)."""
    n = self.config.sample.num if args.num_tokens is None else args.num_tokens
    seed = self.config.sample.seed if args.seed is None else args.seed
    x = self.samples(params, n, seed)
    if n and not np.isfinite(np.asarray(self.log_prob(params, jnp.asarray(x[:1])))).all():
      raise FloatingPointError("the parameters give a non-finite log-probability to their own "
                               "sample: they are unusable (a blown-up run's checkpoint?)")
    if self.data.image_shape is None:
      return "\n".join("".join("#" if v else "." for v in row) for row in x)
    h, w = self.data.image_shape
    return "\n\n".join("\n".join("".join("#" if v else "." for v in r) for r in img.reshape(h, w))
                       for img in x)


def save_grid(x_ND: np.ndarray, image_shape, path: str | pathlib.Path, *, columns: int = 0,
              scale: int = 2) -> None:
  """Samples [N, H*W] in {0, 1} as a PNG grid (white = 1), one pixel gap between images."""
  from PIL import Image
  h, w = image_shape
  n = len(x_ND)
  cols = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // cols)
  canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 128, np.uint8)
  for i, img in enumerate(x_ND.reshape(n, h, w)):
    r, c = divmod(i, cols)
    canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = \
        (img * 255).astype(np.uint8)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.kron(canvas, np.ones((scale, scale), np.uint8))).save(path)
