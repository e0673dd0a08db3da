"""Checkpoints with orbax's CheckpointManager: train state (params, optimizer state, step, RNG) and the
data iterator's state, saved atomically (orbax writes to a temporary directory and renames it).

On restore the newest checkpoint is tried first; one that cannot be read, or whose arrays or data
state no longer match the checksums and digest saved with them (bytes damaged in place), is
reported, moved aside to WORKDIR/corrupt_checkpoints/ (never deleted, never overwritten), and the
previous one is used. When no checkpoint can be restored (more likely a different model than
damage) nothing is moved and `CheckpointError` says so.

In a multi-process run every process saves and restores its shards of the same checkpoint. A checksum
mismatch is seen alike by every process (the sums are global), so they fall back together and process 0
moves the checkpoint aside. A checkpoint that some process cannot read stops the run with one line
naming it (orbax's restore synchronises the processes, so a fallback taken by some of them would hang
the others); move it aside and rerun.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import shutil
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlab.digests import json_sha256
from jaxlab.train import distributed


CHECKSUMS_KEY = "_jaxlab_state_checksums"  # in the "data" item, next to the data iterator's state
DATA_DIGEST_KEY = "_jaxlab_data_digest"  # a digest of the rest of the "data" item
VANISHED_RETRIES = 3  # restore_latest lists the steps again when one was deleted while read
_VANISHED = object()


def _listed_retrying(list_steps, *, retry: bool = True):
  """list_steps() (orbax listing a checkpoint folder), again up to VANISHED_RETRIES times when a
  step is deleted while it lists them (FileNotFoundError; a training run beside a reader)."""
  for attempt in range(VANISHED_RETRIES + 1):
    try:
      return list_steps()
    except FileNotFoundError:
      if not retry or attempt == VANISHED_RETRIES:
        raise


class CheckpointError(RuntimeError):
  """No checkpoint in a workdir could be restored into the run's state."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, a folder made read-only); the ones committed
  before it are intact (orbax writes each into a temporary folder and renames it when whole)."""


def _os_cause(error: BaseException) -> Optional[str]:
  """The operating system's reason for an orbax/TensorStore write error ("No space left on device"),
  or None when the error is not the file system's (a bug or a misuse: raised as it is)."""
  if isinstance(error, OSError):
    return error.strerror or str(error)
  text = str(error)
  found = re.search(r"([A-Z][A-Za-z ]+?) \[os_error_code='?\d+'?\]", text)
  if found:
    return found.group(1)
  if text.startswith(("RESOURCE_EXHAUSTED", "PERMISSION_DENIED")):
    return (text.splitlines() or [""])[0][:200]
  return None


def _committed_steps(directory: pathlib.Path) -> list[int]:
  try:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  except OSError:
    return []


def _barriers(name: str) -> ocp.options.MultiprocessingOptions:
  """A manager's own prefix for orbax's cross-process barrier names. Without one, the background
  saves of WORKDIR/checkpoints and WORKDIR/best at the same step (a keep_best run evaluating where it
  checkpoints) met at one barrier name: a multi-process run stopped with "Barrier
  ThreadSaveMultiHostValueHolder:set_value_start is already ongoing" or hung there."""
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"jaxlab_{name}")


