"""A run interrupted and resumed gives the same losses and parameters as a straight run; a corrupt newest
checkpoint is reported, kept aside, and the previous one is used."""

import json

import jax
import numpy as np

from jaxlab.train import trainer
from jaxlab.train.metrics import read_metrics


def _train_losses(workdir):
  by_step = {}
  for m in read_metrics(workdir):  # a resumed run appends; the last record of a step wins
    if "train_loss" in m:
      by_step[m["step"]] = m["train_loss"]
  return [by_step[s] for s in sorted(by_step)]


def _params(result):
  return jax.device_get(result["state"]["params"])


def test_resume_gives_identical_losses_and_params(tiny_lm_config, tmp_path):
  common = ["--config.train.log_every=1", "--config.train.checkpoint_every=10",
            "--config.model.dropout=0.1"]  # dropout makes the RNG part of what must resume
  straight = trainer.train(tiny_lm_config(*common, "--config.train.steps=20"), tmp_path / "a",
                           progress=False)
  # First half: the same 20-step run, stopped right after its checkpoint at step 10 (as if killed);
  # then a new run with fresh objects resumes from the workdir.
  assert _run_until(tiny_lm_config(*common, "--config.train.steps=20"), tmp_path / "b",
                    stop_after=10) == 10
  resumed = trainer.train(tiny_lm_config(*common, "--config.train.steps=20"), tmp_path / "b",
                          progress=False)
  assert _train_losses(tmp_path / "a") == _train_losses(tmp_path / "b")
  jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))


def _run_until(config, workdir, stop_after):
  """Trains with fresh objects and stops (like a kill) right after the checkpoint at `stop_after`."""
  from jaxlab.train import checkpoint as ckpt

  original_save = ckpt.Checkpointer.save

  class Stop(Exception):
    pass

  def save_then_stop(self, step, state, data_state, **kw):
    original_save(self, step, state, data_state, **kw)
    if step == stop_after:
      self.wait()
      raise Stop

  ckpt.Checkpointer.save = save_then_stop
  try:
    trainer.train(config, workdir, progress=False)
  except Stop:
    return stop_after
  finally:
    ckpt.Checkpointer.save = original_save
  return None


def test_corrupt_latest_checkpoint_falls_back_to_previous(tiny_lm_config, tmp_path, capsys):
  config = tiny_lm_config("--config.train.steps=6", "--config.train.checkpoint_every=3")
  trainer.train(config, tmp_path, progress=False)
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["3", "6"]
  # Truncate every data file of the newest checkpoint's state.
  damaged = 0
  for f in (ckpt_dir / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
      damaged += 1
  assert damaged
  run = trainer.setup(config, tmp_path)
  step, state, data_state = run.checkpointer.restore_latest(run.abstract_state)
  run.checkpointer.close()
  assert step == 3 and int(state["step"]) == 3
  assert data_state  # the iterator position came back too
  assert "could not be read" in capsys.readouterr().out
  kept = list((tmp_path / "corrupt_checkpoints").iterdir())
  assert len(kept) == 1 and kept[0].name.startswith("6.")
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["3"]


def test_run_files_written(tiny_lm_config, tmp_path):
  trainer.train(tiny_lm_config(), tmp_path, progress=False)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["width"] == 32
  records = read_metrics(tmp_path)
  assert all("step" in r for r in records)
  assert any("val_loss" in r for r in records)
  timing = [r for r in records if "step_time_ms" in r]
  assert timing and all(r["step_time_ms"] > 0 and r["tokens_per_sec"] > 0 for r in timing)


def test_read_metrics_skips_a_line_cut_short_by_a_kill(tmp_path):
  from jaxlab.train.metrics import MetricsWriter
  writer = MetricsWriter(tmp_path, tensorboard=False)
  writer.write(1, train_loss=2.0)
  writer.write(2, train_loss=1.5)
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 3, "train_lo')  # the process died mid-write
  assert read_metrics(tmp_path) == [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}]


def test_resuming_with_a_different_model_is_refused_and_changes_nothing(tiny_lm_config, tmp_path):
  import pytest
  trainer.train(tiny_lm_config(), tmp_path, progress=False)
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
  with pytest.raises(ValueError, match="config.model.width=32"):
    trainer.train(tiny_lm_config("--config.model.width=64"), tmp_path, progress=False)
  after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
  assert before == after
  assert not (tmp_path / "corrupt_checkpoints").exists()
