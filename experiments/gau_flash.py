"""GAU and FLASH (Hua et al. 2022) on this machine: forward+backward time and working memory against
sequence length, next to softmax attention measured in the same run.

    nice -n 10 python experiments/gau_flash.py [--quick]

Writes experiments/results/gau_flash.md (+ .json, + gau_flash.png, a log-log plot). Method as in
experiments/attention_zoo.py: B=1, causal, float32, one head with q/k dim s=64 and value dim e=64 (GAU's
paper shape is s=128, e=2d; 64 keeps the rows comparable with the zoo's); memory = the compiled
forward+backward's XLA temporary buffer size (`memory_analysis().temp_size_in_bytes`), time = median
wall time of the jitted forward+backward (gradients with respect to every input). Only the attention
function is timed (no projections). FLASH uses chunk size 256 (the paper's), its four query/key
transforms are independent random arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

S = E = 64
CHUNK = 256


def _families():
  from jaxlab import attention as a
  return {
      "softmax (xla), reference": lambda q, k, lq, lk, v: a.dot_product_attention(
          q, k, v, causal=True, implementation="xla"),
      "softmax (blockwise)": lambda q, k, lq, lk, v: a.dot_product_attention(
          q, k, v, causal=True, implementation="blockwise"),
      "GAU relu^2": lambda q, k, lq, lk, v: a.gau_attention(q, k, v, causal=True),
      "GAU softmax + log-n": lambda q, k, lq, lk, v: a.gau_attention(
          q, k, v, causal=True, kind="softmax", logn_train_len=512),
      f"FLASH mixed chunk (C={CHUNK})": lambda q, k, lq, lk, v: a.mixed_chunk_attention(
          q, k, lq, lk, v, chunk_size=CHUNK, causal=True),
  }


def measure(name: str, fn, length: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(length), 6)
  q, k, lq, lk = (jax.random.normal(key, (1, length, 1, S), jnp.float32) for key in keys[:4])
  v, g = (jax.random.normal(key, (1, length, 1, E), jnp.float32) for key in keys[4:])
  loss = lambda *args: jnp.sum(fn(*args) * g)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(q, k, lq, lk, v).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(q, k, lq, lk, v))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, lq, lk, v))
    times.append(time.perf_counter() - start)
  return {"family": name, "length": length, "ms": 1000 * statistics.median(times),
          "temp_mib": temp / 2 ** 20}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="lengths 256 and 1024 only")
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  lengths = [256, 1024] if args.quick else [256, 1024, 4096, 16384]
  families = _families()
  start = time.time()
  rows = []
  for length in lengths:
    for name, fn in families.items():
      rows.append(measure(name, fn, length, repeats=5 if length <= 4096 else 2))
      print(json.dumps(rows[-1]), flush=True)
  wall = time.time() - start

  import jax
  from attention_zoo import plot
  from jaxlab.train.host_devices import cpu_model
  device = f"{cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__} (CPU)"
  out.mkdir(parents=True, exist_ok=True)
  stem = "gau_flash_quick" if args.quick else "gau_flash"
  get = lambda name, t: next(r for r in rows if r["family"] == name and r["length"] == t)
  ref = "softmax (xla), reference"
  lines = [f"# GAU and FLASH ({'quick' if args.quick else 'full'})", "",
           f"Device: {device}. Command: `nice -n 10 python experiments/gau_flash.py"
           f"{' --quick' if args.quick else ''}` ({wall:.0f} s).", "",
           f"## Forward+backward, causal, B=1, one head, s = e = {S}, float32", "",
           "Each cell: median time / XLA temporary memory; in brackets the ratio to softmax (xla) at "
           "the same length (time x, memory x).", "",
           "| family | " + " | ".join(f"T={t}" for t in lengths) + " |",
           "| --- | " + " | ".join("---" for _ in lengths) + " |"]
  for name in families:
    cells = []
    for t in lengths:
      r, x = get(name, t), get(ref, t)
      cells.append(f"{r['ms']:.1f} ms / {r['temp_mib']:.1f} MiB "
                   f"({r['ms'] / x['ms']:.2f}x, {r['temp_mib'] / max(x['temp_mib'], 1e-9):.3f}x)")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  flash = f"FLASH mixed chunk (C={CHUNK})"
  lo, hi = lengths[-2], lengths[-1]
  growth = get(flash, hi)["temp_mib"] / max(get(flash, lo)["temp_mib"], 1e-9)
  lines += ["", f"FLASH working memory grows {growth:.1f}x from T={lo} to T={hi} "
            f"({hi // lo}x longer: linear); GAU, like softmax (xla), grows "
            f"{get('GAU relu^2', hi)['temp_mib'] / max(get('GAU relu^2', lo)['temp_mib'], 1e-9):.1f}x "
            f"(quadratic). At T={hi}, FLASH uses "
            f"{get(ref, hi)['temp_mib'] / max(get(flash, hi)['temp_mib'], 1e-9):.0f}x less working "
            f"memory and is {get(ref, hi)['ms'] / get(flash, hi)['ms']:.1f}x faster than softmax (xla).",
            "", f"![plot]({stem}.png)"]
  from jaxlab import experiment_results
  experiment_results.write(out, stem, "\n".join(lines), {
      "device": device, "wall_s": wall, "s": S, "e": E, "chunk": CHUNK, "speed": rows})
  try:  # after the results are saved: a machine without matplotlib keeps them
    plot(rows, out / f"{stem}.png", names=list(families))
  except ImportError:  # matplotlib is the experiments extra
    print("matplotlib is not installed: no plot", file=sys.stderr)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
