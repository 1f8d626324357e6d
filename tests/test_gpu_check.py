"""``bench/gpu_check.sh --tiny``: the GPU check's every step runs in its small CPU form, so the
script is not broken when a GPU is lent; its JSON and Markdown carry each step's figures and the
targets table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["cuda_tests", "edit_parity", "dit_speed", "lightning_edit", "lora_step", "nft_step"]


@pytest.mark.slow
def test_gpu_check_runs_tiny(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tiny", "--out", str(tmp_path)],
                          env={**__import__("os").environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {k: (v["status"], (tmp_path / v["log"]).read_text()[-1500:]) for k, v in report["steps"].items()
              if v["status"] != "ok"}
    assert done.returncode == 0 and not failed, failed or done.stdout[-3000:]
    assert list(report["steps"]) == STEPS
    figs = {k: v.get("figures") or {} for k, v in report["steps"].items()}
    assert figs["cuda_tests"]["tests"] >= 10 and figs["cuda_tests"]["failures"] == 0
    assert figs["edit_parity"]["max_pixel_difference"] < 1e-3  # float32 on the CPU: the same picture
    assert {"diffusers", "bf16", "block_swap", "fp8_upcast", "int8", "cache"} <= set(figs["dit_speed"]["variants"])
    assert figs["lightning_edit"]["best_s"] > 0 and figs["lora_step"]["step_s"] > 0 and figs["nft_step"]["update_s"] > 0
    assert len(report["targets"]) == 6 and all(t["met"] is None for t in report["targets"])  # --tiny judges nothing
    md = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {s} | ok |" in md for s in STEPS) and "| target | measured | goal | met |" in md
