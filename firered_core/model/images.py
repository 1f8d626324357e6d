"""Picture inputs and outputs: accept what users hold, size it the way the model was trained.

Accepted pictures: a ``PIL.Image``, a path to an image file, a float tensor in [0, 1] shaped
``[H, W, C]`` / ``[1, H, W, C]`` (ComfyUI ``IMAGE``) or ``[C, H, W]``, or a uint8 numpy array
``[H, W, C]``. Everything is turned into an RGB PIL picture first, so every source goes through
the same resize path as the reference pipeline.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .latents import SIZE_MULTIPLE

#: pixel area of each picture as the Qwen2.5-VL encoder sees it
VL_AREA = 384 * 384
#: pixel area of each reference picture as the VAE encodes it
REF_AREA = 1024 * 1024
#: default output area
OUTPUT_AREA = 1024 * 1024
MAX_PICTURES = 3


#: how each picture is sized for the VL encoder and the VAE (see :func:`plan_sizes`)
REF_MODES = ("own_aspect", "match_output", "comfyui")


def check_ref_mode(ref_mode: str) -> str:
    """``ref_mode`` if it is one of :data:`REF_MODES`, else a ValueError naming the choices."""
    if ref_mode not in REF_MODES:
        raise ValueError(f"ref_mode must be one of {', '.join(map(repr, REF_MODES))}, got {ref_mode!r}")
    return ref_mode


def fit_to_area(area: int, aspect: float, multiple: int = 32) -> tuple[int, int]:
    """``(width, height)`` of about ``area`` pixels at ``aspect = width / height``, each side rounded
    to ``multiple`` (the diffusers ``calculate_dimensions`` rule, used for every FireRed resize)."""
    width = math.sqrt(area * aspect)
    height = width / aspect
    return int(round(width / multiple) * multiple), int(round(height / multiple) * multiple)


def scale_to_area(width: int, height: int, area: int, multiple: int = 1) -> tuple[int, int]:
    """``(width, height)`` scaled by ``sqrt(area / (width * height))``, each side rounded (Python's
    ``round``) to ``multiple``: ComfyUI's ``TextEncodeQwenImageEditPlus`` rule (VL copy: 384^2,
    ``multiple`` 1; VAE reference: 1024^2, ``multiple`` 8)."""
    s = math.sqrt(area / (width * height))
    return int(round(width * s / multiple) * multiple), int(round(height * s / multiple) * multiple)


def to_pil(picture: Any, name: str = "image") -> Image.Image:
    """Turn any accepted picture into an RGB PIL image, or raise a ValueError naming ``name``."""
    if isinstance(picture, Image.Image):
        img = picture
    elif isinstance(picture, (str, os.PathLike)):
        path = os.fspath(picture)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: no such file {path!r}")
        try:
            with Image.open(path) as f:
                img = f.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{name}: {path!r} is not an image file PIL can read ({e})") from None
    elif isinstance(picture, torch.Tensor):
        t = picture.detach().to("cpu", torch.float32)
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise ValueError(f"{name}: expected one picture, got a batch of {t.shape[0]}")
            t = t[0]
        if t.dim() != 3:
            raise ValueError(f"{name}: expected an image tensor [H, W, C] or [C, H, W], got {tuple(t.shape)}")
        if t.shape[-1] not in (1, 3, 4) and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        if t.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{name}: expected 1, 3 or 4 colour channels, got shape {tuple(picture.shape)}")
        arr = (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    elif isinstance(picture, np.ndarray):
        arr = picture
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
        img = Image.fromarray(arr)
    else:
        raise TypeError(f"{name}: expected a PIL image, a file path or an image tensor, got {type(picture).__name__}")
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{name}: empty picture ({img.width}x{img.height})")
    return img.convert("RGB")


def picture_list(pictures: Any) -> list[Any]:
    """``None`` / one picture / a list / an ``IMAGE`` batch -> the list of pictures, None entries
    dropped (not yet checked or converted)."""
    if pictures is None:
        return []
    if isinstance(pictures, torch.Tensor) and pictures.dim() == 4 and pictures.shape[0] > 1:
        pictures = list(pictures)
    if not isinstance(pictures, (list, tuple)):
        pictures = [pictures]
    return [p for p in pictures if p is not None]


def to_pil_list(pictures: Any) -> list[Image.Image]:
    """Normalise ``None`` / one picture / a list of pictures into a list of 0..3 RGB PIL images."""
    pictures = picture_list(pictures)
    if len(pictures) > MAX_PICTURES:
        raise ValueError(
            f"FireRed-Image-Edit reads 1 to {MAX_PICTURES} input pictures, got {len(pictures)}; stitch them onto "
            f"{MAX_PICTURES} canvases first (FireRedEditor.edit does it for up to 10: firered_core/agent/stitch.py)"
        )
    return [to_pil(p, f"image {i + 1}") for i, p in enumerate(pictures)]


def to_unit(picture: Any, name: str = "image") -> torch.Tensor:
    """Any accepted picture -> float32 RGB ``[1, 3, H, W]`` in [0, 1]. A float tensor (a ComfyUI
    ``IMAGE``) is kept as it is (no 8-bit rounding; alpha dropped, grey repeated), as ComfyUI's own
    nodes see it; everything else goes through :func:`to_pil` (8 bits / 255)."""
    if isinstance(picture, torch.Tensor) and picture.is_floating_point():
        img = to_pil(picture, name)  # the same checks and messages
        t = picture.detach().to("cpu", torch.float32)
        t = t[0] if t.dim() == 4 else t
        if t.shape[-1] not in (1, 3, 4) and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        t = t[..., :3] if t.shape[-1] != 1 else t.expand(*t.shape[:2], 3)
        assert (t.shape[1], t.shape[0]) == img.size
        return t.clamp(0, 1).permute(2, 0, 1).unsqueeze(0).contiguous()
    arr = np.asarray(to_pil(picture, name), dtype=np.uint8).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def to_unit_list(pictures: Any) -> list[torch.Tensor]:
    """:func:`to_pil_list`'s rules (``None`` / one / a list / a batch, at most three), giving
    :func:`to_unit` tensors."""
    pils = to_pil_list(pictures)  # validates count and types
    if isinstance(pictures, torch.Tensor) and pictures.dim() == 4 and pictures.shape[0] > 1:
        pictures = list(pictures)
    if not isinstance(pictures, (list, tuple)):
        pictures = [pictures]
    pictures = [p for p in pictures if p is not None]
    assert len(pictures) == len(pils)
    return [to_unit(p, f"image {i + 1}") for i, p in enumerate(pictures)]


def area_resize(unit: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[B, C, H, W]`` float -> ``[B, C, height, width]`` by ``torch.nn.functional.interpolate``'s
    ``"area"`` mode (what ComfyUI's ``common_upscale(..., "area", "disabled")`` does)."""
    return torch.nn.functional.interpolate(unit, size=(height, width), mode="area")


