#!/usr/bin/env bash
# The GPU checks of the flash-attention kernels in one command, for a machine with an NVIDIA GPU whose
# Python already has a CUDA build of jax, flax and optax (jaxlab itself is put on PYTHONPATH, not
# installed). Within a deadline (first argument, seconds, default 560) it runs, each step time-limited:
#   1. a smoke run of the Mosaic GPU (Hopper) kernels, forward and backward, head_dim 64/128/256, with
#      ptxas' register and spill report where this jaxlib prints it (MOSAIC_GPU_DUMP_PTXAS);
#   2. the GPU-only tests of the portable (Triton) kernel, the GPT's default dispatch and cuDNN;
#   3. the GPU-only tests of the Mosaic GPU kernel (when step 1 passed: a hung kernel stops nothing else);
#   4. experiments/bench_flash.py with the time left (it writes its table after every row).
# Logs and results go to $OUT (or /tmp/gpu_check): gpu_check.log, smoke.log, gpu_errors.jsonl (largest
# errors per test case) and flash_<device>.md/.json (also in experiments/results/).
#
#   bash experiments/gpu_check.sh [DEADLINE_S]
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
deadline=$((start + ${1:-560}))
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

pytest_gpu() {  # $1: seconds; the rest: test ids
  local limit=$1; shift
  timeout -k 10 "$limit" "$py" -m pytest -q -p no:cacheprovider -rfEs --durations=8 "$@" 2>&1 | tail -n 45
}
echo "== 2. portable kernel, GPT dispatch, cuDNN tests ($(left) s left)" | tee -a "$log"
pytest_gpu 200 tests/attention/test_flash_gpu.py::test_portable_kernel_bf16 \
  tests/attention/test_flash_gpu.py::test_portable_kernel_other_dtypes tests/models/test_gpt_gpu.py \
  tests/attention/test_cudnn.py | tee -a "$log"
if [ "$mosaic_ok" = 1 ]; then
  echo "== 3. Mosaic GPU kernel tests ($(left) s left)" | tee -a "$log"
  pytest_gpu 150 tests/attention/test_flash_gpu.py::test_mosaic_gpu_kernel_bf16 \
    tests/attention/test_flash_gpu.py::test_mosaic_gpu_kernel_fp16 \
    "tests/attention/test_flash_mosaic_gpu.py::test_on_hopper_matches_xla" | tee -a "$log"
  impls="mosaic_gpu portable cudnn xla"
else
  echo "== 3. skipped: the Mosaic GPU smoke run failed (smoke.log)" | tee -a "$log"
  impls="portable cudnn xla"
fi

remaining=$(left)
echo "== 4. bench_flash ($remaining s left)" | tee -a "$log"
if [ "$remaining" -gt 60 ]; then
  timeout -k 10 "$remaining" "$py" experiments/bench_flash.py --impls $impls --head-dims 128 64 \
    --lengths 8192 1024 4096 16384 2048 --repeats 10 --budget-s $((remaining - 75)) \
    > "$out/bench.log" 2>&1
  grep -v '^{' "$out/bench.log" | tail -n 40 | tee -a "$log"
fi
cp experiments/results/flash_*.md experiments/results/flash_*.json "$out/" 2>/dev/null
rm -f "$out"/flash_NOGPU.*
echo "== done in $(( $(date +%s) - start )) s" | tee -a "$log"
