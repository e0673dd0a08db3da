"""The training loop: sharded initialisation, a jitted train step with donated state, periodic evaluation,
metrics, and orbax checkpoints that resume to the same numbers.

Data flow: config -> task (data + model) -> batches placed with the mesh's data sharding -> train_step
(jit, shardings from logical axis rules) -> metrics -> checkpoint (params, optimizer state, step, RNG,
data iterator state).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxlab.configs import (ConfigError, absolute_data_path, flatten, read_config_json,
                            with_task_defaults)
from jaxlab.configs.validate import train_microbatches
from jaxlab.data import pipeline
from jaxlab.digests import json_sha256
from jaxlab.train import checkpoint as checkpoint_lib
from jaxlab.train import distributed, loss_scale, optim, sharding, tasks
from jaxlab.train.metrics import MetricsWriter, read_metrics, write_atomically

# TrainState is a plain dict pytree: {"step", "params", "opt_state", "rng"}, and "loss_scale" when the
# loss is scaled (float16; see loss_scale.py).
TrainState = dict


@dataclasses.dataclass
class Run:
  """Everything a train/eval/sample command needs, built once from a config and a workdir."""

  config: Any
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  task: Any
  tx: optax.GradientTransformation
  state_shardings: Any
  abstract_state: Any
  checkpointer: checkpoint_lib.Checkpointer
  data_digest: Optional[str] = None  # the task's data_fingerprint() (None: it holds no data)
  # config_fingerprint of the config the checkpoints were saved under (recorded in them, or for older
  # checkpoints the workdir's config.json as found): records saved under it stay valid once
  # check_resume_config has accepted this config
  saved_fingerprint: Optional[str] = None
  # (step, config as JSON) of each checkpoint that records its run's config (CONFIG_KEY), newest first
  recorded_configs: tuple = ()
  reading: bool = False  # eval / sample: READING_MAY_CHANGE keys may differ from the checkpoints'

  def rules(self):
    return nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES)

  def place_batch(self, batch: dict) -> dict:
    """This process's rows of a global batch of config.data.batch_size rows, on the mesh."""
    return sharding.place_batch(batch, self.mesh, self.config.data.batch_size)


