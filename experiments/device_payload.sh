#!/usr/bin/env bash
# Prepares, on the development machine, what experiments/gpu_density.sh needs on a rented GPU machine
# that has jax/flax/optax/orbax/chex but not jaxlab's data stack and cannot reach a package index:
#   .whl/                 cp312 manylinux wheels of tensorflow-datasets, grain, array_record,
#                         ml_collections, jmp, tensorboardX and their missing dependencies (~10 MB; promise
#                         has no wheel on PyPI, so one is built from its source here);
#   shared/data/mnist/    a copy of ../shared/data/mnist (11 MB; shared/ inside the checkout travels).
# Both are git-ignored; never commit them. Pass `carry: [".whl"]` to the device call.
#
#   bash experiments/device_payload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl shared/data
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64"
# Versions as installed with jaxlab's pins on 2026-12-04; the GPU machine's image had Python 3.12.
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $platforms -d .whl array_record==0.8.6 grain==0.2.18 dm-tree==0.1.10 immutabledict==4.3.1 jmp==0.0.4 \
  ml_collections==1.1.0 portpicker==1.6.0 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 \
  toml==0.10.2 tensorboardX==2.6.5 importlib_resources==7.1.0 simple-parsing==0.1.9 \
  docstring_parser==0.18.0 termcolor==3.3.0
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
rm -rf shared/data/mnist && cp -r ../shared/data/mnist shared/data/mnist && chmod -R u+w shared/data/mnist
du -sh .whl shared