class _BackgroundSaves:
  """orbax saves in the background; a failure surfaces at the next save, wait or close. Here it
  becomes one CheckpointSaveError line (after which close() is quiet)."""

  _manager: ocp.CheckpointManager | None  # None: not open (nothing to wait for or close)
  _pending = None  # what the save not yet waited for writes (for the message)
  _failed = False

  def _failure_message(self, pending, cause: str) -> str:
    raise NotImplementedError

  def _save(self, pending, step: int, args) -> None:
    self.wait()  # a failure of the previous save stops here, named
    self._pending = pending
    try:
      self._manager.save(step, args=args, force=True)
    except Exception as e:  # orbax raises many types; its synchronous part can fail too
      self._save_failed(e)

  def wait(self) -> None:
    """Waits for the background save; CheckpointSaveError (one line) if it failed."""
    if self._manager is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._save_failed(e)
    self._pending = None

  def _save_failed(self, error: BaseException) -> None:
    """Called in an `except` block: the file system's errors become one line; others are raised
    as they are."""
    self._failed = True
    pending, self._pending = self._pending, None
    cause = _os_cause(error)
    if cause is None:
      raise error
    raise CheckpointSaveError(self._failure_message(pending, cause)) from None

  def close(self) -> None:
    """Waits for the last save (CheckpointSaveError if it failed) and closes."""
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        if self._manager is not None:
          self._manager.close()
      except Exception:
        if not self._failed:  # else: the failure was reported when it surfaced
          raise


