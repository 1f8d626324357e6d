"""``bench/gpu_check.sh --tiny``: the GPU check's every step runs in its small CPU form, so the
script is not broken when a GPU is lent; its JSON and Markdown carry each step's figures and the
targets table."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["cuda_tests", "dit_speed", "lora_step", "edit_parity", "lightning_edit", "nft_step"]


@pytest.mark.slow
def test_gpu_check_runs_tiny(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tiny", "--out", str(tmp_path)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
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


@pytest.mark.slow
def test_device_script_keeps_its_budget_and_packs_three_files(tmp_path):
    """``bench/gpu_device.sh`` (what a lent machine runs) stops the check at its budget, records the
    steps it had no time for, and leaves the three files a device call can send back."""
    budget = 30
    t = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_device.sh"), "--tiny"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path),
                               "GPU_CHECK_BUDGET": str(budget)}, timeout=300)
    took = time.perf_counter() - t
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"], \
        done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {k: v["status"] for k, v in report["steps"].items()}
    assert list(status) == STEPS and status["cuda_tests"] == "ok", status
    assert any(s.startswith(("not run", "timed out")) for s in status.values()), status  # 30 s is not enough for all
    assert done.returncode != 0  # a check cut short does not pass
    assert took < budget + 25, took  # the interpreter's start and the reports on top of the budget
    with tarfile.open(tmp_path / "gpu_check_logs.tar.gz") as tar:
        names = set(tar.getnames())
        assert {f"{k}.log" for k, v in report["steps"].items() if not v["status"].startswith("not run")} <= names
        assert "cuda_tests.xml" in names
        log = tar.extractfile("cuda_tests.log").read().decode()
    assert "skipped" in log  # pytest's own summary, carried back whole
