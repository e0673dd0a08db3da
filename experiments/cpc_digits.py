"""CPC on the 8x8 digits over seeds: does training lift the linear probe above the untrained CPC the
run started from, beyond the seed-to-seed spread?

    python experiments/cpc_digits.py [--seeds 0 1 2 3 4] [--steps 1000] [--quick] [--out DIR]

Each seed trains `jaxlab train cpc_digits` (config.seed = the seed: another init, another batch order;
the data split stays seed 0's) through the trainer in this process, then fits the task's linear probes
(logistic regression of the digit on frozen features, trained on the training digits, scored on the
225 test digits): the trained CPC's mean context, the untrained CPC's (the run's initial parameters)
and the raw pixels. Writes <out>/cpc_digits{,_quick}.{md,json}: one row per seed, the mean and
standard deviation, and the paired difference trained - untrained with its standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
QUICK = ["--config.model.latent_dim=8", "--config.model.context_dim=16",
         "--config.model.encoder_hidden=16", "--config.data.batch_size=16"]


def run_seed(seed: int, steps: int, overrides: list[str], workdir: pathlib.Path) -> dict:
  from jaxlab.configs import load_config
  from jaxlab.train import trainer
  config = load_config("cpc_digits", [f"--config.seed={seed}", f"--config.train.steps={steps}",
                                      f"--config.train.eval_every={steps}",
                                      f"--config.train.checkpoint_every={steps}",
                                      f"--config.train.log_every={min(100, steps)}",
                                      f"--config.optim.warmup_steps={min(50, steps // 4)}",
                                      *overrides])
  start = time.perf_counter()
  result = trainer.train(config, workdir, progress=False)
  accuracy = result["run"].task.probe_accuracies(result["state"]["params"])
  return {"seed": seed, "val_loss": result["val_loss"], "wall_s": time.perf_counter() - start,
          **{f"{k}_accuracy": v for k, v in accuracy.items()}}


def summary(rows: list[dict]) -> dict:
  """Mean and standard deviation per accuracy, and the paired trained - untrained difference with
  its standard error (None with one seed)."""
  out = {}
  for key in ("cpc_accuracy", "untrained_cpc_accuracy", "pixels_accuracy", "val_loss"):
    values = [r[key] for r in rows]
    out[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)
  gaps = [r["cpc_accuracy"] - r["untrained_cpc_accuracy"] for r in rows]
  out["gap"] = (statistics.mean(gaps),
                statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else None)
  return out


def render(out: dict) -> str:
  fmt = lambda m, s: f"{m:.4f}" + ("" if s is None else f" +- {s:.4f}")
  s = out["summary"]
  lines = [f"# CPC on the 8x8 digits: linear probe over seeds ({out['device']}, Python "
           f"{out['python']}, {out['date']})", "",
           f"Command: `{out['command']}`. {out['steps']} steps per seed; the probe is logistic "
           "regression of the digit on frozen features (standardised on the training digits), "
           "scored on the 225 test digits.", "",
           "| seed | val loss | probe: trained CPC | probe: untrained CPC (its start) | probe: pixels "
           "| training (s) |", "| --- | --- | --- | --- | --- | --- |"]
  for r in out["rows"]:
    lines.append(f"| {r['seed']} | {r['val_loss']:.4f} | {r['cpc_accuracy']:.4f} | "
                 f"{r['untrained_cpc_accuracy']:.4f} | {r['pixels_accuracy']:.4f} | "
                 f"{r['wall_s']:.0f} |")
  lines.append(f"| mean +- sd | {fmt(*s['val_loss'])} | {fmt(*s['cpc_accuracy'])} | "
               f"{fmt(*s['untrained_cpc_accuracy'])} | {fmt(*s['pixels_accuracy'])} | |")
  gap, se = s["gap"]
  verdict = ("" if se is None else
             " (more than 2 standard errors)" if gap > 2 * se else " (within 2 standard errors)")
  lines += ["", f"Trained minus untrained probe accuracy, paired by seed: {fmt(gap, se)}"
                f"{verdict}."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--quick", action="store_true", help="a tiny model (checks the script)")
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  args = parser.parse_args(argv)
  from jaxlab.train.host_devices import cpu_model
  rows = []
  with tempfile.TemporaryDirectory(prefix="jaxlab_cpc_") as tmp:
    for seed in args.seeds:
      rows.append(run_seed(seed, args.steps, QUICK if args.quick else [],
                           pathlib.Path(tmp) / str(seed)))
      print(json.dumps(rows[-1]), flush=True)
  command = " ".join(["python experiments/cpc_digits.py", "--seeds", *map(str, args.seeds),
                      "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
                     + ([f"--out {args.out}"] if args.out != str(RESULTS) else []))
  out = {"device": f"{cpu_model()}, {os.cpu_count()} cores", "python": platform.python_version(),
         "date": time.strftime("%Y-%m-%d"), "command": command, "steps": args.steps,
         "rows": rows, "summary": summary(rows)}
  stem = "cpc_digits_quick" if args.quick else "cpc_digits"
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  text = render(out)
  from jaxlab import experiment_results
  experiment_results.write(out_dir, stem, text, out)
  print(text)
  return out


if __name__ == "__main__":
  main()