def resize(img: Image.Image, width: int, height: int) -> Image.Image:
    """Lanczos resize (the resampling the release pipeline uses for both VL and VAE copies)."""
    return img.resize((width, height), resample=Image.LANCZOS)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> ``[1, 3, H, W]`` float32 in [-1, 1] (the VAE's input range)."""
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def tensor_to_unit(images: torch.Tensor) -> torch.Tensor:
    """VAE output ``[B, 3, H, W]`` in [-1, 1] -> float ``[B, H, W, 3]`` in [0, 1] (ComfyUI ``IMAGE``)."""
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def unit_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, H, W, 3]`` in [0, 1] -> PIL images (rounded to 8 bits)."""
    arr = (images.numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def check_size(width: int | None, height: int | None) -> None:
    """Reject output sizes the model cannot produce (not a positive multiple of 16)."""
    for name, v in (("width", width), ("height", height)):
        if v is None:
            continue
        if not isinstance(v, int) or v <= 0 or v % SIZE_MULTIPLE:
            raise ValueError(
                f"{name} must be a positive multiple of {SIZE_MULTIPLE} pixels (VAE 8x times 2x2 patches), got {v!r}"
            )


def plan_sizes(
    pictures: Sequence[Image.Image],
    width: int | None,
    height: int | None,
    *,
    ref_mode: str = "own_aspect",
    vl_area: int = VL_AREA,
    ref_area: int = REF_AREA,
    output_area: int = OUTPUT_AREA,
) -> tuple[tuple[int, int], list[tuple[int, int]], list[tuple[int, int]]]:
    """Decide the output size and the VL / VAE size of every input picture (all ``(width, height)``).

    * output: as given, else ``output_area`` at the aspect of the *last* picture (the release
      pipeline's rule), floored to a multiple of 16; 1024x1024 without pictures;
    * VL copies: ``vl_area`` at each picture's own aspect, sides multiples of 32;
    * VAE references: ``ref_area`` at each picture's own aspect (``ref_mode="own_aspect"``, what the
      FireRed release and its trainer do) or exactly the output size (``"match_output"``);
    * ``ref_mode="comfyui"``: ComfyUI's ``TextEncodeQwenImageEditPlus`` sizes, :func:`scale_to_area`
      of each picture's own size: VL copies at ``vl_area`` with sides rounded to whole pixels (not
      32), references at ``ref_area`` with sides multiples of 8 (not 32). The output rule is the same.
    """
    check_size(width, height)
    if pictures:
        last = pictures[-1]
        dw, dh = fit_to_area(output_area, last.width / last.height)
    else:
        dw, dh = fit_to_area(output_area, 1.0)
    out_w = width or dw // SIZE_MULTIPLE * SIZE_MULTIPLE
    out_h = height or dh // SIZE_MULTIPLE * SIZE_MULTIPLE
    check_ref_mode(ref_mode)
    if ref_mode == "comfyui":
        vl = [scale_to_area(p.width, p.height, vl_area) for p in pictures]
        refs = [scale_to_area(p.width, p.height, ref_area, 8) for p in pictures]
        return (out_w, out_h), vl, refs
    vl = [fit_to_area(vl_area, p.width / p.height) for p in pictures]
    if ref_mode == "own_aspect":
        refs = [fit_to_area(ref_area, p.width / p.height) for p in pictures]
    else:  # match_output
        refs = [(out_w, out_h) for _ in pictures]
    return (out_w, out_h), vl, refs


def comparison_pairs(before: torch.Tensor, after: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair ``IMAGE`` batches for a before/after view: ``[(before_i, after_i)]``, each ``[1, H, W, 3]``.
    A single source pairs with every result; ``after`` is resized to its source's size when they differ."""
    for name, t in (("before", before), ("after", after)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[-1] not in (3, 4):
            raise ValueError(f"{name}: expected an IMAGE [B, H, W, 3], got {getattr(t, 'shape', type(t).__name__)}")
    nb, na = before.shape[0], after.shape[0]
    if nb not in (1, na):
        raise ValueError(f"before has {nb} pictures and after has {na}: give one source, or one per result")
    out = []
    for i in range(na):
        b = before[min(i, nb - 1) : min(i, nb - 1) + 1, ..., :3].float()
        a = after[i : i + 1, ..., :3].float()
        if a.shape[1:3] != b.shape[1:3]:
            a = torch.nn.functional.interpolate(a.permute(0, 3, 1, 2), size=tuple(b.shape[1:3]), mode="bilinear", align_corners=False, antialias=True)
            a = a.permute(0, 2, 3, 1).clamp(0, 1)
        out.append((b.cpu(), a.cpu()))
    return out
