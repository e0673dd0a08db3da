#!/usr/bin/env bash
# Issue 7's GPU rows in one command: the paper-size PixelCNN and gated PixelCNN (64 channels, 7 layers)
# on binarised MNIST with experiments/binary_density.py, on a rented GPU machine whose Python has jax,
# flax, optax, orbax and chex but not jaxlab's data stack. NOT YET RUN on a GPU (written 2026-12-04,
# when the session's device time had gone to the flash kernels): expect to debug its first run.
#
# Needs, prepared here by `bash experiments/device_payload.sh`: .whl/ (carried: `carry: [".whl"]`) and
# shared/data/mnist/ (shared/ travels by itself). Within a deadline (seconds, default 560) it installs
# the wheels into /tmp/site, times 20 steps of each model with `jaxlab bench`, gives each model the
# steps that fit in its share of the time left (at most 20,000; on a CPU, evaluation took over half of
# a share), trains both (ten evaluations, the
# best checkpoint's test NLL reported, as in the CPU rows) and leaves a table of these two rows alone
# (binary_density.md/.json, labelled with this machine) and the two sample grids in $OUT/results/ (bring
# them into experiments/results/ under names of their own: binary_density.md's CPU rows stay as they are).
#
#   bash experiments/gpu_density.sh [DEADLINE_S]
#   DENSITY_ARGS="--config.model.channels=8 --config.model.num_layers=1" bash experiments/gpu_density.sh 120
#                                                       # a tiny model: checks the script on any machine
set -uo pipefail
cd "$(dirname "$0")/.."
deadline_s=${1:-560}
case "$deadline_s" in ''|*[!0-9]*) echo "DEADLINE_S must be a whole number of seconds"; exit 2;; esac
start=$(date +%s)
left() { echo $((start + deadline_s - $(date +%s))); }
out="${OUT:-/tmp/gpu_density}"
mkdir -p "$out"
log="$out/gpu_density.log"
results="$out/results"  # a table of its own: binary_density.py --only keeps the rows of the table it writes into
mkdir -p "$results"
py=$(command -v python3 || command -v python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stack="import tensorflow_datasets, grain, ml_collections, jmp, tensorboardX"
if ! "$py" -c "$stack" > /dev/null 2>&1; then  # the data stack is missing: install the carried wheels
  ls .whl/*.whl > /dev/null 2>&1 || { echo "no .whl/: run experiments/device_payload.sh" | tee "$log"; exit 2; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>&1 | tail -n 3 | tee "$log"
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ ! -d ../shared/data/mnist ]; then  # the configs' default data folder is ../shared beside the checkout
  [ -d shared/data/mnist ] || { echo "no MNIST: run experiments/device_payload.sh" | tee -a "$log"; exit 2; }
  [ -e ../shared ] || ln -s "$PWD/shared" ../shared \
    || { echo "cannot link ../shared to shared/ (read-only parent?)" | tee -a "$log"; exit 2; }
fi
"$py" -c "$stack; import jaxlab.cli, jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -n 3 \
  | tee -a "$log"

paper=${DENSITY_ARGS:---config.model.channels=64 --config.model.num_layers=7}  # the model's size
declare -A extra=([pixelcnn]="" [gated_pixelcnn]="--config.model.name=gated_pixelcnn")
declare -A steps
for model in pixelcnn gated_pixelcnn; do
  # shellcheck disable=SC2086
  ms=$(timeout 180 "$py" -m jaxlab.cli bench pixelcnn --config.data.name=mnist $paper ${extra[$model]} \
    --steps 20 --json 2>>"$log" | tail -n 1 | "$py" -c "import json, sys; print(json.load(sys.stdin)['step_ms'])")
  echo "$model: ${ms:-?} ms/step ($(left) s left)" | tee -a "$log"
  [ -n "$ms" ] || exit 1
  steps[$model]=$ms
done
for model in pixelcnn gated_pixelcnn; do
  # Half of what is left each (the second gets the rest), 40% of it for the steps: compiling, ten
  # evaluations on 10k+10k images and the sample grid take the rest (a killed run records nothing).
  share=$(left)
  [ "$model" = pixelcnn ] && share=$((share / 2))
  [ "$(left)" -gt 60 ] || { echo "== $model: skipped, $(left) s left" | tee -a "$log"; continue; }
  n=$("$py" -c "print(max(100, min(20000, int($share * 0.4 * 1000 / ${steps[$model]}) // 100 * 100)))")
  echo "== $model: $n steps ($(left) s left)" | tee -a "$log"
  timeout -k 10 "$(left)" "$py" experiments/binary_density.py --only "mnist:$model" --steps "$n" \
    --out "$results" --extra="$paper" 2>&1 | tail -n 25 | tee -a "$log"
done
echo "== done in $(( $(date +%s) - start )) s" | tee -a "$log"
