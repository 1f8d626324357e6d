"""Small facts about loaded modules that the rest of the core asks for.

Quantized models (fp8 layers, GGUF blocks stored as uint8) make "the dtype of the first
parameter" the wrong question: :func:`compute_dtype` answers with the dtype activations are
computed in.
"""

from __future__ import annotations

import torch

_STORAGE_ONLY = {torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2}


def concrete_device(device) -> torch.device:
    """``device`` with its index made explicit: ``cuda`` is ``cuda:<current>``. Tensors always carry
    the index and ``torch.device("cuda") != torch.device("cuda:0")``, so code that compares a
    tensor's device with a requested one asks this first."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype a module computes in: its first parameter (or buffer) that is a real
    compute dtype, skipping quantized storage (fp8, int8 / uint8 GGUF blocks)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and t.dtype not in _STORAGE_ONLY:
            return t.dtype
    return torch.float32
