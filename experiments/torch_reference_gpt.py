"""PyTorch reference for the `lm_char_cpu` benchmark: the same GPT, data and optimizer, written plainly.

Used only to time the reference on the same machine in the same run as jaxlab (see
experiments/lm_char_cpu.py); not part of the jaxlab package. Needs `pip install torch` (CPU build).

Model: 4 pre-norm blocks (LayerNorm without bias, causal self-attention with fused QKV, GELU MLP x4),
learned positions, tied embeddings, no biases, N(0, 0.02) init with residual projections scaled by
1/sqrt(2 * layers). AdamW(lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on matrices), linear warmup 100
steps then cosine to 1e-4 at 2000 (--lr, --min_lr, --warmup, --steps: lm_char_cpu.py passes the jaxlab
config's), gradient clipping at 1.0, batch 12 x 64 random windows.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.ln1 = nn.LayerNorm(width, bias=False)
    self.qkv = nn.Linear(width, 3 * width, bias=False)
    self.proj = nn.Linear(width, width, bias=False)
    self.ln2 = nn.LayerNorm(width, bias=False)
    self.fc = nn.Linear(width, 4 * width, bias=False)
    self.fc_out = nn.Linear(4 * width, width, bias=False)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
    q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
    return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):

  def __init__(self, vocab: int, ctx: int, width: int = 128, layers: int = 4, heads: int = 4):
    super().__init__()
    self.tok = nn.Embedding(vocab, width)
    self.pos = nn.Embedding(ctx, width)
    self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
    self.ln_f = nn.LayerNorm(width, bias=False)
    self.head = nn.Linear(width, vocab, bias=False)
    self.head.weight = self.tok.weight
    for name, p in self.named_parameters():
      if p.dim() == 2:
        std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
        nn.init.normal_(p, 0.0, std)

  def forward(self, idx, targets):
    x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
    for block in self.blocks:
      x = block(x)
    logits = self.head(self.ln_f(x))
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def all_windows_loss(loss_of, tokens: torch.Tensor, ctx: int, chunk: int = 512) -> float:
  """Mean next-token loss over every (ctx + 1)-token window of `tokens` (1-D int64): the population that
  random validation batches sample. `loss_of(inputs_BT, targets_BT)` is a batch's mean loss (a float
  tensor). Call under torch.no_grad(). Also used on nanoGPT's model (experiments/nanogpt_reference.py)."""
  span = torch.arange(ctx + 1)
  starts_all = torch.arange(len(tokens) - ctx)
  total = 0.0
  for starts in starts_all.split(chunk):
    windows = tokens[starts[:, None] + span]
    total += loss_of(windows[:, :-1].contiguous(), windows[:, 1:].contiguous()).item() * len(starts)
  return total / len(starts_all)


def lr_at(step: int, lr=1e-3, min_lr=1e-4, warmup=100, total=2000) -> float:
  if step < warmup:
    return lr * step / warmup
  frac = min(1.0, (step - warmup) / (total - warmup))
  return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--data", required=True)
  parser.add_argument("--steps", type=int, default=2000, help="also where the cosine decay ends")
  parser.add_argument("--warmup", type=int, default=100)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--min_lr", type=float, default=1e-4)
  parser.add_argument("--eval_batches", type=int, default=200)
  parser.add_argument("--threads", type=int, default=0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  text = open(args.data, encoding="utf-8").read()
  chars = sorted(set(text))
  lookup = np.zeros(max(ord(c) for c in chars) + 1, np.int64)
  lookup[[ord(c) for c in chars]] = np.arange(len(chars))
  data = lookup[np.array([ord(c) for c in text])]
  cut = int(0.9 * len(data))
  train, val = torch.from_numpy(data[:cut]), torch.from_numpy(data[cut:])
  ctx, batch = 64, 12
  gen = torch.Generator().manual_seed(args.seed)

  def get_batch(split, g):
    src = train if split == "train" else val
    starts = torch.randint(len(src) - ctx - 1, (batch,), generator=g)
    x = torch.stack([src[i:i + ctx] for i in starts])
    y = torch.stack([src[i + 1:i + ctx + 1] for i in starts])
    return x, y

  model = GPT(len(chars), ctx)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
  times = []
  for step in range(args.steps):
    t0 = time.perf_counter()
    for group in opt.param_groups:
      group["lr"] = lr_at(step, args.lr, args.min_lr, args.warmup, args.steps)
    x, y = get_batch("train", gen)
    loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    loss.item()
    if step:
      times.append(time.perf_counter() - t0)
  model.eval()
  eval_gen = torch.Generator().manual_seed(1234)
  with torch.no_grad():
    val_loss = float(np.mean([model(*get_batch("val", eval_gen)).item()
                              for _ in range(args.eval_batches)]))
    val_loss_all_windows = all_windows_loss(model, val, ctx)
  print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "steps": args.steps, "seed": args.seed, "ms_per_step": 1000 * float(np.median(times)),
                    "val_loss": val_loss, "val_loss_all_windows": val_loss_all_windows}))


if __name__ == "__main__":
  main()
