"""Benchmark: the same edit through firered_core and through diffusers' QwenImageEditPlusPipeline.

Both load the same random weights (a model made on the spot: by default 4 MM-DiT blocks of width
512) in one process and run the same edit -- one 512x512 input picture, 8 steps, true CFG 4.0,
a 512x512 output -- alternately, after one warm-up run each. Printed: the best wall time and the
peak memory of each, their ratios ours / diffusers, and the largest pixel difference between the
two outputs (they must agree: the comparison is at equal output).

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU it is the peak resident
set size above the level before the run, sampled every millisecond from /proc.

    python bench/edit_speed.py                       # CPU, float32
    python bench/edit_speed.py --device cuda --dtype bf16 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firered_core import FireRedEditor  # noqa: E402
from firered_core.loading import resolve_dtype  # noqa: E402
from firered_core.tiny import make_tiny  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or sampled RSS above the start level."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_bytes()
            self._stop = threading.Event()
            self._max = self.base
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes()) - self.base


def make_picture(size: int):
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    arr = np.stack([x, y, ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(np.float32)], -1)
    return Image.fromarray((arr * 255).astype(np.uint8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512, help="MM-DiT width (heads x 128)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--size", type=int, default=512, help="input and output picture side")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="use this model folder instead of making one")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from diffusers import QwenImageEditPlusPipeline

    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    torch.set_grad_enabled(False)
    tmp = tempfile.TemporaryDirectory()
    model = args.model or make_tiny(Path(tmp.name) / "bench", num_layers=args.layers, width=args.width,
                                    num_attention_heads=args.width // 128)
    ref = QwenImageEditPlusPipeline.from_pretrained(model, dtype=dtype, local_files_only=True).to(device)
    ref.set_progress_bar_config(disable=True)
    ours = FireRedEditor.from_pretrained(model, device=device, dtype=dtype)
    pic = make_picture(args.size)
    prompt = "turn the disc into a red star"

    def run_ref():
        return ref(image=pic, prompt=prompt, negative_prompt=" ", true_cfg_scale=args.cfg,
                   num_inference_steps=args.steps, width=args.size, height=args.size,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]

    def run_ours():
        return ours.edit(pic, prompt, negative_prompt=" ", cfg=args.cfg, steps=args.steps, width=args.size,
                         height=args.size, seed=0).pixels[0].numpy()

    runs = {"firered_core": run_ours, "diffusers": run_ref}
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, list[int]] = {k: [] for k in runs}
    outs = {k: fn() for k, fn in runs.items()}  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                outs[name] = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
            peaks[name].append(mem.peak)

    n_params = sum(p.numel() for p in ours.c.transformer.parameters())
    print(f"model: {args.layers} blocks x width {args.width} ({n_params / 1e6:.1f}M MM-DiT params), {args.dtype} on "
          f"{device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"edit: one {args.size}x{args.size} picture, {args.steps} steps, true CFG {args.cfg}, {args.repeats} timed runs each")
    # the fastest run: other load on the machine only ever adds time
    best = {k: min(v) for k, v in times.items()}
    peak = {k: max(v) for k, v in peaks.items()}
    for k in runs:
        print(f"  {k:13s} best time {best[k]:8.2f} s (runs: {', '.join(f'{t:.2f}' for t in times[k])})   peak memory {peak[k] / 2**20:9.1f} MiB")
    diff = float(np.abs(outs["firered_core"] - outs["diffusers"]).max())
    print(f"ratio ours/diffusers: time {best['firered_core'] / best['diffusers']:.3f}   "
          f"peak memory {peak['firered_core'] / max(peak['diffusers'], 1):.3f}   (max pixel difference {diff:.2e})")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "device": str(device), "dtype": args.dtype, "size": args.size, "steps": args.steps, "cfg": args.cfg,
            "best_s": best, "peak_bytes": peak, "time_ratio": best["firered_core"] / best["diffusers"],
            "memory_ratio": peak["firered_core"] / max(peak["diffusers"], 1), "max_pixel_difference": diff}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
