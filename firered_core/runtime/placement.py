"""Places one MM-DiT on a device for a block of work as its memory options say (the node graphs' path).

A node graph loads the MM-DiT, the text encoder and the VAE as separate parts that visit the device
on their own, so the plan here is :func:`~.memory.plan_memory`'s for the MM-DiT alone, where
:class:`~.memory.MemoryManager` places a whole editor.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from . import memory as mem
from .blockswap import BlockSwapper

__all__ = ["placed_transformer"]


@contextlib.contextmanager
def placed_transformer(
    transformer: nn.Module,
    options: mem.MemoryOptions | None,
    device,
    offload_device="cpu",
    *,
    keep_loaded: bool = False,
    width: int = 1024,
    height: int = 1024,
) -> Iterator[str]:
    """Run a block with ``transformer`` placed on ``device`` as ``options`` say; afterwards it goes to
    ``offload_device`` unless ``keep_loaded``. Yields the plan used.

    The plan is :func:`~.memory.plan_memory`'s for the MM-DiT alone at ``width`` x ``height``, from
    the free memory of ``device`` or ``options.budget_gb``: resident, block swap
    (``blocks_resident`` blocks stay, the others stream from the offload device ahead of use) or
    sequential. No options, or ``auto`` on the CPU: resident. Every plan computes the same numbers
    (tested bit for bit).
    """
    device, offload_device = torch.device(device), torch.device(offload_device)
    tr = transformer
    opts = options
    plan, resident_blocks = "resident", None
    if opts is not None:
        free = int(opts.budget_gb * mem.GB) if opts.budget_gb else mem.free_device_bytes(device)
        if free is not None or opts.plan != "auto":
            sizes = mem.ModelSizes.of(tr, nn.Module(), nn.Module())
            chosen = mem.plan_memory(free or 1 << 62, sizes, width=width, height=height, plan=opts.plan,
                                     blocks_resident=opts.blocks_resident, prefetch=opts.prefetch)
            plan, resident_blocks = chosen.name, chosen.blocks_resident
    if plan == "offload_encoders":  # nothing else to offload here: the MM-DiT stays whole
        plan = "resident"
    swapper = None
    if plan in ("block_swap", "sequential"):
        swapper = BlockSwapper(
            tr, resident=0 if plan == "sequential" else int(resident_blocks or 0), device=device,
            offload_device=offload_device, prefetch=opts.prefetch, pin_memory=opts.pin_memory,
        ).install()
    else:
        tr.to(device)
    try:
        yield plan
    finally:
        if swapper is not None:  # streamed weights never stay on the device (keep_loaded or not)
            swapper.uninstall(offload_device)
        if swapper is not None or not keep_loaded:
            tr.to(offload_device)