def init_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(the key of a run's initial parameters, the key its dropout keys derive from)."""
  params_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
  return params_rng, dropout_rng


def _init_state_fn(task, tx, config) -> Callable[[], TrainState]:
  def init() -> TrainState:
    params_rng, dropout_rng = init_keys(config.seed)
    params = task.init_params(params_rng)  # boxed with logical axis names
    state = {"step": jnp.array(0, jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": dropout_rng}
    if loss_scale.enabled(config):
      state["loss_scale"] = loss_scale.init_state(config)
    return state
  return init


def _same_run_everywhere(config, workdir: pathlib.Path) -> None:
  """In a multi-process run, every process was given the same config and workdir (a collective)."""
  distributed.require_same_everywhere(config.to_json_best_effort() + str(workdir.absolute()),
                                      "configs or workdirs")


def _same_data_everywhere(task) -> Optional[str]:
  """The task's data digest (None: a task without data, or one that defines no data_fingerprint);
  in a multi-process run, the same in every process (a collective): each process read its own files."""
  digest = getattr(task, "data_fingerprint", lambda: None)()
  if jax.process_count() > 1:
    distributed.require_same_everywhere(
        str(digest), "data (the same config read other files or other dataset builds)",
        "every process must read the same data: put config.data.path (or the dataset files) and "
        "config.data.data_dir on a filesystem they share, or give each an identical copy")
  return digest


_UNSET = object()


def setup(config, workdir: str | pathlib.Path, *, task=None, check_data: bool = True,
          data_digest=_UNSET, same_run_checked: bool = False, reading: bool = False) -> Run:
  """Mesh, task, optimizer and the sharded abstract state (eval_shape -> shardings). Refuses (ValueError,
  nothing changed) a workdir whose checkpoints belong to another model/data/optimizer config, or (with
  `check_data`) were trained on other data. data_digest: the task's, when the caller has it;
  same_run_checked: the caller (`train`) has checked that every process runs the same config and
  workdir. reading: for `jaxlab eval` / `sample`, which may change what only the training stream
  depends on (READING_MAY_CHANGE)."""
  workdir = pathlib.Path(workdir)
  if not same_run_checked:
    _same_run_everywhere(config, workdir)
  mesh = sharding.config_mesh(config.mesh)
  if task is None:
    task = _build_task(config)
  if data_digest is _UNSET:
    data_digest = _same_data_everywhere(task)
  tx = optim.make_optimizer(config.optim, config.train.steps,
                           clip_groups=getattr(task, "clip_groups", lambda: ())(),
                           upper_bounds=getattr(task, "upper_bounds", lambda: {})())
  init = _init_state_fn(task, tx, config)
  with mesh, nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    boxed = jax.eval_shape(init)
    state_shardings = sharding.logical_shardings(boxed, mesh)
  sharding.check_divisible(nn.meta.unbox(boxed), state_shardings)
  sharding.check_fits(nn.meta.unbox(boxed), state_shardings)
  abstract_state = checkpoint_lib.abstract_with_shardings(nn.meta.unbox(boxed), state_shardings)
  if not reading:  # only now: a run that fails to build leaves no dir
    workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints,
                                             create=not reading)  # eval / sample change nothing
  recorded = _recorded_configs(checkpointer)
  saved_fingerprint = _fingerprint_of(recorded[0][1]) if recorded else _saved_fingerprint(workdir)
  run = Run(config, workdir, mesh, task, tx, state_shardings, abstract_state, checkpointer,
            data_digest, saved_fingerprint, recorded, reading)
  try:
    distributed.require_same_everywhere(  # each process read the checkpoints' data items itself
        json.dumps(recorded, sort_keys=True), "views of the checkpoints' recorded configs",
        "a process could not read a checkpoint's data item; check that every process sees the "
        "same workdir")
    check_resume_config(run)
    check_same_vocabulary(run)  # names an edited text more precisely than the data's digest
    if check_data:  # before the structure: other data (another width) explains other MADE masks
      check_same_data(run)
    check_same_model_structure(run)
  except ValueError:
    checkpointer.close()
    raise
  distributed.barrier("jaxlab_setup")  # every process has read config.json before process 0 rewrites it
  return run


def check_same_vocabulary(run: Run) -> None:
  """Refuses a workdir whose vocab.json differs from the task's vocabulary (the training text was
  edited since: its checkpoints would be read with other token ids)."""
  saved_path = run.workdir / "vocab.json"
  vocab = getattr(run.task, "vocab", None)
  if vocab is None or not saved_path.exists() or not run.checkpointer.all_steps():
    return
  from jaxlab.data.vocab import read_vocab_file
  saved = read_vocab_file(saved_path, "delete it: `jaxlab train` writes it again from the data")
  if saved != vocab:
    raise ValueError(f"the data's vocabulary differs from the one {run.workdir} was trained with "
                     f"({saved_path.name}): the text of config.data.path changed since; nothing "
                     "was changed (restore the text, or train into a new --workdir)")


DATA_FINGERPRINT = "data_fingerprint.txt"


def _differing_saved_digest(run: Run, filename: str, digest: Optional[str]) -> Optional[str]:
  """The digest kept in WORKDIR/filename when it differs from `digest`; None when they agree or
  there is nothing to compare (no digest, none kept, or no checkpoint yet)."""
  saved_path = run.workdir / filename
  if digest is None or not saved_path.exists() or not run.checkpointer.all_steps():
    return None
  saved = saved_path.read_text().strip()
  return saved if saved != digest else None


def check_same_data(run: Run) -> None:
  """Refuses a workdir whose checkpoints were trained on other data than the task now reads (the text
  or dataset files were edited in place: a resume would not see the batches it would have seen, and
  an evaluation would score other data). A task without data (sampling) or a workdir from before the
  digest was kept: nothing to compare."""
  digest = run.data_digest
  saved = _differing_saved_digest(run, DATA_FINGERPRINT, digest)
  if saved is not None:
    raise ValueError(f"the data differs from the data {run.workdir} was trained on (digest "
                     f"{digest[:12]}, saved {saved[:12]} in {DATA_FINGERPRINT}): the files of "
                     "config.data.path (or the dataset) changed since; the workdir was not changed "
                     "(restore them, or train into a new --workdir)")


MODEL_FINGERPRINT = "model_fingerprint.txt"


def _structure_digest(task) -> Optional[str]:
  """The task's digest of what its model builds outside the parameters (MADE's masks), or None."""
  return getattr(task, "structure_fingerprint", lambda: None)()


def check_same_model_structure(run: Run) -> None:
  """Refuses a workdir whose checkpoints were trained with other fixed, non-parameter structure than
  the model builds now: MADE's masks are drawn again from config.model.mask_seed by NumPy's random
  stream, which NumPy does not promise to keep across versions; other masks would pair the saved
  weights with other connectivity, silently. A workdir from before the digest was kept: nothing to
  compare."""
  digest = _structure_digest(run.task)
  saved = _differing_saved_digest(run, MODEL_FINGERPRINT, digest)
  if saved is not None:
    raise ValueError(f"the model's fixed structure (MADE's masks from config.model.mask_seed) "
                     f"differs from the one {run.workdir} was trained with (digest {digest[:12]}, "
                     f"saved {saved[:12]} in {MODEL_FINGERPRINT}): this NumPy draws other masks "
                     "from the seed, or (config.model.connectivity_agnostic=False with a hidden "
                     "layer narrower than the data) the run predates jaxlab's fixed-degree rule of "
                     "2026-12-04; nothing was changed (use the NumPy and jaxlab that trained it)")


def _build_task(config):
  """The config's task. In a multi-process run process 0 builds it first (preparing any dataset files
  that the others then read); if it fails, every process raises (none is left waiting)."""
  if jax.process_count() == 1:
    return tasks.build_task(config)
  task, error = None, None
  if distributed.is_primary():
    try:
      task = tasks.build_task(config)
    except Exception as e:  # raised below, after the others have heard
      error = e
  ok = distributed.all_agree(error is None)
  if error is not None:
    raise error
  if not ok:
    raise RuntimeError("process 0 could not load the data or build the model; its error says why")
  return task or tasks.build_task(config)


def init_state(run: Run) -> TrainState:
  """Fresh state, created directly in its sharded layout (jit with out_shardings)."""
  init = _init_state_fn(run.task, run.tx, run.config)
  with run.mesh, run.rules():
    return jax.jit(lambda: nn.meta.unbox(init()), out_shardings=run.state_shardings)()


def restore_or_init(run: Run) -> tuple[TrainState, Optional[dict]]:
  """The newest readable checkpoint's (state, data iterator state), or a fresh state and None."""
  restored = run.checkpointer.restore_latest(run.abstract_state)
  if restored is None:
    return init_state(run), None
  _, state, data_state = restored
  return state, data_state


def loss_and_grads(task, params, batch: dict, rng: jax.Array, microbatches: int = 1, mesh=None,
                   scale=None, param_shardings=None):
  """(mean loss, its gradient) over the batch, in `microbatches` sequential slices (gradient
  accumulation) when > 1. With a jmp loss `scale`, the scaled loss is differentiated and the gradient
  unscaled (float16; see loss_scale.py). `param_shardings` (the parameters' stored shardings): the
  loss sees the parameters gathered over fsdp (`sharding.gathered_over_fsdp`; XLA gathers them once,
  before the slices) and the gradients, each slice's and the sum, are kept in the stored shardings.

  Slice j holds rows j, j + m, j + 2m, ... of the batch, so every device keeps its own rows of every
  slice (no resharding). The summed losses and gradients of the slices are divided by the total
  count, so the result is the whole batch's mean, as with one slice; this needs a task whose loss aux
  is (sum over examples, count) (LM, density; not the contrastive losses, which couple the batch).
  """
  scaled = scale is not None
  if not scaled:
    scale = loss_scale.no_scaling()
  if param_shardings is None:
    gather = keep = lambda tree: tree
  else:
    compute_shardings = sharding.gathered_over_fsdp(param_shardings)
    gather = lambda p: jax.lax.with_sharding_constraint(p, compute_shardings)
    keep = lambda g: jax.lax.with_sharding_constraint(g, param_shardings)

  def scaled_loss(p):
    loss, _ = task.loss(gather(p), batch, rng, train=True)
    return scale.scale(loss), loss

  if microbatches == 1:
    (_, loss), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params)
    return loss, keep(scale.unscale(grads))
  m = microbatches
  for name, x in batch.items():
    if x.shape[0] % m:
      raise ValueError(f"microbatches={m} does not divide the batch: batch[{name!r}] has "
                       f"{x.shape[0]} rows")

  def weight(count):  # a scaled slice differentiates its mean, so S means what it means above
    return jnp.maximum(jnp.asarray(count, jnp.float32), 1.0) if scaled else 1.0

  def summed(p, b, r):
    _, (total, count) = task.loss(gather(p), b, r, train=True)
    return scale.scale(total / jax.lax.stop_gradient(weight(count))), (total, count)

  def split(x):  # [B, ...] -> [m, B / m, ...], slice j = rows j::m
    x = jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)
    if mesh is None:
      return x
    rows = sharding.batch_sharding(mesh).spec  # the batch axes, one level down
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *rows)))

  grad_fn = jax.value_and_grad(summed, has_aux=True)

  def body(carry, inputs):
    total, count, grads = carry
    j, slice_batch = inputs
    (_, (t, c)), g = grad_fn(params, slice_batch, jax.random.fold_in(rng, j))
    g = keep(jax.tree.map(lambda x: x * weight(c), scale.unscale(g)))  # the slice sum's gradient
    return (total + t.astype(jnp.float32), count + jnp.asarray(c, jnp.float32),
            jax.tree.map(jnp.add, grads, g)), None

  zeros = keep(jax.tree.map(jnp.zeros_like, params))
  (total, count, grads), _ = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros),
      (jnp.arange(m), jax.tree.map(split, batch)))
  count = jnp.maximum(count, 1.0)  # as the tasks' own means: an all-padding batch gives 0, not NaN
  return total / count, jax.tree.map(lambda g: g / count, grads)


