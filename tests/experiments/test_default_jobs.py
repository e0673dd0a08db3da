"""experiments/default_jobs.py --quick runs `jaxlab train` in a fresh process and reads back its
metrics and its final report."""

import json
import math

import pytest


def test_quick_run_of_the_default_job_reads_its_metrics_and_sample(tmp_path, experiment):
  script = experiment("default_jobs")
  script.main(["--quick", "--jobs", "lm", "--out", str(tmp_path)])
  out = json.loads((tmp_path / "default_jobs_quick.json").read_text())
  (row,) = out["rows"]
  assert row["job"] == "lm" and row["steps"] == 6
  # byte-level: ln 256 = 5.55 nats at the start; 6 steps already learn the byte frequencies
  assert math.isfinite(row["val_loss"]) and row["val_loss"] < 5.0, row["val_loss"]
  assert row["step_time_ms"] > 0 and row["wall_s"] > 0
  assert row["report"].startswith(f"jaxlab: step 6: val_loss {row['val_loss']:.4f}")
  assert "jaxlab: sample" in row["report"] and "zero_shot_accuracy" not in row
  table = (tmp_path / "default_jobs_quick.md").read_text()
  assert out["device"] in table and f"| 6 | {row['val_loss']:.4f} | - | - |" in table


def test_the_contrastive_row_reads_both_zero_shot_accuracies(experiment, monkeypatch, tmp_path):
  """The two accuracies are read from the report by their own names (a pattern for one matched the
  other's line) and shown in their own columns."""
  import subprocess
  script = experiment("default_jobs")
  report = ("jaxlab: step 600: val_loss 3.3000, 30.0 ms/step\n"
            "jaxlab: zero-shot on 360 held-out digits images (10 classes)\n"
            "  zero_shot_accuracy       0.8220\n"
            "  zero_shot_accuracy_unseen_prompts 0.4170\n")
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, report, ""))
  (tmp_path / "metrics.jsonl").write_text('{"step": 600, "val_loss": 3.3, "step_time_ms": 30.0}\n')
  row = script.run_job("contrastive_digits", tmp_path, [])
  assert (row["zero_shot_accuracy"], row["zero_shot_accuracy_unseen_prompts"]) == (0.822, 0.417)
  table = script.render({"quick": False, "device": "d", "command": "c", "rows": [row]})
  assert "| 600 | 3.3000 | 0.822 | 0.417 | 30.0 |" in table


def test_unknown_jobs_are_refused_by_name(experiment):
  with pytest.raises(SystemExit):
    experiment("default_jobs").main(["--jobs", "lm,imagenet"])