class Checkpointer(_BackgroundSaves):
  """Saves and restores {"state": pytree of arrays, "data": JSON dict} under WORKDIR/checkpoints."""

  def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 3, create: bool = True):
    """create=False (eval / sample): a missing WORKDIR/checkpoints is not made (no steps)."""
    self.workdir = pathlib.Path(workdir)
    self.directory = self.workdir / "checkpoints"
    self._manager = _listed_retrying(lambda: ocp.CheckpointManager(
        self.directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                             multiprocessing_options=_barriers("checkpoints")),
        item_names=("state", "data")), retry=not create)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict) -> None:
    # A private copy: orbax writes the JSON in the background, after the caller may have changed
    # its own lists (the digest would then not match what was written).
    data_state = json.loads(json.dumps(data_state))
    data = {**data_state, DATA_DIGEST_KEY: data_digest(data_state),
            CHECKSUMS_KEY: state_checksums(state)}
    self._save(step, step, ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              data=ocp.args.JsonSave(data)))

  def _failure_message(self, step, cause: str) -> str:
    kept = [s for s in _committed_steps(self.directory) if step is None or s < step]
    return (f"checkpoint {step} could not be written in {self.directory} ({cause}); "
            + (f"the checkpoints before it are intact (steps {', '.join(map(str, kept))}): make "
               "room (or make the folder writable) and run the same command to resume from step "
               f"{kept[-1]}" if kept else "no checkpoint of this run was written: make room (or "
               "make the folder writable) and run the same command again"))

  def restore_latest(self, abstract_state: Any, *, move_aside: bool = True
                     ) -> Optional[tuple[int, Any, dict]]:
    """Returns (step, state, data_state) from the newest readable checkpoint, or None if there is none.

    `abstract_state`: pytree of jax.ShapeDtypeStruct with shardings (restored arrays land there).
    Unreadable newer checkpoints are moved into WORKDIR/corrupt_checkpoints/ once an older one has
    restored (training, which writes the next ones); move_aside=False (`jaxlab eval` / `sample`, which
    may run beside a training run that is writing or deleting checkpoints) only warns and changes
    nothing.
    """
    for attempt in range(VANISHED_RETRIES + 1):
      if attempt:  # a running training deleted a step while it was read: list again
        _listed_retrying(self._manager.reload)
      found = self._restore_newest(abstract_state, move_aside, retry=attempt < VANISHED_RETRIES)
      if found is not _VANISHED:
        return found
    raise AssertionError("unreachable")

  def _restore_newest(self, abstract_state: Any, move_aside: bool, *, retry: bool):
    """One pass of restore_latest over the steps listed now; _VANISHED (when `retry`) if no step
    restored and one of them was deleted while it was read (a training run's retention, beside
    `jaxlab eval` or `sample`): the caller lists the steps again."""
    failed = []  # (step, why) of the checkpoints newer than the one restored
    vanished = False
    for step in reversed(self.all_steps()):
      restored, error = self._read(step, abstract_state)
      if error is not None and jax.process_count() == 1 and self._step_path(step) is None:
        vanished = True  # deleted meanwhile, not damaged: never reported or moved
        continue
      if error is not None and jax.process_count() > 1:
        raise CheckpointError(
            f"checkpoint {self.directory / str(step)} could not be read in process "
            f"{jax.process_index()} ({error}); in a multi-process run this stops every process: "
            "move it aside (e.g. into WORKDIR/corrupt_checkpoints/) and run the same command again")
      if error is None:
        error = self._verify(restored)  # the same verdict in every process
      if error is None:
        for bad_step, why in failed:  # one line each (the move says where it went)
          if move_aside:
            self._quarantine(bad_step, why)
          elif distributed.is_primary():
            print(f"jaxlab: {self.directory / str(bad_step)} could not be read ({why}); left in "
                  f"place, read step {step}", flush=True)
        return step, restored["state"], restored["data"]
      failed.append((step, error))
    if vanished and retry:
      return _VANISHED
    if failed:
      raise CheckpointError(
          f"none of the checkpoints in {self.directory} (steps {', '.join(str(s) for s, _ in failed)})"
          f" could be restored into this run's state; newest: {failed[0][1]}. Nothing was moved: "
          "if they are damaged, move them away (or use a new --workdir) to start afresh"
          + (" (others were deleted while being read: is a training run writing this workdir?)"
             if vanished else ""))
    return None

  def read_data(self, step: int) -> Optional[dict]:
    """The data item of checkpoint `step` alone (no arrays are read), without the checksums and
    digest, or None when it cannot be read or does not match its digest."""
    try:
      with _quiet("orbax", "absl", "jax"):
        data = dict(self._manager.restore(
            step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"])
    except Exception:  # orbax raises many types for unreadable files
      return None
    _, damaged = _pop_saved_sums(data)
    return None if damaged else data

  def _read(self, step: int, abstract_state: Any) -> tuple[Optional[dict], Optional[str]]:
    """({"state", "data"}, None) for a checkpoint that orbax restores, else (None, why)."""
    try:
      with _quiet("orbax", "absl", "jax"):  # orbax logs each unreadable file at length
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable files
      message = (str(e).splitlines() or [""])[0].split(" See full TensorStore details")[0]
      return None, f"{type(e).__name__}: {message[:200]}"
    return {"state": restored["state"], "data": dict(restored["data"])}, None

  @staticmethod
  def _verify(restored: dict) -> Optional[str]:
    """None if the restored arrays and data state match the checksum and digest saved with them
    (popped from the data state), else why not."""
    saved, damaged = _pop_saved_sums(restored["data"])
    if damaged:
      return ("the saved data state (data-iterator state, recorded config) does not match its "
              "digest (damaged in place)")
    return None if saved is None else checksum_mismatch(saved, restored["state"], "state")

  def _step_path(self, step: int) -> Optional[pathlib.Path]:
    """The folder of checkpoint `step` (also an unfinished save's), or None if there is none."""
    source = self.directory / str(step)
    if source.exists():
      return source
    candidates = [p for p in self.directory.iterdir() if p.name.split("_")[-1] == str(step)] \
        if self.directory.is_dir() else []
    return candidates[0] if candidates else None

  def _quarantine(self, step: int, why: str) -> None:
    """Moves a bad checkpoint out of the manager's directory, keeping it for inspection."""
    self.wait()
    source = self._step_path(step)
    if source is not None and distributed.is_primary():
      _move_aside(source, self.workdir, f"could not be read ({why})")
    distributed.barrier(f"jaxlab_quarantine_{step}")
    self._manager.reload()


class _quiet:
  """Raises the named loggers to CRITICAL inside a `with` block."""

  def __init__(self, *names: str):
    self._loggers = [logging.getLogger(n) for n in names]

  def __enter__(self):
    self._levels = [lg.level for lg in self._loggers]
    for lg in self._loggers:
      lg.setLevel(logging.CRITICAL)

  def __exit__(self, *exc):
    for lg, level in zip(self._loggers, self._levels):
      lg.setLevel(level)


def _pop_saved_sums(data: dict) -> tuple[Optional[list], bool]:
  """Pops the state checksums and the digest from a restored data item: (the checksums, None if it
  was saved before they existed; whether the rest no longer matches its digest)."""
  checksums = data.pop(CHECKSUMS_KEY, None)
  saved_digest = data.pop(DATA_DIGEST_KEY, None)  # None: saved before digests existed
  return checksums, saved_digest is not None and saved_digest != data_digest(data)


def _summary(e: BaseException) -> str:
  """'Type: the first line of the message' (at most 200 characters), or 'Type' alone."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def data_digest(data_state: dict) -> str:
  """sha256 of the JSON data state (key order ignored; JSON round trips keep every value)."""
  return json_sha256(data_state)


def state_checksums(state: Any) -> list[int]:
  """One number per array of `state` (tree-leaf order): the sum of its elements' bit patterns as
  unsigned ints, mod 2**32. Exact (integer sums do not depend on order), so the same for any sharding;
  bytes changed on disk change it. jax.Arrays are summed where they live (one jitted reduction over the
  global arrays: only the sums reach the host, and in a multi-process run every process gets the global
  sums); other leaves (numpy arrays, Python numbers) on the host, with the same result."""
  leaves = jax.tree.leaves(state)
  sums = [None] * len(leaves)
  by_devices = {}  # one jitted call per set of devices (a jit cannot mix arrays committed to others)
  for i, leaf in enumerate(leaves):
    if isinstance(leaf, jax.Array) and _summable_on_device(leaf.dtype):
      by_devices.setdefault(frozenset(leaf.sharding.device_set), []).append(i)
    else:
      sums[i] = _bits_sum(np.asarray(leaf)) % 2**32
  for indices in by_devices.values():
    for i, total in zip(indices, _device_bits_sums([leaves[i] for i in indices])):
      sums[i] = int(np.asarray(total.addressable_data(0)))
  return sums


def _summable_on_device(dtype) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
              or dtype == jnp.bool_)


@jax.jit
def _device_bits_sums(arrays: list[jax.Array]) -> list[jax.Array]:
  """_bits_sum of each array mod 2**32, as uint32 scalars (uint32 addition wraps mod 2**32)."""
  sums = []
  for a in arrays:
    if a.dtype == bool:
      bits = a.astype(jnp.uint32)
    else:
      bits = jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{8 * a.dtype.itemsize}"))
      if a.dtype.itemsize == 8:  # a sum mod 2**32 needs only each element's low 32 bits
        bits = bits & 0xFFFFFFFF
    sums.append(jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32))
  return sums


def checksum_mismatch(saved: list[int], tree: Any, name: str) -> Optional[str]:
  """None if `tree`'s arrays match the `saved` state_checksums, else which array differs."""
  actual = state_checksums(tree)
  if len(saved) != len(actual):
    return f"{name} holds a different number of arrays than was saved"
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  for path, want, got in zip(paths, saved, actual):
    if want != got:
      return f"the bytes of {name}{path} differ from what was saved (checksum)"
  return None


def _bits_sum(a: np.ndarray) -> int:
  a = np.ascontiguousarray(a)
  return int(a.reshape(-1).view(f"u{a.dtype.itemsize}").sum(dtype=np.uint64)) if a.size else 0


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring sharded arrays."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


CORRUPT_DIR = "corrupt_checkpoints"  # damaged or unreadable checkpoints and records
SET_ASIDE_DIR = "set_aside_checkpoints"  # whole records that this run does not follow


def _move_aside(source: pathlib.Path, workdir: pathlib.Path, why: str,
                folder: str = CORRUPT_DIR) -> None:
  """Moves a checkpoint directory to WORKDIR/<folder>/ (kept for inspection, never deleted): damaged
  ones to corrupt_checkpoints/, intact ones that no longer apply to set_aside_checkpoints/. Where
  WORKDIR cannot be written (e.g. `jaxlab eval` on a read-only copy) it is left in place."""
  target_dir = workdir / folder
  target = target_dir / f"{source.name}.{time.time_ns()}"
  try:
    target_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
  except OSError as e:
    print(f"jaxlab: {source} {why}; left in place ({e.strerror or e})", flush=True)
    return
  print(f"jaxlab: {source} {why}; moved to {target}", flush=True)


_BEST_WRITTEN_BY = ("a run with config.train.keep_best=True writes one at each evaluation that "
                    "lowers the validation loss")


def best_entries(workdir: str | pathlib.Path) -> list[str]:
  """The names in WORKDIR/best, sorted ([] when it is absent or empty): a best-params record, one
  being written, or nothing (jaxlab before 2026-12-05 left an empty best/ after moving a record
  aside)."""
  directory = pathlib.Path(workdir) / "best"
  return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


class BestParams(_BackgroundSaves):
  """The parameters with the lowest validation loss so far, under WORKDIR/best (one orbax checkpoint,
  written atomically like the others): model selection on validation data, as the density papers do.
  Training never reads it, so a run with or without it follows the same steps.

  `fingerprint` names the run's model/data/optimizer config: a record saved under another one (or one
  that cannot be read) is moved aside rather than trusted or deleted: to WORKDIR/set_aside_checkpoints/
  when intact, to WORKDIR/corrupt_checkpoints/ when damaged.
  `also_accept`: fingerprints of the same config written otherwise (e.g. the workdir's config.json
  with a data path saved as typed, before paths were made absolute).

  create=False (eval / sample) reads only: a record that cannot be used raises FileNotFoundError and
  stays where it is (a training run may be replacing it at that moment; moving it aside took a valid
  record away from that run).

  The record's directory number is a slot, not the training step (that is in its metadata): a new
  record takes a slot above the last one, and orbax removes the old one only after the new one is
  committed, so a kill at any moment leaves one whole record.
  """

  def __init__(self, workdir: str | pathlib.Path, *, fingerprint: str = "", create: bool = True,
               also_accept: tuple = ()):
    self.workdir = pathlib.Path(workdir)
    self.directory = self.workdir / "best"
    self.fingerprint = fingerprint
    self._read_only = not create
    self.step, self.val_loss = None, float("inf")
    # The first step whose evaluation the record saw, when it started after the run's first
    # evaluations (see trainer._best_record_starts_late); None: it saw all of them.
    self.covers_from = None
    self._checksums = None
    self._slot = None  # the orbax step number the record is saved under
    if not create and not self.directory.is_dir():
      raise FileNotFoundError(f"no best-params checkpoint in {self.directory} ({_BEST_WRITTEN_BY})")
    self._open()
    try:
      slot = self._manager.latest_step()
      if slot is None:
        return
      try:
        meta = dict(self._manager.restore(
            slot, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        saved_digest = meta.pop(DATA_DIGEST_KEY, None)  # None: saved before 2026-12-05
        damaged = saved_digest is not None and saved_digest != data_digest(meta)
        saved_step, saved_loss = int(meta["step"]), float(meta["val_loss"])
        saved_fingerprint = meta.get("fingerprint", "")
        self._checksums = meta.get(CHECKSUMS_KEY)  # None: saved before checksums existed
        covers_from = meta.get("covers_from")
      except Exception as e:  # orbax raises many types for unreadable files
        self.discard(f"is unreadable ({_summary(e)})")
        return
      if damaged:  # e.g. a val_loss edited in place: trusted, it would choose the parameters reported
        self.discard("has a step or validation loss that does not match its digest (damaged in "
                     "place)")
        return
      if fingerprint and saved_fingerprint not in (fingerprint, *filter(None, also_accept)):
        self.discard("was saved under a different model/data/optimizer config", damaged=False)
        return
      self.step, self.val_loss, self._slot = saved_step, saved_loss, slot
      self.covers_from = covers_from if isinstance(covers_from, int) else None
    except FileNotFoundError:  # read-only: the record was refused (and left as it is)
      self._manager.close()
      raise

  def _open(self) -> None:
    self._manager = ocp.CheckpointManager(
        self.directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             multiprocessing_options=_barriers("best")),
        item_names=("params", "meta"))

  def discard(self, why: str, *, damaged: bool = True) -> None:
    """Moves the saved record aside (see the class docstring) and starts with none (WORKDIR/best is
    made again by the next record, not before: an empty one would look like a record to come);
    read-only, raises FileNotFoundError instead and changes nothing. damaged=False: an intact
    record that does not belong to this run goes to set_aside_checkpoints/, not corrupt_checkpoints/."""
    if self._read_only:
      raise FileNotFoundError(f"the best-params record in {self.directory} {why}; nothing was "
                              "changed (a jaxlab train of this workdir moves such a record aside)")
    self.wait()
    if self._manager is not None:  # None: discarded before (and no record since)
      self._manager.close()
    if self.directory.exists() and distributed.is_primary():
      _move_aside(self.directory, self.workdir, why, CORRUPT_DIR if damaged else SET_ASIDE_DIR)
    distributed.barrier("jaxlab_best_discard")
    self.step, self.val_loss, self._slot = None, float("inf"), None
    self.covers_from = None
    self._manager = None

  def offer(self, step: int, val_loss: float, params: Any) -> bool:
    """Saves `params` if `val_loss` beats the best so far; returns whether it did. A step evaluated
    again after a resume replaces its own earlier record, which is kept until the new one is
    committed."""
    if not val_loss < self.val_loss:
      return False
    # The slot is the step itself when it is past the last slot (directory names read as steps),
    # else the next free number: saving under an existing or a lower number would delete first or
    # have orbax drop the new record as the oldest.
    slot = step if self._slot is None or step > self._slot else self._slot + 1
    if self._manager is None:  # discarded: the first record since makes WORKDIR/best again
      self._open()
    meta = {"step": step, "val_loss": val_loss, "fingerprint": self.fingerprint,
            CHECKSUMS_KEY: state_checksums(params),
            **({} if self.covers_from is None else {"covers_from": self.covers_from})}
    self._save((step, self._slot is not None), slot, ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({**meta, DATA_DIGEST_KEY: data_digest(meta)})))
    self.step, self.val_loss, self._slot = step, val_loss, slot
    self._checksums = None  # just written: not re-read in this process
    return True

  def restore(self, abstract_params: Any) -> Any:
    """The saved parameters (pytree of jax.ShapeDtypeStruct with shardings -> arrays). An unreadable
    record is moved aside (read-only: left where it is) and FileNotFoundError raised."""
    if self.step is None:
      raise FileNotFoundError(f"no best-params checkpoint in {self.directory} ({_BEST_WRITTEN_BY})")
    self.wait()
    try:
      with _quiet("orbax", "absl", "jax"):
        params = self._manager.restore(self._slot, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]
    except Exception as e:
      self.discard(f"could not be restored ({_summary(e)})")
      raise FileNotFoundError(f"the best-params checkpoint in {self.directory} could not be read "
                              "and was moved aside") from e
    mismatch = self._checksums and checksum_mismatch(self._checksums, params, "params")
    if mismatch:
      self.discard(f"is damaged: {mismatch}")
      raise FileNotFoundError(f"the best-params checkpoint in {self.directory} was damaged (its "
                              "checksums do not match) and was moved aside")
    return params

  def _failure_message(self, pending, cause: str) -> str:
    step, had_record = pending if pending is not None else (None, False)
    return (f"the best-params record of step {step} could not be written in {self.directory} "
            f"({cause}); " + ("the record before it is intact" if had_record else
                              "there was no earlier record") +
            ": make room (or make the folder writable) and run the same command to resume")
