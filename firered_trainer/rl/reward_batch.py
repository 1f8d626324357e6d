"""What every RL reward reads: the :class:`RewardBatch` beside the pictures, and the pictures as unit floats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Reward", "RewardBatch", "as_unit_images"]


@dataclass
class RewardBatch:
    """What a reward may need besides the pictures; every list has one entry per picture.

    prompts: the edit instructions.
    sources: the first source picture ``[H, W, 3]`` in [0, 1] (or ``None``), at the output size.
    keep_masks: ``[H, W]`` in [0, 1], 1 where the picture must stay as the source (``None`` = all).
    target_texts: the text the edit must show (``None``: taken from the prompt's first quoted span).
    target_boxes: ``(x0, y0, x1, y1)`` in output pixels where that text should stand (``None``:
        no layout term), e.g. the source's text region for a replacement.
    rubrics: a judge prompt per picture (``None``: the judge's own ``prompt``), e.g. the rubric of
        the picture's benchmark category; see :func:`judge_prompt`.
    """

    prompts: list[str]
    sources: list[torch.Tensor | None] | None = None
    keep_masks: list[torch.Tensor | None] | None = None
    target_texts: list[str | None] | None = None
    target_boxes: list[tuple[float, float, float, float] | None] | None = None
    rubrics: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, name: str, i: int):
        v = getattr(self, name)
        return None if v is None else v[i]


Reward = Callable[[Any, RewardBatch], torch.Tensor]


def as_unit_images(images) -> torch.Tensor:
    """PIL list / ``[B, H, W, 3]`` tensor -> ``[B, H, W, 3]`` float32 in [0, 1] on the CPU."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] in [0, 1], got shape {tuple(images.shape)}")
        return images.detach().float().cpu()
    import numpy as np

    arrs = []
    for k, im in enumerate(images):
        if not hasattr(im, "convert"):
            raise TypeError(f"images[{k}] is a {type(im).__name__}; expected a PIL image or one [B, H, W, 3] tensor")
        arrs.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0))
    return torch.stack(arrs)
