"""The GPU check: one run that proves the CUDA path and measures it against its targets.

Steps, each in its own process with its own time limit (a failing or slow step is recorded and the
next one runs), written to ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` after every step
(so a run cut short still leaves what it measured):

1. ``cuda_tests``: the ``gpu``-marked tests (``tests/gpu``: CUDA edit against the CPU one, block
   swap on a side stream, int8 / fp8 / fp8 matmul, compile, attention backends, batched CFG, the
   trainer's block swap gradients, NFT steps on CUDA);
2. ``dit_speed``: one MM-DiT step at the release size with synthetic weights, per option: bf16,
   diffusers' own step, step cache, block swap under a 24 GB cap, scaled fp8 (upcast, fp8
   matmul), int8, compiled blocks (last): s/step, peak memory, MFU (``bench/gpu_speed.py``);
3. ``lora_step``: one LoRA step at 1024^2 with the 24 GB config under a 24 GiB cap (``bench/gpu_lora_step.py``);
4. ``edit_parity``: the tiny model's edit through this core and through diffusers in bf16 on CUDA:
   pixel difference, time and memory ratios (``bench/edit_speed.py``);
5. ``lightning_edit``: a whole 8-step CFG-1 edit at the release size (``bench/gpu_lightning_edit.py``);
6. ``nft_step``: one DiffusionNFT update at 1024^2 on the scaled-fp8 base (``bench/gpu_nft_step.py``).

The order puts the most telling figures first, so a run cut short by ``--budget`` loses the least.

``--budget S`` bounds the whole run: each step gets at most the time left (a step with under
15 s left is recorded as not run), and a step that runs out is stopped with everything it started.
``--pack`` leaves three files under ``<out>`` (``gpu_check.json``, ``gpu_check.md`` and
``gpu_check_logs.tar.gz`` with each step's log, JSON and the tests' XML, rewritten after every step),
which is what a lent device machine sends back (at most 8 files); ``bench/gpu_device.sh`` runs it so.

Targets (issue 16), judged from the figures of the same run: bf16 step >= 50% MFU; fp8 step <=
0.7x bf16; block swap at 24 GB <= 1.5x resident; 8-step edit <= 3 s on an H200; LoRA step fits
24 GB; ours <= 0.9x diffusers' step time.

    bash bench/gpu_check.sh                       # on a GPU; results under $OUT (or ./gpu-check)
    bash bench/gpu_check.sh --tiny                # on the CPU: every step in its small form (a CI test runs it)
    python bench/gpu_check.py --out DIR --skip compile,nft_step
    bash bench/gpu_device.sh                      # on a lent device machine: carried wheels, --pack, --budget 480
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))

from firered_trainer.rl.common import atomic_write  # noqa: E402  (imports torch; starts no CUDA context)

MIN_STEP_S = 15  # a step is not started with less time than this left in --budget


def steps(tiny: bool, out: Path, skip: set[str]) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in s) of each step; ``--tiny`` gives the CPU forms."""
    j = lambda name: ["--json", str(out / f"{name}.json")]  # noqa: E731
    speed_skip = ",".join(sorted(skip & {"swap", "fp8", "int8", "cache"}))
    # most telling first: under --budget the last ones are what a short run loses
    todo = [
        ("cuda_tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu", "-rs",
                        f"--junitxml={out / 'cuda_tests.xml'}"], 150),
        ("dit_speed", [PY, "bench/gpu_speed.py", *(["--tiny"] if tiny else []), *([] if "compile" in skip else ["--compile"]),
                       *(["--skip", speed_skip] if speed_skip else []), *j("dit_speed")], 300),
        ("lora_step", [PY, "bench/gpu_lora_step.py", *(["--tiny"] if tiny else []), *j("lora_step")], 180),
        ("edit_parity", [PY, "bench/edit_speed.py", *(["--layers", "2", "--width", "128", "--size", "64", "--steps", "2",
                                                       "--repeats", "1"] if tiny else
                                                      ["--device", "cuda", "--dtype", "bf16", "--repeats", "3"]), *j("edit_parity")], 120),
        ("lightning_edit", [PY, "bench/gpu_lightning_edit.py", *(["--tiny", "--steps", "2", "--repeats", "1"] if tiny else []),
                            *j("lightning_edit")], 180),
        ("nft_step", [PY, "bench/gpu_nft_step.py", "--fp8", *(["--tiny"] if tiny else []), *j("nft_step")], 150),
    ]
    return [t for t in todo if t[0] not in skip]


