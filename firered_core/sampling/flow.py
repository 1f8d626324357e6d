"""The one time convention of the pack, and every conversion between its quantities.

Rectified flow, as FireRed (and Qwen-Image) is trained:

* ``sigma`` in [0, 1]: 1 is pure noise, 0 is data;
* ``x_sigma = (1 - sigma) * x0 + sigma * eps``;
* the network predicts the velocity ``v = eps - x0`` (so ``dx/dsigma = v``);
* the network's timestep input is ``timestep = 1000 * sigma`` (the diffusers pipeline passes
  ``timestep / 1000`` to the transformer, i.e. sigma again).

The resolution-dependent shifts that bend a uniform sigma grid toward the noisy end also live
here, so schedules, samplers, guidance and the trainer share one definition of every formula.
All functions accept floats or tensors and broadcast ``sigma`` against the latent when needed.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch

T = TypeVar("T", float, torch.Tensor)

NUM_TRAIN_TIMESTEPS = 1000


def broadcast_sigma(sigma, like: torch.Tensor):
    """Shape ``sigma`` (float, 0-d or [B]) so that it broadcasts against ``like`` ([B, ...])."""
    if not isinstance(sigma, torch.Tensor):
        return sigma
    sigma = sigma.to(like.dtype)
    while sigma.dim() < like.dim():
        sigma = sigma.unsqueeze(-1)
    return sigma


# ---------------------------------------------------------------------------------------------
# Forward process and parameterisations
# ---------------------------------------------------------------------------------------------


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps."""
    s = broadcast_sigma(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching target v = eps - x0."""
    return eps - x0


def v_to_x0(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """One-step clean estimate x0_hat = x_sigma - sigma v."""
    return x - broadcast_sigma(sigma, x) * v


def v_to_eps(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """Noise estimate eps_hat = x_sigma + (1 - sigma) v."""
    return x + (1 - broadcast_sigma(sigma, x)) * v


def x0_to_v(x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """Velocity from a clean estimate: v = (x_sigma - x0) / sigma (sigma > 0)."""
    return (x - x0) / broadcast_sigma(sigma, x)


def x0_to_eps(x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """Noise from a clean estimate: eps = (x_sigma - (1 - sigma) x0) / sigma (sigma > 0)."""
    s = broadcast_sigma(sigma, x)
    return (x - (1 - s) * x0) / s


def eps_to_x0(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """Clean estimate from a noise estimate: x0 = (x_sigma - sigma eps) / (1 - sigma) (sigma < 1)."""
    s = broadcast_sigma(sigma, x)
    return (x - s * eps) / (1 - s)


def sigma_to_timestep(sigma: T) -> T:
    """The network's timestep, 1000 sigma."""
    return sigma * NUM_TRAIN_TIMESTEPS


def timestep_to_sigma(timestep: T) -> T:
    return timestep / NUM_TRAIN_TIMESTEPS


# ---------------------------------------------------------------------------------------------
# Shifts
# ---------------------------------------------------------------------------------------------


def shift_linear(sigma: T, shift: float) -> T:
    """The SD3 / AuraFlow shift ``s sigma / (1 + (s - 1) sigma)`` (ComfyUI's ModelSamplingAuraFlow).

    ``shift > 1`` spends more of the steps at high noise. Monotone, fixes 0 and 1.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_linear(sigma: T, shift: float) -> T:
    """Inverse of :func:`shift_linear`."""
    return sigma / (shift - (shift - 1) * sigma)


def shift_exponential(sigma: T, mu: float, power: float = 1.0) -> T:
    """The Flux / Qwen-Image "exponential" time shift ``e^mu / (e^mu + (1/sigma - 1)^power)``.

    With ``power = 1`` this equals :func:`shift_linear` with ``shift = e^mu``. sigma = 0 maps to 0.
    """
    if isinstance(sigma, torch.Tensor):
        safe = sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
        out = math.exp(mu) / (math.exp(mu) + (1 / safe - 1) ** power)
        return torch.where(sigma > 0, out, torch.zeros_like(out))
    if sigma <= 0:
        return 0.0 * sigma
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1) ** power)


def mu_from_seq_len(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 8192,
    base_shift: float = 0.5,
    max_shift: float = 0.9,
) -> float:
    """The resolution-dependent mu: linear in the number of *target* image tokens.

    The defaults are Qwen-Image's scheduler config (used by FireRed): mu = 0.5 at 256 tokens,
    0.9 at 8192 tokens, about 0.694 at 1024x1024 (4096 tokens).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Rescale ``1 - sigma`` so that the last sigma of the grid becomes ``terminal`` exactly.

    The first sigma (1.0) is kept; the grid stays monotone. Applied before the final 0 is appended.
    """
    one_minus = 1 - sigmas
    if float(one_minus[-1]) == 0.0:
        return sigmas  # a one-step grid [1]: nothing to stretch (diffusers returns NaN here)
    scale = one_minus[-1] / (1 - terminal)
    return 1 - one_minus / scale
