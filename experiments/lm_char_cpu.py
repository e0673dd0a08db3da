"""The foundation's bar: `lm_char_cpu` (char-level tiny shakespeare, 4x128, context 64, batch 12, 2000
steps) against the same model in PyTorch, timed on the same machine in the same run.

    python experiments/lm_char_cpu.py --data ../shared/data/tinyshakespeare/input.txt \
        [--torch-python /path/to/python-with-torch] [--nanogpt /path/to/nanoGPT] [--seeds 0 1 2] \
        [--steps 2000] [--override=--config.mesh.cpu_devices=1 ...] [--out DIR]

Writes <out>/lm_char_cpu.md (and .json; default out: experiments/results): val loss at step 2000
(the config's validation batches, 200), median ms/step (compilation excluded), and the ratio of the
implementations' step times. --steps other than 2000 scales the config's 100 warmup steps in
proportion (warmup_steps()); every implementation runs the same steps, warmup and validation batches
(the PyTorch reference also the same lr and min lr). For each seed, in turn: jaxlab, the plain
PyTorch reference (experiments/torch_reference_gpt.py) and, given a local checkout with --nanogpt,
nanoGPT itself (experiments/nanogpt_reference.py). The PyTorch runs use the interpreter given by
--torch-python (default: this one), so jaxlab's environment need not contain torch.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

from jaxlab.train.host_devices import cpu_model
from nanogpt_reference import check_checkout, run_nanogpt

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_STEPS, DEFAULT_WARMUP = 2000, 100  # the config's train.steps and optim.warmup_steps


def warmup_steps(steps: int) -> int:
  """The warmup of a run of `steps`: the config's 100 at 2000 steps, else scaled in proportion (at
  least 1, but below `steps` as the config check requires: 0 for a 1-step run)."""
  if steps == DEFAULT_STEPS:
    return DEFAULT_WARMUP
  return min(steps - 1, max(1, round(DEFAULT_WARMUP * steps / DEFAULT_STEPS)))


def config_overrides(data: str, steps: int, seed: int, overrides: list[str]) -> list[str]:
  """The jaxlab overrides of one run (--override last, so that it wins)."""
  warmup = [] if steps == DEFAULT_STEPS else [f"--config.optim.warmup_steps={warmup_steps(steps)}"]
  return [f"--config.data.path={data}", f"--config.train.steps={steps}", f"--config.seed={seed}",
          "--config.train.tensorboard=False", *warmup, *overrides]


def run_config(data: str, steps: int, overrides: list[str]):
  """The validated config of the jaxlab runs (seed 0; no JAX devices needed): the settings that the
  PyTorch runs share with it are read from here."""
  from jaxlab.configs import load_config
  return load_config("lm_char_cpu", config_overrides(data, steps, 0, overrides), check_devices=False)


def torch_settings(config) -> dict:
  """The jaxlab config's schedule and validation batches, as the PyTorch reference's arguments."""
  return {"steps": config.train.steps, "warmup": config.optim.warmup_steps, "lr": config.optim.lr,
          "min_lr": config.optim.min_lr, "eval_batches": config.train.eval_batches}


def run_jaxlab(data: str, steps: int, seed: int, overrides: list[str]) -> dict:
  """One jaxlab training run, in a child process (an idle JAX runtime must not share the cores with
  the PyTorch run that follows)."""
  proc = subprocess.run([sys.executable, __file__, "--data", data, "--steps", str(steps),
                         "--jaxlab-child-seed", str(seed)] + [f"--override={o}" for o in overrides],
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError("jaxlab run failed:\n" + proc.stderr[-3000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _jaxlab_child(data: str, steps: int, seed: int, overrides: list[str]) -> dict:
  from jaxlab.cli import load_run_config  # as `jaxlab train` does: one CPU device per core
  config = load_run_config("lm_char_cpu", config_overrides(data, steps, seed, overrides))
  from jaxlab.train import trainer
  from jaxlab.train.metrics import read_metrics
  with tempfile.TemporaryDirectory() as workdir:
    start = time.time()
    result = trainer.train(config, workdir, progress=False)
    wall = time.time() - start
    records = read_metrics(workdir)
    full = _eval_all_windows(workdir)
  if full["step"] != steps:
    raise RuntimeError(f"jaxlab's last checkpoint is from step {full['step']}, not {steps}")
  step_ms = sorted(r["step_time_ms"] for r in records if "step_time_ms" in r)
  return {"impl": "jaxlab", "steps": steps, "seed": seed, "val_loss": result["val_loss"],
          "val_loss_all_windows": full["val_loss"],
          "ms_per_step": step_ms[len(step_ms) // 2], "wall_s": wall,
          "val_curve": {r["step"]: r["val_loss"] for r in records if "val_loss" in r}}


def _eval_all_windows(workdir: str) -> dict:
  """`jaxlab eval` of the final checkpoint on every window of the validation split (asking for more
  batches than the split has), the population the evaluation batches are drawn from."""
  import contextlib
  import io
  from jaxlab import cli
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    cli.main(["eval", workdir, "--config.train.eval_batches=100000000"])
  return json.loads(out.getvalue().strip().splitlines()[-1])


def torch_command(python: str, data: str, seed: int, settings: dict) -> list[str]:
  """The PyTorch reference's command line: `settings` (torch_settings) as its arguments."""
  return [python, str(HERE / "torch_reference_gpt.py"), "--data", data, "--seed", str(seed),
          *(f"--{k}={v}" for k, v in settings.items())]


