#!/usr/bin/env bash
# The wheels a lent device machine needs for bench/gpu_device.sh and lacks: its image (Python 3.12,
# torch, transformers, accelerate, peft, safetensors, numpy; no package index) has no diffusers,
# gguf or bitsandbytes. Run here, where pip reaches the index; they go into .whl/ (about 50 MB of
# the 64 MiB a call may carry), ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pin() { grep -E "^$1==" .ci/constraints.txt; }  # the versions CI tests against
mkdir -p .whl
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "$(pin diffusers)" "$(pin gguf)" "$(pin bitsandbytes)" importlib_metadata==10.2.0
du -ch .whl/*.whl | tail -1
