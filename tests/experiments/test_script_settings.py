"""The experiment scripts record the settings they actually ran with: lm_char_cpu's short runs get a
valid schedule that the PyTorch reference follows, and each script's results name the actual command
(and --out keeps smoke runs away from experiments/results). Nothing is trained here: the slow parts
(training, kernels) are replaced by stand-ins."""

import json
import math
import pathlib
import platform
import sys
import types

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"


@pytest.fixture
def data(tmp_path):
  path = tmp_path / "input.txt"
  path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
  return path


@pytest.fixture
def lm_char_cpu(experiment, monkeypatch):
  monkeypatch.syspath_prepend(str(EXPERIMENTS))  # it imports nanogpt_reference
  return experiment("lm_char_cpu")


@pytest.fixture
def torch_reference(experiment, monkeypatch):
  """experiments/torch_reference_gpt.py imported with a stand-in `torch` (only lr_at is used)."""
  torch = types.ModuleType("torch")
  torch.nn = types.ModuleType("torch.nn")
  torch.nn.Module = object
  torch.nn.functional = types.ModuleType("torch.nn.functional")
  for name, module in (("torch", torch), ("torch.nn", torch.nn),
                       ("torch.nn.functional", torch.nn.functional)):
    monkeypatch.setitem(sys.modules, name, module)
  return experiment("torch_reference_gpt")


@pytest.mark.parametrize("steps", [2, 10, 40, 100])
def test_lm_char_cpu_short_runs_build_a_valid_config(lm_char_cpu, data, steps):
  config = lm_char_cpu.run_config(str(data), steps, [])  # validated: warmup < steps
  assert config.train.steps == steps and 1 <= config.optim.warmup_steps < steps
  assert config.optim.warmup_steps == max(1, round(100 * steps / 2000))


def test_lm_char_cpu_default_run_keeps_its_config(lm_char_cpu, data):
  assert not any("warmup" in o for o in lm_char_cpu.config_overrides(str(data), 2000, 0, []))
  settings = lm_char_cpu.torch_settings(lm_char_cpu.run_config(str(data), 2000, []))
  assert settings == {"steps": 2000, "warmup": 100, "lr": 1e-3, "min_lr": 1e-4, "eval_batches": 200}


