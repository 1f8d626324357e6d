"""Every CPU benchmark the README names runs to its end in a small form and prints its ratio line.

The figures themselves are meaningless at these sizes (a benchmark is read at its defaults); what
this guards is the script: ``bench/fp8_cpu_speed.py`` once broke silently when the helper it
called moved to another module. The GPU scripts run through ``bench/gpu_check.sh --tiny``
(``tests/test_gpu_check.py``); ``cache_calibration`` and ``sia_cache_size`` have their own tests."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# script, small arguments, a line its report must print
SCRIPTS = [
    ("fp8_cpu_speed", "--layers 1 --width 256 --size 64 --repeats 1", "fp8 kept upcast"),
    ("guidance_cost", "--layers 1 --width 128 --size 64 --steps 2 --repeats 1", "region_pixel"),
    ("load_memory", "--layers 1 --width 256", "GGUF peak / file"),
    ("nft_cost", "--size 32 --group 2 --sample-steps 2 --iters 1 --warmup 0", "update"),
    ("speed_options", "--layers 2 --width 128 --size 64 --steps 2 --repeats 1 --resident 1 --no-compile", "int8 weights"),
    ("train_memory", "--layers 1 --width 128 --text-dim 128 --resolution 64", "checkpointing saves"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,args,expect", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_benchmark_runs_small(script, args, expect):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *args.split()], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert expect in done.stdout, done.stdout[-3000:]
