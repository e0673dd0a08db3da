"""Run nanoGPT itself on the `lm_char_cpu` setup, as the widely used PyTorch reference.

    python experiments/nanogpt_reference.py --nanogpt /path/to/nanoGPT \
        --data ../shared/data/tinyshakespeare/input.txt [--seed 0] [--steps 2000] [--eval-iters 200]

nanoGPT (https://github.com/karpathy/nanoGPT) is not part of jaxlab and is never downloaded here: pass a
local checkout. The run is its README's CPU command for shakespeare_char (`--device=cpu --compile=False
--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0`) at the config's `--eval_iters=200` instead of the README's quick 20
(`--eval-iters 20 --seed 0` is the README's command exactly). nanoGPT's files are not edited: train.py, model.py, configurator.py, the
config and data/shakespeare_char/prepare.py are copied into a temporary directory (nanoGPT reads paths
relative to the working directory), prepare.py encodes the given input.txt there (it downloads only when
input.txt is missing, and it is not), and train.py runs with `runpy`. Seed s runs with
`torch.manual_seed(1337 + s)` (nanoGPT's seed is fixed in train.py; it is set by wrapping
`torch.manual_seed`), so seed 0 is nanoGPT exactly as published.

Prints one JSON line: the val loss nanoGPT reports at the last step (its estimate from `eval_iters`
random batches), the same model's loss on every window of the validation split (its step-`steps` checkpoint,
restored with nanoGPT's own model code), the median ms/step over the iterations without an evaluation
(nanoGPT's own per-iteration timer: data, forward, backward, update), and the checkout's commit.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                 "data/shakespeare_char/prepare.py")

# Runs in the copied nanoGPT directory: shift nanoGPT's fixed seed, then run train.py unchanged.
_CHILD = """
import runpy, sys, torch
_seed, _manual_seed = int(sys.argv[1]), torch.manual_seed
torch.manual_seed = lambda s: _manual_seed(s + _seed)
sys.argv = ["train.py"] + sys.argv[2:]
runpy.run_path("train.py", run_name="__main__")
"""

# Runs in the copied directory after training: nanoGPT's model, restored from its step-`steps`
# checkpoint, scored on every window of the validation split by the PyTorch reference's all_windows_loss
# (argv[1]: this directory, experiments/).
_SCORE = """
import json, sys, numpy as np, torch
from model import GPT, GPTConfig
sys.path.insert(0, sys.argv[1])
from torch_reference_gpt import all_windows_loss
ckpt = torch.load("out/ckpt.pt", map_location="cpu", weights_only=False)
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.eval()
val = torch.from_numpy(np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64))
ctx = ckpt["model_args"]["block_size"]
with torch.no_grad():
  loss = all_windows_loss(lambda inputs, targets: model(inputs, targets)[1], val, ctx)
print(json.dumps({"step": ckpt["iter_num"], "windows": len(val) - ctx, "loss": loss,
                  "torch": torch.__version__}))
"""

NANOGPT_EVAL_INTERVAL = 250  # config/train_shakespeare_char.py's eval_interval
_EVAL_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", re.M)
_ITER_LINE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", re.M)


def eval_interval(steps: int) -> int:
  """nanoGPT's evaluation (and checkpoint) interval for a run of `steps`: its config's 250 when that
  reaches step `steps`, else `steps` itself (evaluations at 0 and `steps`), so that the last
  checkpoint is the model at `steps`."""
  return NANOGPT_EVAL_INTERVAL if steps % NANOGPT_EVAL_INTERVAL == 0 else steps


def nanogpt_command(steps: int, eval_iters: int = 200, warmup: int = 100) -> list[str]:
  """train.py's arguments: the README's CPU command with `eval_iters` validation batches per evaluation,
  saving a checkpoint at every evaluation (so the last one is the model at `steps`; saving draws no
  randomness, while the evaluation batches do). A `warmup` other than the config's 100 iterations is
  passed as --warmup_iters (lm_char_cpu.py scales it for short runs), and a `steps` that is not a
  multiple of 250 sets --eval_interval (eval_interval())."""
  interval = eval_interval(steps)
  return ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--log_interval=1",
          "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
          f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0",
          *([] if warmup == 100 else [f"--warmup_iters={warmup}"]),
          *([] if interval == NANOGPT_EVAL_INTERVAL else [f"--eval_interval={interval}"]),
          "--out_dir=out", f"--eval_iters={eval_iters}", "--always_save_checkpoint=True"]


def checkout_commit(nanogpt: pathlib.Path) -> str:
  proc = subprocess.run(["git", "-C", str(nanogpt), "rev-parse", "HEAD"], capture_output=True, text=True)
  return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def parse_log(log: str, steps: int, eval_interval: int = 250) -> dict:
  """val loss at `steps` and the median time of iterations that did not evaluate, from train.py's output."""
  evals = {int(s): float(v) for s, _, v in _EVAL_LINE.findall(log)}
  if steps not in evals:
    raise ValueError(f"nanoGPT printed no evaluation at step {steps}; its output ends:\n{log[-2000:]}")
  times = [float(t) for it, _, t in _ITER_LINE.findall(log) if int(it) % eval_interval and int(it) < steps]
  return {"val_loss": evals[steps], "ms_per_step": statistics.median(times),
          "val_curve": {s: v for s, v in sorted(evals.items()) if s}}


