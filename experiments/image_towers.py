"""ViT against Swin as the image tower of the dual encoder, by one config flag
(`--config.model.image_encoder=vit|swin`), on the embedded 8x8 digits of `contrastive_digits`.

    python experiments/image_towers.py [--seeds 0,1,2] [--steps 600] [--towers a,b] [--merge]
                                       [--quick] [--out DIR]

Each (tower, seed) trains `jaxlab train contrastive_digits` as the CLI does (SigLIP, chunked over the
CPU devices, 600 steps, batch 64), in this process, one after another, and reports the validation
loss, zero-shot accuracy and recall@1 on the 360 held-out digits (`ContrastiveTask.zero_shot_metrics`),
the image tower's parameter count and the median step time (compilation excluded). Towers:
  * vit: patch 2 (a 4x4 grid), 2 blocks of width 64, 2-D sin-cos positions (the config's default);
  * vit-rope2d: the same ViT with axial 2-D RoPE in every attention layer instead of sin-cos
    embeddings (`image_position=rope2d`, RoPE-ViT's base 100 for images);
  * vit-rope2d-theta10000: the same with the text RoPE's base 10000;
  * swin-p2-w2: patch 2, windows of 2x2 patches shifted by 1, then patch merging to a 2x2 map;
    2 stages of 2 blocks, widths 64 and 128 (same tokens as the ViT);
  * swin-p2-w2-narrow: the same with widths 32 and 64 (1.4x the ViT's image parameters; the wide
    Swin has ~5x the ViT's image parameters, its second stage being twice as wide);
  * swin-p1-w4: patch 1 (an 8x8 grid), windows of 4x4 shifted by 2, then a 4x4 map (one window).
Writes <out>/image_towers.{md,json} (image_towers_quick.* with --quick: 30 steps, one seed).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                             f"{min(len(os.sched_getaffinity(0)), 8)}").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOWERS = {
    "vit": [],
    "vit-rope2d": ["--config.model.image_position=rope2d"],
    "vit-rope2d-theta10000": ["--config.model.image_position=rope2d",
                              "--config.model.image_rope_theta=10000"],
    "swin-p2-w2": ["--config.model.image_encoder=swin", "--config.model.patch=2",
                   "--config.model.image_window=2"],
    "swin-p2-w2-narrow": ["--config.model.image_encoder=swin", "--config.model.patch=2",
                          "--config.model.image_window=2", "--config.model.image_width=32"],
    "swin-p1-w4": ["--config.model.image_encoder=swin", "--config.model.patch=1",
                   "--config.model.image_window=4"],
}
METRICS = ("val_loss", "zero_shot_accuracy", "image_to_text_R@1", "text_to_image_R@1")


def run_one(tower: str, seed: int, steps: int, workdir: pathlib.Path) -> dict:
  import jax
  from jaxlab.configs import load_config
  from jaxlab.train import trainer
  from jaxlab.train.host_devices import usable_device_count
  from jaxlab.train.metrics import median_step_time_ms
  overrides = TOWERS[tower] + [f"--config.seed={seed}", f"--config.train.steps={steps}",
                               f"--config.train.eval_every={steps}",
                               f"--config.train.checkpoint_every={steps}",
                               f"--config.train.log_every={min(50, steps)}",
                               f"--config.optim.warmup_steps={min(50, steps // 2)}",
                               "--config.train.tensorboard=False"]
  config = load_config("contrastive_digits", overrides, check_devices=False)
  with config.unlocked():  # as `jaxlab train` does: the most devices the batch splits over
    config.mesh.data = usable_device_count(config, jax.device_count())
  start = time.perf_counter()
  result = trainer.train(config, workdir, progress=False)
  params = result["state"]["params"]
  metrics = result["run"].task.zero_shot_metrics(params)
  return {"tower": tower, "seed": seed, "val_loss": float(result["val_loss"]),
          **{k: float(metrics[k]) for k in METRICS[1:]},
          "image_params": int(sum(x.size for x in jax.tree_util.tree_leaves(params["image_tower"]))),
          "step_time_ms": float(median_step_time_ms(workdir)), "wall_s": time.perf_counter() - start}


def summarise(runs: list[dict]) -> list[dict]:
  """Per tower: mean and sd over seeds of each metric, params, median step time."""
  rows = []
  for tower in TOWERS:
    mine = [r for r in runs if r["tower"] == tower]
    if not mine:
      continue
    row = {"tower": tower, "seeds": len(mine), "image_params": mine[0]["image_params"],
           "step_time_ms": statistics.median(r["step_time_ms"] for r in mine)}
    for key in METRICS:
      values = [r[key] for r in mine]
      row[key] = statistics.mean(values)
      row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    rows.append(row)
  return rows


def render(out: dict) -> str:
  lines = ["# ViT against Swin as the dual encoder's image tower (contrastive_digits)", "",
           "Generated by `experiments/image_towers.py`; do not edit by hand.", "",
           f"Device: {out['device']}. Command: `{out['command']}`. Wall time {out['wall_min']:.1f} min.",
           "", f"SigLIP on scikit-learn's 8x8 digits with caption templates, {out['steps']} steps, batch "
           "64; metrics on the 360 held-out digits: validation loss, zero-shot accuracy (10 digit "
           "classes by their prompts), recall@1 both ways. Mean +- sd over seeds "
           f"{', '.join(map(str, out['seeds']))}; step time: median over seeds of each run's median "
           "(compilation excluded).", "",
           "| tower | image params | val loss | zero-shot acc | I->T R@1 | T->I R@1 | ms/step |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  reference = next((r for r in out["rows"] if r["tower"] == "vit"), None)
  for r in out["rows"]:
    cell = lambda k: f"{r[k]:.3f} +- {r[k + '_sd']:.3f}"
    ratio = f" ({r['step_time_ms'] / reference['step_time_ms']:.2f}x)" if reference else ""
    lines.append(f"| {r['tower']} | {r['image_params']:,} | {cell('val_loss')} | "
                 f"{cell('zero_shot_accuracy')} | {cell('image_to_text_R@1')} | "
                 f"{cell('text_to_image_R@1')} | {r['step_time_ms']:.1f}{ratio} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--towers", type=lambda t: t.split(","), default=list(TOWERS))
  parser.add_argument("--quick", action="store_true", help="30 steps, seed 0 (a smoke run)")
  parser.add_argument("--merge", action="store_true",
                      help="keep the other towers' runs of an existing results file (same settings)")
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  if args.quick:
    args.seeds, args.steps = [0], 30
  unknown = set(args.towers) - set(TOWERS)
  if unknown:
    parser.error(f"unknown towers {sorted(unknown)}; choose from {list(TOWERS)}")
  import jax
  start = time.perf_counter()
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for tower in args.towers:
      for seed in args.seeds:
        runs.append(run_one(tower, seed, args.steps, pathlib.Path(tmp) / f"{tower}_{seed}"))
        print(json.dumps(runs[-1]), flush=True)
  name = "image_towers_quick" if args.quick else "image_towers"
  out_dir = pathlib.Path(args.out)
  previous = out_dir / f"{name}.json"
  if args.merge and previous.is_file():
    old = json.loads(previous.read_text())
    if (old["steps"], old["seeds"]) != (args.steps, args.seeds):
      raise SystemExit(f"--merge: {previous} has steps {old['steps']} and seeds {old['seeds']}")
    runs = [r for r in old["runs"] if r["tower"] not in args.towers] + runs
    start -= 60 * old["wall_min"]  # the wall time of every run in the file
  command = "python experiments/image_towers.py" + (" --quick" if args.quick else "")
  if args.merge:
    command += f" --towers {','.join(args.towers)} --merge"
    if previous.is_file():
      command = f"{json.loads(previous.read_text())['command']}`, then `{command}"
  from jaxlab.train.host_devices import cpu_model
  d = jax.devices()[0]
  device = (f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores as {jax.device_count()} CPU devices"
            if d.platform == "cpu" else f"{jax.device_count()} x {d.device_kind}")
  out = {"device": f"{device}, jax {jax.__version__}",
         "command": command, "steps": args.steps, "seeds": args.seeds, "runs": runs,
         "rows": summarise(runs), "wall_min": (time.perf_counter() - start) / 60}
  out_dir.mkdir(parents=True, exist_ok=True)
  from jaxlab import experiment_results
  experiment_results.write(out_dir, name, render(out), out)
  print(render(out))
  return out


if __name__ == "__main__":
  main()
