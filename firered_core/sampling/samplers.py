"""Samplers as pure functions in the k-diffusion shape.

``sample_x(model_fn, x, sigmas, *, callback=None, generator=None) -> x``, where
``model_fn(x, sigma) -> velocity`` (see :mod:`firered_core.sampling.flow` for the convention) and
``sigmas`` is a descending schedule ending in 0. No hidden state: everything a step needs is in
its arguments, so the RL trainer calls the same step functions on its rollouts.

``callback(info)`` receives a :class:`StepInfo` after every step and may raise to cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from . import flow


class ModelFn(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


@dataclass
class StepInfo:
    """What a sampler reports after step ``i`` (0-based) of ``total``.

    x: the latent after the step; x0: the model's clean estimate at this step; sigma / sigma_next:
    the step's endpoints.
    """

    i: int
    total: int
    x: torch.Tensor
    x0: torch.Tensor
    sigma: float
    sigma_next: float


Callback = Callable[[StepInfo], None]
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {}


def register(name: str):
    def deco(fn):
        SAMPLERS[name] = fn
        return fn

    return deco


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None


def _sigma_vec(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(device=x.device, dtype=torch.float32).expand(x.shape[0])


# ---------------------------------------------------------------------------------------------
# Step functions
# ---------------------------------------------------------------------------------------------


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x_next = x + (sigma_next - sigma) v, accumulated in float32 and returned in ``v``'s dtype.

    This is exactly the diffusers FlowMatchEulerDiscreteScheduler step.
    """
    out = x.to(torch.float32) + (sigma_next - sigma) * v
    return out.to(v.dtype)


def sde_step_with_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    eta: float = 0.7,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the reverse SDE that shares the flow's marginals, with its log-probability.

    This is the Flow-GRPO discretisation: with ``std(sigma) = eta * sqrt(sigma / (1 - sigma))``
    the Euler-Maruyama mean is
    ``x + [v + std^2 / (2 sigma) (x + (1 - sigma) v)] (sigma_next - sigma)`` and the noise scale
    ``std * sqrt(sigma - sigma_next)``. At sigma = 1 the ratio is clamped to keep the step finite.

    Returns ``(x_next, log_prob, mean)``; ``log_prob`` is per sample (summed over all but the batch
    dimension, Gaussian density including its constant). Pass ``prev_sample`` to score a given
    transition instead of drawing one (the RL trainer's recomputation of old log-probs).
    """
    xf, vf = x.to(torch.float32), v.to(torch.float32)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    s_b = flow.broadcast_sigma(s.expand(x.shape[0]) if s.dim() == 0 else s, xf)
    sn_b = flow.broadcast_sigma(s_next.expand(x.shape[0]) if s_next.dim() == 0 else s_next, xf)
    dt = sn_b - s_b  # negative
    ratio = s_b / (1 - s_b).clamp_min(1e-3)
    std = eta * torch.sqrt(ratio.clamp_min(0))
    mean = xf + (vf + std**2 / (2 * s_b) * (xf + (1 - s_b) * vf)) * dt
    scale = std * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            # on the generator's device (a CUDA generator, FireRed's, may drive a CPU run), then moved
            at = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=at, dtype=torch.float32).to(x.device)
        prev_sample = mean + scale * noise.to(torch.float32)
    prev = prev_sample.to(torch.float32)
    safe = scale.clamp_min(1e-12)
    log_prob = -((prev - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    log_prob = log_prob.flatten(1).sum(1)
    return prev.to(v.dtype), log_prob, mean


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


def _walk(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None, step) -> torch.Tensor:
    """Walk the schedule one step at a time: the velocity at each sigma, ``x = step(x, v, sigma,
    sigma_next)``, and the :class:`StepInfo` (with the step's clean estimate) to ``callback``."""
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = model_fn(x, _sigma_vec(s, x))
        x0 = flow.v_to_x0(x.float(), v.float(), s.item()) if callback is not None else None
        x = step(x, v, s, s_next)
        if callback is not None:
            callback(StepInfo(i, n, x, x0, s.item(), s_next.item()))
    return x


@register("euler")
@torch.no_grad()
def sample_euler(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """First-order Euler on the probability-flow ODE (FireRed's default sampler)."""
    return _walk(model_fn, x, sigmas, callback, euler_step)


@register("heun")
@torch.no_grad()
def sample_heun(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Second-order Heun (trapezoidal) on the ODE; the last step (to sigma = 0) is plain Euler.

    Two model evaluations per step except the last.
    """

    def step(x, v, s, s_next):
        x_pred = euler_step(x, v, s, s_next)
        if s_next > 0:
            v2 = model_fn(x_pred, _sigma_vec(s_next, x))
            return euler_step(x, (v.float() + v2.float()).div(2).to(v.dtype), s, s_next)
        return x_pred

    return _walk(model_fn, x, sigmas, callback, step)


@register("dpmpp_2m")
@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), a second-order multistep solver in data prediction, one evaluation a step.

    For flow matching, alpha = 1 - sigma and lambda = log(alpha / sigma); the update is exact for
    a data prediction that is constant (first step) or linear in lambda (later steps).
    """
    n = len(sigmas) - 1
    old_x0: torch.Tensor | None = None
    lam_prev: float | None = None  # lambda of the previous step's start; None = no usable history
    for i in range(n):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        v = model_fn(x, _sigma_vec(sigmas[i], x))
        x0 = flow.v_to_x0(x.float(), v.float(), s)
        lam = math.log((1 - s) / s) if 0 < s < 1 else None
        if s_next == 0:
            x_new = x0
        elif lam is None:
            # sigma = 1 (lambda = -inf): the exact first-order step is the flow's own interpolation.
            x_new = (1 - s_next) * x0 + s_next * x.float()
        else:
            lam_next = math.log((1 - s_next) / s_next)
            h = lam_next - lam
            d = x0
            if old_x0 is not None and lam_prev is not None:
                r = (lam - lam_prev) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x_new = (s_next / s) * x.float() - (1 - s_next) * math.expm1(-h) * d
        old_x0, lam_prev = x0, lam
        x = x_new.to(v.dtype)
        if callback is not None:
            callback(StepInfo(i, n, x, x0, s, s_next))
    return x


@register("euler_sde")
@torch.no_grad()
def sample_euler_sde(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.7,
) -> torch.Tensor:
    """Stochastic sampler over :func:`sde_step_with_logprob` (the RL rollout sampler); the last
    step to sigma = 0 is deterministic."""

    def step(x, v, s, s_next):
        if s_next > 0:
            return sde_step_with_logprob(x, v, s, s_next, eta=eta, generator=generator)[0]
        return euler_step(x, v, s, s_next)

    return _walk(model_fn, x, sigmas, callback, step)
