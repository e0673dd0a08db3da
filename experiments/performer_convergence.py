"""Performer (FAVOR+) against exact softmax attention: mean absolute error against the number of random
features M, non-causal and causal.

    python experiments/performer_convergence.py [--quick] [--out DIR]

Writes experiments/results/performer_convergence.md (+ .json); with --quick, performer_convergence_quick.*.
Inputs (fixed seeds): B=2, T=256, 4 heads of head_dim 64, float32, over a few independent feature draws
(PRNG keys). Two regimes for q and k (v is N(0, 1) in both):

* "two clusters": every query is close to one direction u with |q'| = 1.25 (q' = q H^-1/4; jitter of
  norm ~0.57), half the keys close to 0 and half close to -q, so a query weighs a near key ~exp(1.25^2) ~ 5x more than a far
  one: attention far from uniform, in a regime where FAVOR+ is accurate (the tests' regime).
* "iid N(0, 0.5^2)": i.i.d. Gaussian q and k. Logits q.k/sqrt(H) have std 0.25 only, but |q'|^2 =
  0.25 sqrt(64) = 2, and the positive-feature estimator's variance grows like exp(|q' + k'|^2) / M: the
  error decays far more slowly at small M.

Each cell is the mean over draws of mean |performer - softmax|; "uniform" is the error of weighting every
visible key alike (what a useless approximation would reach). Exact attention is
`dot_product_attention(implementation="xla")`.
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
FEATURES = (16, 32, 64, 128, 256, 512, 1024)
REGIMES = ("two clusters", "iid N(0, 0.5^2)")


def settings(quick: bool) -> dict:
  if quick:
    return dict(features=(16, 256), draws=2, b=1, t=32, n=1, h=64)
  return dict(features=FEATURES, draws=4, b=2, t=256, n=4, h=64)


def make_inputs(regime: str, b: int, t: int, n: int, h: int, seed: int = 0):
  import numpy as np
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)
  if regime == "two clusters":
    u = rng.standard_normal(h)
    u *= 1.25 * h ** 0.25 / np.linalg.norm(u)
    # Per-coordinate jitter 0.2 * sqrt(8 / H) in q' units: |jitter'| ~ 0.57 whatever H (as the tests'
    # 0.2 at H = 8); a fixed per-coordinate jitter would grow |q'|, and the estimator's variance, with H.
    jitter = lambda shape: 0.2 * (8 / h) ** 0.5 * h ** 0.25 * rng.standard_normal(shape)
    q = u + jitter((b, t, n, h))
    k = jitter((b, t, n, h)) - (rng.random((b, t, n, 1)) < 0.5) * u
  elif regime == "iid N(0, 0.5^2)":
    q, k = 0.5 * rng.standard_normal((b, t, n, h)), 0.5 * rng.standard_normal((b, t, n, h))
  else:
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
  v = rng.standard_normal((b, t, n, h))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def measure(s: dict) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from jaxlab import attention
  from jaxlab.attention.performer import performer_attention
  keys = jax.random.split(jax.random.key(1), s["draws"])
  rows = []
  for regime in REGIMES:
    q, k, v = make_inputs(regime, s["b"], s["t"], s["n"], s["h"])
    for causal in (False, True):
      exact = attention.dot_product_attention(q, k, v, causal=causal, implementation="xla")
      t = v.shape[1]
      uniform = (jnp.cumsum(v, 1) / jnp.arange(1, t + 1)[None, :, None, None] if causal else
                 jnp.broadcast_to(v.mean(1, keepdims=True), v.shape))
      row = dict(regime=regime, causal=causal,
                 uniform=float(jnp.mean(jnp.abs(uniform - exact))), errors={})
      for m in s["features"]:
        run = jax.jit(jax.vmap(lambda key: performer_attention(q, k, v, key=key, num_features=m,
                                                               causal=causal)))
        row["errors"][str(m)] = float(jnp.mean(jnp.abs(run(keys) - exact[None])))
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def device_name() -> str:
  import jax
  from jaxlab.train.host_devices import cpu_model
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"{cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__} (CPU)"
  return f"{d.device_kind} ({d.platform}), jax {jax.__version__}"


def table(rows: list[dict], features) -> list[str]:
  cols = [(r["regime"], r["causal"]) for r in rows]
  head = "| M | " + " | ".join(f"{g}, {'causal' if c else 'non-causal'}" for g, c in cols) + " |"
  lines = [head, "| --- | " + " | ".join("---" for _ in cols) + " |"]
  for m in features:
    lines.append(f"| {m} | " + " | ".join(f"{r['errors'][str(m)]:.4f}" for r in rows) + " |")
  lines.append("| uniform | " + " | ".join(f"{r['uniform']:.4f}" for r in rows) + " |")
  lo, hi = str(features[0]), str(features[-1])
  lines.append(f"| ratio M={lo} / M={hi} | " + " | ".join(
      f"{r['errors'][lo] / r['errors'][hi]:.2f}" for r in rows) + " |")
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="T=32, M in (16, 256), 2 draws (seconds)")
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  args = parser.parse_args(argv)
  s = settings(args.quick)
  start = time.time()
  rows = measure(s)
  seconds = time.time() - start
  stem = "performer_convergence" + ("_quick" if args.quick else "")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = device_name()
  lines = [f"# Performer convergence ({'quick' if args.quick else 'full'})", "",
           f"Device: {device}. Command: `python experiments/performer_convergence.py"
           f"{' --quick' if args.quick else ''}` ({seconds:.0f} s).", "",
           f"B={s['b']}, T={s['t']}, {s['n']} heads, head_dim {s['h']}, float32; mean |performer - "
           f"softmax| over {s['draws']} feature draws (orthogonal random features, the default "
           "`performer_attention`); regimes as in the script's docstring.", ""]
  lines += table(rows, s["features"])
  lines += ["", "An M^-1/2 decay would give a ratio of "
            f"{(s['features'][-1] / s['features'][0]) ** 0.5:.1f} between the first and last M."]
  from jaxlab import experiment_results
  experiment_results.write(out, stem, "\n".join(lines), {
      "device": device, "settings": {**s, "features": list(s["features"])}, "seconds": seconds,
      "rows": rows})
  print("\n".join(lines))


if __name__ == "__main__":
  sys.exit(main())
