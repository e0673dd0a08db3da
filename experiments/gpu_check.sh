#!/usr/bin/env bash
# The device checks of issue 6 in one command, for a session that is lent an NVIDIA Hopper GPU (which
# already has a CUDA build of jax/flax/optax/orbax/chex): install jaxlab without deps, run the GPU-only
# tests (Mosaic GPU kernel, portable kernel, cuDNN pass-through: values and gradients against "xla"),
# then the speed table, then `jaxlab bench` in float32 / bfloat16 / float16. Results land in
# experiments/results/flash_<device>.md; the log (with the bench JSON lines) in $OUT if set.
#
#   bash experiments/gpu_check.sh            # about 7-10 minutes on an H100/H200 (not yet run)
#
# If the Hopper tests pass, set MOSAIC_GPU_BY_DEFAULT = True in jaxlab/attention/flash/__init__.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
pip install --quiet --no-deps -e . 2>&1 | tail -n 2
# Pure-Python dependencies the device's own environment may lack (jmp, for the trainer's loss scaling):
# bring their wheels with `pip download --no-deps jmp -d wheels/` and carry wheels/ to the device.
if ls wheels/*.whl > /dev/null 2>&1; then pip install --quiet --no-deps wheels/*.whl; fi
python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/gpu_check.log"
# tests/conftest.py defaults JAX_PLATFORMS to cpu; the GPU-only tests skip unless it names cuda.
JAX_PLATFORMS=cuda timeout 240 python -m pytest -q -p no:cacheprovider -rs \
  tests/attention/test_flash_mosaic_gpu.py::test_on_hopper_matches_xla tests/attention/test_cudnn.py \
  2>&1 | tail -n 30 | tee -a "$out/gpu_check.log"
timeout 300 python experiments/bench_flash.py --repeats 10 2>&1 | tail -n 60 | tee -a "$out/gpu_check.log"
# Mixed precision: the train step of a mid-sized GPT in each compute dtype (float16 with loss scaling).
for dtype in float32 bfloat16 float16; do
  timeout 150 jaxlab bench lm_char --config.model.dtype=$dtype --config.model.width=512 \
    --config.model.num_layers=8 --config.model.num_heads=8 --config.data.batch_size=32 --steps 30 \
    --json 2>&1 | tail -n 1 | tee -a "$out/gpu_check.log"
done
cp experiments/results/flash_*.md experiments/results/flash_*.json "$out/" 2>/dev/null || true
