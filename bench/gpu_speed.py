"""Benchmark: one MM-DiT step of the real-size architecture on a GPU, with each speed / memory option.

The real FireRed / Qwen-Image-Edit-2509 MM-DiT (60 blocks, 24 heads x 128, joint text dim 3584;
20.4B parameters) is built on the meta device and materialised directly in bf16 on the GPU with
random weights (no download). One step = one forward at 1024x1024 with one 1024x1024 reference
picture and a 256-token instruction (4096 + 4096 + 256 tokens), CFG 1 (the Lightning setting; a
true-CFG step is two of these). Printed per variant: seconds per step (mean of ``--steps`` after a
warm-up), peak GPU memory, and the model FLOP utilisation, from the FLOPs computed from the shapes
(:func:`forward_flops`: about 0.167 PFLOP per forward) and the card's dense bf16 peak.

Variants, in one run on one card:

- ``diffusers plain``: ``QwenImageTransformer2DModel.forward`` called directly -- the reference;
- ``bf16 resident``: the same step through ``firered_core.sampling.denoiser.Denoiser`` (ours);
- ``step cache``: an 8-step Lightning-like run (Euler over sigmas 1 -> 0) with the first-blocks
  cache (threshold ``--cache-threshold``, 8 blocks computed, 2 warm-up steps): mean s/step and the
  block evaluations skipped. Random weights do not behave like trained ones, so the hit rate is
  only indicative; a cached step's own cost is also printed;
- ``block swap @ 24 GB``: the blocks the memory planner keeps resident for a 24 GB budget (with the
  real text encoder's size in the plan), the rest streamed from pinned memory on a side stream;
- ``fp8 scaled (upcast)`` and ``fp8 scaled + fp8 matmul``: the block linears quantized in place to
  scaled e4m3 (20.4 GB), computed by per-layer upcast, then by ``torch._scaled_mm`` (Ada / Hopper).

    python bench/gpu_speed.py                  # the real size, on cuda (needs ~45 GB GPU memory)
    python bench/gpu_speed.py --tiny           # a small model on the CPU: checks the script runs
    python bench/gpu_speed.py --attention flash --compile
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firered_core.model.conditioning import TextCond  # noqa: E402
from firered_core.runtime import attention, precision  # noqa: E402
from firered_core.runtime.blockswap import BlockSwapper, module_bytes  # noqa: E402
from firered_core.runtime.memory import GB, ModelSizes, plan_memory  # noqa: E402
from firered_core.runtime.step_cache import StepCache  # noqa: E402
from firered_core.sampling.denoiser import Denoiser, EditCondition  # noqa: E402
from firered_trainer.rl.common import atomic_write  # noqa: E402

REAL = dict(num_layers=60, num_attention_heads=24, attention_head_dim=128, joint_attention_dim=3584,
            in_channels=64, out_channels=16, patch_size=2, axes_dims_rope=(16, 56, 56))
TINY = dict(num_layers=4, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
            in_channels=64, out_channels=16, patch_size=2, axes_dims_rope=(4, 14, 14))
# dense bf16 peak (TFLOP/s) by device name, vendor spec sheets
PEAKS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
         ("RTX 6000 Ada", 364.0), ("4090", 165.0), ("3090", 71.0)]


def forward_flops(cfg: dict, n_img: int, n_txt: int, batch: int = 1) -> dict[str, float]:
    """FLOPs of one forward from the shapes: every token passes its own stream's q, k, v, out
    (4 d^2) and MLP (d -> 4d -> d, 8 d^2) in each block; joint attention is 4 N^2 d per block
    (QK^T and PV); the modulation linears (d -> 6d, two streams) run once per sample; plus the
    input / output projections."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    L, n = cfg["num_layers"], n_img + n_txt
    linear = 2 * n * L * (4 * d * d + 8 * d * d)
    attn = 4 * n * n * d * L
    mod = 2 * 2 * d * 6 * d * L
    io = 2 * n_img * cfg["in_channels"] * d + 2 * n_txt * cfg["joint_attention_dim"] * d + 2 * n_img * d * cfg["in_channels"]
    return {k: v * batch for k, v in dict(linear=linear, attention=attn, modulation=mod, io=io,
                                          total=linear + attn + mod + io).items()}


