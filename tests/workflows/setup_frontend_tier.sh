#!/usr/bin/env bash
# Sets up the browser part of the real-ComfyUI test tier (tests/workflows/test_frontend*.py):
# Playwright in the test interpreter, a system Chromium, and the newer ComfyUI front end (pinned
# below) in a folder of its own, served next to the one installed in ComfyUI's venv with
# --front-end-root. Prints the variables the tier reads.
#
#   tests/workflows/setup_frontend_tier.sh [FOLDER]      # default FOLDER: ~/.cache/firered-frontend
#
# Environment: PYTHON (the interpreter that runs pytest; default python3), COMFYUI_PYTHON (ComfyUI's
# interpreter, used for pip; default PYTHON), NO_APT=1 to skip apt-get.
set -euo pipefail

# the newer front end the tier checks (the installed one comes with ComfyUI: 1.27.10 with 0.3.64)
FRONTEND_VERSION="1.58.1"

folder="${1:-$HOME/.cache/firered-frontend}/comfyui-frontend-package-$FRONTEND_VERSION"
python="${PYTHON:-python3}"
comfy_python="${COMFYUI_PYTHON:-$python}"

if ! "$python" -c "import playwright" 2>/dev/null; then
  "$python" -m pip install -q playwright
fi
# Playwright's own browser download is not used: the system Chromium is
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && [ -z "${FIRERED_CHROMIUM:-}" ]; then
  if [ "${NO_APT:-0}" = "1" ]; then
    echo "no Chromium: install one (apt-get install chromium) or set FIRERED_CHROMIUM" >&2
    exit 1
  fi
  apt-get install -y -q chromium
fi
if [ ! -f "$folder/comfyui_frontend_package/static/index.html" ]; then
  "$comfy_python" -m pip install -q --no-deps --target "$folder" "comfyui-frontend-package==$FRONTEND_VERSION"
fi
static="$folder/comfyui_frontend_package/static"
test -f "$static/index.html" || { echo "no index.html in $static" >&2; exit 1; }
echo "export FIRERED_FRONTEND_ROOT=$static"