def run_torch(python: str, data: str, seed: int, settings: dict) -> dict | None:
  proc = subprocess.run(torch_command(python, data, seed, settings), capture_output=True, text=True)
  if proc.returncode:
    print("PyTorch reference did not run:\n" + proc.stderr[-2000:], file=sys.stderr)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _mean(runs: list[dict], key: str) -> float | None:
  values = [r.get(key) for r in runs]
  return None if None in values else sum(values) / len(values)


def _fmt(value: float | None) -> str:
  return "-" if value is None else f"{value:.4f}"


def command_line(args, torch_ran: bool) -> str:
  """This run's command, from its arguments (--torch-python only when the PyTorch reference ran)."""
  parts = ["--data", args.data]
  if args.steps != DEFAULT_STEPS:
    parts += ["--steps", str(args.steps)]
  if torch_ran and args.torch_python != sys.executable:
    parts += ["--torch-python", args.torch_python]
  if args.nanogpt:
    parts += ["--nanogpt", str(args.nanogpt)]
  parts += ["--seeds", *map(str, args.seeds)] + [f"--override={o}" for o in args.override]
  if pathlib.Path(args.out).resolve() != RESULTS:
    parts += ["--out", str(args.out)]
  return "python experiments/lm_char_cpu.py " + shlex.join(parts)