def build(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The MM-DiT on meta, then every parameter created on ``device`` in ``dtype``: weights
    N(0, 0.02), biases 0, norm scales 1 (never a CPU or fp32 copy)."""
    import accelerate
    from diffusers import QwenImageTransformer2DModel

    with accelerate.init_empty_weights(include_buffers=False):
        model = QwenImageTransformer2DModel(**cfg)
    g = torch.Generator(device).manual_seed(seed)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if p.dim() >= 2:
                t.normal_(0.0, 0.02, generator=g)
            elif name == "weight":
                t.fill_(1.0)
            else:
                t.zero_()
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.to(device)
    return model.eval().requires_grad_(False)


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, fn, steps: int) -> tuple[float, float | None]:
        """Mean seconds of ``fn()`` over ``steps`` calls after one warm-up call, and the peak
        allocated GPU memory (GB) during them."""
        fn()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        self.sync()
        dt = (time.perf_counter() - t) / steps
        peak = torch.cuda.max_memory_allocated(self.device) / GB if self.cuda else None
        return dt, peak


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """What one ``n`` x ``n`` x ``n`` matmul reaches on this device (mean of ``repeats`` after three warm-ups)."""
    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    timer = Timer(device)
    for _ in range(3):
        a @ b
    timer.sync()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    timer.sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 4-block width-64 model on the CPU, 128x128 (a dry run)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=None, help="output and reference side in pixels (default 1024)")
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--budget-gb", type=float, default=24.0, help="memory budget for the block-swap variant")
    ap.add_argument("--cache-threshold", type=float, default=0.15)
    ap.add_argument("--attention", default="sdpa", choices=attention.CHOICES)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks (warm-up printed)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card, if not in the table")
    ap.add_argument("--skip", default="", help="comma list of variants to leave out: swap, fp8, int8, cache")
    ap.add_argument("--json", help="also write the figures (per variant: s/step, peak GB, MFU) to this JSON file")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    cfg = TINY if args.tiny else REAL
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    size = args.size or (128 if args.tiny else 1024)
    torch.set_grad_enabled(False)
    timer = Timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak_tflops = args.peak_tflops or next((p for k, p in PEAKS if k in name), None)

    t0 = time.perf_counter()
    model = build(cfg, device, dtype)
    timer.sync()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {name}; model: {cfg['num_layers']} blocks, {n_params / 1e9:.2f}B parameters, "
          f"{module_bytes(model) / GB:.1f} GB in {dtype}, built in {time.perf_counter() - t0:.1f}s")
    attn_in_use = attention.set_attention(model, args.attention)

    rows_px = size // 16
    n_img = rows_px * rows_px
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, n_img, cfg["in_channels"], device=device, dtype=dtype, generator=g)
    refs = torch.randn(1, n_img, cfg["in_channels"], device=device, dtype=dtype, generator=g)
    text = TextCond(torch.randn(1, args.text_tokens, cfg["joint_attention_dim"], device=device, dtype=dtype, generator=g))
    shapes = [(1, rows_px, rows_px), (1, rows_px, rows_px)]
    cond = EditCondition(ref_tokens=refs, img_shapes=shapes)
    flops = forward_flops(cfg, 2 * n_img, args.text_tokens)
    print(f"step: {size}x{size} + one {size}x{size} reference + {args.text_tokens} text tokens = "
          f"{2 * n_img + args.text_tokens} tokens; {flops['total'] / 1e15:.4f} PFLOP per forward "
          f"(linear {flops['linear'] / 1e12:.1f} T, attention {flops['attention'] / 1e12:.1f} T); attention: {attn_in_use}")
    sigma = torch.tensor([0.5], device=device)
    results = []

    gemm = gemm_tflops(device, dtype, 1024 if args.tiny else 8192)
    print(f"a square bf16 matmul runs at {gemm:.0f} TFLOP/s here (spec peak {peak_tflops or '?'}); MFU below is of the spec")
    figures = {"device": name, "blocks": cfg["num_layers"], "params": n_params, "size": size,
               "text_tokens": args.text_tokens, "pflop_per_forward": flops["total"] / 1e15,
               "peak_tflops": peak_tflops, "measured_matmul_tflops": gemm, "attention": attn_in_use, "variants": {}}

    def record(label, dt, peak, note="", flop=flops["total"], key=None):
        mfu_v = flop / dt / (peak_tflops * 1e12) if peak_tflops and flop else None
        mfu = f"{mfu_v * 100:5.1f}%" if mfu_v is not None else "  n/a"
        results.append((label, dt, peak, mfu, note))
        figures["variants"][key or label.strip()] = {"s_per_step": dt, "peak_gb": peak, "mfu": mfu_v, "note": note,
                                                     "of_measured_matmul": flop / dt / (gemm * 1e12) if flop else None}
        print(f"  {label:30s} {dt:8.3f} s/step  peak {peak if peak is not None else float('nan'):6.1f} GB  MFU {mfu}  {note}",
              flush=True)
        save()

    def save():  # after every variant, whole or not at all: a run stopped at its time limit keeps what it measured
        if args.json:
            atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(figures, indent=1)))

    def fresh() -> nn.Module:
        """A new bf16 model once the caller has dropped every reference to the last one."""
        gc.collect()
        if timer.cuda:
            torch.cuda.empty_cache()
        m = build(cfg, device, dtype)
        attention.set_attention(m, args.attention)
        return m

    # 1. diffusers plain (the reference)
    hidden = torch.cat([x, refs], dim=1)
    timestep = torch.full((1,), 0.5, device=device, dtype=dtype)

    def diffusers_step():
        return model(hidden_states=hidden, encoder_hidden_states=text.embeds, timestep=timestep,
                     img_shapes=[shapes], return_dict=False)[0]

    record("diffusers plain", *timer.run(diffusers_step, args.steps), key="diffusers")

    # 2. ours, bf16 resident
    den = Denoiser(model, cond)
    record("bf16 resident (ours)", *timer.run(lambda: den.predict(x, sigma, [text]), args.steps), key="bf16")
    t_plain = results[-1][1]

    # 3. step cache over an 8-step Lightning-like Euler run
    if "cache" not in skip:
        sigmas = torch.linspace(1.0, 0.0, 9).tolist()
        compute = min(8, cfg["num_layers"] - 1)

        def cached_run():
            cache = StepCache(model, threshold=args.cache_threshold, compute_blocks=compute, warmup=2, max_skips=3)
            dc = Denoiser(model, cond, step_cache=cache)
            z = x.clone()
            with cache.installed():
                for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                    v = dc.predict(z, torch.tensor([s], device=device), [text])[0]
                    z = z + (s_next - s) * v
            return cache

        cache = cached_run()
        timer.sync()
        t = time.perf_counter()
        if timer.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        cache = cached_run()
        timer.sync()
        dt = (time.perf_counter() - t) / 8
        peak = torch.cuda.max_memory_allocated(device) / GB if timer.cuda else None
        st = cache.stats
        record(f"step cache thr {args.cache_threshold}", dt, peak,
               f"{st.cached_forwards}/8 steps cached, {st.blocks_skipped} block evals skipped; "
               f"{t_plain / dt:.2f}x vs resident", flop=flops["total"] * (1 - st.skipped_fraction), key="cache")

        # the cost of one cached step on its own (first `compute` blocks + the residual reuse)
        always = StepCache(model, threshold=1e9, compute_blocks=compute, warmup=1, max_skips=10**9)
        da = Denoiser(model, cond, step_cache=always)
        with always.installed():
            da.predict(x, sigma, [text])  # fills the cache
            dt, peak = timer.run(lambda: da.predict(x, sigma, [text]), args.steps)
        record("  one cached step", dt, peak, f"{compute} of {cfg['num_layers']} blocks run",
               flop=flops["total"] * compute / cfg["num_layers"], key="cache_one_step")

    # 4. block swap at a budget (the planner's choice, with the real text encoder's size planned in)
    if "swap" not in skip:
        blocks = list(model.transformer_blocks)
        real = ModelSizes.real()
        scale = module_bytes(model) / real.transformer
        sizes = ModelSizes(transformer=module_bytes(model), block=module_bytes(blocks[0]), blocks=len(blocks),
                           text_encoder=int(real.text_encoder * scale), text_encoder_streamed=int(real.text_encoder_streamed * scale),
                           vae=int(real.vae * scale), width=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                           dtype_bytes=torch.tensor([], dtype=dtype).element_size())
        if args.tiny:  # the planner's fixed activation estimates do not scale down: half the blocks resident
            plan = plan_memory(10**12, sizes, plan="block_swap", blocks_resident=len(blocks) // 2)
        else:
            plan = plan_memory(int(args.budget_gb * GB), sizes, width=size, height=size, ref_area=size * size, cfg_batch=1)
        n_res = plan.blocks_resident if plan.blocks_resident is not None else len(blocks)
        t = time.perf_counter()
        sw = BlockSwapper(model, resident=n_res, device=device).install()
        if timer.cuda:
            torch.cuda.empty_cache()
        t_install = time.perf_counter() - t
        capped = timer.cuda and not args.tiny
        if capped:  # the budget enforced: an allocation past it raises out-of-memory, as on a smaller card
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb * GB / total), device)
        try:
            dt, peak = timer.run(lambda: den.predict(x, sigma, [text]), args.steps)
            record(f"block swap @ {args.budget_gb:g} GB", dt, peak,
                   f"{plan.name}: {n_res}/{len(blocks)} resident, pinned in {t_install:.1f}s; {dt / t_plain:.2f}x resident "
                   f"time{'; memory capped at the budget' if capped else ''}", key="block_swap")
        except torch.OutOfMemoryError as e:
            print(f"  block swap @ {args.budget_gb:g} GB: out of memory under the cap ({str(e).splitlines()[0]})")
            figures["variants"]["block_swap"] = {"error": f"out of memory under a {args.budget_gb:g} GB cap"}
        finally:
            if capped:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        sw.uninstall(device)

    # 5. fp8: scaled e4m3 block linears (in place, one layer at a time), upcast, then fp8 matmul
    if "fp8" not in skip:
        precision.quantize_weights(model, "fp8_scaled")
        if timer.cuda:
            torch.cuda.empty_cache()
        record("fp8 scaled (upcast)", *timer.run(lambda: den.predict(x, sigma, [text]), args.steps),
               f"model {module_bytes(model) / GB:.1f} GB", key="fp8_upcast")
        n = precision.enable_fp8_matmul(model, force=args.tiny)
        if n:
            dt, peak = timer.run(lambda: den.predict(x, sigma, [text]), args.steps)
            modes = {}  # the path each layer settled on ("rowwise", "tensor"; "off": the kernel refused it)
            for m in model.modules():
                if isinstance(m, precision.FP8MatmulLinear):
                    modes[m._mode] = modes.get(m._mode, 0) + 1
            record("fp8 scaled + fp8 matmul", dt, peak, f"{n} layers on torch._scaled_mm, by path: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(modes.items())), key="fp8_matmul")
        else:
            print("  fp8 matmul: not supported on this device (needs compute capability >= 8.9)")

    # 6. int8: the block linears of a fresh bf16 model quantized per channel (weights only)
    if "int8" not in skip:
        model = den = sw = blocks = cache = always = da = None  # each holds the last model (20 GB)
        model = fresh()
        precision.quantize_weights(model, "int8")
        if timer.cuda:
            torch.cuda.empty_cache()
        den = Denoiser(model, cond)
        record("int8 weights", *timer.run(lambda: den.predict(x, sigma, [text]), args.steps),
               f"model {module_bytes(model) / GB:.1f} GB", key="int8")

    # 7. optional: compiled blocks of a fresh bf16 model (last: the slowest variant, its warm-up compiles)
    if args.compile:
        model = den = sw = blocks = cache = always = da = None
        model = fresh()
        den = Denoiser(model, cond)
        precision.compile_blocks(model)
        t = time.perf_counter()
        den.predict(x, sigma, [text])
        timer.sync()
        warm = time.perf_counter() - t
        record("bf16 + compiled blocks", *timer.run(lambda: den.predict(x, sigma, [text]), args.steps),
               f"warm-up {warm:.1f}s", key="compile")

    print()
    print(f"| variant ({name}) | s/step | peak GB | MFU (of {peak_tflops or '?'} TFLOP/s) | note |")
    print("|---|---|---|---|---|")
    for label, dt, peak, mfu, note in results:
        print(f"| {label.strip()} | {dt:.3f} | {'-' if peak is None else f'{peak:.1f}'} | {mfu.strip()} | {note} |")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
