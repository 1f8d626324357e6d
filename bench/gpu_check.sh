#!/usr/bin/env bash
# The GPU check in one command (see bench/gpu_check.py): the CUDA tests, the tiny edit against
# diffusers in bf16, the release-size DiT step per option, a whole 8-step edit, a LoRA step under a
# 24 GB cap and an NFT update; one JSON + one Markdown table under $OUT (default ./gpu-check).
#   bash bench/gpu_check.sh            # on a GPU (about 6-8 minutes on one H200)
#   bash bench/gpu_check.sh --tiny     # on the CPU: every step in its small form
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
exec "$PY" bench/gpu_check.py "$@"
