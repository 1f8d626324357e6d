"""Sigma schedules as pure functions: ``schedule(n, **options) -> descending float32 tensor``.

Every schedule returns ``n + 1`` values, starting at (or below) 1 and ending in exactly 0, the
shape the samplers in :mod:`firered_core.sampling.samplers` expect. They are registered by name in
:data:`SCHEDULES` so nodes, the CLI and configs can refer to them as strings.

* ``"flowmatch"`` -- what the FireRed release (diffusers ``FlowMatchEulerDiscreteScheduler`` with
  the Qwen-Image config) does: a uniform grid ``linspace(1, 1/n, n)``, the exponential shift with a
  mu that grows with the number of target image tokens, then a stretch so the last non-zero sigma
  is ``shift_terminal`` (0.02). Computed in float32 in the scheduler's order of operations, so the
  values are bit-identical to diffusers'.
* ``"linear_shift"`` -- ComfyUI's ``ModelSamplingAuraFlow(shift)`` with the ``simple`` scheduler:
  a fixed shift (3.1 in the official FireRed template) over ComfyUI's 1000-entry sigma table.
* ``"lightning"`` -- the Qwen-Image-Lightning / FireRed Lightning LoRA setting: exponential shift
  with mu = ln 3 (a fixed shift of 3), no terminal stretch, 8 steps by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np
import torch

from . import flow

ScheduleFn = Callable[..., torch.Tensor]
SCHEDULES: dict[str, ScheduleFn] = {}


def register(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    def deco(fn: ScheduleFn) -> ScheduleFn:
        SCHEDULES[name] = fn
        return fn

    return deco


def get_schedule(name: str) -> ScheduleFn:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}") from None


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {n!r}")


def _finish(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float32), torch.zeros(1, dtype=torch.float32)])


@dataclass(frozen=True)
class FlowMatchConfig:
    """The fields of a diffusers ``scheduler_config.json`` that shape FireRed's sigmas.

    Defaults are the Qwen-Image scheduler shipped with FireRed-Image-Edit.
    """

    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    base_shift: float = 0.5
    max_shift: float = 0.9
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    time_shift_type: str = "exponential"
    shift_terminal: float | None = 0.02

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "FlowMatchConfig":
        names = {f.name for f in fields(cls)}
        cfg = {k: v for k, v in cfg.items() if k in names}
        # karras / exponential / beta sigmas and invert_sigmas are off in every FireRed release
        return cls(**cfg)

    def mu(self, image_seq_len: int) -> float:
        return flow.mu_from_seq_len(
            image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
        )


@register("flowmatch")
def flowmatch_sigmas(
    n: int,
    *,
    image_seq_len: int = 4096,
    config: FlowMatchConfig | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """The FireRed release schedule (diffusers FlowMatchEulerDiscreteScheduler, Qwen-Image config).

    ``image_seq_len`` is the number of packed *target* tokens, (H/16)(W/16); references do not count.
    ``mu`` overrides the value derived from it.
    """
    _check_steps(n)
    cfg = config or FlowMatchConfig()
    # numpy float32, in the scheduler's order of operations: torch's float32 kernels differ from
    # numpy's by an ulp here and there, and the point is to be bit-identical to the release.
    t = np.linspace(1.0, 1.0 / n, n).astype(np.float32)
    if cfg.use_dynamic_shifting:
        m = cfg.mu(image_seq_len) if mu is None else mu
        if cfg.time_shift_type == "exponential":
            sigmas = math.exp(m) / (math.exp(m) + (1 / t - 1) ** 1.0)
        elif cfg.time_shift_type == "linear":
            sigmas = m / (m + (1 / t - 1) ** 1.0)
        else:
            raise ValueError(f"unknown time_shift_type {cfg.time_shift_type!r}")
    else:
        sigmas = cfg.shift * t / (1 + (cfg.shift - 1) * t)
    if cfg.shift_terminal:
        sigmas = flow.stretch_to_terminal(sigmas, cfg.shift_terminal)
    return _finish(torch.from_numpy(np.asarray(sigmas, dtype=np.float32)))


@register("linear_shift")
def linear_shift_sigmas(n: int, *, shift: float = 3.1, table_size: int = 1000, **_: Any) -> torch.Tensor:
    """ComfyUI's ``ModelSamplingAuraFlow(shift)`` + ``simple`` scheduler.

    ComfyUI tabulates ``shift_linear(k / 1000)`` for k = 1..1000 and the ``simple`` scheduler takes
    every (1000 / n)-th entry from the top, so the grid is ``linspace(1, 1/n, n)`` quantised to the
    table, then shifted. No terminal stretch.
    """
    _check_steps(n)
    table = flow.shift_linear(torch.arange(1, table_size + 1, dtype=torch.float32) / table_size, shift)
    stride = table_size / n
    picked = torch.stack([table[-(1 + int(i * stride))] for i in range(n)])
    return _finish(picked)


@register("lightning")
def lightning_sigmas(n: int = 8, **_: Any) -> torch.Tensor:
    """The Lightning LoRA schedule: exponential shift with mu = ln 3 (== fixed shift 3), no stretch."""
    cfg = FlowMatchConfig(
        base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None, use_dynamic_shifting=True
    )
    return flowmatch_sigmas(n, image_seq_len=4096, config=cfg)


@register("linear")
def plain_sigmas(n: int, **_: Any) -> torch.Tensor:
    """An unshifted uniform grid 1, 1 - 1/n, ..., 1/n, 0 (for tests and toy flows)."""
    _check_steps(n)
    return _finish(torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64).to(torch.float32))


def truncate_for_denoise(sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """Keep the last ``round(denoise * steps)`` steps, for img2img-style partial denoising."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    steps = len(sigmas) - 1
    keep = max(1, round(steps * denoise))
    return sigmas[steps - keep :]
