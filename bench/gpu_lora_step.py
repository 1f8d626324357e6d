"""One LoRA training step of the real-size FireRed MM-DiT with the 24 GB config: peak memory and
step time.

The architecture is diffusers' ``QwenImageTransformer2DModel`` at its release size (60 blocks,
24 heads x 128 = width 3072, joint text dim 3584; 20.4B parameters) with random weights: built on
the meta device, then materialised one block at a time on the GPU (bf16, and the frozen block
linears converted to scaled fp8 as they arrive, so the bf16 model never exists whole). Then the
trainer's own pieces: PEFT LoRA rank 32 on FireRed's 12 target modules (float32), gradient
checkpointing, 16 blocks swapped to CPU memory (``--blocks-to-swap``), bitsandbytes AdamW8bit, bf16 autocast, and a 1024x1024 target with one 1024x1024
reference (8192 image tokens) and ~250 text tokens -- the sizes the stage feeds the model.

    python bench/gpu_lora_step.py                 # on a GPU: the real size (target: peak < 24 GB)
    python bench/gpu_lora_step.py --tiny          # anywhere (CPU): 2 small blocks, 128x128, checks the code

Prints the setup memory, the peak during the steps, the mean step time (after one warm-up step),
and the loss of each step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    import os

    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(args, device):
    import torch
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    from firered_trainer.config import LORA_PRESETS
    from firered_trainer.lora import add_lora, quantize_frozen_base

    conf = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=args.layers, attention_head_dim=args.head_dim,
                num_attention_heads=args.heads, joint_attention_dim=args.text_dim, axes_dims_rope=tuple(args.rope))
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**conf)
    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(args.rope), scale_rope=True)  # plain tensors, rebuilt
    add_lora(model, rank=args.rank, alpha=args.rank, modules=LORA_PRESETS["firered"])
    g = torch.Generator(device=device).manual_seed(0)  # random weights drawn where they live

    def materialise(module):
        module.to_empty(device=device, recurse=True)
        with torch.no_grad():
            for n, p in module.named_parameters(recurse=True):
                dtype = torch.float32 if ".lora_" in n else torch.bfloat16
                if p.dim() > 1:
                    vals = torch.randn(p.shape, generator=g, device=device, dtype=dtype) * 0.02
                else:  # norm scales 1, biases 0
                    vals = torch.full(p.shape, 1.0 if n.endswith("weight") else 0.0, device=device, dtype=dtype)
                p.data = vals
            for n, b in module.named_buffers(recurse=True):
                b.zero_()

    for name, child in model.named_children():
        if name == "transformer_blocks":
            for block in child:
                materialise(block)
                if args.fp8:
                    quantize_frozen_base(block)
        elif name != "pos_embed":
            materialise(child)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2 small blocks at 128x128 (runs on the CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=250)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-fp8", dest="fp8", action="store_false")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--optimizer", default="adamw8bit")
    ap.add_argument("--blocks-to-swap", type=int, default=16, help="the 24 GB config's block swap (0 = off)")
    ap.add_argument("--cap-gb", type=float, default=24.0,
                    help="on a GPU, cap this process's memory here (torch.cuda.set_per_process_memory_fraction), "
                         "as a card of that size would; 0 = no cap")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    args.layers, args.heads, args.head_dim, args.text_dim, args.rope = 60, 24, 128, 3584, (16, 56, 56)
    if args.tiny:
        args.layers, args.heads, args.head_dim, args.text_dim, args.rope = 2, 2, 32, 64, (8, 12, 12)
        args.resolution, args.text_tokens, args.rank = min(args.resolution, 128), 32, 8
        args.blocks_to_swap = min(args.blocks_to_swap, 1)

    import torch

    from firered_core.sampling import flow
    from firered_trainer.batches import predict_velocity
    from firered_trainer.objective import flow_matching_loss
    from firered_trainer.optim import build_optimizer, state_bytes_per_param

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    model = build(args, device)
    if args.blocks_to_swap:
        from firered_core.runtime.blockswap import swap_last_blocks

        swap_last_blocks(model, args.blocks_to_swap, device)
    n_all = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if "weight_fp8" in n)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(args.optimizer, params, lr=1e-4)
    setup_mem = torch.cuda.memory_allocated(device) if cuda else rss_bytes()
    print(f"model: {args.layers} blocks x width {args.heads * args.head_dim}, {n_all / 1e9:.2f}B parameters, "
          f"LoRA r{args.rank} {sum(p.numel() for p in params) / 1e6:.1f}M trainable, base {'fp8' if args.fp8 else 'bf16'}, "
          f"checkpointing {args.checkpointing}, {args.blocks_to_swap} blocks swapped, {args.optimizer}; built in {time.perf_counter() - t0:.1f} s on {device}")
    print(f"memory after setup: {setup_mem / 2**30:.2f} GiB ({'allocated' if cuda else 'RSS'})")

    side = args.resolution // 16
    n = side * side
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(1, n, 64, generator=g).to(device)
    refs = torch.randn(1, n, 64, generator=g).to(device)
    from firered_core.model.conditioning import TextCond

    text = TextCond(torch.randn(1, args.text_tokens, args.text_dim, generator=g).to(device, torch.bfloat16))
    shapes = [(1, side, side), (1, side, side)]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        if args.cap_gb and not args.tiny:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total), device)
            print(f"memory capped at {args.cap_gb:g} GiB of {total / 2**30:.0f} GiB: a step past it fails out of memory")
    times, losses = [], []
    for step in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        eps = torch.randn(x0.shape, generator=g).to(device)
        sigma = torch.rand(1, generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = predict_velocity(model, flow.add_noise(x0, eps, sigma), sigma, refs, [text], shapes, torch.bfloat16)
        loss = flow_matching_loss(v, x0, eps, sigma, weighting="logit_normal")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if step > 0:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device) if cuda else rss_bytes()
    print(f"optimizer state: {state_bytes_per_param(opt):.3f} bytes per trainable parameter")
    print(f"peak memory during the steps: {peak / 2**30:.2f} GiB ({'max allocated' if cuda else 'RSS at the end'})"
          + (f"; reserved {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB" if cuda else ""))
    print(f"step time: {sum(times) / len(times):.3f} s (mean of {len(times)} after a warm-up step), "
          f"{args.resolution}x{args.resolution} + 1 reference, {args.text_tokens} text tokens")
    print("losses:", " ".join(f"{v:.4f}" for v in losses))
    if cuda and not args.tiny:
        print(f"24 GB target: {'met' if peak < 24 * 10**9 else 'NOT met'} ({peak / 1e9:.2f} GB)")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(device) if cuda else "CPU", "resolution": args.resolution,
            "blocks": args.layers, "rank": args.rank, "fp8_base": args.fp8, "blocks_to_swap": args.blocks_to_swap,
            "cap_gb": args.cap_gb if cuda and not args.tiny else None, "peak_bytes": peak,
            "peak_kind": "max allocated" if cuda else "RSS", "step_s": sum(times) / len(times), "losses": losses,
            "fits_24gb": bool(cuda and peak < 24 * 10**9)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
