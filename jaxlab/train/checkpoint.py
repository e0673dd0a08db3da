"""Checkpoints with orbax's CheckpointManager: train state (params, optimizer state, step, RNG) and the
data iterator's state, saved atomically (orbax writes to a temporary directory and renames it).

On restore the newest checkpoint is tried first; one that cannot be read is reported, moved aside to
WORKDIR/corrupt_checkpoints/ (never deleted, never overwritten), and the previous one is used.

In a multi-process run every process saves and restores its shards of the same checkpoint; a checkpoint
that any process cannot read counts as unreadable for all, and process 0 moves it aside.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlab.train import distributed

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores {"state": pytree of arrays, "data": JSON dict} under WORKDIR/checkpoints."""

  def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 3):
    self.workdir = pathlib.Path(workdir)
    self.directory = self.workdir / "checkpoints"
    self._manager = ocp.CheckpointManager(
        self.directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = True) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)),
                       force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """Returns (step, state, data_state) from the newest readable checkpoint, or None if there is none.

    `abstract_state`: pytree of jax.ShapeDtypeStruct with shardings (restored arrays land there).
    """
    for step in reversed(self.all_steps()):
      restored, error = None, None
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=ocp.args.JsonRestore()))
      except Exception as e:  # orbax raises many types for unreadable files
        message = str(e).splitlines()[0] if str(e) else ""
        error = f"{type(e).__name__}: {message[:200]}"
      if _all_processes_agree(error is None):
        return step, restored["state"], dict(restored["data"])
      log.warning("checkpoint at step %d is unreadable (%s); trying the previous one", step,
                  error or "in another process")
      self._quarantine(step)
    return None

  def _quarantine(self, step: int) -> None:
    """Moves a bad checkpoint out of the manager's directory, keeping it for inspection."""
    self.wait()
    source = self.directory / str(step)
    if not source.exists():
      candidates = [p for p in self.directory.iterdir() if p.name.split("_")[-1] == str(step)]
      source = candidates[0] if candidates else None
    if source is not None and distributed.is_primary():
      _move_aside(source, self.workdir, "could not be read")
    distributed.barrier(f"jaxlab_quarantine_{step}")
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds in every process (a collective in a multi-process run)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring sharded arrays."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def _move_aside(source: pathlib.Path, workdir: pathlib.Path, why: str) -> None:
  """Moves a checkpoint directory to WORKDIR/corrupt_checkpoints/ (kept for inspection, never deleted)."""
  target_dir = workdir / "corrupt_checkpoints"
  target_dir.mkdir(parents=True, exist_ok=True)
  target = target_dir / f"{source.name}.{time.time_ns()}"
  shutil.move(str(source), str(target))
  print(f"jaxlab: {source} {why}; moved to {target}", flush=True)


class BestParams:
  """The parameters with the lowest validation loss so far, under WORKDIR/best (one orbax checkpoint,
  written atomically like the others): model selection on validation data, as the density papers do.
  Training never reads it, so a run with or without it follows the same steps.

  `fingerprint` names the run's model/data/optimizer config: a record saved under another one (or one
  that cannot be read) is moved to WORKDIR/corrupt_checkpoints/ rather than trusted or deleted.
  """

  def __init__(self, workdir: str | pathlib.Path, *, fingerprint: str = "", create: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.directory = self.workdir / "best"
    self.fingerprint = fingerprint
    self.step, self.val_loss = None, float("inf")
    if not create and not self.directory.is_dir():
      raise FileNotFoundError(f"no best-params checkpoint in {self.directory} (train with "
                              "--config.train.keep_best=True)")
    self._open()
    step = self._manager.latest_step()
    if step is None:
      return
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      saved_step, saved_loss = int(meta["step"]), float(meta["val_loss"])
      saved_fingerprint = meta.get("fingerprint", "")
    except Exception as e:  # orbax raises many types for unreadable files
      self.discard(f"is unreadable ({type(e).__name__})")
      return
    if fingerprint and saved_fingerprint != fingerprint:
      self.discard("was saved under a different model/data/optimizer config")
      return
    self.step, self.val_loss = saved_step, saved_loss

  def _open(self) -> None:
    self._manager = ocp.CheckpointManager(
        self.directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        item_names=("params", "meta"))

  def discard(self, why: str) -> None:
    """Moves the saved record aside (see the class docstring) and starts with none."""
    self._manager.wait_until_finished()
    self._manager.close()
    if self.directory.exists() and distributed.is_primary():
      _move_aside(self.directory, self.workdir, why)
    distributed.barrier("jaxlab_best_discard")
    self.step, self.val_loss = None, float("inf")
    self._open()

  def offer(self, step: int, val_loss: float, params: Any) -> bool:
    """Saves `params` if `val_loss` beats the best so far; returns whether it did. A step evaluated
    again after a resume replaces its own earlier record."""
    if not val_loss < self.val_loss:
      return False
    if step in self._manager.all_steps():
      self._manager.delete(step)
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({"step": step, "val_loss": val_loss,
                                "fingerprint": self.fingerprint})), force=True)
    self.step, self.val_loss = step, val_loss
    return True

  def restore(self, abstract_params: Any) -> Any:
    """The saved parameters (pytree of jax.ShapeDtypeStruct with shardings -> arrays). An unreadable
    record is moved aside and FileNotFoundError raised."""
    if self.step is None:
      raise FileNotFoundError(f"no best-params checkpoint in {self.directory}")
    self._manager.wait_until_finished()
    try:
      return self._manager.restore(self.step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params)))["params"]
    except Exception as e:
      self.discard(f"could not be restored ({type(e).__name__})")
      raise FileNotFoundError(f"the best-params checkpoint in {self.directory} could not be read "
                              "and was moved aside") from e

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
