"""Checkpoints with orbax's CheckpointManager: train state (params, optimizer state, step, RNG) and the
data iterator's state, saved atomically (orbax writes to a temporary directory and renames it).

On restore the newest checkpoint is tried first; one that cannot be read is reported, moved aside to
WORKDIR/corrupt_checkpoints/ (never deleted, never overwritten), and the previous one is used.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

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
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=ocp.args.JsonRestore()))
        return step, restored["state"], dict(restored["data"])
      except Exception as e:  # orbax raises many types for unreadable files
        message = str(e).splitlines()[0] if str(e) else ""
        log.warning("checkpoint at step %d is unreadable (%s: %s); trying the previous one",
                    step, type(e).__name__, message[:200])
        self._quarantine(step)
    return None

  def _quarantine(self, step: int) -> None:
    """Moves a bad checkpoint out of the manager's directory, keeping it for inspection."""
    self.wait()
    source = self.directory / str(step)
    if not source.exists():
      candidates = [p for p in self.directory.iterdir() if p.name.split("_")[-1] == str(step)]
      if not candidates:
        return
      source = candidates[0]
    target_dir = self.workdir / "corrupt_checkpoints"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{source.name}.{int(time.time())}"
    shutil.move(str(source), str(target))
    print(f"jaxlab: checkpoint {source} could not be read; moved to {target}", flush=True)
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring sharded arrays."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


class BestParams:
  """The parameters with the lowest validation loss so far, under WORKDIR/best (one orbax checkpoint,
  written atomically like the others): model selection on validation data, as the density papers do.
  Training never reads it, so a run with or without it follows the same steps."""

  def __init__(self, workdir: str | pathlib.Path):
    self.directory = pathlib.Path(workdir) / "best"
    self._manager = ocp.CheckpointManager(
        self.directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        item_names=("params", "meta"))
    self.step, self.val_loss = None, float("inf")
    step = self._manager.latest_step()
    if step is not None:
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        self.step, self.val_loss = int(meta["step"]), float(meta["val_loss"])
      except Exception as e:  # an unreadable best is reported and then beaten by the next evaluation
        log.warning("best-params checkpoint at step %d is unreadable (%s); ignoring it", step,
                    type(e).__name__)

  def offer(self, step: int, val_loss: float, params: Any) -> bool:
    """Saves `params` if `val_loss` beats the best so far; returns whether it did."""
    if not val_loss < self.val_loss:
      return False
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({"step": step, "val_loss": val_loss})), force=True)
    self.step, self.val_loss = step, val_loss
    return True

  def restore(self, abstract_params: Any) -> Any:
    """The saved parameters (pytree of jax.ShapeDtypeStruct with shardings -> arrays)."""
    if self.step is None:
      raise FileNotFoundError(f"no best-params checkpoint in {self.directory}")
    self._manager.wait_until_finished()
    return self._manager.restore(self.step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))["params"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
