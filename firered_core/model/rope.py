"""The MM-DiT's RoPE positions as ComfyUI's Qwen-Image model lays them out, for ``ref_mode="comfyui"``.

diffusers' ``QwenEmbedRope`` (the reference) and ComfyUI's ``comfy/ldm/qwen_image/model.py`` (0.3.64)
place the image tokens the same way except in two details, which change the picture whenever they
apply:

* an odd token grid is centred one place apart: diffusers gives rows ``-(h - h//2) .. h//2 - 1``,
  ComfyUI ``-(h//2) .. h - 1 - h//2`` (the same for even ``h``); likewise the columns;
* the text tokens' positions start after ``max(h//2, w//2)`` of the output's grid in ComfyUI, of
  the largest grid among the output and the references in diffusers.

:func:`comfyui_positions` swaps the transformer's ``pos_embed`` for :class:`ComfyUIRope` while a
block runs; it reuses the module's own frequency tables, so only the positions change.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["ComfyUIRope", "comfyui_positions"]


class ComfyUIRope(nn.Module):
    """``QwenEmbedRope.forward`` with ComfyUI's positions (``rope`` is the transformer's own)."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope
        self._made: dict = {}  # (shapes, device, text length) -> frequencies: the same every step

    def _table(self, device):
        pos, neg = self.rope.pos_freqs, self.rope.neg_freqs
        if device is not None:
            pos, neg = pos.to(device), neg.to(device)
        split = [d // 2 for d in self.rope.axes_dim]
        return pos, pos.split(split, dim=1), neg.split(split, dim=1)

    @staticmethod
    def _at(pos, neg, positions: torch.Tensor) -> torch.Tensor:
        # neg_freqs[i] holds position i - len(neg_freqs)
        return torch.where((positions >= 0)[:, None], pos[positions.clamp(min=0)], neg[(positions + len(neg)).clamp(max=len(neg) - 1)])

    def forward(self, video_fhw, device=None, max_txt_seq_len=None):
        if max_txt_seq_len is None:
            raise ValueError("`max_txt_seq_len` must be provided.")
        if isinstance(video_fhw, list):  # one shape list per batch row (all the same), as diffusers reads it
            video_fhw = video_fhw[0]
        shapes = video_fhw if isinstance(video_fhw, list) else [video_fhw]
        key = (tuple(tuple(int(v) for v in s) for s in shapes), str(device), int(max_txt_seq_len))
        if key not in self._made:
            self._made = {key: self._make(shapes, device, int(max_txt_seq_len))}
        return self._made[key]

    def _make(self, shapes, device, txt_len: int):
        full, pos, neg = self._table(device)
        freqs = []
        for idx, (frame, h, w) in enumerate(shapes):
            f = pos[0][idx : idx + frame].view(frame, 1, 1, -1).expand(frame, h, w, -1)
            rows = self._at(pos[1], neg[1], torch.arange(h, device=pos[1].device) - h // 2)
            cols = self._at(pos[2], neg[2], torch.arange(w, device=pos[2].device) - w // 2)
            rows = rows.view(1, h, 1, -1).expand(frame, h, w, -1)
            cols = cols.view(1, 1, w, -1).expand(frame, h, w, -1)
            freqs.append(torch.cat([f, rows, cols], dim=-1).reshape(frame * h * w, -1))
        _, h0, w0 = shapes[0]
        start = max(h0 // 2, w0 // 2)  # the output's grid only
        return torch.cat(freqs, dim=0), full[start : start + txt_len]


@contextmanager
def comfyui_positions(transformer: nn.Module, positions: ComfyUIRope | None = None):
    """Inside this context ``transformer`` (a diffusers ``QwenImageTransformer2DModel``, or a wrapper
    of one) computes its RoPE positions as ComfyUI's Qwen-Image model does; yields the
    :class:`ComfyUIRope` in use. ``positions``: one yielded before for this transformer, reused (it
    keeps its frequencies between steps)."""
    module = getattr(transformer, "_orig_mod", transformer)
    rope = getattr(module, "pos_embed", None)
    if rope is None or not hasattr(rope, "pos_freqs") or not getattr(rope, "scale_rope", False):
        raise ValueError("ComfyUI's RoPE positions need a Qwen-Image MM-DiT (a centred QwenEmbedRope pos_embed)")
    module.pos_embed = positions if positions is not None and positions.rope is rope else ComfyUIRope(rope)
    try:
        yield module.pos_embed
    finally:
        module.pos_embed = rope
