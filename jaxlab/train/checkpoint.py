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
