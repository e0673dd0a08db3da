"""Metrics sinks: WORKDIR/metrics.jsonl (one JSON object per line, always with "step") and TensorBoard
event files (readable by `tensorboard --logdir WORKDIR`)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import time


class MetricsWriter:

  """`enabled=False` writes nothing (the processes other than 0 of a multi-process run). A run resumed
  from the checkpoint at `resume_step` first drops what a killed run wrote after it (metrics.jsonl
  records; TensorBoard purges those steps), so both hold one history."""

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True, enabled: bool = True,
               resume_step: int | None = None):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self._tb = None
    if resume_step is not None:
      self.drop_after(resume_step)
    if tensorboard and enabled:
      self._tb = _EventFile(pathlib.Path(workdir) / "tensorboard",
                            purge_step=None if resume_step is None else resume_step + 1)

  def drop_after(self, step: int) -> None:
    """Removes the records after `step` (a run resumed from the checkpoint at `step` writes them
    again), so metrics.jsonl holds one history. Replaces the file atomically."""
    if not self.enabled or not self.path.exists():
      return
    text = self.path.read_text()
    records = _parse_records(text)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) == len(records) and (not text or text.endswith("\n")):
      return  # (a line cut short by a kill is dropped too: the next record would be glued to it)
    write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

  def write(self, step: int, **scalars: float) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    for k, v in scalars.items():
      v = float(v)
      record[k] = v if math.isfinite(v) else str(v)
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      self._tb.write_scalars(int(step), {k: float(v) for k, v in scalars.items()})

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _EventFile:
  """A TensorBoard event file written synchronously: each record is on disk when `write_scalars`
  returns, as its metrics.jsonl line is. (tensorboardX's SummaryWriter hands events to a background
  thread that writes them within 120 s: a run killed after a checkpoint lost the records of the steps
  before it from TensorBoard, and the resumed run does not write those again.) purge_step: TensorBoard
  hides the events of earlier files from that step on (a resumed run's SessionLog.START)."""

  def __init__(self, logdir: pathlib.Path, *, purge_step: int | None):
    # tensorboardX (imported lazily: optional for library users) for the event protos and the
    # TFRecord framing; its EventsWriter writes and flushes in the calling thread.
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import scalar
    logdir.mkdir(parents=True, exist_ok=True)
    self._pb, self._scalar = event_pb2, scalar
    # The name ends in the nanosecond clock: two files opened in one second (EventsWriter names
    # them by the second and the host) would be one file, the second truncating the first.
    self._writer = EventsWriter(str(logdir / "events"), f".{time.time_ns()}")
    if purge_step is not None:
      self._writer.write_event(event_pb2.Event(
          wall_time=time.time(), step=purge_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._writer.flush()

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    for tag, value in scalars.items():
      self._writer.write_event(self._pb.Event(wall_time=time.time(), step=step,
                                              summary=self._scalar(tag, value)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl in order; a line cut short (a killed run), or any line
  that is not a record as MetricsWriter writes them, is skipped."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return _parse_records(path.read_text()) if path.exists() else []


def median_step_time_ms(workdir: str | pathlib.Path) -> float | None:
  """The median of a run's logged `step_time_ms` (each a logging interval's median; the trainer's
  final record holds the last interval's alone); None if none was logged."""
  import statistics
  times = [r["step_time_ms"] for r in read_metrics(workdir)
           if isinstance(r.get("step_time_ms"), (int, float))]
  return statistics.median(times) if times else None


def _parse_records(text: str) -> list[dict]:
  """The lines that are records as MetricsWriter writes them: a JSON object with an int "step"
  and number values (a line cut short by a kill, or any other text, e.g. `123`, {"step": "abc"} or
  {"step": 5, "val_loss": null}, is skipped)."""
  records = []
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    step = record.get("step") if isinstance(record, dict) else None
    if isinstance(step, int) and not isinstance(step, bool) and all(
        _is_value(v) for k, v in record.items() if k != "step"):
      records.append(record)
  return records


def _is_value(v) -> bool:
  """A value as MetricsWriter writes it: a number, or "nan" / "inf" / "-inf" for a non-finite one."""
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) or v in ("nan", "inf", "-inf")


def write_atomically(path: pathlib.Path, text: str) -> None:
  """Writes a run file so that readers see the old file or the new one, never a part (a kill
  mid-write loses nothing)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
