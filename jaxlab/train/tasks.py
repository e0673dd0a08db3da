"""Which task a config trains: `config.task = NAME` selects the module `jaxlab.train.NAME_task`.

A task module defines
  build(config) -> task object with init_params(rng), loss(params, batch, rng, *, train) -> (mean,
      (total, count)) (with config.train.microbatches > 1 the trainer accumulates total and count),
      train_iterator(), eval_iterator() (each process's rows, `sharding.config_process_rows`, of
      global batches of config.data.batch_size rows) and tokens_per_batch (see train/trainer.py);
  validate(config, require) -> None: the task's own config checks (no devices needed);
      `require(condition, message)` raises ConfigError with the one-line message;
  tensor_units(config) -> int | None: how many units the mesh's tensor axis must divide (LM: kv heads),
      or None when the task has no tensor-parallel axis;
  validate_devices(config, require) -> None (optional): checks that need JAX's backend (e.g. an
      attention implementation this backend lacks), run after the mesh checks;
  validate_new_run(config, require) -> None (optional): checks for a config about to start a run
      only (`load_config`), not for a saved workdir's, which may hold what an older jaxlab allowed.
The task object also defines data_fingerprint() -> str | None (a digest of the data it trains and
evaluates on, or None when it holds none, e.g. an LM built for sampling: kept in
WORKDIR/data_fingerprint.txt, and compared across the processes of a multi-process run) and may define `finish(params) -> str | None` (printed at the end of `jaxlab train`),
`sample_command(params, args) -> str` (what `jaxlab sample` prints) and `clip_groups()` -> masks of
parameter groups that gradient clipping treats separately, and `upper_bounds()` -> {parameter path:
largest value after a step} (see train/optim.py).
Every config of every task has the sections seed, data (with batch_size), optim, train and mesh.
"""

from __future__ import annotations

import importlib
import pathlib
from types import ModuleType

_HERE = pathlib.Path(__file__).parent


def available_tasks() -> tuple[str, ...]:
  return tuple(sorted(p.stem[:-len("_task")] for p in _HERE.glob("*_task.py")))


def task_module(name: str) -> ModuleType:
  if name not in available_tasks():
    raise ValueError(f"config.task={name!r} must be one of {', '.join(available_tasks())}")
  return importlib.import_module(f"jaxlab.train.{name}_task")


def build_task(config):
  return task_module(config.task).build(config)
