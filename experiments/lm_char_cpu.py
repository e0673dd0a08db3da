"""The foundation's bar: `lm_char_cpu` (char-level tiny shakespeare, 4x128, context 64, batch 12, 2000
steps) against the same model in PyTorch, timed on the same machine in the same run.

    python experiments/lm_char_cpu.py --data ../shared/data/tinyshakespeare/input.txt \
        [--torch-python /path/to/python-with-torch] [--seeds 0 1 2] \
        [--override=--config.mesh.cpu_devices=1 ...]

Writes experiments/results/lm_char_cpu.md (and .json): val loss at step 2000 (200 fixed validation
batches), median ms/step (compilation excluded), and the ratio of the two implementations' step times.
The PyTorch reference (experiments/torch_reference_gpt.py) runs in the interpreter given by
--torch-python (default: this one), so jaxlab's environment need not contain torch.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from jaxlab.train.host_devices import cpu_model

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"


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
  config = load_run_config("lm_char_cpu", [f"--config.data.path={data}",
                                           f"--config.train.steps={steps}",
                                           f"--config.seed={seed}",
                                           "--config.train.tensorboard=False"] + overrides)
  from jaxlab.train import trainer
  from jaxlab.train.metrics import read_metrics
  with tempfile.TemporaryDirectory() as workdir:
    start = time.time()
    result = trainer.train(config, workdir, progress=False)
    wall = time.time() - start
    records = read_metrics(workdir)
  step_ms = sorted(r["step_time_ms"] for r in records if "step_time_ms" in r)
  return {"impl": "jaxlab", "steps": steps, "seed": seed, "val_loss": result["val_loss"],
          "ms_per_step": step_ms[len(step_ms) // 2], "wall_s": wall,
          "val_curve": {r["step"]: r["val_loss"] for r in records if "val_loss" in r}}


def run_torch(python: str, data: str, steps: int, seed: int) -> dict | None:
  script = HERE / "torch_reference_gpt.py"
  proc = subprocess.run([python, str(script), "--data", data, "--steps", str(steps),
                         "--seed", str(seed)],
                        capture_output=True, text=True)
  if proc.returncode:
    print("PyTorch reference did not run:\n" + proc.stderr[-2000:], file=sys.stderr)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="tiny shakespeare input.txt")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--torch-python", default=sys.executable)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="one run of each implementation per seed, alternating")
  parser.add_argument("--override", action="append", default=[],
                      help="a jaxlab config override for the jaxlab runs (repeatable), e.g. "
                           "--override=--config.mesh.cpu_devices=1")
  parser.add_argument("--jaxlab-child-seed", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  data = str(pathlib.Path(args.data).resolve())
  if args.jaxlab_child_seed is not None:
    print(json.dumps(_jaxlab_child(data, args.steps, args.jaxlab_child_seed, args.override)))
    return
  runs = []
  for seed in args.seeds:
    runs.append(run_jaxlab(data, args.steps, seed, args.override))
    print(json.dumps({k: v for k, v in runs[-1].items() if k != "val_curve"}), flush=True)
    ref = run_torch(args.torch_python, data, args.steps, seed)
    if ref:
      runs.append(ref)
      print(json.dumps(ref), flush=True)

  import jax
  device = (f"{cpu_model()}, {os.cpu_count()} cores (jax {jax.__version__} on CPU, one XLA device "
            "per core; each run in its own process)")
  command = "python experiments/lm_char_cpu.py --data ../shared/data/tinyshakespeare/input.txt " \
            "--torch-python <python with torch>" + "".join(f" --override={o}" for o in args.override)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "lm_char_cpu.json").write_text(json.dumps({"device": device, "command": command, "runs": runs},
                                                           indent=2))
  jl = [r for r in runs if r["impl"] == "jaxlab"]
  pt = [r for r in runs if r["impl"] == "pytorch"]
  lines = [
      "# lm_char_cpu: jaxlab vs the same model in PyTorch",
      "",
      f"Device: {device}. Command: `{command}`.",
      f"{args.steps} steps, batch 12 x 64 characters; val loss = mean over 200 fixed validation "
      "batches (jaxlab) / 200 random validation batches (PyTorch); ms/step = median, compilation "
      "excluded, data loading included.",
      "",
      "| implementation | seed | val loss @ %d | ms/step (median) |" % args.steps,
      "| --- | --- | --- | --- |",
  ]
  for r in runs:
    name = "jaxlab" if r["impl"] == "jaxlab" else f"PyTorch {r.get('torch', '')}"
    lines.append(f"| {name} | {r['seed']} | {r['val_loss']:.4f} | {r['ms_per_step']:.1f} |")
  for group, name in ((jl, "jaxlab"), (pt, "PyTorch")):
    if group:
      losses = [r["val_loss"] for r in group]
      lines.append(f"| {name} mean of {len(group)} | | {sum(losses) / len(losses):.4f} | "
                   f"{sum(r['ms_per_step'] for r in group) / len(group):.1f} |")
  if jl and pt:
    ratio = (sum(r["ms_per_step"] for r in pt) / len(pt)) / (sum(r["ms_per_step"] for r in jl) / len(jl))
    lines += ["", f"Speed ratio (PyTorch ms/step / jaxlab ms/step, same run): **{ratio:.2f}x** "
              "(> 1 means jaxlab is faster)."]
  if jl:
    lines += ["", "jaxlab val loss during training: " +
              ", ".join(f"{s}: {v:.3f}" for s, v in sorted(jl[0]["val_curve"].items(),
                                                           key=lambda kv: int(kv[0])))]
  (RESULTS / "lm_char_cpu.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
