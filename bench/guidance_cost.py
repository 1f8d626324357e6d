"""Benchmark: the per-step cost of consistency guidance against unguided sampling.

Encodes one edit once, then samples it without guidance and with each guidance measure
(``region``: latent-space pull outside the mask; ``region_pixel``: the same through the VAE
decoder's gradient; ``auto``: the automatic edit mask), alternately, and prints the best time per
step of each and its ratio to unguided (target: at most 1.3x). Model: made on the spot (default
4 MM-DiT blocks of width 512), 512x512, true CFG 4.

    python bench/guidance_cost.py [--steps 6] [--size 512] [--repeats 2] [--device cuda --dtype bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firered_core import FireRedEditor  # noqa: E402
from firered_core.editing import consistency_guidance as CG  # noqa: E402
from firered_core.pipeline import EditRequest  # noqa: E402
from firered_core.tiny import make_tiny  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    tmp = tempfile.TemporaryDirectory()
    model = make_tiny(Path(tmp.name) / "m", num_layers=args.layers, width=args.width, num_attention_heads=max(1, args.width // 128))
    ed = FireRedEditor.from_pretrained(model, device=args.device, dtype=args.dtype)
    from PIL import Image

    pic = Image.radial_gradient("L").convert("RGB").resize((args.size, args.size))
    mask = torch.zeros(1, args.size, args.size)
    mask[:, :, args.size // 2 :] = 1
    req = EditRequest(prompt="make the right half red", steps=args.steps, cfg=4.0, width=args.size, height=args.size,
                      ref_area=args.size * args.size)
    with torch.inference_mode():
        enc = ed.encode(pic, req)
    runs = {
        "unguided": None,
        "region": lambda: CG.GuidanceHook(ed.c.vae, pic, mask, options=dict(strength=1.0)),
        "region_pixel": lambda: CG.GuidanceHook(ed.c.vae, pic, mask, options=dict(strength=1.0, measures=("region_pixel",), vae=ed.c.vae)),
        "auto": lambda: CG.GuidanceHook(ed.c.vae, pic, None, options=dict(strength=1.0, auto_mask=True)),
    }
    # the one-time setup of a guided edit (VAE-encoding the source, in the hook's first call) is timed
    # in each run and left out: not a per-step cost
    setups = []

    def timed(hook):
        def call(model_fn, enc_, sigmas):
            t = time.perf_counter()
            fn = hook(model_fn, enc_, sigmas)
            setups.append(time.perf_counter() - t)
            return fn
        return call

    best, setup = {k: float("inf") for k in runs}, 0.0
    for _ in range(args.repeats):
        for name, make in runs.items():
            guide = timed(make()) if make else None
            setups.clear()
            t = time.perf_counter()
            with torch.inference_mode():
                ed.sample(enc, req, generator=torch.Generator().manual_seed(0), guide=guide)
            total = time.perf_counter() - t - sum(setups)
            best[name] = min(best[name], total / args.steps)
            setup = max([setup, *setups])
    print(f"model: {args.layers} blocks x width {args.width}, {args.size}x{args.size}, {args.steps} steps, true CFG 4, "
          f"{args.dtype} on {args.device}")
    print(f"  one-time setup of guidance (VAE-encoding the source, timed in each run): at most {setup:.3f} s, excluded below")
    for name, t in best.items():
        print(f"  {name:13s} {t:7.3f} s/step   ratio to unguided {t / best['unguided']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