def check_checkout(nanogpt: pathlib.Path) -> None:
  """Raises FileNotFoundError naming --nanogpt unless it holds the nanoGPT files this run uses."""
  missing = [f for f in NANOGPT_FILES if not (nanogpt / f).is_file()]
  if missing:
    raise FileNotFoundError(f"--nanogpt {nanogpt} is not a nanoGPT checkout: missing {', '.join(missing)}")


def run_nanogpt(nanogpt: pathlib.Path, data: pathlib.Path, seed: int, steps: int,
                python: str = sys.executable, eval_iters: int = 200, warmup: int = 100) -> dict:
  """One nanoGPT training run in a temporary copy of its files; see the module docstring."""
  check_checkout(nanogpt)
  if not data.is_file():
    raise FileNotFoundError(f"--data {data} is not a file")
  with tempfile.TemporaryDirectory(prefix="nanogpt_") as tmp:
    work = pathlib.Path(tmp)
    for name in NANOGPT_FILES:
      (work / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(nanogpt / name, work / name)
    prepared = work / "data" / "shakespeare_char"
    shutil.copy(data, prepared / "input.txt")
    subprocess.run([python, "prepare.py"], cwd=prepared, check=True, capture_output=True, text=True)
    proc = subprocess.run([python, "-c", _CHILD, str(seed)] + nanogpt_command(steps, eval_iters, warmup),
                          cwd=work, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError("nanoGPT's train.py failed:\n" + proc.stderr[-3000:])
    score = subprocess.run([python, "-c", _SCORE, str(HERE)], cwd=work, capture_output=True, text=True)
    if score.returncode:
      raise RuntimeError("scoring nanoGPT's checkpoint failed:\n" + score.stderr[-3000:])
  full = json.loads(score.stdout.strip().splitlines()[-1])
  if full["step"] != steps:
    raise RuntimeError(f"nanoGPT's last checkpoint is from step {full['step']}, not {steps}")
  return {"impl": "nanogpt", "commit": checkout_commit(nanogpt), "torch": full["torch"],
          "steps": steps, "seed": seed, "torch_seed": 1337 + seed,
          "eval_iters": eval_iters, **parse_log(proc.stdout, steps, eval_interval(steps)),
          "val_loss_all_windows": full["loss"], "val_windows": full["windows"]}


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--nanogpt", required=True, type=pathlib.Path, help="a local nanoGPT checkout")
  parser.add_argument("--data", required=True, type=pathlib.Path, help="tiny shakespeare input.txt")
  parser.add_argument("--seed", type=int, default=0, help="nanoGPT runs with torch.manual_seed(1337 + seed)")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--eval-iters", type=int, default=200,
                      help="validation batches per evaluation (nanoGPT's README uses 20)")
  args = parser.parse_args(argv)
  result = run_nanogpt(args.nanogpt.resolve(), args.data.resolve(), args.seed, args.steps,
                       eval_iters=args.eval_iters)
  print(json.dumps({k: v for k, v in result.items() if k != "val_curve"}))


if __name__ == "__main__":
  main()
