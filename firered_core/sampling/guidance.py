"""Guidance: functions that wrap a denoiser and return a ``model_fn(x, sigma) -> v``.

True CFG, as FireRed is run: ``comb = v_neg + s (v_pos - v_neg)``, then the norm rescale
``v = comb * |v_pos| / |comb|`` per token over the 64 packed channels, which keeps the guided
velocity at the conditional one's magnitude. Cond and uncond go through the MM-DiT in one batched
forward pass by default (``batched=False`` runs them one after the other, e.g. to halve peak
activation memory). Outside the ``[start, end)`` window of steps the positive prediction alone
is used, one forward pass per step.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..model.conditioning import TextCond
from .denoiser import Denoiser

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_combine(v_pos: torch.Tensor, v_neg: torch.Tensor, scale: float, *, norm_rescale: bool = True) -> torch.Tensor:
    """The guided velocity from a positive and a negative prediction (reference pipeline's math)."""
    comb = v_neg + scale * (v_pos - v_neg)
    if not norm_rescale:
        return comb
    pos_norm = torch.norm(v_pos, dim=-1, keepdim=True)
    comb_norm = torch.norm(comb, dim=-1, keepdim=True)
    return comb * (pos_norm / comb_norm)


def true_cfg(
    denoiser: Denoiser,
    positive: TextCond,
    negative: TextCond | None,
    scale: float,
    *,
    norm_rescale: bool = True,
    batched: bool = True,
    sigma_window: tuple[float, float] = (0.0, 1.0),
) -> ModelFn:
    """A ``model_fn`` applying true CFG with ``scale``.

    CFG is active when ``scale > 1`` and a negative prompt is given (as in the release), and only
    for ``sigma_window[0] <= sigma <= sigma_window[1]``; elsewhere it is the positive prediction.
    """
    lo, hi = sigma_window
    if negative is None or scale <= 1.0:
        return denoiser.model_fn(positive)

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma.reshape(-1)[0])
        if not (lo <= s <= hi):
            return denoiser.predict(x, sigma, [positive])[0]
        if batched:
            v_pos, v_neg = denoiser.predict(x, sigma, [positive, negative])
        else:
            v_pos = denoiser.predict(x, sigma, [positive])[0]
            v_neg = denoiser.predict(x, sigma, [negative])[0]
        return cfg_combine(v_pos, v_neg, scale, norm_rescale=norm_rescale)

    return fn
