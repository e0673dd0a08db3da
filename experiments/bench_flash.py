"""Flash attention speed on one GPU: jaxlab's Pallas kernel against cuDNN and XLA, in the same run.

    python experiments/bench_flash.py                 # on an NVIDIA Hopper GPU (H100 / H200)
    python experiments/bench_flash.py --dry-run       # anywhere: tiny shapes, checks the script end to end
    python experiments/bench_flash.py --dry-run --out /tmp/flash   # the same, results/ left alone

For head_dim 64 and 128, sequence lengths 1k..16k at a fixed token count (batch = tokens / length),
causal and not, forward and forward+backward, it times (jitted, bfloat16, heads = --width / head_dim;
the median time per call over 3 to --repeats samples (about 1 s of them), each of enough back-to-back
calls to last about 5 ms, after a warm-up):
  * "pallas": `jaxlab.attention.dot_product_attention(implementation="pallas")` (the default dispatch:
    the Mosaic GPU kernel on Hopper, `flash.MOSAIC_GPU_BY_DEFAULT`, else the portable one),
  * "mosaic_gpu": `jaxlab.attention.flash_attention(kernel="mosaic_gpu")` (Hopper: wgmma, TMA K/V
    ring, warp specialisation; dQ and dK/dV kernels too for head_dim 64/128),
  * "portable": `jaxlab.attention.flash_attention(kernel="portable")` (Triton-lowered Pallas),
  * "cudnn":  `jax.nn.dot_product_attention(implementation="cudnn")`,
  * "xla":    `jax.nn.dot_product_attention(implementation="xla")`.
FLOPs: 4 * B * N * Tq * Tk * D forward, halved for causal; forward+backward counts 3.5x forward
(backward = 2.5x forward, the FlashAttention-2 convention). Reported: TFLOP/s, each jaxlab kernel's
ratio to cuDNN, and the best jaxlab kernel as a fraction of the GPU's dense bf16 peak (--peak-tflops,
default from the device name). Goals (issue 6): forward >= 1.0x cuDNN, forward+backward >= 0.8x cuDNN,
forward >= 60% of peak at 8k, head_dim 128. The table is rewritten after every row, and --budget-s
stops starting new (head_dim, length) pairs after that many seconds (the order of --head-dims and
--lengths is the order of measurement), so a run cut short still leaves its rows. Rows measured by
an earlier run on the same kind of device are kept unless this run measures the same shape again.

Writes <out>/flash_<device>.md and .json (--out, default experiments/results; the kept rows are read
from there too). With --dry-run (or without a GPU) nothing is timed: the shapes are shrunk, the kernel
runs in interpret mode, its output is checked against XLA, and the table is written with empty cells,
saying so. In the dry run "mosaic_gpu" runs in Mosaic GPU
interpret mode, forward only (that mode deadlocks when its kernel is differentiated in jax 0.10; the
gradients of the custom_vjp are checked in tests/attention/test_flash_mosaic_gpu.py instead).
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

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets (SXM parts).
# (GH200 first: the device name is matched by substring, and "H200" is in "GH200".)
PEAK_BF16_TFLOPS = {"GH200": 989.0, "H100": 989.0, "H200": 989.0, "H800": 989.0}


def cpu_description() -> str:
  from jaxlab.train.host_devices import cpu_model
  return f"{cpu_model()}, {os.cpu_count()} cores"


def flops(b, n, tq, tk, d, causal, mode):
  fwd = 4.0 * b * n * tq * tk * d / (2.0 if causal else 1.0)
  return fwd if mode == "fwd" else 3.5 * fwd


def make_fn(impl, causal, mode):
  import jax
  from jaxlab import attention

  if impl == "pallas":
    attn = lambda q, k, v: attention.dot_product_attention(q, k, v, causal=causal,
                                                           implementation="pallas")
  elif impl in ("mosaic_gpu", "portable"):
    from jaxlab.attention.masks import make_mask

    def attn(q, k, v):
      mask = make_mask(q.shape[1], k.shape[1], q.shape[0], causal=causal)
      return attention.flash_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5, kernel=impl)
  else:
    attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation=impl)
  if mode == "fwd":
    return jax.jit(attn)

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(attn, q, k, v)
    return vjp(out)  # the output as cotangent: same shape/dtype, no extra input
  return jax.jit(fwd_bwd)


def time_fn(fn, args, repeats, max_seconds=1.0):
  """Median seconds per call. Each sample runs `inner` calls back to back (asynchronous dispatch keeps
  the GPU busy, so Python's launch overhead does not count against sub-millisecond kernels); the
  number of samples is cut so that one measurement takes about max_seconds (at least 3)."""
  import jax
  jax.block_until_ready(fn(*args))  # compile + warm-up
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = max(time.perf_counter() - start, 1e-6)
  inner = min(50, max(1, int(0.005 / once) + 1))
  repeats = max(3, min(repeats, int(max_seconds / (inner * once))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / inner)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=16384, help="batch * length, fixed")
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--width", type=int, default=2048, help="heads = width / head_dim")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--impls", nargs="+", default=["pallas", "mosaic_gpu", "portable", "cudnn", "xla"])
  parser.add_argument("--peak-tflops", type=float, default=None)
  parser.add_argument("--budget-s", type=float, default=float("inf"),
                      help="start no new (head_dim, length) after this many seconds; the table says so")
  parser.add_argument("--dry-run", action="store_true",
                      help="tiny shapes, interpret mode, correctness only; no timings")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS,
                      help="results directory (also where earlier rows are kept from)")
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  command = shlex.join(["python", "experiments/bench_flash.py", *argv])
  if not args.budget_s > 0:
    parser.error(f"--budget-s must be > 0, got {args.budget_s}")

  import jax
  import jax.numpy as jnp

  backend = jax.default_backend()
  dry = args.dry_run or backend != "gpu"
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", backend)
  if dry:
    lengths, head_dims, tokens, width = [64, 96], [64], 192, 128
    impls = ["pallas", "mosaic_gpu", "xla"]
    slug = "NOGPU"
  else:
    lengths, head_dims, tokens, width = args.lengths, args.head_dims, args.tokens, args.width
    impls = args.impls
    slug = next((name for name in PEAK_BF16_TFLOPS if name in kind.upper()),
                kind.replace(" ", "_"))
  peak = args.peak_tflops or next((p for name, p in PEAK_BF16_TFLOPS.items() if name in kind.upper()),
                                  None)
  device = f"{kind} ({backend}); host {cpu_description()}"
  print(f"device: {device}; jax {jax.__version__}" + ("; DRY RUN (no timings)" if dry else ""))

  rows, checks = [], []
  # Rows of earlier runs on this kind of device are kept unless re-measured (same head_dim, length,
  # causal, mode), so runs of a few shapes each build one table.
  earlier = args.out / f"flash_{slug}.json"
  kept = [] if dry or not earlier.exists() else json.loads(earlier.read_text())["rows"]
  measured_on = f"{time.strftime('%Y-%m-%d')}, jax {jax.__version__}"
  start = time.time()
  skipped = 0
  for d in head_dims:
    n = max(1, width // d)
    for t in lengths:
      b = max(1, tokens // t)
      if not dry and time.time() - start > args.budget_s:
        skipped += 1  # counted per (head_dim, length); each is 4 rows
        continue
      keys = jax.random.split(jax.random.key(t + d), 3)
      q, k, v = (jax.random.normal(key, (b, t, n, d), jnp.bfloat16) for key in keys)
      for causal in (False, True):
        for mode in ("fwd", "fwd+bwd"):
          row = {"head_dim": d, "length": t, "batch": b, "heads": n, "causal": causal, "mode": mode,
                 "measured": measured_on, "tflops": {}, "errors": {}}
          for impl in impls:
            if dry and impl == "mosaic_gpu" and mode != "fwd":
              row["tflops"][impl] = None
              continue  # see the module docstring
            fn = make_fn(impl, causal, mode)
            try:
              if dry:
                got = jax.tree.leaves(fn(q, k, v))
                want = jax.tree.leaves(make_fn("xla", causal, mode)(q, k, v))
                err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - w.astype(jnp.float32))))
                          for a, w in zip(got, want))
                checks.append(dict(head_dim=d, length=t, causal=causal, mode=mode, impl=impl,
                                   max_abs_diff_vs_xla=err))
                row["tflops"][impl] = None
              else:
                seconds = time_fn(fn, (q, k, v), args.repeats)
                row["tflops"][impl] = flops(b, n, t, t, d, causal, mode) / seconds / 1e12
            except Exception as e:  # e.g. cuDNN missing, out of memory for xla at 16k
              row["tflops"][impl] = None
              row["errors"][impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
          rows.append(row)
          print(json.dumps(row), flush=True)
          write_results(with_kept(rows, kept), checks, impls, dry, slug, device, peak, tokens, width,
                        time.time() - start, skipped, args.budget_s, args.out, command)
  wall = time.time() - start
  print(write_results(with_kept(rows, kept), checks, impls, dry, slug, device, peak, tokens, width,
                      wall, skipped, args.budget_s, args.out, command))
  print(f"wrote {args.out / f'flash_{slug}.md'}")
  if dry:
    errors = [e for r in rows for e in r["errors"].values()]
    worst = max(c["max_abs_diff_vs_xla"] for c in checks if c["impl"] in ("pallas", "mosaic_gpu"))
    if not worst < 0.1 or errors:
      raise SystemExit(f"dry run: max difference from xla {worst}, errors {errors}")


OURS = ("pallas", "mosaic_gpu", "portable")  # jaxlab's kernels; the others are references


def with_kept(rows, kept):
  """This run's rows, plus the earlier runs' rows for shapes this run has not measured."""
  key = lambda r: (r["head_dim"], r["length"], r["causal"], r["mode"])
  new = {key(r) for r in rows}
  return [r for r in kept if key(r) not in new] + rows


def write_results(rows, checks, impls, dry, slug, device, peak, tokens, width, wall, skipped, budget_s,
                  out=RESULTS, command=""):
  """Writes <out>/flash_<slug>.md and .json from the rows measured so far (command: the last run's
  command line); returns the Markdown table."""
  import jax

  def fmt(x, spec=".0f"):
    return "" if x is None else format(x, spec)

  impls = list(impls) + [i for r in rows for i in r["tflops"] if i not in impls]  # earlier runs' too
  impls = list(dict.fromkeys(impls))
  ours = [i for i in impls if i in OURS]
  ratio = lambda r, i: (None if r["tflops"].get(i) is None or r["tflops"].get("cudnn") is None
                        else r["tflops"][i] / r["tflops"]["cudnn"])
  best = lambda r: max((r["tflops"][i] for i in ours if r["tflops"].get(i) is not None), default=None)
  header = ("| head_dim | length | batch | causal | mode | " + " | ".join(f"{i} TFLOP/s" for i in impls)
            + "".join(f" | {i} / cuDNN" for i in ours) + " | best jaxlab % of peak | measured |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  order = lambda r: (r["head_dim"], r["length"], r["causal"], r["mode"])
  for r in sorted(rows, key=order):
    frac = None if best(r) is None or peak is None else 100 * best(r) / peak
    lines.append(f"| {r['head_dim']} | {r['length']} | {r['batch']} | {r['causal']} | {r['mode']} | "
                 + " | ".join(fmt(r["tflops"].get(i)) for i in impls)
                 + "".join(f" | {fmt(ratio(r, i), '.2f')}" for i in ours)
                 + f" | {fmt(frac)} | {r.get('measured', '')} |")
  table = "\n".join(lines)

  md = [f"# Flash attention: jaxlab Pallas kernels vs cuDNN vs XLA ({slug})", "",
        f"Device: {device}. jax {jax.__version__}. Command of the last run: `{command}`. bfloat16 "
        f"inputs, {tokens} tokens per call (batch = tokens / length), heads = {width} / head_dim. Wall "
        f"time of the last run {wall:.0f} s"
        + ("" if dry else "; rows of earlier runs on this device kind are kept where the last run did "
           "not re-measure them (see the measured column)") + ". Each cell: "
        "median time per call, calls run back to back between synchronisations. \"pallas\" is "
        "`dot_product_attention(implementation=\"pallas\")` (the default dispatch), \"mosaic_gpu\" "
        "and \"portable\" `flash_attention(kernel=...)`.", ""]
  if skipped:
    md += [f"**Stopped at the time budget ({budget_s:.0f} s): {skipped} (head_dim, length) pairs were "
           "not measured.**", ""]
  if dry:
    md += ["**A `--dry-run` (no GPU): every timing cell is empty on purpose (not measured, not "
           "guessed).** Tiny shapes on the machine above, the Pallas kernels in interpret mode, each "
           "output (forward) or gradient (forward+backward) compared with XLA's. The GPU timings are "
           "written by `python experiments/bench_flash.py` on an H100/H200, to `flash_H100.md` / "
           "`flash_H200.md`.", ""]
  md += [table, ""]
  if dry:
    for impl in ("pallas", "mosaic_gpu"):
      diffs = [c["max_abs_diff_vs_xla"] for c in checks if c["impl"] == impl]
      if diffs:
        md += [f"Dry-run check: {len(diffs)} {impl} runs, largest |{impl} - xla| over outputs and "
               f"gradients (bf16) = {max(diffs):.3g}."
               + (" (forward only)" if impl == "mosaic_gpu" else ""), ""]
  errors = [(r, i, e) for r in rows for i, e in r["errors"].items()]
  if errors:
    md += ["Errors:", ""] + [f"- {i} at head_dim {r['head_dim']}, length {r['length']}, "
                             f"causal={r['causal']}, {r['mode']}: {e}" for r, i, e in errors] + [""]
  md += ["Goals (issue 6): forward >= 1.0x cuDNN; forward+backward >= 0.8x cuDNN; forward >= 60% of "
         f"the dense bf16 peak ({fmt(peak)} TFLOP/s) at length 8192, head_dim 128."]
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  from jaxlab import experiment_results
  experiment_results.write(out, f"flash_{slug}", "\n".join(md), {
      "device": device, "command": command, "dry_run": dry, "peak_tflops": peak, "tokens": tokens,
      "width": width, "wall_s": wall, "skipped_pairs": skipped, "rows": rows, "checks": checks})
  return table


if __name__ == "__main__":
  main()
