"""Quality check of GAU and FLASH (Hua et al. 2022) as LM layers, before they are wired into jaxlab's GPT:
a small char-level LM on tiny shakespeare with (a) pre-norm transformer blocks (softmax
MultiHeadAttention + MLP), (b) GatedAttentionUnit layers, (c) FlashLayer layers, same data, steps and
optimiser; two GAU/FLASH layers per transformer block, which matches the parameter count (the paper's
comparison, sec. 2: one GAU has about half a block's parameters). See MODELS for the variants.

    nice -n 10 python experiments/gau_flash_lm.py --data ../shared/data/tinyshakespeare/input.txt \
        [--steps 500]

Writes experiments/results/gau_flash_lm.md (+ .json): validation loss (nats/char, 16 fixed batches of
the last 10% of the text), parameters and median ms/step (compilation excluded), per model. All models:
width 128, context 128, batch 8, RoPE, AdamW (lr 3e-3, 50 warmup steps, cosine decay; weight decay
0.1 on weight matrices only, `jaxlab.train.optim.decay_mask`, as jaxlab's trainer), seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.train import optim

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

WIDTH, CONTEXT, BATCH, BLOCKS, CHUNK = 128, 128, 8, 3, 32
# name -> (TinyLM kind, layer options). relu^2 GAU with the paper's init (offsets beta = 0, scales
# gamma ~ N(0, 0.02)) starts with logits ~1e-6 where relu^2 has ~zero gradient; offset_init = 0.5 starts
# it from positive logits. FLASH's linear part has no such dead zone.
MODELS = {
    f"transformer ({BLOCKS} x [softmax MHA + MLP])": ("softmax", ()),
    f"GAU relu^2, paper init ({2 * BLOCKS} x GatedAttentionUnit)": ("gau", ()),
    f"GAU relu^2, offset_init=0.5 ({2 * BLOCKS} x GatedAttentionUnit)": (
        "gau", (("offset_init", 0.5),)),
    f"GAU softmax + log-n ({2 * BLOCKS} x GatedAttentionUnit)": (
        "gau", (("kind", "softmax"), ("logn_train_len", CONTEXT))),
    f"FLASH relu^2, paper init ({2 * BLOCKS} x FlashLayer, chunk {CHUNK})": ("flash", ()),
}


class TinyLM(nn.Module):
  """Token embedding -> layers (each x + layer(LayerNorm(x))) -> LayerNorm -> tied output."""

  vocab: int
  kind: str  # "softmax" | "gau" | "flash"
  layer_options: tuple = ()  # extra (name, value) attributes of the GAU / FLASH layers

  @nn.compact
  def __call__(self, tokens_BT):
    from jaxlab.layers import MLP, MultiHeadAttention
    from jaxlab.layers.gau import FlashLayer, GatedAttentionUnit
    embed = nn.Embed(self.vocab, WIDTH, embedding_init=nn.initializers.normal(0.02))
    x = embed(tokens_BT)
    pos = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    for i in range(BLOCKS):
      if self.kind == "softmax":
        x = x + MultiHeadAttention(4, 4, WIDTH // 4, causal=True, position="rope",
                                   name=f"attn{i}")(nn.LayerNorm(name=f"ln_a{i}")(x), pos)
        x = x + MLP(4 * WIDTH, name=f"mlp{i}")(nn.LayerNorm(name=f"ln_m{i}")(x))
        continue
      for j in range(2):
        if self.kind == "gau":
          layer = GatedAttentionUnit(2 * WIDTH, 64, causal=True, position="rope", name=f"gau{i}_{j}",
                                     **dict(self.layer_options))
        else:
          layer = FlashLayer(2 * WIDTH, 64, chunk_size=CHUNK, causal=True, position="rope",
                             relative_bias=True, name=f"flash{i}_{j}", **dict(self.layer_options))
        x = x + layer(nn.LayerNorm(name=f"ln{i}_{j}")(x), pos)
    return embed.attend(nn.LayerNorm(name="ln_f")(x))


def train(kind: str, data: np.ndarray, vocab: int, steps: int, layer_options: tuple = ()) -> dict:
  split = int(0.9 * len(data))
  train_data, val_data = data[:split], data[split:]
  model = TinyLM(vocab, kind, layer_options)
  rng = np.random.default_rng(0)
  batch = lambda src, r: np.stack([src[i:i + CONTEXT + 1] for i in
                                   r.integers(0, len(src) - CONTEXT - 1, BATCH)])
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, CONTEXT), jnp.int32))["params"])
  warmup = min(50, steps // 4)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, steps, 3e-4)
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(schedule, weight_decay=0.1, mask=optim.decay_mask))
  opt_state = opt.init(params)

  def loss_fn(params, seq):
    logits = model.apply({"params": params}, seq[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state, seq):
    loss, grads = jax.value_and_grad(loss_fn)(params, seq)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  times = []
  for i in range(steps):
    seq = jnp.asarray(batch(train_data, rng))
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, seq)
    loss.block_until_ready()
    if i:
      times.append(time.perf_counter() - start)
  val_rng = np.random.default_rng(1234)
  evaluate = jax.jit(loss_fn)
  val = float(np.mean([evaluate(params, jnp.asarray(batch(val_data, val_rng))) for _ in range(16)]))
  return {"model": kind, "val_loss": val, "train_loss": float(loss), "steps": steps,
          "params": int(sum(x.size for x in jax.tree.leaves(params))),
          "ms_per_step": 1000 * statistics.median(times)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="tiny shakespeare input.txt (any text file)")
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  text = pathlib.Path(args.data).read_text()
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  data = np.fromiter((lookup[c] for c in text), np.int32, len(text))
  start = time.time()
  rows = []
  for name, (kind, options) in MODELS.items():
    rows.append(train(kind, data, len(chars), args.steps, options))
    rows[-1]["name"] = name
    print(json.dumps(rows[-1]), flush=True)
  wall = time.time() - start

  from jaxlab.train.host_devices import cpu_model
  device = f"{cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__} (CPU)"
  out.mkdir(parents=True, exist_ok=True)
  (out / "gau_flash_lm.json").write_text(json.dumps(
      {"device": device, "wall_s": wall, "rows": rows}, indent=2))
  lines = ["# GAU and FLASH as LM layers (standalone tiny LM)", "",
           f"Device: {device}. Command: `nice -n 10 python experiments/gau_flash_lm.py --data "
           f"../shared/data/tinyshakespeare/input.txt --steps {args.steps}` ({wall:.0f} s).", "",
           f"Char-level tiny shakespeare, width {WIDTH}, context {CONTEXT}, batch {BATCH}, "
           f"{args.steps} steps, RoPE, AdamW (weight decay 0.1 on weight matrices only); val loss in "
           "nats/char on 16 fixed batches.", "",
           "| model | params | val loss | ms/step (ratio to transformer) |", "| --- | --- | --- | --- |"]
  base = rows[0]["ms_per_step"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['params']:,} | {r['val_loss']:.4f} | "
                 f"{r['ms_per_step']:.1f} ({r['ms_per_step'] / base:.2f}x) |")
  (out / "gau_flash_lm.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
