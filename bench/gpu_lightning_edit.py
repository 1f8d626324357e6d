"""Benchmark: a whole 8-step Lightning-style edit (CFG 1) at the release size on a GPU -- the text
encoder reading the instruction with the picture, the VAE encoding the reference, 8 MM-DiT steps
and the VAE decode -- through ``FireRedEditor.edit``. Target on an H200: <= 3 s per edit.

No weights are downloaded: the parts are built at their release sizes with random weights directly
on the GPU in bf16 -- the MM-DiT (60 blocks, width 3072: ``bench/gpu_speed.py``'s builder),
Qwen2.5-VL-7B (28 layers of width 3584, the 32-block vision tower of width 1280) and the Qwen-Image
VAE (diffusers' default ``AutoencoderKLQwenImage``, the released configuration). The tokenizer and
image processor come from a tiny model made on the spot (same image processing; a small
vocabulary, so the embedding table is smaller than the release's -- a lookup, no cost in time).
Random weights give a meaningless picture at the real cost.

    python bench/gpu_lightning_edit.py                # on a GPU: the release size, 1024x1024
    python bench/gpu_lightning_edit.py --tiny         # anywhere (CPU): the tiny model, 128x128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Qwen2.5-VL-7B-Instruct's sizes (its config.json)
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, max_window_layers=28)
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 fullatt_block_indexes=[7, 15, 23, 31], window_size=112)
MROPE_7B = [16, 24, 24]


def real_text_encoder(tiny_config, device, dtype):
    """Qwen2.5-VL-7B's architecture with random weights, created on ``device`` in ``dtype``; the
    token ids (and the vocabulary size) of the tiny tokenizer ``tiny_config`` was written for."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = tiny_config.to_dict()
    d["text_config"].update(TEXT_7B, layer_types=["full_attention"] * TEXT_7B["num_hidden_layers"])
    d["text_config"]["rope_parameters"]["mrope_section"] = MROPE_7B
    d["vision_config"].update(VISION_7B)
    d.pop("dtype", None)
    cfg = Qwen2_5_VLConfig(**d)
    with torch.device(device):  # created there in ``dtype``: never a CPU or float32 copy
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU at 128x128 (a dry run)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=None, help="picture and output side (default 1024; 128 with --tiny)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed edits after one warm-up")
    ap.add_argument("--target-s", type=float, default=3.0)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from PIL import Image

    from firered_core import FireRedEditor
    from firered_core.loading import FireRedComponents, load_pretrained
    from firered_core.tiny import make_tiny

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    cuda = device.type == "cuda"
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    size = args.size or (128 if args.tiny else 1024)
    torch.set_grad_enabled(False)
    tmp = tempfile.TemporaryDirectory()
    tiny = make_tiny(Path(tmp.name) / "tiny")
    t0 = time.perf_counter()
    c = load_pretrained(tiny, device=device if args.tiny else "cpu", dtype=dtype)
    if not args.tiny:
        from diffusers import AutoencoderKLQwenImage

        sys.path.insert(0, str(ROOT / "bench"))
        from gpu_speed import REAL, build

        transformer = build(REAL, device, dtype)
        text_encoder = real_text_encoder(c.text_encoder.config, device, dtype)
        vae = AutoencoderKLQwenImage().to(device, dtype).eval().requires_grad_(False)
        c = FireRedComponents(transformer=transformer, vae=vae, text_encoder=text_encoder, processor=c.processor,
                              scheduler_config=c.scheduler_config, source="random weights at the release size")
    if cuda:
        torch.cuda.synchronize(device)
    built = time.perf_counter() - t0
    sizes = {k: sum(p.numel() for p in getattr(c, k).parameters()) for k in ("transformer", "text_encoder", "vae")}
    editor = FireRedEditor(c, device=device)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"device: {name}; parameters: MM-DiT {sizes['transformer'] / 1e9:.2f}B, text encoder "
          f"{sizes['text_encoder'] / 1e9:.2f}B, VAE {sizes['vae'] / 1e6:.0f}M ({dtype}); built in {built:.1f} s")
    pic = Image.radial_gradient("L").convert("RGB").resize((size, size))

    def one():
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        editor.edit(pic, "turn the disc into a red star", steps=args.steps, cfg=1.0, width=size, height=size, seed=0)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    warm = one()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = [one() for _ in range(args.repeats)]
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    best = min(times)
    print(f"{args.steps}-step edit at CFG 1, {size}x{size} with one {size}x{size} picture: best {best:.2f} s "
          f"(runs {', '.join(f'{t:.2f}' for t in times)}; warm-up {warm:.2f} s)"
          + (f", peak {peak / 2**30:.1f} GiB" if peak is not None else ""))
    if not args.tiny:
        print(f"target <= {args.target_s:g} s: {'met' if best <= args.target_s else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "size": size, "steps": args.steps, "best_s": best,
                                               "runs_s": times, "warmup_s": warm, "peak_bytes": peak, "params": sizes,
                                               "target_s": args.target_s}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
