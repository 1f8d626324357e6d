"""The flow-matching objective of the pretrain / SFT stages, as pure functions.

* **Timesteps** -- distributed stratified sampling (FireRed report section 3.8): the unit interval
  is cut into ``world_size`` sub-intervals; at step ``s`` rank ``r`` draws from sub-interval
  ``(r + s) mod world_size``, so every step covers the whole range across ranks and each rank
  visits every sub-interval in turn (the released code keeps each rank's interval fixed; the
  report rotates it -- this follows the report). With one process this is plain uniform sampling.
  The uniform draw goes through the same resolution-dependent shift as inference
  (:func:`firered_core.sampling.schedules.FlowMatchConfig.mu`), so training and sampling agree on where
  the noise levels are.
* **Loss** -- MSE between the predicted velocity and ``eps - x0`` (the convention of
  :mod:`firered_core.sampling.flow`), per sample, weighted by ``"none"`` or ``"logit_normal"`` (the
  logit-normal density of sigma, normalised to mean 1 under the uniform draw: it emphasises
  middle noise levels, SD3-style), with the released trainer's guard that ignores elements whose
  error exceeds ``clip`` (50).
* **EMA** of trainable weights.
"""

from __future__ import annotations

import hashlib
import math

import torch

from firered_core.sampling import flow
from firered_core.sampling.schedules import FlowMatchConfig


def seed_of(*parts) -> int:
    """A 63-bit seed from its parts (``seed_of(cfg.seed, "noise", step, position)``): the same on
    every process and every run, independent of the rank -- how the stages key their random draws
    so that N processes compute what one process at N times the batch computes."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def stratified_uniform(
    batch: int, *, rank: int = 0, world_size: int = 1, step: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``batch`` draws in [0, 1) from this rank's rotating sub-interval (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    k = (rank + step) % world_size
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    return ((k + u) / world_size).to(torch.float32)


def training_sigmas(u: torch.Tensor, *, image_seq_len: int, config: FlowMatchConfig | None = None) -> torch.Tensor:
    """Map uniform draws to sigmas with the inference schedule's resolution-dependent shift (the
    scheduler config's ``time_shift_type``: "exponential" ``e^mu / (e^mu + 1/u - 1)``, or "linear"
    ``mu / (mu + 1/u - 1)``; a fixed ``shift`` without dynamic shifting)."""
    cfg = config or FlowMatchConfig()
    u = u.clamp(1e-5, 1.0)
    if cfg.use_dynamic_shifting:
        mu = cfg.mu(image_seq_len)
        if cfg.time_shift_type == "exponential":
            return flow.shift_exponential(u.double(), mu).float()
        if cfg.time_shift_type == "linear":
            return flow.shift_linear(u.double(), mu).float()  # mu / (mu + 1/u - 1) = shift_linear(u, mu)
        raise ValueError(f"unknown time_shift_type {cfg.time_shift_type!r}; expected 'exponential' or 'linear'")
    return flow.shift_linear(u, cfg.shift)


def logit_normal_weight(sigma: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution at ``sigma`` (integrates to 1 over [0, 1])."""
    s = sigma.clamp(1e-5, 1 - 1e-5).double()
    logit = torch.log(s / (1 - s))
    pdf = torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * s * (1 - s))
    return pdf.to(sigma.dtype)


def flow_matching_loss(
    v_pred: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    sigma: torch.Tensor,
    *,
    weighting: str = "none",
    clip: float | None = 50.0,
) -> torch.Tensor:
    """Weighted velocity MSE, averaged over elements then samples. ``v_pred``, ``x0``, ``eps``:
    ``[B, ...]`` (packed tokens or latents); ``sigma``: ``[B]``."""
    target = flow.velocity(x0.float(), eps.float())
    err = (v_pred.float() - target) ** 2
    if clip is not None:
        err = torch.where((v_pred.float() - target).abs() > clip, torch.zeros_like(err), err)
    per_sample = err.flatten(1).mean(1)
    if weighting == "none":
        w = torch.ones_like(per_sample)
    elif weighting == "logit_normal":
        w = logit_normal_weight(sigma.float())
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected 'none' or 'logit_normal'")
    return (w * per_sample).mean()


class EMA:
    """Exponential moving average of a module's trainable parameters (kept in float32)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}
