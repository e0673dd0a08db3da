"""Flash attention speed on one GPU: jaxlab's Pallas kernel against cuDNN and XLA, in the same run.

    python experiments/bench_flash.py                 # on an NVIDIA Hopper GPU (H100 / H200)
    python experiments/bench_flash.py --dry-run       # anywhere: tiny shapes, checks the script end to end

For head_dim 64 and 128, sequence lengths 1k..16k at a fixed token count (batch = tokens / length),
causal and not, forward and forward+backward, it times (median of --repeats, after a warm-up, jitted,
bfloat16, heads = --width / head_dim):
  * "pallas": `jaxlab.attention.dot_product_attention(implementation="pallas")` (the default dispatch:
    the portable kernel until `flash.MOSAIC_GPU_BY_DEFAULT` is set, then the Mosaic GPU one on Hopper),
  * "mosaic_gpu": `jaxlab.attention.flash_attention(kernel="mosaic_gpu")` (Hopper forward: wgmma, TMA
    K/V ring, warp specialisation; backward by the portable kernels),
  * "portable": `jaxlab.attention.flash_attention(kernel="portable")` (Triton-lowered Pallas),
  * "cudnn":  `jax.nn.dot_product_attention(implementation="cudnn")`,
  * "xla":    `jax.nn.dot_product_attention(implementation="xla")`.
FLOPs: 4 * B * N * Tq * Tk * D forward, halved for causal; forward+backward counts 3.5x forward
(backward = 2.5x forward, the FlashAttention-2 convention). Reported: TFLOP/s, the pallas/cuDNN ratio and
pallas as a fraction of the GPU's dense bf16 peak (--peak-tflops, default from the device name).
Goals (issue 6): forward >= 1.0x cuDNN, forward+backward >= 0.8x cuDNN, forward >= 60% of peak at 8k,
head_dim 128.

Writes experiments/results/flash_<device>.md and .json. With --dry-run (or without a GPU) nothing is
timed: the shapes are shrunk, the kernel runs in interpret mode, its output is checked against XLA, and
the table is written with empty cells, saying so. In the dry run "mosaic_gpu" runs in Mosaic GPU
interpret mode, forward only (that mode deadlocks when its kernel is differentiated in jax 0.10; the
gradients of the custom_vjp are checked in tests/attention/test_flash_mosaic_gpu.py instead).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0}


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


def time_fn(fn, args, repeats):
  import jax
  jax.block_until_ready(fn(*args))  # compile + warm-up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=16384, help="batch * length, fixed")
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--width", type=int, default=2048, help="heads = width / head_dim")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--impls", nargs="+", default=["pallas", "mosaic_gpu", "portable", "cudnn", "xla"])
  parser.add_argument("--peak-tflops", type=float, default=None)
  parser.add_argument("--dry-run", action="store_true",
                      help="tiny shapes, interpret mode, correctness only; no timings")
  args = parser.parse_args()

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
  start = time.time()
  for d in head_dims:
    n = max(1, width // d)
    for t in lengths:
      b = max(1, tokens // t)
      keys = jax.random.split(jax.random.key(t + d), 3)
      q, k, v = (jax.random.normal(key, (b, t, n, d), jnp.bfloat16) for key in keys)
      for causal in (False, True):
        for mode in ("fwd", "fwd+bwd"):
          row = {"head_dim": d, "length": t, "batch": b, "heads": n, "causal": causal, "mode": mode,
                 "tflops": {}, "errors": {}}
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
  wall = time.time() - start

  def fmt(x, spec=".0f"):
    return "" if x is None else format(x, spec)

  header = ("| head_dim | length | batch | causal | mode | " + " | ".join(f"{i} TFLOP/s" for i in impls)
            + " | pallas / cuDNN | mosaic_gpu / cuDNN | pallas % of peak |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for r in rows:
    p, c = r["tflops"].get("pallas"), r["tflops"].get("cudnn")
    mg = r["tflops"].get("mosaic_gpu")
    ratio = None if p is None or c is None else p / c
    mg_ratio = None if mg is None or c is None else mg / c
    frac = None if p is None or peak is None else 100 * p / peak
    lines.append(f"| {r['head_dim']} | {r['length']} | {r['batch']} | {r['causal']} | {r['mode']} | "
                 + " | ".join(fmt(r["tflops"].get(i)) for i in impls)
                 + f" | {fmt(ratio, '.2f')} | {fmt(mg_ratio, '.2f')} | {fmt(frac, '.0f')} |")
  table = "\n".join(lines)
  print(table)

  md = [f"# Flash attention: jaxlab Pallas kernels (default, Mosaic GPU, portable) vs cuDNN vs XLA "
        f"({slug})", "",
        f"Device: {device}. jax {jax.__version__}. bfloat16 inputs, {tokens} tokens per call "
        f"(batch = tokens / length), heads = {width} / head_dim. Wall time {wall:.0f} s.", ""]
  if dry:
    md += ["**No GPU was available when this file was written: every timing cell is empty on purpose "
           "(not measured, not guessed).** This is a `--dry-run` on the machine above: tiny shapes, the "
           "Pallas kernel in interpret mode, each output (forward) or gradient (forward+backward) "
           "compared with XLA's. Run `python experiments/bench_flash.py` on an H100/H200 to fill the "
           "table; it then writes `flash_H100.md` / `flash_H200.md`.", ""]
  md += [table, ""]
  if dry:
    for impl in ("pallas", "mosaic_gpu"):
      ours = [c["max_abs_diff_vs_xla"] for c in checks if c["impl"] == impl]
      if ours:
        md += [f"Dry-run check: {len(ours)} {impl} runs, largest |{impl} - xla| over outputs and "
               f"gradients (bf16) = {max(ours):.3g}."
               + (" (forward only)" if impl == "mosaic_gpu" else ""), ""]
  errors = [(r, i, e) for r in rows for i, e in r["errors"].items()]
  if errors:
    md += ["Errors:", ""] + [f"- {i} at head_dim {r['head_dim']}, length {r['length']}, "
                             f"causal={r['causal']}, {r['mode']}: {e}" for r, i, e in errors] + [""]
  md += ["Goals (issue 6): forward >= 1.0x cuDNN; forward+backward >= 0.8x cuDNN; forward >= 60% of "
         f"the dense bf16 peak ({fmt(peak)} TFLOP/s) at length 8192, head_dim 128."]
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"flash_{slug}.md").write_text("\n".join(md) + "\n")
  (RESULTS / f"flash_{slug}.json").write_text(json.dumps(
      {"device": device, "dry_run": dry, "peak_tflops": peak, "tokens": tokens, "width": width,
       "wall_s": wall, "rows": rows, "checks": checks}, indent=1))
  print(f"wrote {RESULTS / f'flash_{slug}.md'}")
  if dry:
    worst = max(c["max_abs_diff_vs_xla"] for c in checks if c["impl"] in ("pallas", "mosaic_gpu"))
    if not worst < 0.1 or errors:
      raise SystemExit(f"dry run: max difference from xla {worst}, errors {errors}")


if __name__ == "__main__":
  main()
