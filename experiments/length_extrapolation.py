"""Train short, test long: the same small LM trained at context 128 once per position encoding, then
evaluated at contexts 128 ... 2048 (and RoPE's context-extension methods applied without retraining).

    python experiments/length_extrapolation.py                 # full: ~1 h on 2 CPU cores
    python experiments/length_extrapolation.py --quick         # minutes; what tests/experiments runs

Writes experiments/results/length_extrapolation{,_quick}.{md,json,png}.

Set-up (full): tiny shakespeare (../shared/data/tinyshakespeare/input.txt, 90/10 split), characters,
`lm_char` model (4 layers, width 128, 4 heads, pre-norm, tied embeddings), context 128, batch 16,
`--steps` AdamW steps (warmup + cosine), one model per encoding: sinusoidal, learned, none (NoPE),
rope, t5, alibi, xpos. Evaluation on the validation split, per-character loss (nats) and
next-character accuracy, at each context L in two ways (Press et al. 2022, ALiBi, sec. 4 and app. B):
  * non-overlapping: the text cut into windows of L tokens, every token scored (a token's context is its
    position in its window, so the mean mixes short and long contexts);
  * sliding: windows of L tokens with stride S = 64, only the last S tokens of each window scored (every
    scored token sees at least L - S tokens of context); the same tokens at every L (from position
    max(L) - S of the split on), so the columns differ only in context.
Without retraining, the RoPE model is also evaluated with PI (linear), NTK-aware, dynamic NTK and YaRN
scaling at factor L / 128, log-n query scaling (Su 2023; Chiang & Cholak 2022), NTK + log-n, and ReRoPE /
leaky ReRoPE (Su 2023, window 64) with and without log-n. The learned table has 128 rows, so the learned
model cannot be evaluated beyond L = 128 (reported as n/a).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

from jaxlab.train.host_devices import cpu_model

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

ENCODINGS = ("sinusoidal", "learned", "none", "rope", "t5", "alibi", "xpos")


def rope_variants(w: int) -> dict:
  """RoPE evaluated without retraining: name -> config.model overrides (factors set per length)."""
  return {
      "rope + PI": {"rope_scaling": "linear"},
      "rope + NTK": {"rope_scaling": "ntk"},
      "rope + dynamic NTK": {"rope_scaling": "dynamic_ntk"},
      "rope + YaRN": {"rope_scaling": "yarn"},
      "rope + log-n": {"logn_scaling": True},
      "rope + NTK + log-n": {"rope_scaling": "ntk", "logn_scaling": True},
      f"rope + ReRoPE(w={w})": {"rerope_window": w},
      f"rope + ReRoPE(w={w}) + log-n": {"rerope_window": w, "logn_scaling": True},
      f"rope + leaky ReRoPE(w={w}, k=16)": {"rerope_window": w, "rerope_leaky_k": 16.0},
  }

SCALED = ("linear", "ntk", "yarn")  # their factor is L / train length; dynamic NTK follows L itself


def settings(quick: bool) -> dict:
  if quick:
    return dict(train_len=32, lengths=[32, 64, 128], stride=16, steps=60, layers=2, width=64,
                heads=4, batch=16, eval_tokens=2048, sliding_tokens=512, rerope_window=16)
  return dict(train_len=128, lengths=[128, 256, 512, 1024, 2048], stride=64, steps=1000, layers=4,
              width=128, heads=4, batch=16, eval_tokens=16384, sliding_tokens=4096,
              rerope_window=64)


def train_overrides(s: dict, data: str, encoding: str, steps: int) -> list[str]:
  return ["--config.data.name=tiny_shakespeare", f"--config.data.path={data}",
          "--config.data.vocab=char", f"--config.data.seq_len={s['train_len']}",
          f"--config.data.batch_size={s['batch']}", f"--config.model.num_layers={s['layers']}",
          f"--config.model.width={s['width']}", f"--config.model.num_heads={s['heads']}",
          f"--config.model.position={encoding}", f"--config.train.steps={steps}",
          f"--config.optim.warmup_steps={max(1, min(100, steps // 10))}",
          f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
          f"--config.train.log_every={max(1, steps // 10)}", "--config.train.eval_batches=20",
          "--config.train.tensorboard=False", "--config.sample.num_tokens=0"]


def eval_model(config, vocab_size: int, train_len: int, variant: dict, length: int):
  """The GPT of `config.model` with a RoPE variant's overrides for evaluation at `length`."""
  import ml_collections
  from jaxlab.models.gpt import gpt_from_config
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  for key, value in variant.items():
    model_cfg[key] = value
  model_cfg.rope_train_len = train_len
  if model_cfg.rope_scaling in SCALED:
    # Factor 1 up to the training length: each method itself must then be plain RoPE (no shortcut
    # to rope_scaling="none" here, so tests/experiments can check that it is).
    model_cfg.rope_scaling_factor = max(1.0, length / train_len)
  elif model_cfg.rope_scaling == "dynamic_ntk":
    model_cfg.rope_scaling_factor = 1.0  # alpha = L / train_len beyond the training length
  return gpt_from_config(model_cfg, vocab_size, max_len=train_len)


