#!/usr/bin/env bash
# The GPU check on a lent device machine, in one call (it has no package index; see
# bench/gpu_check.py). Here, once: `bash bench/gpu_wheels.sh` (fetches the wheels the device's image
# lacks into .whl/, ignored by git). Then the device tool's run, with carry [".whl"]:
#   bash bench/gpu_device.sh                  # timeout_s 560: the check stops itself at 480 s
# Its $OUT gets gpu_check.json, gpu_check.md and gpu_check_logs.tar.gz (each step's log and figures).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/firered-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/firered-site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY' || exit 1
import importlib.util, sys
missing = [m for m in ("diffusers", "transformers", "accelerate", "peft", "gguf", "bitsandbytes", "safetensors")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_device.sh: {', '.join(missing)} missing here: run `bash bench/gpu_wheels.sh` on the dev machine "
             "and carry .whl")
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
export PYTHONUNBUFFERED=1 PYTHON="$PY"
exec bash bench/gpu_check.sh --out "${OUT:-gpu-check}" --pack --budget "${GPU_CHECK_BUDGET:-480}" "$@"
