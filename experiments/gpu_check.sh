#!/usr/bin/env bash
# The GPU checks of the flash-attention kernels in one command, for a machine with an NVIDIA GPU whose
# Python already has a CUDA build of jax, flax and optax (jaxlab itself is put on PYTHONPATH, not
# installed). Within a deadline (seconds, default 560) it runs, each step in its own time limit:
#   1. a smoke run of the Mosaic GPU (Hopper) kernels, forward and backward, head_dim 64/128/256, with
#      ptxas' register and spill report (MOSAIC_GPU_DUMP_PTXAS);
#   2. (MODE all or tests) the GPU-only tests, in three pytest runs so that a hung kernel stops only
#      its own: (a) the GPT's default dispatch, cuDNN, the portable (Triton) kernel's float32/float16
#      cases and its case with every mask at head_dim 256; (b) the Mosaic GPU kernel (when step 1
#      passed) with segment ids, lengths, every mask, float16, and the Hopper default-dispatch test;
#      (c) the remaining bf16 cases of both kernels (dense, causal, window, GQA/MQA);
#   3. (MODE all or bench) experiments/bench_flash.py with the time left (it writes its table after
#      every row and keeps earlier runs' rows for shapes it does not re-measure; with MODE all,
#      step 2 leaves it 150 s). BENCH_ARGS picks the shapes, in the order of measurement.
# Logs and results go to $OUT (or /tmp/gpu_check): gpu_check.log, smoke.log, pytest.log, bench.log,
# gpu_errors.jsonl (largest errors per test case) and flash_<device>.md/.json when the bench wrote them
# (also in experiments/results/): at most 7 files.
#
#   bash experiments/gpu_check.sh [DEADLINE_S] [all|tests|bench]
#   BENCH_ARGS="--head-dims 128 --lengths 8192" bash experiments/gpu_check.sh 300 bench
#
# Measured on an H200 (2026-12-04, jax 0.11.2): the smoke run takes ~35 s; a test case took ~28 s when
# it compiled four programs (each now compiles one); the bench ~32 s per (head_dim, length) pair.
set -uo pipefail
cd "$(dirname "$0")/.."
deadline_s=${1:-560}
mode=${2:-all}
case "$deadline_s" in ''|*[!0-9]*) echo "DEADLINE_S must be a whole number of seconds, got '$deadline_s'"; exit 2;; esac
case "$mode" in all|tests|bench) ;; *) echo "MODE must be all, tests or bench, got '$mode'"; exit 2;; esac
start=$(date +%s)
deadline=$((start + deadline_s))
left() { echo $((deadline - $(date +%s))); }
at_most() { local a=$1 b; b=$(left); echo $(( a < b ? a : b )); }
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
log="$out/gpu_check.log"
stamp=$(mktemp)
py=$(command -v python3 || command -v python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
export JAXLAB_GPU_ERRORS="$out/gpu_errors.jsonl"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  timeout 60 "$py" -c "import sys, jax, jaxlib, flax, optax, chex, numpy
print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax',
      flax.__version__, 'optax', optax.__version__, 'chex', chex.__version__, 'numpy', numpy.__version__)
print(jax.devices(), getattr(jax.devices()[0], 'compute_capability', None))"
} 2>&1 | tee "$log"

echo "== 1. Mosaic GPU smoke run ($(left) s left)" | tee -a "$log"
MOSAIC_GPU_DUMP_PTXAS=1 timeout -k 10 "$(at_most 120)" "$py" - > "$out/smoke.log" 2>&1 <<'EOF'
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

reserve=$([ "$mode" = all ] && echo 150 || echo 10)  # seconds kept for the bench
pytest_gpu() {  # $1: name, $2: most seconds; the rest: pytest arguments
  local name=$1 limit=$2; shift 2
  limit=$(at_most "$limit")
  limit=$(( limit - reserve > 30 ? limit - reserve : 30 ))
  [ "$(left)" -gt 40 ] || { echo "== $name: skipped, $(left) s left" | tee -a "$log"; return; }
  echo "== 2$name. GPU tests, at most $limit s ($(left) s left): $*" | tee -a "$log"
  echo "== 2$name: $*" >> "$out/pytest.log"
  XLA_FLAGS="$test_flags" timeout -k 10 "$limit" "$py" -m pytest -v -p no:cacheprovider -rfEs \
    --durations=5 "$@" > "$out/pytest_$name.tmp" 2>&1
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$out/pytest_$name.tmp" | tail -n 60 \
    | tee -a "$log"
  cat "$out/pytest_$name.tmp" >> "$out/pytest.log" && rm -f "$out/pytest_$name.tmp"
}
if [ "$mode" != bench ]; then
  # No GEMM autotuning in the tests (it lengthens every compile; the default tilings give the same
  # numbers up to rounding), if this XLA knows the flag (an unknown flag aborts XLA).
  test_flags="${XLA_FLAGS:-}"
  XLA_FLAGS="$test_flags --xla_gpu_autotune_level=0" timeout 60 "$py" -c "import jax; jax.devices()" \
    > /dev/null 2>&1 && test_flags="$test_flags --xla_gpu_autotune_level=0"
  f=tests/attention/test_flash_gpu.py
  pytest_gpu a 400 tests/models/test_gpt_gpu.py tests/attention/test_cudnn.py \
    "$f::test_portable_kernel_other_dtypes" "$f::test_portable_kernel_bf16" -k \
    "gpt or cudnn or other_dtypes or all_combined"
  if [ "$mosaic_ok" = 1 ]; then
    pytest_gpu b 300 "$f::test_mosaic_gpu_kernel_bf16" "$f::test_mosaic_gpu_kernel_fp16" \
      "tests/attention/test_flash_mosaic_gpu.py::test_on_hopper_matches_xla" -k \
      "segments or lengths or all_combined or fp16 or hopper"
  else
    echo "== 2b. skipped: the Mosaic GPU smoke run failed (smoke.log)" | tee -a "$log"
  fi
  kernels="$f::test_portable_kernel_bf16"
  [ "$mosaic_ok" = 1 ] && kernels="$kernels $f::test_mosaic_gpu_kernel_bf16"
  # shellcheck disable=SC2086
  pytest_gpu c 400 $kernels -k "not all_combined and not (mosaic and (segments or lengths))"
fi
[ "$mosaic_ok" = 1 ] && impls="mosaic_gpu portable cudnn xla" || impls="portable cudnn xla"

remaining=$(left)
echo "== 3. bench_flash ($remaining s left)" | tee -a "$log"
if [ "$mode" != tests ] && [ "$remaining" -gt 110 ]; then
  timeout -k 10 "$remaining" "$py" experiments/bench_flash.py --impls $impls --repeats 10 \
    ${BENCH_ARGS:---head-dims 64 128 --lengths 8192 16384 2048 1024 4096} \
    --budget-s $((remaining - 75)) > "$out/bench.log" 2>&1
  grep -v '^{' "$out/bench.log" | tail -n 40 | tee -a "$log"
fi
find experiments/results -name 'flash_*' -newer "$stamp" ! -name 'flash_NOGPU.*' -exec cp {} "$out/" \;
rm -f "$stamp"
echo "== done in $(( $(date +%s) - start )) s" | tee -a "$log"
