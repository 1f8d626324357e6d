"""Exact preservation: put the source's own pixels back outside the edit region after decoding.

``composite(edited, source, edit_mask)`` works on ComfyUI ``IMAGE`` tensors (``[B, H, W, 3]`` float in
[0, 1]) and a ``MASK`` (1 = edit, any size, :mod:`firered_core.editing.masks` conventions):

1. the result has the **source's** size: the edited picture is resized to it (bilinear, antialiased)
   when they differ, so the kept pixels are the original full-resolution ones;
2. the edit mask is resized to that size and feathered outward (:func:`firered_core.editing.masks.feather`,
   ``feather_px`` = Gaussian sigma in pixels): alpha is 1 on the edit region, falls to 0 over a seam
   of about ``3 feather_px`` pixels *outside* it, and is exactly 0 beyond;
3. colour matching (optional): on a ring of ``ring_px`` pixels just outside the seam, where both
   pictures show the same unedited content, the edited picture's per-channel mean and standard
   deviation are matched to the source's, and that affine correction is applied to the edited
   pixels that are blended in (std ratio clamped to [0.5, 2]);
4. ``out = alpha * edited + (1 - alpha) * source``, and wherever alpha is 0 the source pixel is
   copied as is: bit-identical to the source away from the seam.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import masks as M


def _as_image(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} must be a ComfyUI IMAGE [B, H, W, 3], got {tuple(x.shape)}")
    return x


def seam_width(feather_px: float) -> int:
    """How far (pixels) outside the edit region the feathered seam can reach."""
    if feather_px <= 0:
        return 0
    k = M.gaussian_kernel1d(feather_px)
    return (k.numel() - 1) // 2


def color_match(edited: torch.Tensor, source: torch.Tensor, region: torch.Tensor, *, max_ratio: float = 2.0) -> torch.Tensor:
    """Per picture and channel, the affine map ``a * edited + b`` that gives the edited pixels in
    ``region`` (``[B, H, W]``, > 0.5) the source's mean and std there. Images ``[B, H, W, 3]``.
    Pictures whose region is empty are returned unchanged."""
    out = edited.clone()
    for b in range(edited.shape[0]):
        sel = region[b] > 0.5
        if int(sel.sum()) < 4:
            continue
        e, s = edited[b][sel], source[b][sel]  # [n, 3]
        me, ms = e.mean(0), s.mean(0)
        se, ss = e.std(0), s.std(0)
        ratio = torch.where(se > 1e-6, ss / se.clamp_min(1e-6), torch.ones_like(se)).clamp(1 / max_ratio, max_ratio)
        out[b] = (edited[b] - me) * ratio + ms
    return out


def composite(
    edited: torch.Tensor,
    source: torch.Tensor,
    edit_mask,
    *,
    feather_px: float = 4.0,
    color_matching: bool = True,
    ring_px: int = 8,
) -> torch.Tensor:
    """Blend ``edited`` into ``source`` on the (feathered) edit region; see the module docstring.

    edited: ``[B or 1, h, w, 3]``; source: ``[B or 1, H, W, 3]``; edit_mask: ``[H', W']`` or
    ``[B or 1, H', W']``, 1 = edit. Returns ``[B, H, W, 3]`` at the source's size.
    """
    edited, source = _as_image(edited, "edited").float(), _as_image(source, "source").float()
    b = max(edited.shape[0], source.shape[0])
    edited = M.match_batch(edited, b, name="edited")
    source = M.match_batch(source, b, name="source")
    h, w = source.shape[1:3]
    if edited.shape[1:3] != (h, w):
        edited = F.interpolate(edited.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        edited = edited.permute(0, 2, 3, 1).clamp(0, 1)
    mask = M.match_batch(M.resize_mask(edit_mask, (h, w)), b)
    binary = (mask > 0.5).float()
    alpha = M.feather(mask, feather_px) if feather_px > 0 else mask.clamp(0, 1)
    if color_matching and ring_px > 0:
        inner = M.dilate(binary, seam_width(feather_px))
        ring = M.dilate(binary, seam_width(feather_px) + ring_px) - inner
        edited = color_match(edited, source, ring).clamp(0, 1)
    a = alpha.unsqueeze(-1)
    out = a * edited + (1 - a) * source
    return torch.where(a == 0, source, out)
