"""Command line: ``python -m firered_core edit ...`` and ``python -m firered_core make-tiny DIR``.

Examples::

    python -m firered_core edit --model models/FireRed-Image-Edit-1.1 --image cat.png \\
        --prompt "give the cat a red hat" --out hat.png --seed 43
    python -m firered_core edit --image a.png --image b.png --prompt "put the cup from Picture 2 on the table in Picture 1" --out out.png
    python -m firered_core edit --model models/FireRed-Image-Edit-1.1 --image cat.png --prompt "hat" \\
        --recaption --out hat.png      # the instruction rewritten first (add --recaption-url URL for a server)
    python -m firered_core make-tiny /tmp/tiny-firered

Without ``--model`` the edit runs on a tiny random model made on the spot (a smoke test of the
whole path: the picture it writes is noise-like, not an edit).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from .model import images
    from .sampling import samplers, schedules

    p = argparse.ArgumentParser(prog="python -m firered_core", description="FireRed-Image-Edit from the command line")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("edit", help="edit 1-3 pictures following an instruction")
    e.add_argument("--model", help="FireRed / Qwen-Image-Edit-2509 model folder (diffusers layout); omit for a tiny random model")
    e.add_argument("--image", action="append", default=[],
                   help="input picture (repeat up to 10 times; more than 3 are stitched onto 3 canvases and 'Picture N' in "
                        "--prompt is rewritten to them; none = text-to-image)")
    e.add_argument("--prompt", required=True, help="the edit instruction")
    e.add_argument("--crop", action="append", default=[], metavar="N=x0,y0,x1,y1|N=MASK",
                   help="show only part of picture N: a box in its pixels, or the bounding box (plus a 10%% margin) of "
                        "the white part of a mask picture of the same size (repeatable)")
    e.add_argument("--ground", action="store_true",
                   help="with more than 3 pictures: crop each picture without --crop (except the base) to what the "
                        "instruction needs, found by the edit's own Qwen2.5-VL (needs its language head: a release "
                        "folder's text_encoder/, not a ComfyUI single file)")
    e.add_argument("--base-picture", type=int, default=1, metavar="N",
                   help="with more than 3 pictures: the picture that keeps a canvas of its own (the scene; the output "
                        "takes its aspect), 0 = none (default 1)")
    e.add_argument("--negative-prompt", default=" ", help="negative prompt for true CFG (default ' ')")
    e.add_argument("--out", required=True, help="output picture path (.png, .jpg, .webp)")
    e.add_argument("--steps", type=int, default=None, help="sampling steps (default 40; 8 with --schedule lightning)")
    e.add_argument("--cfg", type=float, default=None, help="true CFG scale (default 4.0; 1.0 = off, one pass per step)")
    e.add_argument("--seed", type=int, default=43, help="seed of the initial noise (drawn where --noise-device says)")
    e.add_argument("--noise-device", default="cpu", metavar="{cpu,cuda,cuda:N,comfyui}",
                   help="where the seed's noise is drawn, i.e. which tool's picture a seed gives: cpu = diffusers' "
                        "examples (default), cuda = FireRed's inference.py, comfyui = ComfyUI's KSampler")
    e.add_argument("--width", type=int, help="output width, a multiple of 16 (default: ~1024^2 at the last picture's aspect)")
    e.add_argument("--height", type=int, help="output height, a multiple of 16")
    e.add_argument("--sampler", default="euler", choices=sorted(samplers.SAMPLERS))
    e.add_argument("--schedule", default="flowmatch", choices=sorted(schedules.SCHEDULES))
    e.add_argument("--shift", type=float, help="fixed shift for --schedule linear_shift (ComfyUI template: 3.1)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    e.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    e.add_argument(
        "--ref-mode", default="own_aspect", choices=list(images.REF_MODES),
        help="how each picture is sized for Qwen2.5-VL and the VAE: own_aspect (the release, diffusers), "
        "match_output (reference = output size), comfyui (ComfyUI's TextEncodeQwenImageEditPlus: area resampling, "
        "VL sides to the pixel, references to multiples of 8)",
    )
    e.add_argument("--transformer", help="MM-DiT file (ComfyUI diffusion_models/*.safetensors, fp8, GGUF) instead of the folder's")
    e.add_argument("--text-encoder", help="Qwen2.5-VL file (e.g. qwen_2.5_vl_7b_fp8_scaled.safetensors) instead of the folder's")
    e.add_argument("--vae", help="VAE file (e.g. qwen_image_vae.safetensors) instead of the folder's")
    e.add_argument("--tokenizer", help="Qwen2.5-VL tokenizer folder (default: the model folder's or ComfyUI's)")
    e.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="LoRA to apply (repeatable)")
    e.add_argument("--weight-dtype", default="auto",
                   choices=["auto", "fp8_e4m3fn", "fp8_e5m2", "dequantize", "fp8_scaled", "int8"],
                   help="MM-DiT weight storage: auto keeps fp8 files in fp8; fp8_* stores bf16 weights in fp8 (plain "
                        "down-cast); fp8_scaled: fp8 with per-channel scales (pick this with Lightning LoRAs); int8: "
                        "int8 weight-only with per-channel scales")
    s = e.add_argument_group("speed and memory (see firered_core/runtime/memory.py and speed.py)")
    s.add_argument("--memory", choices=["auto", "resident", "offload_encoders", "block_swap", "sequential"],
                   help="memory plan (default: everything where it was loaded; auto = chosen from the free GPU memory)")
    s.add_argument("--blocks-resident", type=int, help="MM-DiT blocks kept on the GPU with --memory block_swap")
    s.add_argument("--memory-budget", type=float, metavar="GB", help="plan for this many GB instead of the free memory")
    s.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                   help="decode / encode in tiles (default: automatic for large pictures and tight memory)")
    s.add_argument("--cache-threshold", type=float, default=0.0,
                   help="step cache threshold (relative L1 of the first blocks' residual); 0 = off; 0.05-0.15")
    s.add_argument("--cache-warmup", type=int, default=3, help="full steps before the step cache may skip")
    s.add_argument("--cache-blocks", type=int, default=8, help="MM-DiT blocks always computed by the step cache")
    s.add_argument("--attention", default="sdpa", choices=["sdpa", "flash", "sage", "auto"],
                   help="attention backend (falls back to sdpa with a log line when not installed)")
    s.add_argument("--compile", action="store_true", help="torch.compile the repeated MM-DiT block (slow first step)")
    s.add_argument("--fp8-matmul", action="store_true", help="fp8 layers as fp8 matmuls on Ada / Hopper GPUs")
    r = e.add_argument_group("instruction rewriting (see firered_core/agent/recaption.py)")
    r.add_argument("--recaption", action="store_true",
                   help="rewrite --prompt into a precise, expanded instruction first (FireRed's agent recaption): on the "
                        "edit's own Qwen2.5-VL (needs its language head: a release folder's text_encoder/, not a ComfyUI "
                        "single file) or, with --recaption-url, an OpenAI-compatible server")
    r.add_argument("--recaption-url", metavar="URL", help="OpenAI-compatible server for --recaption, e.g. http://127.0.0.1:8000/v1")
    r.add_argument("--recaption-model", default="default", help="the model name the --recaption-url server serves")
    r.add_argument("--recaption-key-env", metavar="VAR",
                   help="environment variable holding the server's API key (the key itself is never passed)")
    r.add_argument("--recaption-seed", type=int, help="sampling seed of the rewriting (default: --seed)")
    r.add_argument("--recaption-tokens", type=int, default=1024, help="length limit of the rewritten instruction, in tokens")

    t = sub.add_parser("make-tiny", help="write a tiny random FireRed model folder (for tests and demos)")
    t.add_argument("dir", help="folder to write")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layers", type=int, default=2, help="MM-DiT blocks")
    t.add_argument("--layout", default="diffusers", choices=["diffusers", "comfyui"],
                   help="diffusers: a release folder; comfyui: a ComfyUI models/ folder of single files")
    return p


def check_edit_args(args) -> list:
    """Everything about the request that can be wrong without a model, checked before anything is
    loaded: the steps, the output size and file, the instruction, and that every ``--image`` is a
    readable picture (at most 3). Returns the pictures (RGB PIL); raises ValueError /
    FileNotFoundError naming the option."""
    from .model import conditioning, images

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.cfg is not None and args.cfg < 0:
        raise ValueError(f"--cfg must be >= 0 (1 = no CFG), got {args.cfg}")
    images.check_size(args.width, args.height)
    from .sampling.noise import check_noise_device

    try:
        args.noise_device = check_noise_device(args.noise_device)
    except ValueError as e:
        raise ValueError(f"--noise-device: {e}") from None
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"--out {args.out!r} must end in .png, .jpg or .webp")
    conditioning.check_instruction(args.prompt, "--prompt")
    if not args.recaption:
        given = [f for f, v in (("--recaption-url", args.recaption_url), ("--recaption-key-env", args.recaption_key_env),
                                ("--recaption-seed", args.recaption_seed)) if v is not None]  # fmt: skip
        if given:
            raise ValueError(f"{given[0]} needs --recaption (it sets how the instruction is rewritten)")
    if args.recaption_tokens < 1:
        raise ValueError(f"--recaption-tokens must be at least 1, got {args.recaption_tokens}")
    from .agent.layout import MAX_INPUT_PICTURES

    if len(args.image) > MAX_INPUT_PICTURES:
        raise ValueError(
            f"--image given {len(args.image)} times: picture {MAX_INPUT_PICTURES + 1} ({args.image[MAX_INPUT_PICTURES]!r}) "
            f"is one too many; FireRed-Image-Edit takes at most {MAX_INPUT_PICTURES} (more than 3 are stitched onto 3 canvases)"
        )
    if not 0 <= args.base_picture <= max(len(args.image), 1):
        raise ValueError(f"--base-picture must be 0 (none) or 1 to {len(args.image)}, got {args.base_picture}")
    pictures = [images.to_pil(p, f"--image {p!r}") for p in args.image]
    args.crop_boxes = crop_boxes(args.crop, pictures)
    return pictures


def crop_boxes(specs: list[str], pictures: list) -> list | None:
    """``--crop N=x0,y0,x1,y1`` / ``N=MASK_FILE`` -> one crop box (or None) per picture; None without
    ``--crop``. Raises ValueError naming the option."""
    from .agent.layout import check_box
    from .agent.stitch import box_from_mask
    from .model import images

    if not specs:
        return None
    boxes: list = [None] * len(pictures)
    for spec in specs:
        num, sep, what = spec.partition("=")
        if not sep or not num.strip().isdigit() or not 1 <= int(num) <= len(pictures):
            raise ValueError(f"--crop {spec!r}: expected N=x0,y0,x1,y1 or N=MASK_FILE, N a picture number 1 to {len(pictures)}")
        i = int(num) - 1
        if boxes[i] is not None:
            raise ValueError(f"--crop given twice for picture {i + 1}")
        parts = what.split(",")
        if len(parts) == 4 and all(p.strip().isdigit() for p in parts):
            boxes[i] = check_box([int(p) for p in parts], pictures[i].size, f"picture {i + 1} (--crop {spec!r})")
        else:
            mask = images.to_pil(what, f"--crop {spec!r}")
            boxes[i] = box_from_mask(mask, pictures[i].size, name=f"--crop {spec!r}")
            if boxes[i] is None:
                raise ValueError(f"--crop {spec!r}: the mask has no white part (white marks what to keep)")
    return boxes


def _edit(args) -> int:
    import torch
    from tqdm import tqdm

    from .pipeline import FireRedEditor

    try:
        pictures = check_edit_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    steps = args.steps if args.steps is not None else (8 if args.schedule == "lightning" else 40)
    cfg = args.cfg if args.cfg is not None else (1.0 if args.schedule == "lightning" else 4.0)
    tmp = None
    model = args.model
    files = {k: getattr(args, k) for k in ("transformer", "text_encoder", "vae", "tokenizer") if getattr(args, k)}
    if model is None and not files:
        from .tiny import make_tiny

        tmp = tempfile.TemporaryDirectory(prefix="firered-tiny-")
        model = make_tiny(Path(tmp.name) / "tiny")
        print(f"no --model given: using a tiny random model made at {model} (output is not a real edit)", file=sys.stderr)
    out = Path(args.out)
    try:
        prompt = args.prompt
        if args.recaption and args.recaption_url:  # before the model load: a server problem shows at once
            prompt = _recaption(args, pictures, None)
        t0 = time.perf_counter()
        speed, memory = _speed_memory(args)
        if files or args.lora or args.weight_dtype != "auto":
            from .formats.lora import parse_lora_spec

            loras = [parse_lora_spec(spec) for spec in args.lora]
            editor = FireRedEditor.from_files(model, device=device, dtype=dtype, loras=loras,
                                              weight_dtype=args.weight_dtype, speed=speed, memory=memory, **files)
        else:
            editor = FireRedEditor.from_pretrained(model, device=device, dtype=dtype, speed=speed, memory=memory)
        if memory is not None:
            print(f"memory plan: {editor.memory.plan.describe()}", file=sys.stderr)
        t_load = time.perf_counter() - t0
        if args.recaption and not args.recaption_url:
            prompt = _recaption(args, pictures, editor)
        if args.ground and len(pictures) > 3:
            args.crop_boxes = _ground(args, pictures, prompt, editor)
        bar = None

        def progress(info) -> None:
            nonlocal bar
            if bar is None:  # created at the first step, so encoding time is not counted as a step
                bar = tqdm(total=info.total, desc="sampling", unit="step")
            bar.update(1)

        print("encoding the instruction and pictures...", file=sys.stderr)
        t1 = time.perf_counter()
        result = editor.edit(
            pictures or None,
            prompt,
            negative_prompt=args.negative_prompt,
            steps=steps,
            cfg=cfg,
            seed=args.seed,
            width=args.width,
            height=args.height,
            sampler=args.sampler,
            schedule=args.schedule,
            shift=args.shift,
            ref_mode=args.ref_mode,
            noise_device=args.noise_device,
            crop_boxes=args.crop_boxes,
            base_picture=args.base_picture,
            callback=progress,
        )
        if bar is not None:
            bar.close()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".part" + out.suffix)
        result.images[0].save(tmp_out)
        tmp_out.replace(out)
        if "stitch" in result.info:
            st = result.info["stitch"]
            what = f"stitched onto canvases {st['canvases']}" if st["stitched"] else "cropped"
            print(f"pictures {what}; the instruction read: {st['prompt']!r}", file=sys.stderr)
        w, h = result.info["size"]
        if "cache" in result.info:
            c = result.info["cache"]
            print(f"step cache: {c['cached_forwards']} of {c['forwards']} forwards cached, "
                  f"{c['blocks_skipped']} block evaluations skipped", file=sys.stderr)
        print(f"wrote {out} ({w}x{h}) in {time.perf_counter() - t1:.1f}s (model load {t_load:.1f}s)")
        return 0
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()


def _recaption(args, pictures, editor) -> str:
    """``--prompt`` rewritten by ``--recaption``: on ``--recaption-url``, else on the editor's own
    Qwen2.5-VL; prints the new instruction. Raises ValueError naming what failed."""
    from .agent import recaption as rc
    from .agent import vlm

    seed = args.seed if args.recaption_seed is None else args.recaption_seed
    print("rewriting the instruction (--recaption)...", file=sys.stderr)
    try:
        if args.recaption_url:
            out = rc.recaption(args.prompt, pictures, backend="http", url=args.recaption_url,
                               server_model=args.recaption_model, api_key_env=args.recaption_key_env, seed=seed,
                               max_new_tokens=args.recaption_tokens)  # fmt: skip
        else:
            source = args.text_encoder or str(Path(args.model or "tiny model") / "text_encoder")
            local = vlm.LocalVLM.from_model(editor.c.text_encoder, editor.c.processor, source, "--recaption")
            with editor._stage("text_encoder"):
                out = rc.recaption(args.prompt, pictures, backend="local", model=local, seed=seed,
                                   max_new_tokens=args.recaption_tokens)  # fmt: skip
    except vlm.NoLanguageHeadError as e:
        raise ValueError(f"{e} On the command line: --model RELEASE_FOLDER without --text-encoder, or --recaption-url URL.") from None
    except (vlm.VLMServerError, vlm.MissingKeyError) as e:
        raise ValueError(f"--recaption: {e}") from None
    print(f"rewritten instruction: {out}", file=sys.stderr)
    return out


def _ground(args, pictures, prompt, editor) -> list:
    """``--ground``: crop boxes from the editor's own Qwen2.5-VL for the pictures without ``--crop``
    (never the base picture). Raises ValueError naming what failed."""
    from .agent import grounding, vlm

    given = args.crop_boxes or [None] * len(pictures)
    skip = [i + 1 == args.base_picture or given[i] is not None for i in range(len(pictures))]
    print("finding what the instruction needs in each picture (--ground)...", file=sys.stderr)
    source = args.text_encoder or str(Path(args.model or "tiny model") / "text_encoder")
    try:
        with editor._stage("text_encoder"):
            found = grounding.ground_boxes(pictures, prompt, editor.c.text_encoder, editor.c.processor, skip=skip, source=source)
    except vlm.NoLanguageHeadError as e:
        raise ValueError(f"--ground: {e} On the command line: --model RELEASE_FOLDER without --text-encoder.") from None
    boxes = [g if g is not None else f for g, f in zip(given, found)]
    print(f"crop boxes: {boxes}", file=sys.stderr)
    return boxes


def _speed_memory(args):
    """SpeedOptions / MemoryOptions from the flags (None where every flag of the group is default)."""
    from .runtime.memory import MemoryOptions
    from .runtime.speed import SpeedOptions

    speed = None
    if args.cache_threshold or args.attention != "sdpa" or args.compile or args.fp8_matmul:
        speed = SpeedOptions(attention=args.attention, cache_threshold=args.cache_threshold,
                             cache_warmup=args.cache_warmup, cache_compute_blocks=args.cache_blocks,
                             compile=args.compile, fp8_matmul=args.fp8_matmul)
    memory = None
    if args.memory or args.blocks_resident is not None or args.memory_budget or args.vae_tiling is not None:
        plan = args.memory or ("block_swap" if args.blocks_resident is not None else "auto")
        memory = MemoryOptions(plan=plan, blocks_resident=args.blocks_resident, budget_gb=args.memory_budget,
                               vae_tiling=args.vae_tiling)
    return speed, memory


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "edit":
        return _edit(args)
    if args.command == "make-tiny":
        if args.layout == "comfyui":
            from .tiny import make_tiny_comfyui

            paths = make_tiny_comfyui(args.dir, seed=args.seed, num_layers=args.layers)
            print(f"wrote a tiny FireRed model as a ComfyUI models/ folder at {args.dir}:")
            for role, p in paths.items():
                print(f"  {role:17s} {p}")
            return 0
        from .tiny import make_tiny

        path = make_tiny(args.dir, seed=args.seed, num_layers=args.layers)
        print(f"wrote a tiny FireRed model to {path}")
        return 0
    return 2
