"""Turn up to ten pictures and an instruction into what FireRed-Image-Edit reads (one to three
pictures and an instruction that names them): crop boxes from masks, stitch the pictures onto the
canvases :func:`firered_core.agent.layout.plan_layout` plans, and rewrite "Picture N" to the canvases.

>>> st = stitch([scene, hat, banner, dog], "put the hat of Picture 2 on the dog of Picture 4 in Picture 1")
>>> st.prompt  # scene 800x600, hat 300x300, banner 600x200, dog 200x500:
'put the hat of Picture 2 (left) on the dog of Picture 2 (right) in Picture 1'
>>> [p.size for p in st.pictures]  # the scene; hat and dog side by side; the banner
[(1152, 864), (1184, 864), (1760, 576)]

With three pictures or fewer nothing is stitched; crop boxes (or masks) still crop them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..model import images
from . import layout as layout_mod
from .references import renumber

#: the colour of a canvas's padding
FILL = (255, 255, 255)


@dataclass
class Stitched:
    """pictures: the 1-3 RGB pictures the model reads; prompt: the instruction naming them;
    layout: the plan (None when nothing was stitched); output_aspect: the width / height the output
    should take when no size is given (the base picture's), or None for the release rule (the last
    picture's aspect)."""

    pictures: list[Image.Image]
    prompt: str
    layout: layout_mod.Layout | None = None
    output_aspect: float | None = None

    def describe(self) -> dict:
        """What was done, for logs and ``EditResult.info``: canvases, where each picture went, the prompt."""
        if self.layout is None:
            return {"stitched": False, "prompt": self.prompt}
        return {
            "stitched": True,
            "canvases": [(c.width, c.height) for c in self.layout.canvases],
            "picture_canvas": self.layout.canvas_of(),
            "min_fraction": round(self.layout.min_fraction, 3),
            "prompt": self.prompt,
        }


def _mask_array(mask: Any, name: str) -> np.ndarray:
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, torch.Tensor):
        m = mask.detach().to("cpu", torch.float32)
        while m.dim() > 2 and m.shape[0] == 1:
            m = m[0]
        if m.dim() == 3 and m.shape[-1] in (1, 3, 4):  # an IMAGE used as a mask: its first channel
            m = m[..., 0]
        if m.dim() != 2:
            raise ValueError(f"{name}: expected a mask [H, W] (or a MASK of one picture), got shape {tuple(mask.shape)}")
        return m.numpy()
    if isinstance(mask, np.ndarray):
        m = mask.astype(np.float32) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float32)
        m = m[..., 0] if m.ndim == 3 else m
        if m.ndim != 2:
            raise ValueError(f"{name}: expected a mask [H, W], got shape {mask.shape}")
        return m
    raise TypeError(f"{name}: expected a mask (tensor, numpy array or PIL picture), got {type(mask).__name__}")


def box_from_mask(mask: Any, size: tuple[int, int], *, threshold: float = 0.5, margin: float = 0.1,
                  name: str = "mask") -> layout_mod.Box | None:
    """The crop box ``(x0, y0, x1, y1)`` around a mask's region (values >= ``threshold``), grown by
    ``margin`` of the box's sides on each side and clamped to the picture; None when the mask is empty
    (the whole picture: ComfyUI's LoadImage gives an empty mask to a picture without alpha, of any
    size). A non-empty mask must have the picture's ``size`` ``(width, height)``."""
    m = _mask_array(mask, name)
    hit = m >= threshold
    if not hit.any():
        return None
    w, h = size
    if (m.shape[1], m.shape[0]) != (w, h):
        raise ValueError(f"{name}: the mask is {m.shape[1]}x{m.shape[0]} but its picture is {w}x{h}")
    ys, xs = np.nonzero(hit)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    dx, dy = round((x1 - x0) * margin), round((y1 - y0) * margin)
    return max(0, x0 - dx), max(0, y0 - dy), min(w, x1 + dx), min(h, y1 + dy)


def render(pictures: Sequence[Image.Image], lay: layout_mod.Layout, fill=FILL) -> list[Image.Image]:
    """The canvases of ``lay`` with each picture's box resized (Lanczos) into its tile."""
    out = []
    for c in lay.canvases:
        canvas = Image.new("RGB", (c.width, c.height), fill)
        for t in c.tiles:
            tw, th = t.size
            canvas.paste(pictures[t.picture].crop(t.box).resize((tw, th), Image.LANCZOS), t.rect[:2])
        out.append(canvas)
    return out


