"""Attention zoo on this machine: forward+backward time and working memory against sequence length for
every causal family, and the quality of the same small LM trained with each family.

    python experiments/attention_zoo.py --data ../shared/data/tinyshakespeare/input.txt [--quick]

Writes experiments/results/attention_zoo.md (+ .json, + attention_zoo.png, a log-log plot).
Part 1: B=1, one head of dimension 64, causal, float32; memory = the compiled forward+backward's XLA
temporary buffer size (`memory_analysis().temp_size_in_bytes`: the working set beyond inputs and
outputs), time = median wall time of the jitted forward+backward. Swin windows are left out: they are
non-causal attention over 2-D feature maps, not a sequence family. Part 2: `lm_char_cpu` with
`--config.model.attention=...` for a fixed number of steps, val loss on the fixed validation batches,
and each model's parameter count (the GAU and FLASH models have two gated attention units per block
and no MLP, not the same LM).

The script checks what the issue requires of part 1 and exits non-zero if it does not hold: at the
longest length blockwise softmax needs >= 10x less working memory than "xla", and the linear-memory
families grow at most ~linearly (memory ratio <= 1.5x the length ratio between the two longest lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import statistics
import sys
import time

from jaxlab.train.host_devices import cpu_model

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
import lm_runs  # noqa: E402  (experiments/lm_runs.py)

FAMILIES = {
    "softmax (xla)": lambda a, q, k, v: a.dot_product_attention(q, k, v, causal=True,
                                                                implementation="xla"),
    "softmax (blockwise)": lambda a, q, k, v: a.dot_product_attention(q, k, v, causal=True,
                                                                      implementation="blockwise"),
    "local (window 256)": lambda a, q, k, v: a.local_attention(q, k, v, window=(256, 0),
                                                               causal=True),
    "linear (elu+1)": lambda a, q, k, v: a.linear_attention(q, k, v, causal=True),
    "performer (64 features)": lambda a, q, k, v: a.performer_attention(
        q, k, v, key=__import__("jax").random.key(0), num_features=64, causal=True),
    "block-sparse (strided 128-blocks)": lambda a, q, k, v: a.block_sparse_attention(
        q, k, v, block_size=128, causal=True,
        layout=a.strided_layout(-(-q.shape[1] // 128), local_blocks=2, stride=8)),
    "FLASH mixed chunk (C=256)": lambda a, q, k, v: a.mixed_chunk_attention(
        q, k, q, k, v, chunk_size=256, causal=True),
    "GAU relu^2 (quadratic)": lambda a, q, k, v: a.gau_attention(q, k, v, causal=True),
}
# Families whose working memory must grow linearly with the length (checked by `check_claims`).
LINEAR_MEMORY = ("softmax (blockwise)", "local (window 256)", "linear (elu+1)",
                 "performer (64 features)", "FLASH mixed chunk (C=256)")
LM_FAMILIES = {"softmax": [],
               "local": ["--config.model.attention=local", "--config.model.attention_window=16"],
               "linear": ["--config.model.attention=linear"],
               "performer": ["--config.model.attention=performer"],
               "block_sparse": ["--config.model.attention=block_sparse",
                                "--config.model.sparse_layout=strided",
                                "--config.model.sparse_block_size=8",
                                "--config.model.sparse_local_blocks=2",
                                "--config.model.sparse_stride=4"],
               "gau": ["--config.model.attention=gau", "--config.model.gau_offset_init=0.5"],
               "flash": ["--config.model.attention=flash", "--config.model.gau_offset_init=0.5"],
               "flash (C=16)": ["--config.model.attention=flash", "--config.model.gau_offset_init=0.5",
                                "--config.model.flash_chunk=16"]}


def measure(name: str, length: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from jaxlab import attention
  fn = FAMILIES[name]
  keys = jax.random.split(jax.random.key(length), 4)
  shape = (1, length, 1, 64)
  q, k, v, g = (jax.random.normal(key, shape, jnp.float32) for key in keys)
  loss = lambda q, k, v: jnp.sum(fn(attention, q, k, v) * g)
  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  compiled = step.lower(q, k, v).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(q, k, v))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    times.append(time.perf_counter() - start)
  return {"family": name, "length": length, "ms": 1000 * statistics.median(times),
          "temp_mib": temp / 2 ** 20}


def quality(data: str, family: str, steps: int, eval_batches: int = 0) -> dict:
  """Trains the lm_char_cpu model with one family in a child process (clean CPU devices)."""
  args = [f"--config.data.path={data}", f"--config.train.steps={steps}",
          f"--config.optim.warmup_steps={min(100, steps // 10)}",
          f"--config.train.eval_every={steps}", "--config.train.tensorboard=False"]
  args += LM_FAMILIES[family]
  if eval_batches:
    args.append(f"--config.train.eval_batches={eval_batches}")
  result = lm_runs.train_lm("lm_char_cpu", args)
  result.update(family=family, steps=steps)
  return result


def plot(rows, path, names=None):
  """Time and working memory against sequence length, one line per family (`names`: which, in this
  order; default FAMILIES), written to `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name in names or FAMILIES:
    pts = [r for r in rows if r["family"] == name]
    if not pts:
      continue
    xs = [r["length"] for r in pts]
    axes[0].loglog(xs, [r["ms"] for r in pts], "o-", label=name)
    axes[1].loglog(xs, [max(r["temp_mib"], 1e-3) for r in pts], "o-", label=name)
  axes[0].set(xlabel="sequence length", ylabel="forward+backward ms", title="time")
  axes[1].set(xlabel="sequence length", ylabel="XLA temp MiB", title="working memory")
  axes[0].legend(fontsize=8)
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def check_claims(rows, lengths) -> list[str]:
  """The part-1 properties the issue requires; returns the violated ones (empty = all hold).

  They are claims about long sequences, so they are checked only there: the 10x memory saving at a
  longest length >= 16k, the linear growth between two lengths >= 1k (at a few hundred tokens fixed
  costs dominate the working set).
  """
  at = {(r["family"], r["length"]): r["temp_mib"] for r in rows}
  big, prev = lengths[-1], lengths[-2] if len(lengths) > 1 else lengths[-1]
  failures = []
  if big >= 16384 and ("softmax (xla)", big) in at and ("softmax (blockwise)", big) in at:
    ratio = at[("softmax (xla)", big)] / max(at[("softmax (blockwise)", big)], 1e-9)
    if ratio < 10:
      failures.append(f"blockwise uses only {ratio:.1f}x less memory than xla at T={big} (< 10x)")
  for name in LINEAR_MEMORY:
    if prev >= 1024 and big > prev and (name, big) in at and (name, prev) in at:
      growth = at[(name, big)] / max(at[(name, prev)], 1e-9)
      if growth > 1.5 * big / prev:
        failures.append(f"{name}: memory grew {growth:.1f}x for {big / prev:.0f}x length")
  return failures


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="tiny shakespeare input.txt")
  parser.add_argument("--quick", action="store_true", help="lengths up to 1k, 100 LM steps")
  parser.add_argument("--steps", type=int, default=None,
                      help="LM steps per family (part 2; default 1000, --quick 100)")
  parser.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")], default=None,
                      help="part 1 sequence lengths, comma-separated (default 256..16384)")
  names = lambda text: [x for x in text.split(",") if x]
  parser.add_argument("--families", type=names, default=list(FAMILIES),
                      help="part 1 families to (re)measure, comma-separated")
  parser.add_argument("--lm-families", type=names, default=list(LM_FAMILIES),
                      help="part 2 families to (re)train, comma-separated")
  parser.add_argument("--merge", action="store_true",
                      help="keep the other families' results from the existing results file")
  parser.add_argument("--eval-batches", type=int, default=0,
                      help="part 2 validation batches (default: the config's)")
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  for name in args.families:
    if name not in FAMILIES:
      parser.error(f"--families: unknown family {name!r}; choose from {list(FAMILIES)}")
  for name in args.lm_families:
    if name not in LM_FAMILIES:
      parser.error(f"--lm-families: unknown family {name!r}; choose from {list(LM_FAMILIES)}")
  lengths = args.lengths or ([256, 512, 1024] if args.quick else [256, 1024, 4096, 16384])
  steps = args.steps or (100 if args.quick else 1000)
  stem = "attention_zoo_quick" if args.quick else "attention_zoo"
  out = pathlib.Path(args.out)
  import jax
  device = f"{cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__} (CPU)"
  rows, lm = [], []
  if args.merge and (out / f"{stem}.json").is_file():
    old = json.loads((out / f"{stem}.json").read_text())
    # Each row keeps the device it was measured on (older files name one device for all rows).
    rows = [{"device": old["device"], **r} for r in old["speed"] if r["family"] not in args.families]
    lm = [{"device": old["device"], **r} for r in old["lm"] if r["family"] not in args.lm_families]
  for length in lengths:
    for name in args.families:
      rows.append({**measure(name, length, repeats=5 if length <= 4096 else 2), "device": device})
      print(json.dumps(rows[-1]), flush=True)
  for f in args.lm_families:
    lm.append({**quality(str(pathlib.Path(args.data).resolve()), f, steps, args.eval_batches),
               "device": device})
    print(json.dumps(lm[-1]), flush=True)
  rows.sort(key=lambda r: (r["length"], list(FAMILIES).index(r["family"])))
  lm.sort(key=lambda r: list(LM_FAMILIES).index(r["family"]))
  devices = {r["device"]: None for r in rows + lm}  # in order of first appearance
  if len(devices) > 1:  # rows merged from runs on other machines: say which ran where
    device = "; ".join(
        f"{d} ({', '.join(dict.fromkeys(r['family'] for r in rows + lm if r['device'] == d))})"
        for d in devices)
  out.mkdir(parents=True, exist_ok=True)
  failures = check_claims(rows, lengths)
  command = shlex.join(["python", "experiments/attention_zoo.py", *argv])
  try:
    plot(rows, out / f"{stem}.png")
  except ImportError:  # matplotlib is the experiments extra
    print("matplotlib is not installed: no plot", file=sys.stderr)
  lines = [f"# Attention zoo ({'quick' if args.quick else 'full'})", "",
           f"Device{'s' if len(devices) > 1 else ''}: {device}. Command: `{command}`"
           + (" (the last run; --merge kept the other rows of earlier runs)" if args.merge else "")
           + ".", "",
           "## Forward+backward, causal, B=1, one head, head_dim 64, float32", "",
           "Time / XLA working memory (temp buffers) of the jitted forward+backward. Swin windows are "
           "not in this table: they are non-causal attention over 2-D feature maps.", "",
           "| family | " + " | ".join(f"T={t}" for t in lengths) + " |",
           "| --- | " + " | ".join("---" for _ in lengths) + " |"]
  for name in FAMILIES:
    cells = []
    for t in lengths:
      r = next((x for x in rows if x["family"] == name and x["length"] == t), None)
      cells.append("" if r is None else f"{r['ms']:.1f} ms / {r['temp_mib']:.1f} MiB")
    if any(cells):
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  big = lengths[-1]
  xla = next((r for r in rows if r["family"] == "softmax (xla)" and r["length"] == big), None)
  blk = next((r for r in rows if r["family"] == "softmax (blockwise)" and r["length"] == big), None)
  if xla and blk:
    lines += ["", f"At T={big}, blockwise softmax uses "
              f"{xla['temp_mib'] / max(blk['temp_mib'], 1e-9):.0f}x less working memory than "
              f"`\"xla\"` ({blk['temp_mib']:.1f} vs {xla['temp_mib']:.1f} MiB)."]
  lines += ["", "Checks (blockwise >= 10x less memory than xla at 16k; linear-memory families grow "
            "at most 1.5x the length ratio between the two longest lengths, from 1k on): "
            + ("all hold." if not failures else "FAILED: " + "; ".join(failures))]
  lines += ["", f"## Quality: lm_char_cpu model, {steps} steps on tiny shakespeare, per family", "",
            "| family | parameters | val loss | ms/step |", "| --- | --- | --- | --- |"]
  for r in lm:
    params = f"{r['params']:,}" if r.get("params") else "n/a"
    lines.append(f"| {r['family']} | {params} | {r['val_loss']:.4f} | "
                 f"{r['ms_per_step'] or float('nan'):.1f} |")
  lines += ["", f"![plot]({stem}.png)"]
  from jaxlab import experiment_results
  experiment_results.write(out, stem, "\n".join(lines), {
      "device": device, "command": command, "speed": rows, "lm": lm, "claims_failed": failures})
  print("\n".join(lines))
  if failures:
    raise SystemExit("attention_zoo: " + "; ".join(failures))


if __name__ == "__main__":
  main()