def score(model, params, tokens, *, length: int, stride: int, num_scored: int, sliding: bool,
          first_scored: int = 0, batch_tokens: int = 8192) -> tuple[float, float, int]:
  """(mean loss in nats, next-token accuracy, scored tokens) over windows of `length` tokens.

  Non-overlapping: consecutive windows from the start, every prediction scored. Sliding: windows start
  every `stride` tokens and only their last `stride` predictions are scored, those made at input
  positions first_scored, first_scored + 1, ...: the same targets at every length (first_scored must be
  >= length - stride, so that the first window starts inside the text).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  if sliding and length < stride:
    raise ValueError(f"a sliding window of {length} tokens cannot score its last {stride}")
  if sliding and first_scored < length - stride:
    raise ValueError(f"first_scored={first_scored} leaves a window of {length} tokens less than "
                     f"{length - stride} tokens of context before it")
  step = stride if sliding else length
  first_start = first_scored - (length - stride) if sliding else 0
  starts = list(range(first_start, len(tokens) - length - 1, step))
  needed = -(-num_scored // (stride if sliding else length))
  starts = starts[:needed]
  if not starts:
    raise ValueError(f"validation text too short for windows of {length}")
  scored_from = length - stride if sliding else 0

  @jax.jit
  def batch_stats(inputs_BT, targets_BT):
    logits_BTV = model.apply({"params": params}, inputs_BT)[:, scored_from:]
    targets_BT = targets_BT[:, scored_from:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    correct = jnp.argmax(logits_BTV, -1) == targets_BT
    return ce.sum(), correct.sum()

  per_batch = max(1, batch_tokens // length)
  loss, correct, count = 0.0, 0, 0
  for i in range(0, len(starts), per_batch):
    windows = np.stack([tokens[s:s + length + 1] for s in starts[i:i + per_batch]])
    ce_sum, ok = batch_stats(windows[:, :-1].astype(np.int32), windows[:, 1:].astype(np.int32))
    loss += float(ce_sum)
    correct += int(ok)
    count += len(windows) * (length - scored_from)
  return loss / count, correct / count, count


def run(args) -> dict:
  s = settings(args.quick)
  steps = args.steps or s["steps"]
  lengths = args.lengths or s["lengths"]
  encodings = args.encodings or list(ENCODINGS)
  data = str(pathlib.Path(args.data).resolve())
  from jaxlab.cli import load_run_config
  first = load_run_config("lm_char", train_overrides(s, data, encodings[0], steps))
  import jax
  import numpy as np
  from jaxlab.data import text
  from jaxlab.train import trainer

  corpus = text.load_corpus(first.data)
  val = np.asarray(corpus.validation)
  device = f"{cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})"
  # Sliding windows score the same characters at every L: from max(L) - stride on, where the longest
  # window starts at the text's first character.
  out = {"device": device, "settings": dict(s, steps=steps, lengths=lengths,
                                            sliding_first_scored=max(lengths) - s["stride"]),
         "models": [], "rows": []}
  previous = pathlib.Path(args.out) / f"length_extrapolation{'_quick' if args.quick else ''}.json"
  earlier_seconds = 0.0
  if args.merge and previous.is_file():  # keep the other encodings' results from an earlier run
    old = json.loads(previous.read_text())
    if old["settings"] != out["settings"]:
      raise SystemExit(f"--merge: {previous} was made with other settings: {old['settings']}")
    out["models"] = [m for m in old["models"] if m["encoding"] not in encodings]
    out["rows"] = [r for r in old["rows"] if r["encoding"] not in encodings]
    earlier_seconds = sum(m["train_seconds"] for m in out["models"]) + sum(
        r.get("seconds", 0.0) for r in out["rows"])
  started = time.time() - earlier_seconds
  for encoding in encodings:
    config = load_run_config("lm_char", train_overrides(s, data, encoding, steps))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as workdir:
      result = trainer.train(config, workdir, progress=False)
    params = jax.device_get(result["state"]["params"])
    train_s = time.time() - t0
    out["models"].append({"encoding": encoding, "val_loss_at_train_len": result["val_loss"],
                          "train_seconds": train_s})
    print(f"# {encoding}: trained {steps} steps in {train_s:.0f} s, val loss "
          f"{result['val_loss']:.4f}", flush=True)
    variants = {encoding: {}}
    if encoding == "rope":
      variants.update({name: v for name, v in rope_variants(s["rerope_window"]).items()
                       if args.variants is None or name in args.variants})
    for name, variant in variants.items():
      for length in lengths:
        for sliding in (False, True):
          row = {"model": name, "encoding": encoding, "length": length,
                 "mode": "sliding" if sliding else "non-overlapping"}
          if encoding == "learned" and length > s["train_len"]:
            row.update(loss=None, accuracy=None, note="positions beyond the learned table")
          else:
            model = eval_model(config, corpus.vocab.size, s["train_len"], variant, length)
            t1 = time.time()
            loss, acc, count = score(model, params, val, length=length, stride=s["stride"],
                                     num_scored=s["sliding_tokens"] if sliding else s["eval_tokens"],
                                     sliding=sliding, first_scored=max(lengths) - s["stride"])
            row.update(loss=loss, accuracy=acc, scored=count, seconds=time.time() - t1)
          out["rows"].append(row)
          print(json.dumps(row), flush=True)
    out["wall_seconds"] = time.time() - started
    write(out, args.quick, pathlib.Path(args.out))  # partial results survive an interrupted run
  return out


def _cell(rows, model, length, mode):
  r = next((x for x in rows if x["model"] == model and x["length"] == length and x["mode"] == mode),
           None)
  if r is None:
    return ""
  if r["loss"] is None:
    return "n/a"
  return f"{r['loss']:.3f} / {100 * r['accuracy']:.1f}%"


def write(out: dict, quick: bool, results: pathlib.Path = RESULTS) -> None:
  results.mkdir(parents=True, exist_ok=True)
  stem = "length_extrapolation_quick" if quick else "length_extrapolation"
  s, rows = out["settings"], out["rows"]
  lengths = s["lengths"]
  models = list(dict.fromkeys(r["model"] for r in rows))
  lines = [f"# Length extrapolation ({'quick' if quick else 'full'})", "",
           f"Device: {out['device']}. Wall time {out['wall_seconds'] / 60:.1f} min. Command: "
           f"`python experiments/length_extrapolation.py{' --quick' if quick else ''}`.", "",
           f"Tiny shakespeare, characters; {s['layers']} layers, width {s['width']}, {s['heads']} "
           f"heads; trained at context {s['train_len']} for {s['steps']} steps, batch {s['batch']}. "
           f"Validation split: non-overlapping windows over {s['eval_tokens']} characters; sliding "
           f"windows with stride {s['stride']} scoring the last {s['stride']} characters of each, "
           + (f"the same {s['sliding_tokens']} characters at every L (from character "
              f"{s['sliding_first_scored']} of the split on, so each has at least L - {s['stride']} "
              "characters of context)" if "sliding_first_scored" in s else
              f"{s['sliding_tokens']} characters scored from the split's start (so a different set "
              "at each L: an earlier protocol)")
           + ". Cells: loss (nats/char) / next-char accuracy.",
           ""] + ([out["note"], ""] if out.get("note") else [])
  for mode in ("non-overlapping", "sliding"):
    lines += [f"## {mode}", "", "| model | " + " | ".join(f"L={t}" for t in lengths) + " |",
              "| --- | " + " | ".join("---" for _ in lengths) + " |"]
    for m in models:
      lines.append(f"| {m} | " + " | ".join(_cell(rows, m, t, mode) for t in lengths) + " |")
    lines.append("")
  lines += ["## Training", "", "| encoding | val loss at the training length | train time (s) |",
            "| --- | --- | --- |"]
  for m in out["models"]:
    lines.append(f"| {m['encoding']} | {m['val_loss_at_train_len']:.4f} | "
                 f"{m['train_seconds']:.0f} |")
  lines += ["", f"![plot]({stem}.png)", ""]
  from jaxlab import experiment_results
  experiment_results.write(results, stem, "\n".join(lines), out)
  plot(out, results / f"{stem}.png")


def plot(out: dict, path: pathlib.Path) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  rows = out["rows"]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  models = list(dict.fromkeys(r["model"] for r in rows))
  colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(models)}
  for ax, mode in zip(axes, ("non-overlapping", "sliding")):
    for m in models:
      pts = [(r["length"], r["loss"]) for r in rows
             if r["model"] == m and r["mode"] == mode and r["loss"] is not None]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=m, color=colors[m],
                linestyle="-" if "+" not in m else "--")
    ax.set_xscale("log", base=2)
    ax.axvline(out["settings"]["train_len"], color="grey", linewidth=0.8)
    ax.set_title(f"{mode} windows")
    ax.set_xlabel("evaluation context L (tokens)")
  axes[0].set_ylabel("validation loss (nats/char)")
  axes[1].legend(fontsize=7, loc="upper left")
  top = [r["loss"] for r in rows if r["loss"] is not None]
  if top:
    axes[0].set_ylim(min(top) - 0.05, min(max(top), 4.5) + 0.05)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", default=str(DEFAULT_DATA), help="tiny shakespeare input.txt")
  parser.add_argument("--quick", action="store_true", help="tiny model, context 32, minutes")
  parser.add_argument("--steps", type=int, default=0, help="training steps per encoding")
  parser.add_argument("--encodings", type=lambda t: t.split(","), default=None,
                      help=f"comma-separated subset of {','.join(ENCODINGS)}")
  parser.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")], default=None)
  parser.add_argument("--variants", type=lambda t: [v.strip() for v in t.split(";")], default=None,
                      help="semicolon-separated RoPE variant names to evaluate (names hold commas; "
                      "default: all)")
  parser.add_argument("--merge", action="store_true",
                      help="replace only these encodings' results in an existing results file")
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  args = parser.parse_args(argv)
  if args.encodings and set(args.encodings) - set(ENCODINGS):
    parser.error(f"--encodings must be a subset of {','.join(ENCODINGS)}")
  s = settings(args.quick)
  known = rope_variants(s["rerope_window"])
  if args.variants and set(args.variants) - set(known):
    parser.error(f"--variants: unknown {sorted(set(args.variants) - set(known))}; the variants are "
                 f"{'; '.join(known)}")
  if args.lengths and min(args.lengths) < s["stride"]:
    parser.error(f"--lengths must be >= the sliding stride {s['stride']} (a window scores its last "
                 f"{s['stride']} tokens)")
  out = run(args)
  print((pathlib.Path(args.out) / ("length_extrapolation_quick.md" if args.quick else
                                   "length_extrapolation.md")).read_text())
  return out


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