def make_train_step(run: Run):
  task, tx = run.task, run.tx
  microbatches = train_microbatches(run.config)
  scaling, scale_period = loss_scale.enabled(run.config), loss_scale.period(run.config)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state["rng"], state["step"])
    scale = loss_scale.scaler(state["loss_scale"], scale_period) if scaling else None
    loss, grads = loss_and_grads(task, state["params"], batch, rng, microbatches, run.mesh, scale,
                                 run.state_shardings["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "rng": state["rng"]}
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    if scaling:  # a step whose gradients overflowed is skipped
      new_state, scale_metrics = loss_scale.keep_finite_step(state, new_state, grads, scale)
      metrics.update(scale_metrics)
    return new_state, metrics

  batch_sharding = sharding.batch_sharding(run.mesh)
  with run.mesh, run.rules():
    return jax.jit(train_step, in_shardings=(run.state_shardings, batch_sharding),
                   out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                   donate_argnums=0)


def make_eval_step(run: Run):
  task = run.task

  compute_shardings = sharding.gathered_over_fsdp(run.state_shardings["params"])

  def eval_step(params, batch: dict):
    params = jax.lax.with_sharding_constraint(params, compute_shardings)
    _, (total, count) = task.loss(params, batch, jax.random.PRNGKey(0), train=False)
    return total, count

  with run.mesh, run.rules():
    return jax.jit(eval_step, in_shardings=(run.state_shardings["params"],
                                            sharding.batch_sharding(run.mesh)))


class BestRecord(NamedTuple):
  """The best-params record that a `train.keep_best` run saved: its training step, its parameters,
  and the first step whose evaluation it saw when it started after the run's first ones (None: it
  saw all of them; see _best_record_starts_late)."""
  step: int
  params: Any
  covers_from: int | None


def restore_best_params(run: Run, *, training: bool = False) -> BestRecord:
  """The lowest-validation-loss parameters a `train.keep_best` run saved (BestRecord), in the
  run's sharding; FileNotFoundError if there is no readable record. training: the run that keeps the
  record (`jaxlab train`, after its last step) moves a damaged one aside; eval / sample leave it (a
  training run may be replacing it), and read again a record replaced while they read it."""
  for attempt in range(checkpoint_lib.VANISHED_RETRIES + 1):
    before = checkpoint_lib.best_entries(run.workdir)
    try:
      keeper = checkpoint_lib.BestParams(run.workdir, fingerprint=config_fingerprint(run.config),
                                         also_accept=(run.saved_fingerprint,), create=training)
      try:
        return BestRecord(keeper.step, keeper.restore(run.abstract_state["params"]),
                          keeper.covers_from)
      finally:
        keeper.close()
    except FileNotFoundError:
      if (training or attempt == checkpoint_lib.VANISHED_RETRIES
          or checkpoint_lib.best_entries(run.workdir) == before
          or jax.process_count() > 1):  # (opening a record is collective: no per-process retry)
        raise  # not a record replaced while it was read
  raise AssertionError("unreachable")


def evaluate(run: Run, params, eval_step=None) -> float:
  """Mean loss per token over the task's fixed evaluation batches."""
  eval_step = eval_step or make_eval_step(run)
  total, count = 0.0, 0.0
  with run.mesh, run.rules():
    for batch in run.task.eval_iterator():
      t, c = eval_step(params, run.place_batch(batch))
      total, count = total + float(t), count + float(c)
  if count == 0:
    raise ValueError("the evaluation split gave no batches")
  return total / count


RESUME_MUST_MATCH = ("task", "seed", "model", "data", "optim")
# Keys of RESUME_MUST_MATCH that `jaxlab eval` / `sample` may set otherwise: they shape the training
# stream only, not the saved arrays (eval with another batch size scores other windows: it was asked).
READING_MAY_CHANGE = ("data.batch_size",)
# Keys added after runs were first saved, left out while they hold the value that means "as before",
# so that the records of older runs (WORKDIR/best's fingerprint) still match. Every key added to a
# config section of RESUME_MUST_MATCH must be listed here (tests/train/fingerprint_keys.json holds the
# keys the fingerprint has always covered, and its test names a key that is in neither).
# (The loss-scaling keys are handled by _resume_keys itself: what matters is whether a run scales.)
ADDED_KEYS_AT_DEFAULT = {"model.mtp_heads": 0, "model.medusa_heads": 0,
                         "model.heads_loss_decay": 1.0, "model.heads_stop_gradient": False}
# The same, for keys that only some tasks gained later (the LM has had model.dtype from the start).
ADDED_TASK_KEYS_AT_DEFAULT = {
    "contrastive": {"model.dtype": "float32", "model.image_encoder": "vit", "model.image_window": 4,
                    "model.image_stages": 2, "model.image_rope_theta": 100.0},
    "density": {"data.static_binarization": False, "model.dtype": "float32"},
}


def _resume_keys(config_json: dict, *, resolve_paths: bool = True) -> dict:
  """The flattened config entries a checkpoint depends on (RESUME_MUST_MATCH, less data.data_dir
  and the ADDED_..._KEYS_AT_DEFAULT at their defaults), from the config as JSON. The loss-scaling
  keys count only for a run that scales (then as "dynamic", however it was asked for): a run without
  it checkpoints the same state as one saved before loss scaling existed."""
  flat = flatten({k: v for k, v in config_json.items() if k in RESUME_MUST_MATCH})
  flat.pop("data.data_dir", None)
  if resolve_paths and "data.path" in flat:  # runs saved before paths were absolute: as typed
    flat["data.path"] = _comparable_data_path(flat, config_json.get("task"))
  if loss_scale.enabled(config_json):
    flat["optim.loss_scale"] = "dynamic"
  else:
    for key in loss_scale.KEYS:
      flat.pop(key, None)
  added = {**ADDED_KEYS_AT_DEFAULT, **ADDED_TASK_KEYS_AT_DEFAULT.get(config_json.get("task"), {})}
  for key, default in added.items():
    if key in flat and flat[key] == default:
      del flat[key]
  return flat


def _comparable_data_path(flat: dict, task) -> str:
  """data.path as the file it names: absolute, symlinks resolved, and the emoji default ("") as the
  shared folder it means (contrastive_emoji once saved that folder as a relative path)."""
  path = flat["data.path"]
  if task == "contrastive" and flat.get("data.name") == "emoji" and not path:
    from jaxlab.data.local_info import SHARED_DATA
    path = str(SHARED_DATA / "emoji_captions")
  return absolute_data_path(path, task, resolve_links=True)


def config_fingerprint(config) -> str:
  """A short hash of `_resume_keys` (data.path as given): which model/data/optimizer a saved record
  (WORKDIR/best) belongs to."""
  return _fingerprint_of(json.loads(config.to_json_best_effort()))


def _fingerprint_of(config_json: dict) -> str:
  return json_sha256(_resume_keys(config_json, resolve_paths=False))[:16]


def _recorded_configs(checkpointer: checkpoint_lib.Checkpointer) -> tuple:
  """(step, config as JSON) of each checkpoint whose data item records its run's config and reads
  whole, newest first (checkpoints saved before configs were recorded have none)."""
  found = []
  for step in reversed(checkpointer.all_steps()):
    data = checkpointer.read_data(step)
    if data is not None and isinstance(data.get(CONFIG_KEY), dict):
      found.append((step, data[CONFIG_KEY]))
  return tuple(found)


def _saved_fingerprint(workdir: pathlib.Path) -> Optional[str]:
  """config_fingerprint of WORKDIR/config.json (None if there is none or it cannot be read)."""
  try:
    return _fingerprint_of(json.loads((workdir / "config.json").read_text()))
  except (OSError, ValueError, TypeError, AttributeError):
    return None


def check_resume_config(run: Run) -> None:
  """Refuses to resume a workdir whose checkpoints were trained under a different model/data/optimizer
  config (restoring them would fail or silently change the run); names the first differing key. The
  config each checkpoint recorded is what counts (WORKDIR/config.json may have been edited since);
  checkpoints saved before configs were recorded are checked against config.json. Keys that the saved
  config lacks (added to jaxlab after that run) are taken to hold their defaults, so a resume that
  sets one of them otherwise is refused too."""
  saved_path = run.workdir / "config.json"
  if not run.checkpointer.all_steps():
    return
  if run.recorded_configs:
    for step, recorded in run.recorded_configs:
      _refuse_another_config(run, recorded, f"recorded in checkpoint {step}")
    return
  if not saved_path.exists():
    raise ValueError(f"{run.workdir} holds checkpoints but no config.json, so they cannot be checked "
                     "against this run's config; put config.json back or use a new --workdir "
                     "(nothing was changed)")
  try:
    saved_dict = read_config_json(saved_path)
  except ConfigError as e:
    raise ValueError(f"{e}, so the checkpoints cannot be checked against this run's config; "
                     "nothing was changed") from None
  _refuse_another_config(run, saved_dict, f"from {saved_path}")


def _refuse_another_config(run: Run, saved_dict: dict, source: str) -> None:
  """ConfigError (`jaxlab` exits 2) naming the first key (of RESUME_MUST_MATCH; a `name` key first,
  since another dataset or model explains the other differences) where this run's config differs
  from `saved_dict`, the config checkpoints were saved under; `source` says where it was read."""
  saved_json = with_task_defaults(saved_dict)[0]
  scaled = loss_scale.enabled(saved_json)
  if scaled != loss_scale.enabled(run.config):  # the checkpoints' state has (or lacks) the scale
    choice = saved_json.get("optim", {}).get("loss_scale", "none (saved before loss scaling existed)")
    dtype = saved_json.get("model", {}).get("dtype", "float32")
    raise ConfigError(
        f"{run.workdir} holds checkpoints of a run {'with' if scaled else 'without'} loss scaling ("
        f"{source}: "
        f"config.optim.loss_scale={choice!r}, config.model.dtype={dtype!r}), but this run "
        f"{'has none' if scaled else 'scales the loss'}; nothing was changed (give "
        f"--config.optim.loss_scale={'dynamic' if scaled else 'none'} to use them, or a new --workdir)")
  current_json = with_task_defaults(json.loads(run.config.to_json_best_effort()))[0]
  saved, current = _resume_keys(saved_json), _resume_keys(current_json)
  saved_raw, current_raw = flatten(saved_json), flatten(current_json)
  # The task, then the names (model, dataset): the key that explains the other differences first.
  name_first = lambda key: (key != "task", key.rsplit(".", 1)[-1] != "name", key)
  for key in sorted(set(saved) | set(current), key=name_first):
    if key not in saved_raw:  # a key of this run's own config file that the saved run lacks
      continue
    if key == "data.path" and (run.workdir / DATA_FINGERPRINT).is_file():
      continue  # moved or copied data: check_same_data compares the content itself
    if run.reading and key in READING_MAY_CHANGE:
      continue
    was, now = saved.get(key, saved_raw[key]), current.get(key, current_raw.get(key))
    if was != now:
      raise ConfigError(f"{run.workdir} holds checkpoints trained with config.{key}={was!r} ("
                       f"{source}), but this run has {now!r}{_edited_note(run, key, was)}; "
                       "nothing was changed (" + (
                           f"of the model, data and optimizer keys, only {', '.join(READING_MAY_CHANGE)}"
                           " may be overridden here" if run.reading else
                           "train a different config into a new --workdir") + ")")


def _edited_note(run: Run, key: str, recorded) -> str:
  """When the checkpoints recorded their config and WORKDIR/config.json now says otherwise at `key`
  (edited after they were saved): a note saying so, else ""."""
  if not run.recorded_configs:
    return ""
  try:
    saved = _resume_keys(with_task_defaults(read_config_json(run.workdir / "config.json"))[0])
  except (ConfigError, OSError, TypeError, ValueError, AttributeError):
    return ""
  if key not in saved or saved[key] == recorded:
    return ""
  return (f" (the workdir's config.json says {saved[key]!r}: it was edited after the checkpoints "
          "were saved, which record their own)")


def _save_run_files(run: Run) -> None:
  if not distributed.is_primary():
    return
  write_atomically(run.workdir / "config.json", run.config.to_json_best_effort(indent=2))
  vocab = getattr(run.task, "vocab", None)
  if vocab is not None:
    write_atomically(run.workdir / "vocab.json", json.dumps(vocab.to_file_json()))
  if run.data_digest is not None:
    write_atomically(run.workdir / DATA_FINGERPRINT, run.data_digest + "\n")
  structure_digest = _structure_digest(run.task)
  if structure_digest is not None:
    write_atomically(run.workdir / MODEL_FINGERPRINT, structure_digest + "\n")


def _lock_workdir(workdir: pathlib.Path):
  """An exclusive lock on WORKDIR/.jaxlab.lock for one training run (process 0), or RuntimeError if
  another holds it; None where there is no fcntl."""
  if not distributed.is_primary():
    return None
  try:
    import fcntl
  except ImportError:  # not POSIX
    return None
  try:
    handle = open(workdir / ".jaxlab.lock", "a+")
  except OSError as e:
    raise PermissionError(f"{workdir} is not writable ({e.strerror or e}: {workdir / '.jaxlab.lock'}"
                          "); a training run writes its checkpoints and metrics there (nothing was "
                          "changed)") from None
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    handle.close()
    raise RuntimeError(f"another `jaxlab train` is writing {workdir}; nothing was changed (wait for "
                       "it, or use another --workdir)") from None
  return handle


def _unlock(handle) -> None:
  if handle is not None:
    handle.close()  # releases the flock


def _schedule_change_note(run: Run, start: int, applied: int) -> Optional[str]:
  """A resumed run whose config.train.steps differs from the saved run's keeps training, but its
  learning-rate schedule (warmup + cosine over train.steps) is another one from here on: one line
  saying so, with the learning rate at the resumed step under each; another train.eval_batches makes
  the validation losses before and after incomparable: a line too. None if neither changed."""
  if not start:
    return None
  notes, saved = [], _saved_train_section(run)
  was = saved.get("steps")
  now = run.config.train.steps
  if isinstance(was, int) and was != now:
    # The schedule counts applied updates (loss scaling's skipped steps do not advance it).
    lr = lambda steps: float(optim.learning_rate_schedule(run.config.optim, steps)(applied))
    notes.append(f"jaxlab: config.train.steps changed from {was} to {now} since the checkpoints: "
                 f"the learning-rate schedule now runs over {now} steps (at step {start}: lr "
                 f"{lr(was):.3g} under the old schedule, {lr(now):.3g} under the new one)")
  was = saved.get("eval_batches")
  now = run.config.train.eval_batches
  if isinstance(was, int) and was != now:
    notes.append(f"jaxlab: config.train.eval_batches changed from {was} to {now} since the "
                 "checkpoints: validation losses from here on average other batches than the "
                 "earlier ones in metrics.jsonl" + (" (and the best-params record compares them)"
                                                    if run.config.train.get("keep_best", False)
                                                    else ""))
  return "\n".join(notes) or None


def _saved_train_section(run: Run) -> dict:
  """config.train as the checkpoints recorded it (else the workdir's config.json), or {}."""
  saved_path = run.workdir / "config.json"
  if run.recorded_configs:
    return run.recorded_configs[0][1].get("train", {})
  if saved_path.exists():
    return json.loads(saved_path.read_text()).get("train", {})
  return {}


# In a checkpoint's data state: the train losses (and loss-scaling skips) of the logging interval
# that the checkpoint cut into, so that a resumed run logs the interval's mean over all of its steps.
OPEN_INTERVAL_KEY = "_jaxlab_open_log_interval"
STREAM_KEY = "_jaxlab_stream_version"  # tasks with a `train_stream_version` (pipeline.STREAM_VERSION)
CONFIG_KEY = "_jaxlab_config"  # the run's whole config (JSON): what check_resume_config compares with


# Whether every array of a tree is finite (one boolean scalar); loss scaling uses the same test.
_all_finite = jax.jit(jmp.all_finite)


def _close_savers(savers, lock, failure: Optional[BaseException]) -> None:
  """Closes the checkpointer and the best-params keeper (waiting for their last saves) and releases
  the workdir lock, whatever fails. When `failure` already stops the run, a save that failed too is
  printed on stderr beside it instead of replacing it; otherwise the first save error is raised,
  naming the second."""
  errors = []
  for saver in savers:
    if saver is None:
      continue
    try:
      saver.close()
    except Exception as e:  # noqa: BLE001  (each saver must be closed)
      errors.append(e)
  _unlock(lock)
  if not errors:
    return
  if failure is not None:
    for e in errors:
      print(f"jaxlab: also: {e}", file=sys.stderr, flush=True)
    return
  if len(errors) > 1:
    raise checkpoint_lib.CheckpointSaveError(f"{errors[0]}; also: {errors[1]}") from None
  raise errors[0]


def _best_record_starts_late(run: Run, best, start: int) -> Optional[int]:
  """A resumed run with no best-params record (keep_best was off, or the record was unreadable and
  moved aside) while metrics.jsonl holds earlier evaluations: the record starts at `start` and covers
  the evaluations from there on. Says so (naming the lowest earlier one, whose parameters were not
  kept) and returns `start` (the record keeps it: BestParams.covers_from); else None."""
  if not start or best.step is not None:
    return None
  earlier = [(r["val_loss"], r["step"]) for r in read_metrics(run.workdir)
             if "val_loss" in r and r["step"] < start and isinstance(r["val_loss"], float)]
  if not earlier:
    return None
  low, at = min(earlier)
  if distributed.is_primary():
    print(f"jaxlab: note: {run.workdir / 'best'} holds no record, so the best-params record covers "
          f"the evaluations from step {start} on (the lowest before it, val_loss {low:.4f} at step "
          f"{at}, kept no parameters)", file=sys.stderr, flush=True)
  return start


def _skipped_steps(state) -> int:
  """Steps loss scaling skipped so far (0 without loss scaling): the schedule counts the others."""
  return int(state["loss_scale"]["skipped"]) if "loss_scale" in state else 0


def logged_val_loss(workdir: pathlib.Path, step: int) -> Optional[float]:
  """The val_loss metrics.jsonl holds for `step`, or None."""
  values = [r["val_loss"] for r in read_metrics(workdir) if r.get("step") == step and "val_loss" in r]
  return float(values[-1]) if values else None


def train(config, workdir: str | pathlib.Path, *, task=None, progress: bool = True) -> dict:
  """Trains (resuming from WORKDIR's newest checkpoint when there is one); returns final metrics."""
  _same_run_everywhere(config, pathlib.Path(workdir))  # before any process reads data
  if task is None:
    task = _build_task(config)
  data_digest = _same_data_everywhere(task)
  check = getattr(task, "check_before_training", None)  # e.g. the LM's sample prompt
  if check is not None:
    check()  # before setup creates the workdir: a refused config leaves nothing behind
  run = setup(config, workdir, task=task, data_digest=data_digest, same_run_checked=True)
  cfg = config.train
  stream_version = getattr(run.task, "train_stream_version", None)
  lock = None
  try:
    lock = _lock_workdir(run.workdir)
    if not os.access(run.checkpointer.directory, os.W_OK):
      raise PermissionError(f"{run.checkpointer.directory} is not writable; no checkpoint could be "
                            "saved (nothing was changed)")
    best_dir = run.workdir / "best"  # orbax's background save there hung for minutes, then failed
    if cfg.get("keep_best", False) and best_dir.exists() and not (
        best_dir.is_dir() and os.access(best_dir, os.W_OK)):
      raise PermissionError(f"{best_dir} is not a writable folder; the best-params record "
                            "(config.train.keep_best) could not be saved (nothing was changed)")
    state, data_state = restore_or_init(run)
    if data_state is not None and stream_version is not None:
      pipeline.check_stream_version(data_state.get(STREAM_KEY, 1), config.seed, run.workdir)
    start = int(state["step"])
    if start > cfg.steps:
      raise ValueError(f"{run.workdir} holds a checkpoint at step {start}, beyond "
                       f"config.train.steps={cfg.steps}; nothing was changed (give "
                       f"--config.train.steps >= {start}, or a new --workdir)")
    schedule_note = _schedule_change_note(run, start, start - _skipped_steps(state))
    _save_run_files(run)
  except BaseException as e:
    _close_savers((run.checkpointer,), lock, e)
    raise
  data_iter = run.task.train_iterator()
  open_interval = {"losses": [], "skipped": 0}  # the logging interval a checkpoint cut into
  if data_state is not None:
    open_interval = data_state.pop(OPEN_INTERVAL_KEY, open_interval)
    data_state.pop(STREAM_KEY, None)  # checked before training (above)
    data_state.pop(CONFIG_KEY, None)  # checked by setup
    data_iter.set_state(data_state)
  train_step = make_train_step(run)
  eval_step = make_eval_step(run)
  config_json = json.loads(config.to_json_best_effort())
  primary = distributed.is_primary()
  writer = MetricsWriter(run.workdir, tensorboard=cfg.tensorboard, enabled=primary,
                         resume_step=start)
  best = None
  failure = None  # what stopped the loop, if anything (a failed final save must not replace it)
  if cfg.get("keep_best", False):
    best = checkpoint_lib.BestParams(run.workdir, fingerprint=config_fingerprint(config),
                                     also_accept=(run.saved_fingerprint,))
    if start == 0 and best.step is not None:  # a fresh run: that record is from an earlier one
      best.discard("was saved before any checkpoint of this workdir: by an earlier run, or by this "
                   "one before a stop (training starts again from step 0)", damaged=False)
    best.covers_from = _best_record_starts_late(run, best, start) or best.covers_from
  elif checkpoint_lib.best_entries(run.workdir):
    # A record this run will not follow would be served by `--best` as if it were the run's best
    # (and taken up again were keep_best switched back on): it goes aside.
    stale = checkpoint_lib.BestParams(run.workdir, fingerprint=config_fingerprint(config),
                                      also_accept=(run.saved_fingerprint,))
    if stale.step is not None:
      stale.discard("is not kept up to date by this run (config.train.keep_best=False)",
                    damaged=False)
    stale.close()
  if start and primary:
    print(f"jaxlab: resumed from step {start} in {run.workdir}", flush=True)
    if schedule_note:
      print(schedule_note, file=sys.stderr, flush=True)
  final: dict = {}
  step_times: list[float] = []
  losses = list(open_interval["losses"])  # this logging interval's, from its start (a resume too)
  skipped = int(open_interval["skipped"])  # steps skipped by loss scaling in this interval
  overflow_streak = 0  # consecutive steps skipped at loss scale 1 (loss_scale.check_progress)
  bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and primary),
             dynamic_ncols=True, desc="train")
  is_eval_step = lambda s: s % cfg.eval_every == 0 or s == cfg.steps

  blamed = lambda step: (f"checkpoint {step} in {run.checkpointer.directory} holds the parameters "
                         "that gave it, any earlier ones are kept")

  def evaluate_and_record(step: int, params) -> None:
    val_loss = evaluate(run, params, eval_step)
    writer.write(step, val_loss=val_loss)
    if not np.isfinite(val_loss):  # e.g. parameters blown up by the last update (finite, huge)
      raise FloatingPointError(f"the validation loss is {val_loss} at step {step}; stopping "
                               f"({blamed(step)}; lower config.optim.lr?)")
    if primary:
      bar.write(f"step {step}: val_loss {val_loss:.4f}")
    final["val_loss"] = val_loss
    if best is not None:
      best.offer(step, val_loss, params)

  try:
    with run.mesh, run.rules():
      if start and is_eval_step(start):
        # A run stopped between saving this checkpoint and evaluating it (or recording the best
        # parameters) finishes that evaluation now; otherwise it reports the one on record.
        logged = logged_val_loss(run.workdir, start)
        if not distributed.all_agree(logged is not None):
          evaluate_and_record(start, state["params"])
        else:
          final["val_loss"] = logged
          if best is not None:
            # The number that may pick the reported parameters is not read back from
            # metrics.jsonl (no checksum: an edited digit was trusted) but computed again (one
            # evaluation, deterministic).
            val_loss = evaluate(run, state["params"], eval_step)
            if primary and not np.isclose(val_loss, logged, rtol=1e-5, atol=0.0):
              print(f"jaxlab: metrics.jsonl gives val_loss {logged} at step {start}, but checkpoint "
                    f"{start} evaluates to {val_loss} (the file was edited or damaged?); the "
                    "best-params record uses the latter", file=sys.stderr, flush=True)
            final["val_loss"] = val_loss
            best.offer(start, val_loss, state["params"])
      batch = None
      saved_at = start  # the step of the newest checkpoint (start: the one resumed, if any)
      nonfinite_streak, save_deferred = 0, False
      for step in range(start, cfg.steps):
        if batch is None:  # after a checkpoint (nothing read ahead): not part of the step's time
          batch = run.place_batch(next(data_iter))
        t0 = time.perf_counter()
        state, metrics = train_step(state, batch)  # dispatched; runs while the next lines do
        batch = None
        done = step + 1
        save_now = done % cfg.checkpoint_every == 0 or done == cfg.steps or save_deferred
        if not save_now:
          # The next batch is read while this step computes. Not before a checkpoint: the saved
          # iterator state must be the one after exactly `done` batches.
          batch = run.place_batch(next(data_iter))
        loss = float(metrics["loss"])  # blocks: the step time below is real work, not dispatch
        if step > start:  # the first step of a process includes compilation
          step_times.append(time.perf_counter() - t0)
        # Without loss scaling a non-finite gradient is applied (loss scaling skips that step), so
        # it stops the run here, before the state it made can be checkpointed. With loss scaling a
        # skipped step may have a non-finite loss too (loss_scale.check_loss_overflow): it is left
        # out of the logged train_loss and a checkpoint due at it waits for a step with a finite loss.
        step_skipped = "skipped" in metrics and bool(metrics["skipped"])
        nonfinite_streak = loss_scale.check_loss_overflow(
            done, loss, step_skipped, nonfinite_streak, last=done == cfg.steps,
            kept=str(run.checkpointer.directory))
        loss_overflowed = nonfinite_streak > 0  # this step's loss overflowed (the streak's last)
        if not loss_overflowed:
          losses.append(loss)
        grad_norm = float(metrics["grad_norm"]) if "skipped" not in metrics else 0.0
        save_deferred = save_now and loss_overflowed  # not a state whose last loss overflowed
        save_now = save_now and not loss_overflowed
        if not step_skipped and not (np.isfinite(loss) and np.isfinite(grad_norm)):
          what = f"loss is {loss}" if not np.isfinite(loss) else f"gradient norm is {grad_norm}"
          kept = (blamed(step) if saved_at == step and step else
                  f"last good checkpoint kept in {run.checkpointer.directory}")
          raise FloatingPointError(f"{what} at step {step + 1}; stopping ({kept})")
        if "skipped" in metrics:
          skipped += step_skipped
          overflow_streak = loss_scale.check_progress(done, float(metrics["loss_scale"]),
                                                      step_skipped, overflow_streak)
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
          # The schedule counts applied updates: loss scaling's skipped steps do not advance it.
          applied = step - _skipped_steps(state)
          record = {"train_loss": float(np.mean(losses)) if losses else float("nan"),  # all skipped
                    "grad_norm": float(metrics["grad_norm"]),
                    "learning_rate": float(
                        optim.learning_rate_schedule(config.optim, cfg.steps)(applied))}
          if step_times:
            median = statistics.median(step_times)
            record["step_time_ms"] = 1000 * median
            record["tokens_per_sec"] = run.task.tokens_per_batch / median
          if "loss_scale" in metrics:
            record["loss_scale"], record["skipped_steps"] = float(metrics["loss_scale"]), skipped
            skipped = 0
          writer.write(done, **record)
          bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                          tok_s=f"{record.get('tokens_per_sec', 0):.0f}")
          final.update(record)
          step_times, losses = [], []
        if save_now:  # before evaluating: an evaluation that fails loses no trained steps
          # The guard above checks the loss and gradient the update came from, not the update:
          # an overflowing one (a huge lr) made NaN parameters that were saved, and the run ended 0.
          if not bool(_all_finite(state["params"])):
            raise FloatingPointError(
                f"the parameters are not finite after step {done} (the update overflowed; lower "
                f"config.optim.lr?); stopping before saving them (last good checkpoint kept in "
                f"{run.checkpointer.directory})")
          saved_at = done
          run.checkpointer.save(done, state, {
              **data_iter.get_state(),
              **({} if stream_version is None else {STREAM_KEY: stream_version}),
              CONFIG_KEY: config_json,
              OPEN_INTERVAL_KEY: {"losses": losses, "skipped": skipped}})  # save() copies it
        if is_eval_step(done):
          evaluate_and_record(done, state["params"])
  except BaseException as e:
    failure = e
    raise
  finally:
    bar.close()
    writer.close()
    _close_savers((run.checkpointer, best), lock, failure)
  if best is not None and best.step is not None:
    final["best_step"], final["best_val_loss"] = best.step, best.val_loss
    if best.covers_from is not None:  # recorded with the record: true on later resumes too
      final["best_since"] = best.covers_from
  total_skipped = _skipped_steps(state)
  if total_skipped and total_skipped == int(state["step"]) and distributed.is_primary():
    print(f"jaxlab: warning: loss scaling skipped all {total_skipped} steps (every step's "
          "gradients overflowed float16), so the parameters are still the initial ones; lower "
          "config.optim.lr or config.optim.loss_scale_init, or train longer", file=sys.stderr,
          flush=True)
  final["step"] = int(state["step"])
  final["state"] = state
  final["run"] = run
  return final
