"""Benchmark: optimizer-state bytes per parameter, and a training step's peak memory with and
without gradient checkpointing.

1. Every optimizer of :mod:`firered_trainer.optim` on the same parameters (LoRA-shaped matrices, larger
   than bitsandbytes' 4096-element 8-bit threshold): bytes of state per parameter after one step,
   against torch AdamW's float32 state (8 bytes).
2. One LoRA training step (the stage's own forward: target + one reference + text, velocity loss,
   backward, AdamW) of a mid-size ``QwenImageTransformer2DModel`` (default 8 blocks of width 1024
   at 512x512 + a 512x512 reference), each setting in a fresh process: on CUDA
   ``torch.cuda.max_memory_allocated`` above the memory after setup; on the CPU the peak resident
   memory (VmHWM, reset through /proc/self/clear_refs after a warm-up step and ``malloc_trim``) above
   the resident memory before the step.

    python bench/train_memory.py [--layers 8] [--width 1024] [--resolution 512] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def optimizer_states() -> list[tuple[str, float]]:
    import torch

    from firered_trainer.optim import OPTIMIZERS, build_optimizer, state_bytes_per_param

    out = []
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(32, 3072) * 0.01), torch.nn.Parameter(torch.zeros(3072, 32))]
        try:
            opt = build_optimizer(name, params, lr=1e-4)
        except ImportError as e:
            out.append((name, float("nan")))
            print(f"  {name}: skipped ({e})")
            continue
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        out.append((name, state_bytes_per_param(opt)))
    return out


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def step_child(args) -> dict:
    """One configuration, in this (fresh) process."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from firered_core.model.conditioning import TextCond
    from firered_core.sampling import flow
    from firered_trainer.batches import predict_velocity
    from firered_trainer.config import LORA_PRESETS
    from firered_trainer.lora import add_lora
    from firered_trainer.objective import flow_matching_loss
    from firered_trainer.optim import build_optimizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    heads = args.width // 128
    model = QwenImageTransformer2DModel(num_layers=args.layers, attention_head_dim=128, num_attention_heads=heads,
                                        joint_attention_dim=args.text_dim, axes_dims_rope=(16, 56, 56))
    add_lora(model, rank=16, alpha=16, modules=LORA_PRESETS["firered"])
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device).train()
    opt = build_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], lr=1e-4)
    side = args.resolution // 16
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, side * side, 64, generator=g).to(device)
    refs = torch.randn(1, side * side, 64, generator=g).to(device)
    text = TextCond(torch.randn(1, 64, args.text_dim, generator=g).to(device))
    shapes = [(1, side, side), (1, side, side)]

    def step():
        eps = torch.randn(x0.shape, generator=g).to(device)
        sigma = torch.tensor([0.5], device=device)
        v = predict_velocity(model, flow.add_noise(x0, eps, sigma), sigma, refs, [text], shapes, torch.float32)
        flow_matching_loss(v, x0, eps, sigma).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: the second step measures activations

    step()  # optimizer state and gradient buffers exist from here on
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"base": base, "peak": torch.cuda.max_memory_allocated(), "how": "cuda max_memory_allocated"}
    import ctypes
    import gc

    gc.collect()
    try:  # give the first step's freed blocks back to the OS, or the second step reuses them unseen
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        how = "VmHWM after clear_refs"
    except OSError:
        how = "VmHWM (not reset: includes setup)"
    step()
    return {"base": base, "peak": _status("VmHWM"), "how": how}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--text-dim", type=int, default=1024)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(step_child(args)))
        return 0

    print("optimizer state per trainable parameter (after one step; LoRA-shaped 32x3072 matrices)")
    states = optimizer_states()
    ref = dict(states)["adamw"]
    for name, b in states:
        print(f"  {name:16s} {b:6.3f} bytes/param   {b / ref:5.2f}x AdamW fp32")

    print(f"\none LoRA step (rank 16, FireRed targets, AdamW) of a {args.layers}-block width-{args.width} MM-DiT, "
          f"{args.resolution}x{args.resolution} target + 1 reference, on {args.device}")
    results = {}
    for ckpt in (False, True):
        cmd = [sys.executable, __file__, "--child", "--layers", str(args.layers), "--width", str(args.width),
               "--text-dim", str(args.text_dim), "--resolution", str(args.resolution), "--device", args.device]
        if ckpt:
            cmd.append("--checkpointing")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            print(out.stderr[-2000:])
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[ckpt] = r["peak"] - r["base"]
        print(f"  gradient checkpointing {'on ' if ckpt else 'off'}: step peak {results[ckpt] / 2**20:8.1f} MiB above "
              f"the {r['base'] / 2**20:.0f} MiB after setup ({r['how']})")
    print(f"  checkpointing saves {(1 - results[True] / results[False]) * 100:.0f}% of the step's peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
