"""The speed settings of an editor in one dataclass: :class:`SpeedOptions`.

>>> editor.configure(speed=SpeedOptions(attention="sage", cache_threshold=0.1, compile=True))

Each field maps to one module: ``attention`` -> :mod:`.attention`; ``cache_*`` ->
:mod:`.step_cache` (a fresh cache per sampling run); ``compile`` / ``fp8_matmul`` ->
:mod:`.precision`. Weight precision (int8, scaled fp8) is chosen when loading
(``FireRedEditor.from_files(weight_dtype=...)``) because it replaces layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .attention import CHOICES as ATTENTION_CHOICES


@dataclass
class SpeedOptions:
    """attention: "sdpa" (default), "flash", "sage", "auto" (see :mod:`.attention`).
    cache_threshold: step-cache relative-L1 threshold; 0 = off (default). 0.05-0.1 is meant as mild,
        0.15 is FireRed's fast pipeline (aggressive); none is tested on the released weights here
        (``bench/cache_calibration.py --model`` calibrates on them). cache_compute_blocks: blocks always run
        (8 of 60 like DBCache F8B0; clamped below the block count). cache_warmup: full forwards per
        stream before any skip. cache_max_skips: most consecutive skipped forwards.
        cache_taylor_order: 1 = first-order TaylorSeer extrapolation of the skipped residual, 0 = reuse.
    compile: ``torch.compile`` the repeated MM-DiT block (first step pays the warm-up).
    fp8_matmul: run fp8 layers as fp8 matmuls on GPUs of compute capability >= 8.9 (opt-in:
        the activation is rounded to fp8).
    """

    attention: str = "sdpa"
    cache_threshold: float = 0.0
    cache_compute_blocks: int = 8
    cache_warmup: int = 3
    cache_max_skips: int = 3
    cache_taylor_order: int = 1
    compile: bool = False
    fp8_matmul: bool = False

    def __post_init__(self) -> None:
        if self.attention.lower() not in ATTENTION_CHOICES and not self.attention.startswith("_"):
            raise ValueError(f"SpeedOptions.attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.cache_threshold < 0:
            raise ValueError(f"SpeedOptions.cache_threshold must be >= 0 (0 = off), got {self.cache_threshold}")

    @property
    def caching(self) -> bool:
        return self.cache_threshold > 0

    def step_cache(self, transformer: nn.Module):
        """A fresh :class:`.step_cache.StepCache` for one sampling run, or None when caching is off."""
        if not self.caching:
            return None
        from .step_cache import StepCache

        return StepCache(transformer, threshold=self.cache_threshold, compute_blocks=self.cache_compute_blocks,
                         warmup=self.cache_warmup, max_skips=self.cache_max_skips, taylor_order=self.cache_taylor_order)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_speed(transformer: nn.Module, opts: SpeedOptions) -> dict[str, Any]:
    """Apply the model-level settings (attention, compile, fp8 matmul) to ``transformer``; returns
    what is in effect."""
    from . import attention, precision

    info: dict[str, Any] = {"attention": attention.set_attention(transformer, opts.attention)}
    if opts.fp8_matmul:
        info["fp8_matmul_layers"] = precision.enable_fp8_matmul(transformer)
    else:
        precision.disable_fp8_matmul(transformer)
    if opts.compile:
        info["compiled_blocks"] = precision.compile_blocks(transformer)
    else:
        precision.uncompile_blocks(transformer)
    return info