@pytest.mark.parametrize("steps", [40, 2000])
def test_torch_reference_schedule_is_jaxlabs(lm_char_cpu, torch_reference, data, steps):
  from jaxlab.train.optim import learning_rate_schedule
  config = lm_char_cpu.run_config(str(data), steps, [])
  settings = lm_char_cpu.torch_settings(config)
  schedule = learning_rate_schedule(config.optim, config.train.steps)
  for step in sorted({0, 1, settings["warmup"] - 1, settings["warmup"], steps // 2, steps - 1}):
    want = float(schedule(step))
    got = torch_reference.lr_at(step, settings["lr"], settings["min_lr"], settings["warmup"],
                                settings["steps"])
    assert got == pytest.approx(want, rel=1e-5, abs=1e-9), step
  # ... and those are the arguments the reference is started with.
  command = lm_char_cpu.torch_command("python", str(data), 3, settings)
  for flag in (f"--steps={steps}", f"--warmup={settings['warmup']}", "--lr=0.001", "--min_lr=0.0001",
               "--eval_batches=200", "3"):
    assert flag in command


def _fake_jaxlab_run(steps, seed):
  return {"impl": "jaxlab", "steps": steps, "seed": seed, "val_loss": 2.5, "val_loss_all_windows": 2.6,
          "ms_per_step": 30.0, "wall_s": 1.0, "val_curve": {str(steps): 2.5}}


def test_lm_char_cpu_writes_the_actual_settings_to_out(lm_char_cpu, data, tmp_path, monkeypatch):
  started = []
  monkeypatch.setattr(lm_char_cpu, "run_jaxlab", lambda data, steps, seed, overrides: (
      started.append(("jaxlab", steps, overrides)) or _fake_jaxlab_run(steps, seed)))
  monkeypatch.setattr(lm_char_cpu, "run_torch", lambda python, data, seed, settings: (
      started.append(("torch", python, settings)) and None))  # as without torch
  out = tmp_path / "out"
  lm_char_cpu.main(["--data", str(data), "--steps", "10", "--torch-python", "/no/torch/python",
                    "--override=--config.train.eval_batches=7", "--out", str(out)])
  assert started[0] == ("jaxlab", 10, ["--config.train.eval_batches=7"])
  assert started[1] == ("torch", "/no/torch/python", {"steps": 10, "warmup": 1, "lr": 1e-3,
                                                      "min_lr": 1e-4, "eval_batches": 7})
  md = (out / "lm_char_cpu.md").read_text()
  assert "mean over 7 validation batches" in md and "val loss @ 10 (7 batches)" in md
  assert "200 validation" not in md and "(200 batches)" not in md and "did not run" in md
  command = json.loads((out / "lm_char_cpu.json").read_text())["command"]
  assert f"Command: `{command}`" in md
  assert command == (f"python experiments/lm_char_cpu.py --data {data} --steps 10 --seeds 0 "
                     f"--override=--config.train.eval_batches=7 --out {out}")  # no --torch-python
  # When the reference runs, its interpreter is part of the command.
  monkeypatch.setattr(lm_char_cpu, "run_torch", lambda python, data, seed, settings: {
      "impl": "pytorch", "torch": "x", "seed": seed, "val_loss": 2.4, "ms_per_step": 20.0})
  lm_char_cpu.main(["--data", str(data), "--steps", "10", "--torch-python", "/opt/py", "--out", str(out)])
  md = (out / "lm_char_cpu.md").read_text()
  assert "--torch-python /opt/py" in md and "did not run" not in md and "(200 batches)" in md


def test_lm_char_cpu_means_and_speed_ratio_on_hand_made_runs(lm_char_cpu):
  """Two seeds per implementation with different numbers: the mean rows and the ratio of the means
  (the ratio inverted, or the first seed's number as the mean, passed the test above)."""
  runs = [dict(_fake_jaxlab_run(10, 0), val_loss=2.5, ms_per_step=30.0),
          dict(_fake_jaxlab_run(10, 1), val_loss=2.7, ms_per_step=34.0),
          {"impl": "pytorch", "torch": "x", "seed": 0, "val_loss": 2.4, "ms_per_step": 20.0},
          {"impl": "pytorch", "torch": "x", "seed": 1, "val_loss": 2.6, "ms_per_step": 24.0}]
  settings = {"steps": 10, "warmup": 1, "lr": 1e-3, "min_lr": 1e-4, "eval_batches": 7}
  md = lm_char_cpu.render(runs, "a CPU", "cmd", settings)
  assert "| jaxlab mean of 2 | | 2.6000 | 2.6000 | 32.0 |" in md
  assert "| PyTorch reference mean of 2 | | 2.5000 | - | 22.0 |" in md
  assert "**0.69x**" in md  # 22 / 32: jaxlab slower


def test_input_overlap_records_the_data_argument(experiment, data, tmp_path, monkeypatch):
  script = experiment("lm_char_cpu_input_overlap")
  names = ["fetch, step; grain threads", "fetch, step; in thread", "step, fetch next; in thread"]
  monkeypatch.setattr(script, "timed_blocks", lambda rounds, block, data, overrides: (
      {n: [50.0 + i] * rounds for i, n in enumerate(names)}, 2))
  script.main(["--data", str(data), "--rounds", "2", "--block", "3", "--out", str(tmp_path)])
  md = (tmp_path / "lm_char_cpu_input_overlap.md").read_text()
  assert (f"`python experiments/lm_char_cpu_input_overlap.py --data {data} --rounds 2 --block 3 "
          f"--out {tmp_path}`") in md
  # Each row: the median, the median per-round difference from the first loop, rounds faster.
  assert "| fetch, step; grain threads | 50.0 | +0.00 | 0/2 |" in md
  assert "| step, fetch next; in thread | 52.0 | -2.00 | 0/2 |" in md


@pytest.mark.filterwarnings("ignore:No artists with labels")  # an empty plot: nothing measured
def test_attention_zoo_records_its_arguments(experiment, data, tmp_path):
  script = experiment("attention_zoo")
  script.main(["--quick", "--data", str(data), "--families", "", "--lm-families", "",
               "--lengths", "64", "--steps", "3", "--out", str(tmp_path)])
  md = (tmp_path / "attention_zoo_quick.md").read_text()
  assert (f"Command: `python experiments/attention_zoo.py --quick --data {data} --families '' "
          f"--lm-families '' --lengths 64 --steps 3 --out {tmp_path}`.") in md


def test_speculative_decoding_header_follows_the_config(experiment, data, tmp_path, monkeypatch):
  script = experiment("speculative_decoding")
  setup = {"num_layers": 1, "width": 32, "seq_len": 64, "position": "learned", "seed": 0,
           "eval_batches": 4}
  monkeypatch.setattr(script, "run_here", lambda name, args: {
      "variant": name, "val_loss": 3.0, "ms_per_step": 5.0, "head_accuracy": [0.3], "setup": setup})
  argv = ["--data", str(data), "--steps", "4", "--prompts", "2", "--in-process", "--variants",
          "baseline", "--results", str(tmp_path), "--out", "tiny",
          "--override=--config.model.num_layers=1", "--override=--config.train.eval_batches=4"]
  script.main(argv)
  md = (tmp_path / "tiny.md").read_text()
  assert "(1 x 32, context 64, learned positions, 4 steps, seed 0) in this process" in md
  assert "on 4 validation batches" in md and "200 validation" not in md and "4 x 128" not in md
  assert "python experiments/speculative_decoding.py " + " ".join(argv) in md
  saved = json.loads((tmp_path / "tiny.json").read_text())
  assert f"{saved['device']}. Date: {saved['date']}." in md and " cores" in saved["device"]


def test_bench_flash_dry_run_writes_to_out(experiment, tmp_path, monkeypatch):
  script = experiment("bench_flash")
  committed = [(EXPERIMENTS / "results" / f"flash_NOGPU.{ext}") for ext in ("md", "json")]
  before = [p.read_bytes() if p.exists() else None for p in committed]
  monkeypatch.setattr(script, "make_fn", lambda impl, causal, mode: lambda q, k, v: q)  # no kernels
  script.main(["--dry-run", "--out", str(tmp_path)])
  assert [p.read_bytes() if p.exists() else None for p in committed] == before
  md = (tmp_path / "flash_NOGPU.md").read_text()
  assert f"Command of the last run: `python experiments/bench_flash.py --dry-run --out {tmp_path}`" in md
  assert json.loads((tmp_path / "flash_NOGPU.json").read_text())["dry_run"]


def test_binary_density_table_names_its_command(experiment, tmp_path):
  script = experiment("binary_density")
  command = "python experiments/binary_density.py --quick --only digits:made"
  script.write_tables([], "a CPU", 60.0, tmp_path, "t", True, 1.0, command)
  assert f"Command of the run that wrote this file: `{command}`" in (tmp_path / "t.md").read_text()
  assert json.loads((tmp_path / "t.json").read_text())["command"] == command


def test_default_jobs_records_the_python_version(experiment, tmp_path, monkeypatch):
  script = experiment("default_jobs")
  monkeypatch.setattr(script, "run_job", lambda name, workdir, extra: {
      "job": name, "command": "jaxlab train", "steps": 6, "val_loss": 4.0, "step_time_ms": 1.0,
      "wall_s": 2.0, "report": "jaxlab: step 6: val_loss 4.0000"})
  out = script.main(["--quick", "--jobs", "lm", "--out", str(tmp_path)])
  assert out["python"] == platform.python_version()
  md = (tmp_path / "default_jobs_quick.md").read_text()
  assert f"Python {platform.python_version()} (" in md and math.isfinite(out["rows"][0]["val_loss"])
  assert out["command"] == f"python experiments/default_jobs.py --jobs lm --quick --out {tmp_path}"
