"""`jaxlab bench`: times the very train step that `jaxlab train` runs (same batches, same numbers),
reports compile time, step time, throughput and memory, and leaves nothing behind."""

import json
import pathlib

import jax
import numpy as np

from jaxlab import cli
from jaxlab.configs import load_config
from jaxlab.train import bench, trainer
from jaxlab.train.metrics import read_metrics


def test_bench_runs_the_train_step_and_leaves_nothing_behind(tiny_cli_overrides, tmp_path,
                                                             monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  workdirs = []  # where the benchmark built its run
  setup = trainer.setup
  monkeypatch.setattr(trainer, "setup", lambda config, workdir, **kw: (
      workdirs.append(pathlib.Path(workdir)), setup(config, workdir, **kw))[1])
  overrides = tiny_cli_overrides + ["--config.train.steps=5"]  # the schedule's length
  assert cli.main(["bench", "lm_char", *overrides, "--steps", "3", "--warmup", "2", "--json"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["config"] == "lm_char" and result["devices"] == 8
  assert 0 < result["step_ms_p10"] <= result["step_ms"] <= result["step_ms_p90"]
  assert result["compile_s"] > 0 and result["batch_ms"] > 0 and result["temp_mib"] > 0
  assert np.isclose(result["tokens_per_sec"], 8 * 16 / (result["step_ms"] / 1000))  # batch 8 x 16
  assert len(workdirs) == 1 and not workdirs[0].exists()  # its temporary workdir is gone
  assert list(tmp_path.iterdir()) == []  # and nothing was written here (no runs/)
  monkeypatch.setattr(trainer, "setup", setup)

  # The same config trained for 2 + 3 steps: its loss at step 5 is the benchmark's last loss, and its
  # parameter count the benchmark's.
  config = load_config("lm_char", overrides + ["--config.train.log_every=1"])
  final = trainer.train(config, tmp_path / "run", progress=False)
  losses = {m["step"]: m["train_loss"] for m in read_metrics(tmp_path / "run") if "train_loss" in m}
  assert result["final_loss"] == losses[5]
  params = final["state"]["params"]
  assert result["parameters"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  table = bench.format_table("lm_char", result)
  assert "jaxlab bench: lm_char on 8 devices" in table and "tokens/s" in table
  assert f"{result['step_ms']:.2f} ms median" in table


def test_bench_flags_are_checked_first(capsys):
  assert cli.main(["bench", "lm_char", "--steps", "0"]) == 2
  assert "--steps must be >= 1" in capsys.readouterr().err
  assert cli.main(["bench", "lm_char", "--config.model.width=-3"]) == 2
  assert "config.model.width" in capsys.readouterr().err


def test_the_step_time_excludes_data_loading(tiny_cli_overrides, monkeypatch):
  """Reading a batch takes 0.25 s here: batch_ms shows it and step_ms does not (the table says
  "data loading excluded"; a clock started before the read passed the test above)."""
  import time
  from jaxlab.train.lm_task import LMTask
  make_iterator = LMTask.train_iterator

  def slow_iterator(task):
    for batch in make_iterator(task):
      time.sleep(0.25)
      yield batch

  monkeypatch.setattr(LMTask, "train_iterator", slow_iterator)
  config = load_config("lm_char", tiny_cli_overrides + ["--config.train.steps=4"])
  result = bench.benchmark(config, steps=2, warmup=1)
  assert result["batch_ms"] >= 250 and result["step_ms"] < 250, result