def preview(pictures: Sequence[Image.Image], height: int = 512, gap: int = 16, fill=(32, 32, 32)) -> Image.Image:
    """The pictures side by side at a common ``height``, ``gap`` pixels apart (a stitching preview)."""
    scaled = [p.resize((max(1, round(p.width * height / p.height)), height), Image.LANCZOS) for p in pictures]
    sheet = Image.new("RGB", (sum(p.width for p in scaled) + gap * (len(scaled) - 1), height), fill)
    x = 0
    for p in scaled:
        sheet.paste(p, (x, 0))
        x += p.width + gap
    return sheet


def _per_picture(values, n: int, what: str) -> list:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) > n:
        raise ValueError(f"{what}: got {len(values)} for {n} pictures (give at most one per picture, None to skip one)")
    return values + [None] * (n - len(values))


def stitch(
    pictures: Sequence[Any],
    prompt: str,
    *,
    boxes: Sequence[layout_mod.Box | None] | None = None,
    masks: Sequence[Any] | None = None,
    base: int = 1,
    max_canvases: int = layout_mod.MAX_CANVASES,
    canvas_area: int = layout_mod.CANVAS_AREA,
    min_fraction: float = layout_mod.MIN_FRACTION,
    margin: float = 0.1,
    fill=FILL,
) -> Stitched:
    """Up to ten pictures (PIL, paths, ``IMAGE`` tensors; see :func:`images.to_pil`) and an instruction
    -> :class:`Stitched`.

    boxes / masks: per picture (in order; shorter lists leave the rest whole, None skips one) a crop
    box or a mask whose region (grown by ``margin``) is kept; not both for one picture.
    base: the 1-based picture that keeps a canvas to itself, placed first (the scene being edited,
    whose aspect the output takes); 0 for none. More than ``max_canvases`` pictures are stitched;
    fewer are only cropped. Errors name the picture (an 11th picture, a bad box or mask, a picture
    that would be shown below ``min_fraction``).
    """
    pictures = list(pictures)
    layout_mod.check_count(len(pictures))
    n = len(pictures)
    if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= n:
        raise ValueError(f"base picture must be 0 (none) or 1 to {n}, got {base!r}")
    pils = [images.to_pil(p, f"picture {i + 1}") for i, p in enumerate(pictures)]
    boxes, masks = _per_picture(boxes, n, "crop boxes"), _per_picture(masks, n, "crop masks")
    regions = []
    for i, (p, b, m) in enumerate(zip(pils, boxes, masks)):
        if b is not None and m is not None:
            raise ValueError(f"picture {i + 1}: give a crop box or a crop mask, not both")
        if m is not None:
            b = box_from_mask(m, p.size, margin=margin, name=f"crop mask of picture {i + 1}")
        regions.append(None if b is None else layout_mod.check_box(b, p.size, f"picture {i + 1}"))
    if n <= max_canvases:
        return Stitched([p if b is None else p.crop(b) for p, b in zip(pils, regions)], prompt)
    lay = layout_mod.plan_layout(
        [p.size for p in pils], regions, alone=base - 1 if base else None, max_canvases=max_canvases,
        canvas_area=canvas_area, min_fraction=min_fraction,
    )
    aspect = None
    if base:
        x0, y0, x1, y1 = regions[base - 1] or (0, 0, *pils[base - 1].size)
        aspect = (x1 - x0) / (y1 - y0)
    return Stitched(render(pils, lay, fill), renumber(prompt, lay.canvas_of(), lay.notes()), lay, aspect)


def output_size(aspect: float, area: int = images.OUTPUT_AREA) -> tuple[int, int]:
    """The output ``(width, height)`` for a stitched edit: ``area`` at ``aspect``, sides floored to
    multiples of 16 (the rule :func:`images.plan_sizes` applies to the last picture)."""
    w, h = images.fit_to_area(area, aspect)
    m = images.SIZE_MULTIPLE
    return max(m, w // m * m), max(m, h // m * m)
