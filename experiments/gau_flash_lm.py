"""GAU and FLASH (Hua et al. 2022) as LM layers against softmax attention, in jaxlab's GPT: the same
char-level LM on tiny shakespeare, switched by `--config.model.attention`, trained by jaxlab's trainer.

    nice -n 10 python experiments/gau_flash_lm.py --data ../shared/data/tinyshakespeare/input.txt \
        [--steps 500]

Writes experiments/results/gau_flash_lm.md (+ .json): validation loss (nats/char, the trainer's fixed
validation batches), parameters and median ms/step (compilation excluded), per model. All models:
`lm_char_cpu` with width 128, context 128, batch 8, 3 blocks, RoPE, AdamW (lr 3e-3 -> 3e-4, 50 warmup
steps, cosine; weight decay 0.1 on weight matrices only), seed 0. A transformer block is softmax
MHA + MLP; a GAU / FLASH block is two gated attention units (expansion 2 x width), which matches the
parameter count (the paper's comparison, sec. 2: one GAU has about half a block's parameters). GAU's
relu^2 logits are scaled by 1/data.seq_len = 1/128, the paper's 1/T. See MODELS for the variants.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
import lm_runs  # noqa: E402  (experiments/lm_runs.py)

CONTEXT, BATCH, BLOCKS, CHUNK = 128, 8, 3, 32
COMMON = [f"--config.data.seq_len={CONTEXT}", f"--config.data.batch_size={BATCH}",
          f"--config.model.num_layers={BLOCKS}", "--config.model.position=rope",
          "--config.optim.lr=3e-3", "--config.optim.min_lr=3e-4",
          "--config.optim.decay_embeddings=False", "--config.train.tensorboard=False"]
GAU = ["--config.model.attention=gau"]
# name -> overrides. relu^2 GAU with the paper's init (offsets beta = 0, scales gamma ~ N(0, 0.02))
# starts with logits ~1e-6 where relu^2 has ~zero gradient; gau_offset_init = 0.5 starts it from
# positive logits. FLASH's linear part has no such dead zone.
MODELS = {
    f"transformer ({BLOCKS} x [softmax MHA + MLP])": [],
    f"GAU relu^2, paper init ({2 * BLOCKS} x GatedAttentionUnit)": GAU,
    f"GAU relu^2, offset_init=0.5 ({2 * BLOCKS} x GatedAttentionUnit)": GAU + [
        "--config.model.gau_offset_init=0.5"],
    # (No log-n row: config.model.logn_scaling multiplies only the logits of queries that see more
    # than the training context, so at context 128 it trains exactly this model.)
    f"GAU softmax ({2 * BLOCKS} x GatedAttentionUnit)": GAU + ["--config.model.gau_kind=softmax"],
    f"FLASH relu^2, paper init ({2 * BLOCKS} x FlashLayer, chunk {CHUNK})": [
        "--config.model.attention=flash", f"--config.model.flash_chunk={CHUNK}"],
}


def train(name: str, data: str, steps: int) -> dict:
  args = [f"--config.data.path={data}", f"--config.train.steps={steps}",
          f"--config.optim.warmup_steps={min(50, steps // 4)}",
          f"--config.train.eval_every={steps}"] + COMMON + MODELS[name]
  result = lm_runs.train_lm("lm_char_cpu", args)
  result.update(name=name, steps=steps)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="tiny shakespeare input.txt (any text file)")
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  data = str(pathlib.Path(args.data).resolve())
  start = time.time()
  rows = []
  for name in MODELS:
    rows.append(train(name, data, args.steps))
    print(json.dumps(rows[-1]), flush=True)
  wall = time.time() - start

  import jax
  from jaxlab.train.host_devices import cpu_model
  device = f"{cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__} (CPU)"
  out.mkdir(parents=True, exist_ok=True)
  lines = ["# GAU and FLASH as LM layers (jaxlab's GPT, one config switch)", "",
           f"Device: {device}. Command: `nice -n 10 python experiments/gau_flash_lm.py --data "
           f"../shared/data/tinyshakespeare/input.txt --steps {args.steps}` ({wall:.0f} s).", "",
           f"`lm_char_cpu` on tiny shakespeare with {BLOCKS} blocks of width 128, context {CONTEXT}, "
           f"batch {BATCH}, {args.steps} steps, RoPE, AdamW (lr 3e-3 -> 3e-4; weight decay 0.1 on "
           "weight matrices only); val loss in nats/char on the trainer's fixed validation batches; "
           "ms/step: median over the logged intervals.", "",
           "| model | params | val loss | ms/step (ratio to transformer) |", "| --- | --- | --- | --- |"]
  base = rows[0]["ms_per_step"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['params']:,} | {r['val_loss']:.4f} | "
                 f"{r['ms_per_step']:.1f} ({r['ms_per_step'] / base:.2f}x) |")
  from jaxlab import experiment_results
  experiment_results.write(out, "gau_flash_lm", "\n".join(lines),
                           {"device": device, "wall_s": wall, "rows": rows})
  print("\n".join(lines))


if __name__ == "__main__":
  main()
