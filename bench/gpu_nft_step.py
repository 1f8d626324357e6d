"""One DiffusionNFT update of the real-size FireRed MM-DiT with a LoRA at 1024x1024: peak memory
and time, plus the cost of one CFG-1 rollout forward.

The architecture is diffusers' ``QwenImageTransformer2DModel`` at release size (60 blocks, width
3072, joint text dim 3584; 20.4B parameters) with random weights, built on the meta device and
materialised block by block on the GPU (bf16; with ``--fp8`` the frozen block linears become the
trainer's scaled fp8). The NFT pieces are the stage's own: :class:`firered_trainer.rl.common.Policy`
(PEFT LoRA r32 / alpha 64, reference = adapters off, old policy = EMA swapped in) and
:func:`firered_trainer.rl.losses.nft_loss` through :class:`firered_core.sampling.denoiser.Denoiser`. One update =
old-policy forward + reference forward (no grad) + trained forward and backward (gradient
checkpointing) + AdamW step + EMA update, on a 1024^2 target with a 1024^2 reference (8192
image tokens) and ~250 text tokens.

    python bench/gpu_nft_step.py               # on a GPU, the real size
    python bench/gpu_nft_step.py --tiny        # anywhere (CPU): 2 small blocks at 128x128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(args, device):
    import torch
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    from firered_trainer.rl.common import Policy

    conf = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=args.layers, attention_head_dim=args.head_dim,
                num_attention_heads=args.heads, joint_attention_dim=args.text_dim, axes_dims_rope=tuple(args.rope))
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**conf)
    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(args.rope), scale_rope=True)
    policy = Policy(model, lora_rank=args.rank, lora_alpha=2 * args.rank, need_reference=False, keep_old=False)
    g = torch.Generator(device=device).manual_seed(0)  # random weights drawn where they live (20B on a CPU: minutes)

    def materialise(module):
        module.to_empty(device=device, recurse=True)
        with torch.no_grad():
            for n, p in module.named_parameters(recurse=True):
                dtype = torch.float32 if ".lora_" in n else torch.bfloat16
                if p.dim() > 1:
                    p.data = torch.randn(p.shape, generator=g, device=device, dtype=dtype) * 0.02
                else:  # norm scales 1, biases 0
                    p.data = torch.full(p.shape, 1.0 if n.endswith("weight") else 0.0, device=device, dtype=dtype)
            for b in module.buffers(recurse=True):
                b.zero_()

    for name, child in model.named_children():
        if name == "transformer_blocks":
            for block in child:
                materialise(block)
                if args.fp8:
                    from firered_trainer.lora import quantize_frozen_base

                    quantize_frozen_base(block)
        elif name != "pos_embed":
            materialise(child)
    policy.old = {n: p.detach().float().clone() for n, p in policy.trainable()}
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    return model.train(), policy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2 small blocks at 128x128 (runs on the CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=250)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="rollouts per update micro-batch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--fp8", action="store_true", help="frozen base in scaled fp8 (the 24 GB setting)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    args.layers, args.heads, args.head_dim, args.text_dim, args.rope = 60, 24, 128, 3584, (16, 56, 56)
    if args.tiny:
        args.layers, args.heads, args.head_dim, args.text_dim, args.rope = 2, 2, 32, 64, (8, 12, 12)
        args.resolution, args.text_tokens, args.rank = min(args.resolution, 128), 32, 8

    import torch

    from firered_core.model.conditioning import TextCond
    from firered_core.sampling import flow
    from firered_core.sampling.denoiser import Denoiser, EditCondition
    from firered_trainer.optim import build_optimizer
    from firered_trainer.rl import losses

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    model, policy = build(args, device)
    params = policy.parameters()
    opt = build_optimizer("adamw", params, lr=3e-4, weight_decay=1e-4)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} blocks x width {args.heads * args.head_dim}, {n_all / 1e9:.2f}B parameters "
          f"(fp8 base {args.fp8}), LoRA r{args.rank}/a{2 * args.rank} {sum(p.numel() for p in params) / 1e6:.1f}M "
          f"trainable; built in {time.perf_counter() - t0:.1f} s on {device}")
    if cuda:
        print(f"memory after setup: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB")

    side = args.resolution // 16
    n = side * side
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(1, n, 64, generator=g, device=device)
    cond = EditCondition(ref_tokens=refs, img_shapes=[(1, side, side), (1, side, side)])
    text = TextCond(torch.randn(1, args.text_tokens, args.text_dim, generator=g, device=device).to(torch.bfloat16))
    den = Denoiser(model, cond, dtype=torch.bfloat16)
    x0 = torch.randn(args.batch, n, 64, generator=g, device=device)
    r = torch.rand(args.batch, generator=g, device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # one rollout forward (CFG 1, no grad): a rollout costs sample_steps of these per picture
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16), policy.old_policy():
        den.predict(x0[:1].to(torch.bfloat16), torch.tensor([0.5], device=device), [text])
        sync()
        t = time.perf_counter()
        den.predict(x0[:1].to(torch.bfloat16), torch.tensor([0.5], device=device), [text])
        sync()
        t_fwd = time.perf_counter() - t
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.steps + 1):
        sync()
        t = time.perf_counter()
        eps = torch.randn(x0.shape, generator=g, device=device)
        sigma = torch.rand(args.batch, generator=g, device=device) * 0.98 + 0.01
        xt = flow.add_noise(x0, eps, flow.broadcast_sigma(sigma, x0)).to(torch.bfloat16)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                with policy.old_policy():
                    v_old = den.predict(xt, sigma, [text])[0]
                with policy.reference():
                    v_ref = den.predict(xt, sigma, [text])[0]
            v = den.predict(xt, sigma, [text])[0]
        loss, st = losses.nft_loss(v, v_old, x0, eps, sigma, r, beta=1.0, v_ref=v_ref, kl_weight=1e-4)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        policy.update_old(losses.old_policy_decay(step + 1))
        sync()
        if step > 0:
            times.append(time.perf_counter() - t)
        print(f"update {step}: loss {st.loss:.4f} ({time.perf_counter() - t:.2f} s)")
    mean = sum(times) / len(times)
    print(f"one rollout forward (CFG 1, batch 1): {t_fwd:.3f} s -> an 8-step rollout of a group of 8: {t_fwd * 64:.1f} s")
    print(f"one NFT update (batch {args.batch}, old + ref + trained fwd/bwd + AdamW + EMA): {mean:.3f} s")
    if cuda:
        print(f"peak memory during updates: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved ({torch.cuda.get_device_name(device)})")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(device) if cuda else "CPU", "resolution": args.resolution,
            "blocks": args.layers, "fp8_base": args.fp8, "batch": args.batch, "rollout_forward_s": t_fwd,
            "update_s": mean, "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
