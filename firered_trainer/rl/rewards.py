"""Builds the RL stage's reward by name, behind one interface: ``reward(images, batch) -> scores``.

``images``: the edited pictures, ``[B, H, W, 3]`` float in [0, 1] (ComfyUI's IMAGE layout) or a
list of PIL images; ``batch``: a :class:`RewardBatch` with one entry per picture; ``scores``: a
float32 tensor ``[B]``, higher is better. :func:`build_reward` turns a name, or a
``{name: weight}`` / ``{name: {"weight": w, **options}}`` mapping, into one weighted-sum reward;
:data:`REWARDS` is the name -> factory registry.

* ``brightness``, ``colour`` -- cheap image statistics, for tests and demonstrations.
* ``consistency`` -- ``1 - region_consistency`` against the source outside the edit (the shared
  measure of :mod:`firered_core.editing.consistency`, on pixels).
* ``ocr`` -- the report's layout-aware OCR reward (eq. 5, reconstructed; see :class:`OCRReward`),
  on rapidocr's PP-OCR ONNX models, which ship inside its wheel and run offline
  (:mod:`.ocr_reward`).
* ``vlm_judge`` -- the report's fine-grained logit-weighted judge (eq. 4, :class:`VLMJudge`), a
  local Qwen-VL through transformers or an OpenAI-compatible server. Off by default
  (:mod:`.vlm_judge`).

This module is the rewards' entry point: :class:`RewardBatch` (:mod:`.reward_batch`) and the OCR
and judge names are importable from here.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from firered_core.editing import consistency

from .ocr_reward import OCRReward, ocr_engine, quoted_text, substring_alignment
from .reward_batch import Reward, RewardBatch, as_unit_images
from .vlm_judge import SCORE_LINE, VLMJudge, expected_rating, judge_prompt, rating_from_logprobs

__all__ = [
    "REWARDS",
    "OCRReward",
    "RewardBatch",
    "SCORE_LINE",
    "VLMJudge",
    "WeightedSum",
    "as_unit_images",
    "build_reward",
    "expected_rating",
    "judge_prompt",
    "ocr_engine",
    "quoted_text",
    "rating_from_logprobs",
    "substring_alignment",
]

# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


REWARDS: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    def deco(factory):
        REWARDS[name] = factory
        return factory

    return deco


class WeightedSum:
    """``sum_k w_k reward_k(images, batch)``; keeps each part's last scores in ``last``."""

    def __init__(self, parts: Sequence[tuple[str, float, Reward]]):
        if not parts:
            raise ValueError("a reward needs at least one part")
        self.parts = list(parts)
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, images, batch: RewardBatch) -> torch.Tensor:
        imgs = as_unit_images(images)
        if len(batch) != imgs.shape[0]:
            raise ValueError(f"the reward batch describes {len(batch)} pictures but {imgs.shape[0]} were given")
        total = torch.zeros(imgs.shape[0])
        for name, w, fn in self.parts:
            s = torch.as_tensor(fn(imgs, batch), dtype=torch.float32).reshape(-1)
            self.last[name] = s
            total = total + w * s
        return total


def build_reward(spec) -> WeightedSum:
    """A reward from a name (``"ocr"``), a list of names, or ``{name: weight}`` /
    ``{name: {"weight": w, **options}}``."""
    if isinstance(spec, str):
        spec = {spec: 1.0}
    elif isinstance(spec, (list, tuple)):
        spec = {s: 1.0 for s in spec}
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"reward spec must be a name or a {{name: weight}} mapping, got {spec!r}")
    parts = []
    for name, opts in spec.items():
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; expected one of {sorted(REWARDS)}")
        if isinstance(opts, (int, float)):
            w, kw = float(opts), {}
        elif isinstance(opts, dict):
            kw = dict(opts)
            w = float(kw.pop("weight", 1.0))
        else:
            raise ValueError(f"reward {name!r}: expected a weight or an options mapping, got {opts!r}")
        parts.append((name, w, REWARDS[name](**kw)))
    return WeightedSum(parts)


# ---------------------------------------------------------------------------------------------
# Cheap rewards
# ---------------------------------------------------------------------------------------------


@register("brightness")
def brightness_reward(**_):
    """Mean pixel value in [0, 1]."""

    def fn(images, batch):
        return as_unit_images(images).mean(dim=(1, 2, 3))

    return fn


@register("colour")
def colour_reward(target=(1.0, 0.0, 0.0), **_):
    """``1 - |mean colour - target| / sqrt(3)``, in [0, 1]; ``target`` is RGB in [0, 1]."""
    tgt = torch.tensor(target, dtype=torch.float32).reshape(3)

    def fn(images, batch):
        m = as_unit_images(images).mean(dim=(1, 2))
        return 1 - (m - tgt).norm(dim=-1) / math.sqrt(3)

    return fn


# ---------------------------------------------------------------------------------------------
# Consistency reward
# ---------------------------------------------------------------------------------------------


@register("consistency")
def consistency_reward(**_):
    """``1 - region_consistency`` on pixels in [0, 1] against ``batch.sources`` where
    ``batch.keep_masks`` is 1 (the whole picture when no mask is given). In [0, 1]."""

    def fn(images, batch):
        imgs = as_unit_images(images)
        out = []
        for i in range(imgs.shape[0]):
            src = batch.get("sources", i)
            if src is None:
                raise ValueError(f"the consistency reward needs batch.sources[{i}] (the source picture)")
            src = torch.as_tensor(src, dtype=torch.float32)
            if src.shape != imgs[i].shape:
                raise ValueError(f"batch.sources[{i}] is {tuple(src.shape)}; expected the output's {tuple(imgs[i].shape)}")
            km = batch.get("keep_masks", i)
            km = torch.ones(imgs.shape[1:3]) if km is None else torch.as_tensor(km, dtype=torch.float32)
            x = imgs[i].permute(2, 0, 1)[None]
            m = consistency.region_consistency(x, src.permute(2, 0, 1)[None], km[None, None], space="latent")
            out.append(1 - m[0])
        return torch.stack(out)

    return fn


register("ocr")(OCRReward)
register("vlm_judge")(VLMJudge)
