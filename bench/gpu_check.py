"""The GPU check: one run that proves the CUDA path and measures it against its targets.

Steps, each in its own process with its own time limit (a failing or slow step is recorded and the
next one runs), written to ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` after every step
(so a run cut short still leaves what it measured):

1. ``cuda_tests``: the ``gpu``-marked tests (``tests/gpu``: CUDA edit against the CPU one, block
   swap on a side stream, int8 / fp8 / fp8 matmul, compile, attention backends, batched CFG, the
   trainer's block swap gradients, NFT steps on CUDA);
2. ``edit_parity``: the tiny model's edit through this core and through diffusers in bf16 on CUDA:
   pixel difference, time and memory ratios (``bench/edit_speed.py``);
3. ``dit_speed``: one MM-DiT step at the release size with synthetic weights, per option: bf16,
   diffusers' own step, step cache, block swap under a 24 GB cap, scaled fp8 (upcast, fp8
   matmul), int8, compiled blocks: s/step, peak memory, MFU (``bench/gpu_speed.py``);
4. ``lightning_edit``: a whole 8-step CFG-1 edit at the release size (``bench/gpu_lightning_edit.py``);
5. ``lora_step``: one LoRA step at 1024^2 with the 24 GB config under a 24 GiB cap (``bench/gpu_lora_step.py``);
6. ``nft_step``: one DiffusionNFT update at 1024^2 (``bench/gpu_nft_step.py``).

Targets (issue 16), judged from the figures of the same run: bf16 step >= 50% MFU; fp8 step <=
0.7x bf16; block swap at 24 GB <= 1.5x resident; 8-step edit <= 3 s on an H200; LoRA step fits
24 GB; ours <= 0.9x diffusers' step time.

    bash bench/gpu_check.sh                       # on a GPU; results under $OUT (or ./gpu-check)
    bash bench/gpu_check.sh --tiny                # on the CPU: every step in its small form (a CI test runs it)
    python bench/gpu_check.py --out DIR --skip compile,nft_step
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def steps(tiny: bool, out: Path, skip: set[str]) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in s) of each step; ``--tiny`` gives the CPU forms."""
    j = lambda name: ["--json", str(out / f"{name}.json")]  # noqa: E731
    speed_skip = ",".join(sorted(skip & {"swap", "fp8", "int8", "cache"}))
    todo = [
        ("cuda_tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu", "-rs",
                        f"--junitxml={out / 'cuda_tests.xml'}"], 240),
        ("edit_parity", [PY, "bench/edit_speed.py", *(["--layers", "2", "--width", "128", "--size", "64", "--steps", "2",
                                                       "--repeats", "1"] if tiny else
                                                      ["--device", "cuda", "--dtype", "bf16", "--repeats", "3"]), *j("edit_parity")], 120),
        ("dit_speed", [PY, "bench/gpu_speed.py", *(["--tiny"] if tiny else []), *([] if "compile" in skip else ["--compile"]),
                       *(["--skip", speed_skip] if speed_skip else []), *j("dit_speed")], 300),
        ("lightning_edit", [PY, "bench/gpu_lightning_edit.py", *(["--tiny", "--steps", "2", "--repeats", "1"] if tiny else []),
                            *j("lightning_edit")], 180),
        ("lora_step", [PY, "bench/gpu_lora_step.py", *(["--tiny"] if tiny else []), *j("lora_step")], 180),
        ("nft_step", [PY, "bench/gpu_nft_step.py", *(["--tiny"] if tiny else ["--fp8"]), *j("nft_step")], 150),
    ]
    return [t for t in todo if t[0] not in skip]


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
    row("LoRA step at 1024^2, peak", peak, "fits 24 GB", peak is not None and peak < 24e9,
        f"{peak / 1e9:.2f} GB" if peak is not None else "-")
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
    ap.add_argument("--skip", default="", help="comma list: steps (cuda_tests, edit_parity, dit_speed, lightning_edit, "
                                               "lora_step, nft_step) or speed variants (swap, fp8, int8, cache, compile)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    if args.tiny:
        skip.add("compile")  # compiling on a CPU needs a C++ toolchain and minutes: not what --tiny checks
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    except Exception:  # noqa: BLE001 -- the report says so rather than failing
        device = "unknown"
    report = {"device": device, "tiny": args.tiny, "started": time.time(), "seconds": 0.0, "steps": {}, "targets": []}
    t_all = time.perf_counter()

    def write():
        report["seconds"] = time.perf_counter() - t_all
        report["targets"] = judge(report["steps"], args.tiny)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.md").write_text(markdown(report))

    for name, cmd, limit in steps(args.tiny, out, skip):
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        log = out / f"{name}.log"
        try:
            with open(log, "w") as fh:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=limit).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit} s"
        entry = {"status": status, "seconds": time.perf_counter() - t, "log": log.name}
        if name == "cuda_tests":
            entry["figures"] = junit_counts(out / "cuda_tests.xml")
        elif (out / f"{name}.json").is_file():
            entry["figures"] = json.loads((out / f"{name}.json").read_text())
        report["steps"][name] = entry
        print(f"   {status} in {entry['seconds']:.0f} s; log {log}", flush=True)
        write()
    write()
    print(markdown(report))
    return 0 if all(r["status"] == "ok" for r in report["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
