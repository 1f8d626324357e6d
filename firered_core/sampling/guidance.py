"""Guidance: functions that wrap a denoiser and return a ``model_fn(x, sigma) -> v``.

True CFG, as FireRed is run: ``comb = v_neg + s (v_pos - v_neg)``, then the norm rescale
``v = comb * |v_pos| / |comb|`` per token over the 64 packed channels, which keeps the guided
velocity at the conditional one's magnitude. Cond and uncond go through the MM-DiT in one batched
forward pass by default (``batched=False`` runs them one after the other, e.g. to halve peak
activation memory). Outside the ``[start, end)`` window of steps the positive prediction alone
is used, one forward pass per step.

For ``ref_mode="comfyui"`` (an :class:`EditCondition` with ``cfg_norm="comfyui"``) the rescale is
ComfyUI's ``CFGNorm`` node at strength 1, as its Qwen-Image-Edit template runs it: on the clean
estimates ``x0 = x - sigma v``, per latent pixel over the 16 channels, the scale clamped at 1.
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


def cfg_combine_comfyui(v_pos: torch.Tensor, v_neg: torch.Tensor, scale: float, x: torch.Tensor,
                        sigma: torch.Tensor) -> torch.Tensor:
    """ComfyUI's CFG + ``CFGNorm`` (strength 1) in velocity form, on packed ``[B, N, 64]`` tokens
    (each 16 channels x a 2 x 2 patch): ``x0 = x - sigma v`` for the positive and the guided
    prediction, the guided one scaled per pixel by ``min(1, |x0_pos| / (|x0_cfg| + 1e-8))`` over the
    channels, then back to a velocity."""
    s = sigma.reshape(-1, 1, 1).to(torch.float32)
    comb = v_neg + scale * (v_pos - v_neg)
    x0_pos = x.float() - s * v_pos.float()
    x0_cfg = x.float() - s * comb.float()
    b, n, d = x0_cfg.shape
    per_pixel = (b, n, d // 4, 4)  # packed as (channel, patch row, patch column)
    ratio = torch.norm(x0_pos.view(per_pixel), dim=2, keepdim=True) / (torch.norm(x0_cfg.view(per_pixel), dim=2, keepdim=True) + 1e-8)
    x0 = (x0_cfg.view(per_pixel) * ratio.clamp(0.0, 1.0)).view(b, n, d)
    return ((x.float() - x0) / s).to(v_pos.dtype)


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
        if norm_rescale and getattr(denoiser.cond, "cfg_norm", "flow") == "comfyui":
            return cfg_combine_comfyui(v_pos, v_neg, scale, x, sigma)
        return cfg_combine(v_pos, v_neg, scale, norm_rescale=norm_rescale)

    return fn
