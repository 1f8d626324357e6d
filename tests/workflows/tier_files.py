"""The files the ``COMFYUI_PATH`` tier's prompts read besides the tiny model: test pictures and masks,
the ComfyUI-loadable native Qwen-Image MM-DiT (cached between runs), and the rewrite that makes a
native Qwen-Image-Edit prompt run on them (:func:`substitute_native`).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_test_picture(path: Path, size: tuple[int, int] = (96, 64), seed: int = 0) -> None:
    """A structured RGB test picture (gradients and a disc) as PNG."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, 0.25 * min(w, h)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r).astype(np.float32)
    arr = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), 0.2 + 0.6 * disc], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path)


# -- ComfyUI-loadable native Qwen-Image MM-DiT (full width: ComfyUI fixes the width) ------------
# (the VAE needs no stand-in: make_tiny_comfyui writes the configuration ComfyUI's VAELoader builds)

NATIVE_DIT = "firered_native_test_full_width_1layer.safetensors"
NATIVE_SIZE = (64, 48)  # pictures on the native path (w, h): an 8x6 latent


def cached(name: str, writer) -> Path:
    """``$FIRERED_TEST_CACHE/name`` (default ``~/.cache/firered-comfyui-tier``), written by
    ``writer(path)`` the first time (to a temp name, then renamed)."""
    root = Path(os.environ.get("FIRERED_TEST_CACHE") or Path.home() / ".cache" / "firered-comfyui-tier")
    path = root / name
    if not path.exists():
        tmp = root / f".{name}.{os.getpid()}.tmp"
        writer(tmp)
        os.replace(tmp, path)
    return path


def write_native_dit(path: Path, *, num_layers: int = 1, seed: int = 0) -> Path:
    """A random Qwen-Image MM-DiT at the real width (3072 hidden, 24 heads x 128, text dim 3584) with
    ``num_layers`` blocks, in diffusers key names, bf16 -- what ComfyUI's detection can load (it reads
    only the in-channels and the number of blocks). About 0.37 B parameters per block."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(num_layers=num_layers)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith(".bias"):
            t = torch.zeros(p.shape)
        elif "norm" in name and p.dim() == 1:
            t = torch.ones(p.shape)
        else:
            fan_in = p.shape[1] if p.dim() > 1 else p.shape[0]
            t = torch.randn(p.shape, generator=g) / fan_in**0.5
        sd[name] = t.to(torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_rgba_half_mask(path: Path, size: tuple[int, int]) -> None:
    """A PNG whose alpha is 0 on the left half: ComfyUI's LoadImage gives MASK = 1 - alpha, i.e.
    1 (may change) on the left half, 0 (keep) on the right."""
    import numpy as np
    from PIL import Image

    w, h = size
    a = np.full((h, w, 4), 255, np.uint8)
    a[:, : w // 2, 3] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "RGBA").save(path)


def uses_native_qwen(prompt: dict) -> bool:
    """Whether an API prompt uses ComfyUI's own Qwen-Image model loaders (needs :func:`substitute_native`:
    ComfyUI 0.3.x builds the full-width MM-DiT and the 7B text encoder whatever the file holds, so the
    tiny DiT and text encoder of :func:`firered_core.tiny.make_tiny_comfyui` do not load there; its VAE
    does, and ``VAELoader`` keeps the workflow's file)."""
    return any(
        n["class_type"] in ("UNETLoader", "CLIPLoader", "TextEncodeQwenImageEditPlus")
        for n in prompt.values()
    )


def substitute_native(prompt: dict, server) -> dict:
    """Make a native Qwen-Image-Edit prompt runnable on the test files: UNETLoader gets the full-width
    test DiT (``VAELoader`` keeps the workflow's ``qwen_image_vae.safetensors``, the tiny VAE), each TextEncodeQwenImageEditPlus becomes test conditioning + ReferenceLatent of its
    first picture (VAE-encoded as the node would), CLIPLoader is dropped, pictures are made 64x48."""
    for name in [k for k, n in prompt.items() if n["class_type"] == "LoadImage"]:
        img = prompt[name]["inputs"]["image"]
        if not (server.input_dir / img).exists():
            write_test_picture(server.input_dir / img, size=NATIVE_SIZE, seed=7)
    out = {}
    for nid, n in prompt.items():
        t, inp = n["class_type"], dict(n["inputs"])
        if t == "CLIPLoader":
            continue
        if t == "UNETLoader":
            inp["unet_name"] = NATIVE_DIT
        elif t == "ImageScaleToTotalPixels":  # a small picture (its minimum, 0.01 MP, is slow here)
            t, inp = (
                "ImageScale",
                {
                    "image": inp["image"],
                    "upscale_method": "area",
                    "width": NATIVE_SIZE[0],
                    "height": NATIVE_SIZE[1],
                    "crop": "disabled",
                },
            )
        elif t == "TextEncodeQwenImageEditPlus":
            cond = f"{nid}_cond"
            out[cond] = {
                "class_type": "FireRedTestConditioning",
                "inputs": {"seed": len(out), "tokens": 6, "dim": 3584, "scale": 1.0},
            }
            if "image1" in inp and "vae" in inp:
                enc = f"{nid}_enc"
                out[enc] = {"class_type": "VAEEncode", "inputs": {"pixels": inp["image1"], "vae": inp["vae"]}}
                out[nid] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": [cond, 0], "latent": [enc, 0]}}
            else:
                out[nid] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [cond, 0]}}
            continue
        out[nid] = {"class_type": t, "inputs": inp}
    return out