def render(runs: list[dict], device: str, command: str, settings: dict) -> str:
  """The .md: one row per run, the means, the speed ratios and the val curves. settings: the jaxlab
  config's schedule and validation batches (torch_settings), shared by every implementation."""
  steps, batches = settings["steps"], settings["eval_batches"]
  names = {"jaxlab": "jaxlab", "pytorch": "PyTorch reference", "nanogpt": "nanoGPT"}
  groups = {impl: [r for r in runs if r["impl"] == impl] for impl in names}
  lines = [
      "# lm_char_cpu: jaxlab vs the same model in PyTorch",
      "",
      f"Device: {device}. Command: `{command}`.",
      f"{steps} steps (warmup {settings['warmup']}, then cosine lr {settings['lr']:g} -> "
      f"{settings['min_lr']:g}), batch 12 x 64 characters. Val loss: the mean over {batches} validation "
      "batches (jaxlab: fixed; the PyTorch reference and nanoGPT: random), and over every 64-character "
      "window of the validation split (the population those batches sample; the final checkpoint, "
      "restored). ms/step: median, compilation excluded, data loading included.",
  ]
  if not groups["pytorch"]:
    lines.append("The PyTorch reference did not run (its error, if any, went to stderr).")
  if groups["nanogpt"]:
    commit = groups["nanogpt"][0]["commit"]
    lines.append(f"nanoGPT is karpathy/nanoGPT at commit {commit[:12]}, unmodified, run with torch seed "
                 "1337 + seed (seed 0 = as published) by experiments/nanogpt_reference.py.")
  lines += ["", f"| implementation | seed | val loss @ {steps} ({batches} batches) | val loss, all windows | "
            "ms/step (median) |", "| --- | --- | --- | --- | --- |"]
  for r in runs:
    torch_version = f" (torch {r['torch']})" if "torch" in r else ""
    lines.append(f"| {names[r['impl']]}{torch_version} | {r['seed']} | {r['val_loss']:.4f} | "
                 f"{_fmt(r.get('val_loss_all_windows'))} | {r['ms_per_step']:.1f} |")
  mean_ms = {}
  for impl, group in groups.items():
    if group:
      mean_ms[impl] = _mean(group, "ms_per_step")
      lines.append(f"| {names[impl]} mean of {len(group)} | | {_mean(group, 'val_loss'):.4f} | "
                   f"{_fmt(_mean(group, 'val_loss_all_windows'))} | {mean_ms[impl]:.1f} |")
  for impl in ("pytorch", "nanogpt"):
    if "jaxlab" in mean_ms and impl in mean_ms:
      lines += ["", f"Speed ratio ({names[impl]} ms/step / jaxlab ms/step, same run): "
                f"**{mean_ms[impl] / mean_ms['jaxlab']:.2f}x** (> 1 means jaxlab is faster)."]
  if groups["jaxlab"]:
    lines += ["", "jaxlab val loss during training: " +
              ", ".join(f"{s}: {v:.3f}" for s, v in sorted(groups["jaxlab"][0]["val_curve"].items(),
                                                           key=lambda kv: int(kv[0])))]
  if groups["nanogpt"]:
    lines += ["", "nanoGPT val loss during training: " +
              ", ".join(f"{s}: {v:.3f}" for s, v in groups["nanogpt"][0]["val_curve"].items())]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="tiny shakespeare input.txt")
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                      help="training steps (other than 2000: warmup scaled in proportion)")
  parser.add_argument("--torch-python", default=sys.executable)
  parser.add_argument("--nanogpt", type=pathlib.Path, default=None,
                      help="a local nanoGPT checkout: also run nanoGPT's own train.py (never downloaded)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="one run of each implementation per seed, alternating")
  parser.add_argument("--override", action="append", default=[],
                      help="a jaxlab config override for the jaxlab runs (repeatable), e.g. "
                           "--override=--config.mesh.cpu_devices=1; the PyTorch reference follows its "
                           "optim.lr, optim.min_lr, optim.warmup_steps and train.eval_batches, nanoGPT "
                           "its warmup and validation batches")
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  parser.add_argument("--jaxlab-child-seed", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  data = str(pathlib.Path(args.data).resolve())
  if args.nanogpt:
    check_checkout(args.nanogpt)  # before the first (long) jaxlab run
  if args.jaxlab_child_seed is not None:
    print(json.dumps(_jaxlab_child(data, args.steps, args.jaxlab_child_seed, args.override)))
    return
  settings = torch_settings(run_config(data, args.steps, args.override))  # also checks the config
  runs = []
  for seed in args.seeds:
    runs.append(run_jaxlab(data, args.steps, seed, args.override))
    print(json.dumps({k: v for k, v in runs[-1].items() if k != "val_curve"}), flush=True)
    ref = run_torch(args.torch_python, data, seed, settings)
    if ref:
      runs.append(ref)
      print(json.dumps(ref), flush=True)
    if args.nanogpt:
      runs.append(run_nanogpt(args.nanogpt.resolve(), pathlib.Path(data), seed, args.steps,
                              python=args.torch_python, eval_iters=settings["eval_batches"],
                              warmup=settings["warmup"]))
      print(json.dumps({k: v for k, v in runs[-1].items() if k != "val_curve"}), flush=True)

  import jax
  device = (f"{cpu_model()}, {os.cpu_count()} cores (jax {jax.__version__} on CPU, one XLA device "
            "per core; each run in its own process)")
  command = command_line(args, torch_ran=any(r["impl"] == "pytorch" for r in runs))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  text = render(runs, device, command, settings)
  from jaxlab import experiment_results
  experiment_results.write(out, "lm_char_cpu", text, {"device": device, "command": command,
                                                      "settings": settings, "runs": runs})
  print(text, end="")


if __name__ == "__main__":
  main()
