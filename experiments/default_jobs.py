"""The embedded default jobs as a user runs them: `jaxlab train` (the quick start's main job) and
`jaxlab train contrastive_digits`, each in a fresh process with a fresh workdir.

    python experiments/default_jobs.py [--jobs lm,contrastive_digits] [--quick] [--out DIR]

Both need no download (the first trains on the Python standard library's sources, the second on
scikit-learn's 8x8 digits). For each job the table gives the final validation loss and step time
from WORKDIR/metrics.jsonl (the median over the logging intervals, compilation excluded), the wall
time of the whole command (start-up, data, compilation, training, the final report), and the job's
headline result from the report it prints at the end (zero-shot accuracy; for the LM the printed
sample follows the table). The jobs run one after another, nothing else run by this script beside
them. Writes <out>/default_jobs.{md,json} (default_jobs_quick.* with --quick: 6 steps each, a check
that the commands and the parsing work).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
JOBS = {"lm": [], "contrastive_digits": ["contrastive_digits"]}  # arguments after `jaxlab train`
QUICK = ["--config.train.steps=6", "--config.train.eval_every=6", "--config.train.log_every=3",
         "--config.train.eval_batches=2", "--config.train.checkpoint_every=6",
         "--config.optim.warmup_steps=2"]


def run_job(name: str, workdir: pathlib.Path, extra: list[str]) -> dict:
  """Runs `jaxlab train [CONFIG] --workdir WORKDIR --no-progress EXTRA...` in a new process."""
  args = JOBS[name] + ["--workdir", str(workdir), "--no-progress", *extra]
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "jaxlab.cli", "train", *args], capture_output=True,
                        text=True, env={**os.environ, "TQDM_DISABLE": "1"})
  wall_s = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"`jaxlab train {' '.join(args)}` exited with {proc.returncode}:\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  from jaxlab.train.metrics import median_step_time_ms, read_metrics
  records = read_metrics(workdir)
  evals = [r for r in records if "val_loss" in r]
  row = {"job": name, "command": " ".join(["jaxlab train", *JOBS[name], *extra]),
         "steps": records[-1]["step"], "val_loss": evals[-1]["val_loss"],
         "step_time_ms": median_step_time_ms(workdir), "wall_s": wall_s,
         "report": report_of(proc.stdout)}
  for key in ("zero_shot_accuracy", "zero_shot_accuracy_unseen_prompts"):
    found = re.search(rf"{key}\s+([0-9.]+)", proc.stdout)
    if found:
      row[key] = float(found.group(1))
  return row


def report_of(stdout: str) -> str:
  """What the command printed after its final "jaxlab: step N: val_loss ..." line."""
  lines = stdout.splitlines()
  last = max((i for i, line in enumerate(lines) if re.match(r"jaxlab: step \d+: val_loss", line)),
             default=None)
  if last is None:
    raise RuntimeError(f"no final 'jaxlab: step N: val_loss' line in the output:\n{stdout[-2000:]}")
  return "\n".join(lines[last:])


def render(out: dict) -> str:
  lines = [f"# Default jobs{' (quick check)' if out['quick'] else ''}", "",
           f"Device: {out['device']}. Python {out.get('python', 'not recorded')} (the lm job trains on "
           f"this interpreter's standard library). Command: `{out['command']}`. Each job in a fresh "
           "process and workdir; wall time covers start-up, data, compilation, training and the final "
           "report.", "",
           "| command | steps | val loss | zero-shot acc | the same, unseen prompts | ms/step | "
           "wall (min) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in out["rows"]:
    acc, unseen = (f"{r[k]:.3f}" if k in r else "-"
                   for k in ("zero_shot_accuracy", "zero_shot_accuracy_unseen_prompts"))
    ms = f"{r['step_time_ms']:.1f}" if r["step_time_ms"] is not None else "-"
    lines.append(f"| `{r['command']}` | {r['steps']} | {r['val_loss']:.4f} | {acc} | {unseen} | "
                 f"{ms} | {r['wall_s'] / 60:.1f} |")
  if any("zero_shot_accuracy_unseen_prompts" in r for r in out["rows"]):
    lines += ["", "Zero-shot acc prompts with the digits' caption templates, which are training "
              "captions; the unseen-prompts column with wording no caption uses "
              "(`caption_pairs.DIGIT_UNSEEN_TEMPLATES`)."]
  for r in out["rows"]:
    lines += ["", f"`{r['command']}` ended with:", "", "```", r["report"], "```"]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--jobs", type=lambda t: t.split(","), default=list(JOBS),
                      help=f"comma-separated, from {','.join(JOBS)}")
  parser.add_argument("--quick", action="store_true", help="6 steps per job (checks the script)")
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  args = parser.parse_args(argv)
  unknown = [j for j in args.jobs if j not in JOBS]
  if unknown:
    parser.error(f"--jobs: unknown {unknown}; choose from {list(JOBS)}")
  from jaxlab.train.host_devices import cpu_model
  device = f"{cpu_model()}, {os.cpu_count()} cores"
  out = {"device": device, "python": platform.python_version(), "quick": args.quick, "rows": [],
         "command": " ".join(["python experiments/default_jobs.py"]
                             + ([f"--jobs {','.join(args.jobs)}"] if args.jobs != list(JOBS) else [])
                             + (["--quick"] if args.quick else [])
                             + ([f"--out {args.out}"] if args.out != str(RESULTS) else []))}
  with tempfile.TemporaryDirectory(prefix="jaxlab_default_jobs_") as tmp:
    for name in args.jobs:
      row = run_job(name, pathlib.Path(tmp) / name, QUICK if args.quick else [])
      print(f"{row['command']}: val_loss {row['val_loss']:.4f} in {row['wall_s']:.0f} s", flush=True)
      out["rows"].append(row)
  stem = "default_jobs_quick" if args.quick else "default_jobs"
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  text = render(out)
  from jaxlab import experiment_results
  experiment_results.write(out_dir, stem, text, out)
  print(text)
  return out


if __name__ == "__main__":
  main()
