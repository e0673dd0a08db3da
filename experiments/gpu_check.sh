#!/usr/bin/env bash
# The GPU checks of the flash-attention kernels in one command, for a machine with an NVIDIA GPU whose
# Python already has a CUDA build of jax, flax and optax (jaxlab itself is put on PYTHONPATH, not
# installed). Within a deadline (seconds, default 560) it runs, each step time-limited:
#   1. a smoke run of the Mosaic GPU (Hopper) kernels, forward and backward, head_dim 64/128/256, with
#      ptxas' register and spill report (MOSAIC_GPU_DUMP_PTXAS);
#   2. (MODE all or tests) the GPU-only tests: the Mosaic GPU kernel (when step 1 passed: a hung kernel
#      stops nothing else), the GPT's default dispatch, cuDNN, the portable (Triton) kernel;
#   3. (MODE all or bench) experiments/bench_flash.py with the time left (it writes its table after
#      every row; with MODE all, step 2 leaves it 200 s).
# Logs and results go to $OUT (or /tmp/gpu_check): gpu_check.log, smoke.log, pytest.log, bench.log,
# gpu_errors.jsonl (largest errors per test case) and flash_<device>.md/.json (also in
# experiments/results/).
#
#   bash experiments/gpu_check.sh [DEADLINE_S] [all|tests|bench]
#   BENCH_ARGS="--head-dims 64 --lengths 16384 2048" bash experiments/gpu_check.sh 560 bench
#
# Measured on an H200 (2026-12-04, jax 0.11.2): the smoke run takes ~35 s, each test case ~10-30 s
# (compiling for the GPU is most of it), the bench ~32 s per (head_dim, length) pair.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
deadline=$((start + ${1:-560}))
mode=${2:-all}
left() { echo $((deadline - $(date +%s))); }
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
log="$out/gpu_check.log"
py=$(command -v python3 || command -v python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
export JAXLAB_GPU_ERRORS="$out/gpu_errors.jsonl"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c "import sys, jax, jaxlib, flax, optax, chex, numpy
print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax',
      flax.__version__, 'optax', optax.__version__, 'chex', chex.__version__, 'numpy', numpy.__version__)
print(jax.devices(), getattr(jax.devices()[0], 'compute_capability', None))"
} 2>&1 | tee "$log"

echo "== 1. Mosaic GPU smoke run ($(left) s left)" | tee -a "$log"
MOSAIC_GPU_DUMP_PTXAS=1 timeout -k 10 120 "$py" - > "$out/smoke.log" 2>&1 <<'EOF'
import time
import jax
import jax.numpy as jnp
from jaxlab.attention.flash import flash_attention
from jaxlab.attention.masks import make_mask
from jaxlab.attention.softmax import xla_attention

for h in (64, 128, 256):
  b, t, n = 2, 640, 4
  q, k, v, ct = (jax.random.normal(jax.random.key(i), (b, t, n, h), jnp.bfloat16) for i in range(4))
  mask = make_mask(t, t, b, causal=True)

  def run(q, k, v, kernel):
    fn = ((lambda q, k, v: flash_attention(q, k, v, mask, scale=h ** -0.5, kernel=kernel)) if kernel
          else (lambda q, k, v: xla_attention(q, k, v, mask, scale=h ** -0.5)))
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct.astype(out.dtype))

  t0 = time.time()
  got = jax.block_until_ready(jax.jit(run, static_argnums=3)(q, k, v, "mosaic_gpu"))
  took = time.time() - t0
  want = jax.jit(run, static_argnums=3)(*(x.astype(jnp.float32) for x in (q, k, v)), None)
  errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - w))) for a, w in zip(got, want)]
  print(f"SMOKE h={h}: compile+run {took:.1f} s, max |err| out/dq/dk/dv = "
        + " ".join(f"{e:.3g}" for e in errs), flush=True)
print("SMOKE OK")
EOF
grep -E "SMOKE|[Rr]egisters|spill|Error|error" "$out/smoke.log" | head -n 40 | tee -a "$log"
mosaic_ok=0
grep -q "SMOKE OK" "$out/smoke.log" && mosaic_ok=1

if [ "$mode" != bench ]; then
  tests=()
  if [ "$mosaic_ok" = 1 ]; then
    tests+=(tests/attention/test_flash_gpu.py::test_mosaic_gpu_kernel_bf16
            tests/attention/test_flash_gpu.py::test_mosaic_gpu_kernel_fp16
            "tests/attention/test_flash_mosaic_gpu.py::test_on_hopper_matches_xla")
  else
    echo "== the Mosaic GPU smoke run failed (smoke.log): its tests are left out" | tee -a "$log"
  fi
  tests+=(tests/models/test_gpt_gpu.py tests/attention/test_cudnn.py
          tests/attention/test_flash_gpu.py::test_portable_kernel_bf16
          tests/attention/test_flash_gpu.py::test_portable_kernel_other_dtypes)
  limit=$(( $(left) - $([ "$mode" = all ] && echo 200 || echo 10) ))
  [ "$limit" -lt 30 ] && limit=30
  echo "== 2. GPU tests, at most $limit s ($(left) s left)" | tee -a "$log"
  # No GEMM autotuning in the tests (it lengthens every compile; the default tilings give the same
  # numbers up to rounding), if this XLA knows the flag (an unknown flag aborts XLA).
  flags="${XLA_FLAGS:-}"
  XLA_FLAGS="$flags --xla_gpu_autotune_level=0" "$py" -c "import jax; jax.devices()" > /dev/null 2>&1 \
    && flags="$flags --xla_gpu_autotune_level=0"
  XLA_FLAGS="$flags" timeout -k 10 "$limit" "$py" -m pytest -v -p no:cacheprovider -rfEs \
    --durations=10 "${tests[@]}" > "$out/pytest.log" 2>&1
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$out/pytest.log" | tail -n 80 | tee -a "$log"
fi
[ "$mosaic_ok" = 1 ] && impls="mosaic_gpu portable cudnn xla" || impls="portable cudnn xla"

remaining=$(left)
echo "== 3. bench_flash ($remaining s left)" | tee -a "$log"
if [ "$mode" != tests ] && [ "$remaining" -gt 60 ]; then
  # BENCH_ARGS: which shapes, in the order of measurement.
  timeout -k 10 "$remaining" "$py" experiments/bench_flash.py --impls $impls --repeats 10 \
    ${BENCH_ARGS:---head-dims 128 64 --lengths 8192 1024 4096 16384 2048} \
    --budget-s $((remaining - 75)) > "$out/bench.log" 2>&1
  grep -v '^{' "$out/bench.log" | tail -n 40 | tee -a "$log"
fi
cp experiments/results/flash_*.md experiments/results/flash_*.json "$out/" 2>/dev/null
rm -f "$out"/flash_NOGPU.*
echo "== done in $(( $(date +%s) - start )) s" | tee -a "$log"
