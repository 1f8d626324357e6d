"""Optimizers by name: AdamW, bitsandbytes 8-bit AdamW / paged AdamW / Lion, and Adafactor.

The 8-bit optimizers keep their two moment buffers in 8 bits with block-wise quantisation
(bitsandbytes), about 2 bytes of state per parameter instead of AdamW's 8; from bitsandbytes 0.50
they also run on the CPU, so the same code is tested in CI. Tensors smaller than
``min_8bit_size`` elements keep 32-bit state (bitsandbytes' default rule).

FireRed's stages all use AdamW with betas (0.9, 0.999), weight decay 0.01 (report Table 1); those
are the defaults here.
"""

from __future__ import annotations

from typing import Iterable

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "adafactor")


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state per trainable parameter (after at least one step)."""
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    n_bytes = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                n_bytes += v.numel() * v.element_size()
    return n_bytes / max(n_params, 1)


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.01,
    eps: float = 1e-8,
    min_8bit_size: int = 4096,
) -> torch.optim.Optimizer:
    """Build an optimizer by name (one of :data:`OPTIMIZERS`)."""
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name in ("adamw8bit", "paged_adamw8bit", "lion8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError(
                f"optimizer {name!r} needs bitsandbytes (pip install 'bitsandbytes>=0.50'); or use 'adamw'"
            ) from e
        if name == "adamw8bit":
            return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                                       min_8bit_size=min_8bit_size)
        if name == "paged_adamw8bit":
            return bnb.optim.PagedAdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                                            min_8bit_size=min_8bit_size)
        return bnb.optim.Lion8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
