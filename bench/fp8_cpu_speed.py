"""Benchmark: an MM-DiT step with scaled-fp8 block linears against the same step in bf16, on the CPU.

A random MM-DiT (default 4 blocks of width 512; ``bench/gpu_speed.py``'s builder) runs one step
(a ``--size`` picture with one reference of the same size and 64 text tokens) in ``--dtype``; a
copy gets its block linears quantized to scaled e4m3 (``precision.quantize_weights(...,
"fp8_scaled")``, what a ComfyUI ``*_fp8_scaled`` file loads as). Variants, alternating round by
round (bf16, then each fp8 variant, then bf16 again ...) so a drifting machine load hits all alike;
the best time of each is compared with the best bf16 time of the same run:

- ``fp8 upcast per call (torch .to)``: every layer converts its weight with torch's fp8 cast each
  call (the path before the byte-level upcast);
- ``fp8 upcast per call``: ``FP8Linear.keep_upcast = False``: the byte-level upcast each call
  (the memory saving kept whole);
- ``fp8 kept upcast``: ``keep_upcast = True`` (what the automatic rule picks on the CPU when memory
  allows): the upcast copy is kept after the first call. Target: <= 1.15x bf16.

    python bench/fp8_cpu_speed.py [--layers 4 --width 512 --size 256 --repeats 5 --dtype bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_speed import build  # noqa: E402

from firered_core.formats import fp8_layers as tf  # noqa: E402
from firered_core.runtime import precision  # noqa: E402

TARGET = 1.15


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512, help="heads x 128")
    ap.add_argument("--size", type=int, default=256, help="picture (and reference) side in pixels")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = dict(num_layers=args.layers, num_attention_heads=args.width // 128, attention_head_dim=128,
               joint_attention_dim=512, in_channels=64, out_channels=16, patch_size=2, axes_dims_rope=(16, 56, 56))
    plain = build(cfg, torch.device("cpu"), dtype)
    fp8 = copy.deepcopy(plain)
    n = precision.quantize_weights(fp8, "fp8_scaled")
    fp8_kept = copy.deepcopy(fp8)  # its own layers: the per-call variants never drop its copies
    tf.set_fp8_upcast(fp8, False)
    tf.set_fp8_upcast(fp8_kept, True)
    side = args.size // 16
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 2 * side * side, 64, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(1, 64, 512, generator=g).to(dtype),
              timestep=torch.full((1,), 0.5, dtype=dtype), img_shapes=[[(1, side, side), (1, side, side)]],
              return_dict=False)

    def legacy(w8, fp8_dtype, dt):
        return w8.view(fp8_dtype).to(dt), 1.0

    fast = tf.fp8_to

    def upcast(old=False):
        def on():
            tf.fp8_to = legacy if old else fast
        return on

    variants = {"bf16": (plain, upcast()),
                "fp8 upcast per call (torch .to)": (fp8, upcast(old=True)),
                "fp8 upcast per call": (fp8, upcast()),
                "fp8 kept upcast": (fp8_kept, upcast())}
    times: dict[str, list[float]] = {k: [] for k in variants}
    outs = {}
    try:
        for r in range(args.repeats + 1):  # round 0 is the warm-up (and fills the kept copies)
            for name, (model, on) in variants.items():
                on()
                t = time.perf_counter()
                outs[name] = model(**kw)[0]
                dt = time.perf_counter() - t
                if r:
                    times[name].append(dt)
    finally:
        tf.fp8_to = fast
    best = {k: min(v) for k, v in times.items()}
    kept = tf.upcast_bytes(fp8_kept)
    print(f"MM-DiT {args.layers} blocks x width {args.width}, {args.size}x{args.size} + one reference, {args.dtype} "
          f"on the CPU ({torch.get_num_threads()} threads); {n} block linears in scaled fp8; best of {args.repeats}, "
          "variants alternating")
    rows = {}
    for name in variants:
        ratio = best[name] / best["bf16"]
        dev = ((outs[name].float() - outs["bf16"].float()).norm() / outs["bf16"].float().norm()).item()
        rows[name] = {"seconds": best[name], "runs": times[name], "ratio_vs_bf16": ratio, "deviation_vs_bf16": dev}
        print(f"  {name:34s} {best[name]:8.3f} s  {ratio:5.2f}x bf16  (rel. deviation {dev:.2e}; runs "
              f"{', '.join(f'{t:.3f}' for t in times[name])})")
    same = torch.equal(outs["fp8 kept upcast"], outs["fp8 upcast per call"])
    r = rows["fp8 kept upcast"]["ratio_vs_bf16"]
    print(f"kept upcast copies: {kept / 2**20:.1f} MiB on top of the fp8 weights; kept and per-call outputs "
          f"{'identical' if same else 'DIFFER'}")
    print(f"fp8 kept upcast {r:.2f}x bf16 (target <= {TARGET}x): {'met' if r <= TARGET else 'NOT met'}; "
          f"per call {rows['fp8 upcast per call']['ratio_vs_bf16']:.2f}x, "
          f"torch's cast per call {rows['fp8 upcast per call (torch .to)']['ratio_vs_bf16']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows, "kept_bytes": kept,
                                               "identical": same}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
