"""Metrics sinks: TensorBoard event files hold the same scalars as metrics.jsonl; only the writing
process writes."""

import pathlib
import struct

from jaxlab.train.metrics import MetricsWriter, median_step_time_ms, read_metrics


def _tensorboard_scalars(workdir) -> list[tuple]:
  """(step, tag, value) from the TFRecord event files (length, crc, Event proto, crc)."""
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted((pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
      i += 12 + n + 4
  return out


def test_tensorboard_events_match_metrics_jsonl(tmp_path):
  writer = MetricsWriter(tmp_path, tensorboard=True)
  writer.write(3, train_loss=1.5, val_loss=2.0)
  writer.write(6, train_loss=1.25)
  writer.close()
  assert _tensorboard_scalars(tmp_path) == [(3, "train_loss", 1.5), (3, "val_loss", 2.0),
                                            (6, "train_loss", 1.25)]
  assert read_metrics(tmp_path) == [{"step": 3, "train_loss": 1.5, "val_loss": 2.0},
                                    {"step": 6, "train_loss": 1.25}]


def test_a_disabled_writer_writes_nothing(tmp_path):
  writer = MetricsWriter(tmp_path, tensorboard=True, enabled=False)
  writer.write(1, train_loss=1.0)
  writer.drop_after(0)
  writer.close()
  assert list(tmp_path.iterdir()) == []


def test_median_step_time_is_over_every_logged_interval(tmp_path):
  """Not the last interval's alone (the final record), which the experiments once reported."""
  assert median_step_time_ms(tmp_path) is None
  w = MetricsWriter(tmp_path, tensorboard=False)
  for step, ms in ((10, 30.0), (20, 10.0), (30, 20.0), (40, 50.0)):
    w.write(step, train_loss=1.0, step_time_ms=ms)
  w.write(40, val_loss=2.0)
  w.close()
  assert median_step_time_ms(tmp_path) == 25.0


def test_a_fresh_start_hides_an_earlier_runs_tensorboard_events(tmp_path):
  """A run that died before its first checkpoint, then started again from step 0 in the same workdir:
  metrics.jsonl loses its records and TensorBoard is told to purge its events from step 1 on (it was
  told nothing, so both histories showed)."""
  from tensorboardX.proto import event_pb2
  first = MetricsWriter(tmp_path, tensorboard=True)
  first.write(3, train_loss=1.5)
  first.close()
  again = MetricsWriter(tmp_path, tensorboard=True, resume_step=0)
  again.write(3, train_loss=1.25)
  again.close()
  assert read_metrics(tmp_path) == [{"step": 3, "train_loss": 1.25}]
  starts = []
  for path in sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      if event.session_log.status == event_pb2.SessionLog.START:
        starts.append(event.step)
      i += 12 + n + 4
  assert starts == [1]


def test_lines_that_are_json_but_not_records_are_skipped(tmp_path):
  """`123` or {"step": "abc"} appended to metrics.jsonl crashed resuming (drop_after) and
  `jaxlab sample` (logged_val_loss) with a traceback; they are skipped like any other non-record."""
  w = MetricsWriter(tmp_path, tensorboard=False)
  w.write(5, train_loss=1.0)
  w.write(10, train_loss=0.5)
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('123\n[1, 2]\nnull\n{"step": "abc"}\n{"step": true}\n{"loss": 1}\n'
            '{"step": 10, "val_loss": null}\n{"step": 10, "step_time_ms": "x"}\n')
  assert read_metrics(tmp_path) == [{"step": 5, "train_loss": 1.0}, {"step": 10, "train_loss": 0.5}]
  assert median_step_time_ms(tmp_path) is None
  MetricsWriter(tmp_path, tensorboard=False, resume_step=5).close()
  assert read_metrics(tmp_path) == [{"step": 5, "train_loss": 1.0}]


def test_a_killed_process_loses_no_tensorboard_record(tmp_path):
  """A record is in the event file when write() returns, as its metrics.jsonl line is: tensorboardX's
  SummaryWriter queued events for a background thread, and a kill after a checkpoint lost records
  from before it, which the resumed run does not write again."""
  import subprocess
  import sys
  code = ("import os, sys; from jaxlab.train.metrics import MetricsWriter; "
          "w = MetricsWriter(sys.argv[1]); w.write(5, train_loss=1.0); w.write(10, train_loss=0.5); "
          "os._exit(9)")
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False, timeout=120)
  assert read_metrics(tmp_path) == [{"step": 5, "train_loss": 1.0}, {"step": 10, "train_loss": 0.5}]
  assert _tensorboard_scalars(tmp_path) == [(5, "train_loss", 1.0), (10, "train_loss", 0.5)]


def test_two_writers_opened_in_one_second_keep_both_files(tmp_path):
  """Event files were named by the second and host alone: a second writer truncated the first's."""
  for step in (1, 2):
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write(step, train_loss=float(step))
    writer.close()
  assert sorted(_tensorboard_scalars(tmp_path)) == [(1, "train_loss", 1.0), (2, "train_loss", 2.0)]
