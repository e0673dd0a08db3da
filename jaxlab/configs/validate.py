"""Checks a config before anything is built or compiled; every failure is one line naming the key.

The checks shared by every task live here; each task adds its own (`validate` in
jaxlab/train/NAME_task.py, see jaxlab/train/tasks.py).
"""

from __future__ import annotations

import math

import jax

from jaxlab.configs import ConfigError, flatten

POSITIVE_INTS = ("data.batch_size", "train.steps", "train.log_every", "train.eval_every",
                 "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints")

MAX_CPU_DEVICES = 1024  # host devices per process (config.mesh.cpu_devices)


def get(config, key: str):
  """config["a"]["b"] for key "a.b"."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def train_microbatches(config) -> int:
  """config.train.microbatches, or 1 for a config written before it existed (an older workdir)."""
  return config.train.get("microbatches", 1)


def require(cond: bool, message: str) -> None:
  """Raises ConfigError(message) unless cond."""
  if not cond:
    raise ConfigError(message)


def require_choice(config, key: str, choices) -> None:
  value = get(config, key)
  require(value in choices, f"config.{key}={value!r} must be one of {', '.join(choices)}")


def require_defaults(config, defaults: dict, why: str) -> None:
  """Each key of `defaults` ("section.key") keeps its value there; else one line naming the key and
  `why` (e.g. "applies to MADE only")."""
  for key, default in defaults.items():
    value = get(config, key)
    require(value == default, f"config.{key}={value!r} {why}")


def require_unread_at_default(config, key: str, default, reader: str, chosen, hint: str = "") -> None:
  """An option that only `reader` (e.g. "config.model.attention='local'") reads keeps its `default`
  when `chosen` is selected instead: one line naming the key (a new run; see validate_new_run)."""
  value = get(config, key)
  same = tuple(value) == tuple(default) if isinstance(default, tuple) else value == default
  require(same, f"config.{key}={value!r} applies to {reader}, not {chosen!r} (it would be "
                f"ignored); set it to {default!r}{hint}")


def require_positive_ints(config, keys) -> None:
  for key in keys:
    value = get(config, key)
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"config.{key}={value!r} must be a positive int")


def _require_no_bools_for_ints(config, flat: dict) -> None:
  """A bool where the task's built-in config has an int (True passes for 1 in Python: an override
  like --config.optim.warmup_steps=True is a mistake). flat: the config, flattened."""
  from jaxlab.configs import base_config_for_task
  found = base_config_for_task(config.get("task"))
  if found is None:
    return
  defaults = flatten(found[1].to_dict())
  for key, value in flat.items():
    default = defaults.get(key)
    if isinstance(value, bool) and isinstance(default, int) and not isinstance(default, bool):
      raise ConfigError(f"config.{key}={value!r} must be an int, not a bool")


def validate(config, *, check_devices: bool = True, new_run: bool = False) -> None:
  """Every check of the config (ConfigError, one line, on the first failure). new_run: also the task's
  `validate_new_run` checks, for a config about to start a run (settings that a saved workdir may
  hold from an older jaxlab, and that its checkpoints depend on, are refused only there)."""
  try:
    _validate(config, check_devices)
    if new_run:
      from jaxlab.train import tasks
      check_new = getattr(tasks.task_module(config.task), "validate_new_run", None)
      if check_new is not None:
        check_new(config, require)
  except TypeError as e:  # a value of a type no check expected (e.g. a tuple of strings for ints)
    raise ConfigError(f"a config value has the wrong type for its key ({e}); compare the overrides "
                      "with the config's defaults") from None


def _validate(config, check_devices: bool) -> None:
  from jaxlab.train import tasks
  require("task" in config, "config.task is missing")
  require_choice(config, "task", tasks.available_tasks())
  require_positive_ints(config, POSITIVE_INTS)
  micro = train_microbatches(config)
  require(isinstance(micro, int) and not isinstance(micro, bool) and micro > 0,
          f"config.train.microbatches={micro!r} must be a positive int")
  tasks.task_module(config.task).validate(config, require)

  flat = flatten(config.to_dict())
  _require_no_bools_for_ints(config, flat)
  for key, value in flat.items():  # step counts and intervals: int32 step counters
    if key.endswith(("steps", "_every")):
      require(not isinstance(value, int) or value < 2**31,
              f"config.{key}={value!r} must be < 2**31 (steps are counted in int32)")
  for key, seed in flat.items():  # config.seed, train.eval_seed, sample.seed, ...
    if key.rsplit(".", 1)[-1] == "seed" or key.endswith("_seed"):
      require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32,
              f"config.{key}={seed!r} must be an int in [0, 2**32)")

  o = config.optim
  for key in ("lr", "min_lr", "b1", "b2", "eps", "weight_decay", "grad_clip"):
    if key in o:
      value = o[key]
      require(isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value), f"config.optim.{key}={value!r} must be a finite number")
  require(o.lr > 0, f"config.optim.lr={o.lr} must be > 0")
  require(0 <= o.min_lr <= o.lr, f"config.optim.min_lr={o.min_lr} must be in [0, optim.lr]")
  require(0 <= o.warmup_steps < config.train.steps,
          f"config.optim.warmup_steps={o.warmup_steps} must be < config.train.steps="
          f"{config.train.steps}")
  require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "config.optim.b1 and config.optim.b2 must be in [0, 1)")
  if "eps" in o:
    require(o.eps > 0, f"config.optim.eps={o.eps} must be > 0")
  require(o.weight_decay >= 0, f"config.optim.weight_decay={o.weight_decay} must be >= 0")
  require(o.grad_clip >= 0, f"config.optim.grad_clip={o.grad_clip} must be >= 0 (0 = off)")
  if "loss_scale" in o:
    from jaxlab.train import loss_scale
    require_choice(config, "optim.loss_scale", loss_scale.CHOICES)
  if "loss_scale_period" in o:
    require_positive_ints(config, ["optim.loss_scale_period"])
  if "loss_scale_init" in o:
    value = o.loss_scale_init
    require(isinstance(value, (int, float)) and not isinstance(value, bool)
            and 1 <= value < 2.0**127, f"config.optim.loss_scale_init={value!r} must be a number "
            "in [1, 2**127)")

  require(config.mesh.cpu_devices >= 0,
          f"config.mesh.cpu_devices={config.mesh.cpu_devices} must be >= 0 (0 = auto)")
  require(config.mesh.cpu_devices <= MAX_CPU_DEVICES,  # 100,000 crashed XLA (a segfault, no message)
          f"config.mesh.cpu_devices={config.mesh.cpu_devices} must be <= {MAX_CPU_DEVICES} (XLA "
          "devices per process on CPU; one per core is the useful number)")
  # With every mesh size fixed the batch split is known without the devices: say so here rather than
  # let the CPU device chooser pick fewer devices and validate_mesh blame the mesh.
  sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  for key, size in zip(("data", "fsdp", "tensor"), sizes):
    require(size == -1 or size >= 1, f"config.mesh.{key}={size} must be >= 1, or -1 (the rest)")
  require(list(sizes).count(-1) <= 1, f"config.mesh: at most one of data, fsdp, tensor may be -1 "
                                      f"(the rest), got {list(sizes)}")
  if isinstance(config.mesh.tensor, int) and config.mesh.tensor > 1:  # fixed: no devices needed
    _require_tensor_units(config, config.mesh.tensor)
  if all(isinstance(s, int) and s >= 1 for s in sizes):
    shards = config.mesh.data * config.mesh.fsdp
    require(config.data.batch_size % shards == 0,
            f"config.data.batch_size={config.data.batch_size} is not divisible by config.mesh.data"
            f"*config.mesh.fsdp = {config.mesh.data}*{config.mesh.fsdp} = {shards}")
  if check_devices:
    validate_mesh(config)


def _require_tensor_units(config, tensor: int) -> None:
  """The mesh's tensor size divides the task's tensor-parallel units (1 if it has none)."""
  from jaxlab.train import tasks
  units = tasks.task_module(config.task).tensor_units(config)
  if units is None:
    require(tensor == 1, f"config.mesh.tensor={tensor}: task {config.task!r} has no "
                         "tensor-parallel axis; use 1")
  else:
    require(units % tensor == 0, f"config.mesh.tensor={tensor} must divide the task's "
                                 f"{units} tensor-parallel units (LM: kv heads)")


def validate_mesh(config) -> None:
  """The checks that need the device count (this starts JAX's backend)."""
  from jaxlab.train import tasks
  from jaxlab.train.sharding import mesh_shape
  sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  if jax.process_count() > 1:  # first: every other check below reads the global count
    from jaxlab.train import distributed
    counts = distributed.local_device_counts()
    require(len(set(counts)) == 1,
            f"config.mesh.cpu_devices: the processes have different numbers of devices {counts}, "
            "so they cannot hold equal shares of the batch; give every process as many (on CPU, "
            "set config.mesh.cpu_devices)")
  try:
    data, fsdp, tensor = mesh_shape(sizes, jax.device_count())
  except ValueError as e:
    hint = ""
    if jax.default_backend() == "cpu":  # the device count is jaxlab's own choice there
      hint = (f" (CPU devices: config.mesh.cpu_devices={config.mesh.cpu_devices}"
              + (", i.e. one per core where the mesh and batch split evenly" if
                 not config.mesh.cpu_devices else "")
              + "; set config.mesh.cpu_devices to the count the mesh needs)")
    raise ConfigError(f"config.mesh: {e}{hint}") from None
  batch = config.data.batch_size
  require(batch % (data * fsdp) == 0,
          f"config.data.batch_size={batch} is not divisible by the mesh's data*fsdp = "
          f"{data * fsdp} devices")
  micro = train_microbatches(config)
  require(batch % (data * fsdp * micro) == 0,
          f"config.train.microbatches={micro} does not divide the {batch // (data * fsdp)} rows "
          f"each of the {data * fsdp} data*fsdp devices holds (config.data.batch_size={batch})")
  if jax.process_count() > 1:
    require(data * fsdp * tensor == jax.device_count(),
            f"config.mesh: data*fsdp*tensor = {data * fsdp * tensor} must use all "
            f"{jax.device_count()} devices of the {jax.process_count()} processes (use -1 for one axis)")
    require(jax.local_device_count() % tensor == 0,
            f"config.mesh.tensor={tensor} must divide each process's {jax.local_device_count()} "
            "devices (a tensor-parallel group stays inside one process, so that processes hold "
            "distinct rows of the batch)")
  module = tasks.task_module(config.task)
  # A task's own device-dependent checks (optional): validate_devices(config, require), run once the
  # backend is up (e.g. the LM's config.model.attention_impl='cudnn' needs a GPU).
  validate_devices = getattr(module, "validate_devices", None)
  if validate_devices is not None:
    validate_devices(config, require)
  _require_tensor_units(config, tensor)