def device_name() -> str:
    """The GPU's name, asked of nvidia-smi (a CUDA context in this process would hold half a GB of the
    card through every step), else of torch in a child process; "CPU" without one."""
    for cmd in (["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                [PY, "-c", "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    return "unknown"


def run_step(cmd: list[str], log: Path, env: dict, limit: float) -> str:
    """Run one step in its own process group; past ``limit`` the whole group is killed (pytest's or a
    benchmark's children too, so nothing is left holding the GPU). Returns the step's status."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {limit:.0f} s"
    return "ok" if rc == 0 else f"failed (exit {rc})"


def pack(work: Path, out: Path) -> None:
    """Every step's log, JSON and XML so far into ``<out>/gpu_check_logs.tar.gz`` (written whole, then renamed)."""

    def write(tmp):
        with tarfile.open(tmp, "w:gz") as tar:
            for f in sorted(work.iterdir()):
                tar.add(f, arcname=f.name)

    atomic_write(out / "gpu_check_logs.tar.gz", write)


def junit_counts(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    n["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
    return n


def judge(res: dict, tiny: bool) -> list[dict]:
    """The targets: (what, measured, target, met) from the figures of this run."""

    def fig(step, *path):
        v = res.get(step, {}).get("figures")
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    rows = []

    def row(what, value, target, met, shown):
        rows.append({"target": what, "measured": value, "goal": target,
                     "met": None if tiny or value is None else bool(met), "shown": shown})

    bf16 = fig("dit_speed", "variants", "bf16", "s_per_step")
    mfu = fig("dit_speed", "variants", "bf16", "mfu")
    row("DiT step 1024^2 + 1 reference, bf16: MFU", mfu, ">= 50%", mfu is not None and mfu >= 0.5,
        f"{mfu:.1%}" if mfu is not None else "-")
    fp8 = [fig("dit_speed", "variants", k, "s_per_step") for k in ("fp8_matmul", "fp8_upcast")]
    fp8 = min((v for v in fp8 if v), default=None)
    r = fp8 / bf16 if fp8 and bf16 else None
    row("fp8 step / bf16 step", r, "<= 0.7x", r is not None and r <= 0.7, f"{r:.2f}x" if r else "-")
    sw = fig("dit_speed", "variants", "block_swap", "s_per_step")
    r = sw / bf16 if sw and bf16 else None
    row("block swap at 24 GB / resident", r, "<= 1.5x", r is not None and r <= 1.5, f"{r:.2f}x" if r else "-")
    le = fig("lightning_edit", "best_s")
    row("8-step Lightning edit (TE + DiT + VAE)", le, "<= 3 s (H200)", le is not None and le <= 3.0,
        f"{le:.2f} s" if le is not None else "-")
    peak = fig("lora_step", "peak_bytes")
    # a "24 GB" card holds 24 GiB; the step ran under that cap (gpu_lora_step.py --cap-gb 24)
    row("LoRA step at 1024^2, peak", peak, "fits 24 GB (24 GiB)", peak is not None and peak < 24 * 2**30,
        f"{peak / 2**30:.2f} GiB" if peak is not None else "-")
    dif = fig("dit_speed", "variants", "diffusers", "s_per_step")
    r = bf16 / dif if bf16 and dif else None
    row("our DiT step / diffusers' step", r, "<= 0.9x", r is not None and r <= 0.9, f"{r:.2f}x" if r else "-")
    return rows


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device']}{', --tiny' if report['tiny'] else ''})", "",
             f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(report['started']))} UTC, {report['seconds']:.0f} s in all", "",
             "| step | status | seconds | figures |", "|---|---|---|---|"]
    for name, r in report["steps"].items():
        figs = r.get("figures") or {}
        if name == "cuda_tests":
            shown = ", ".join(f"{k} {figs[k]}" for k in ("passed", "failures", "errors", "skipped") if k in figs)
        elif name == "dit_speed":
            shown = "; ".join(f"{k} {v['s_per_step']:.3f} s" for k, v in figs.get("variants", {}).items() if "s_per_step" in v)
        elif name == "edit_parity":
            shown = (f"max pixel difference {figs['max_pixel_difference']:.2e}, time {figs['time_ratio']:.2f}x, "
                     f"memory {figs['memory_ratio']:.2f}x diffusers") if figs else ""
        else:
            shown = ", ".join(f"{k} {v:.3g}" for k, v in figs.items() if isinstance(v, float))
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.0f} | {shown} |")
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = "not judged (--tiny)" if report["tiny"] else {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['shown']} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="every step in its small CPU form (checks the script)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check", help="results folder (default $OUT)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: each step's own limit)")
    ap.add_argument("--pack", action="store_true", help="leave only gpu_check.json, gpu_check.md and gpu_check_logs.tar.gz in --out")
    ap.add_argument("--skip", default="", help="comma list: steps (cuda_tests, edit_parity, dit_speed, lightning_edit, "
                                               "lora_step, nft_step) or speed variants (swap, fp8, int8, cache, compile)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.pack else out
    skip = set(filter(None, args.skip.split(",")))
    if args.tiny:
        skip.add("compile")  # compiling on a CPU needs a C++ toolchain and minutes: not what --tiny checks
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    device = device_name()
    report = {"device": device, "tiny": args.tiny, "started": time.time(), "seconds": 0.0, "steps": {}, "targets": []}
    t_all = time.perf_counter()

    def write():
        report["seconds"] = time.perf_counter() - t_all
        report["targets"] = judge(report["steps"], args.tiny)
        for name, text in (("gpu_check.json", json.dumps(report, indent=1)), ("gpu_check.md", markdown(report))):
            atomic_write(out / name, lambda tmp: Path(tmp).write_text(text))  # a run killed mid-write keeps the last whole report

    for name, cmd, limit in steps(args.tiny, work, skip):
        left = None if args.budget is None else args.budget - (time.perf_counter() - t_all)
        log = work / f"{name}.log"
        entry = {"status": "", "seconds": 0.0, "log": None}
        if left is not None and left < MIN_STEP_S:
            entry["status"] = f"not run: {args.budget:.0f} s budget spent"
            print(f"== {name}: {entry['status']}", flush=True)
        else:
            limit = limit if left is None else min(limit, left)
            print(f"== {name} (at most {limit:.0f} s): {' '.join(cmd[1:])}", flush=True)
            t = time.perf_counter()
            entry["status"], entry["log"] = run_step(cmd, log, env, limit), log.name
            entry["seconds"] = time.perf_counter() - t
            if name == "cuda_tests":
                entry["figures"] = junit_counts(work / "cuda_tests.xml")
            elif (work / f"{name}.json").is_file():
                entry["figures"] = json.loads((work / f"{name}.json").read_text())
            print(f"   {entry['status']} in {entry['seconds']:.0f} s; log {log}", flush=True)
        report["steps"][name] = entry
        write()
        if args.pack:
            pack(work, out)
    write()
    if args.pack:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))
    return 0 if all(r["status"] == "ok" for r in report["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
