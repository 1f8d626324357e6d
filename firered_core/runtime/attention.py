"""The attention backend of the MM-DiT: one setting, through diffusers' attention dispatcher.

``set_attention(transformer, name)`` with ``name``:

- ``"sdpa"`` (default): PyTorch ``scaled_dot_product_attention`` (which itself picks flash /
  memory-efficient / cuDNN kernels on CUDA). Nothing is changed on a model that never had another
  backend set, so results stay bit-identical.
- ``"flash"``: FlashAttention -- FA3 (``_flash_3``) when its package is importable, else FA2
  (``flash``, the ``flash-attn`` package).
- ``"sage"``: SageAttention (``sageattention`` package; 8-bit QK, fast on Ada / Hopper).
- ``"auto"``: sage, else flash, else sdpa, whatever is installed (CUDA only).
- any other name of diffusers' ``AttentionBackendName`` (e.g. ``"_native_cudnn"``) is passed on.

A backend that is not installed (or not usable on this device) falls back to SDPA with one log
line saying why. FlashAttention and SageAttention take no attention mask: the editor then runs
cond and uncond of true CFG as two passes instead of one padded, masked batch
(:func:`supports_mask`).
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

CHOICES = ("sdpa", "flash", "sage", "auto")
_NO_MASK = ("flash", "_flash_3", "sage", "flash_hub", "_flash_3_hub", "sage_hub")


def _candidates(name: str) -> list[str]:
    if name == "flash":
        return ["_flash_3", "flash"]
    if name == "sage":
        return ["sage"]
    if name == "auto":
        return ["sage", "_flash_3", "flash"]
    return [name]


def supports_mask(backend: str | None) -> bool:
    """Whether a diffusers backend name accepts an attention mask (padded, batched CFG)."""
    return backend is None or backend in ("native", "sdpa") or backend not in _NO_MASK


def set_attention(transformer: nn.Module, name: str = "sdpa") -> str:
    """Set the attention backend of ``transformer``; returns the diffusers backend in use
    (``"native"`` for SDPA). Unknown names raise ``ValueError`` listing the choices."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = {b.value for b in AttentionBackendName}
    name = (name or "sdpa").lower()
    if name not in CHOICES and name not in known:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {CHOICES} (or a diffusers backend name)")
    current = getattr(transformer, "_firered_attention", None)
    if name == "sdpa":
        if current not in (None, "native"):
            transformer.set_attention_backend("native")
        transformer._firered_attention = "native"
        return "native"
    device_type = next(transformer.parameters()).device.type
    reasons = []
    for cand in _candidates(name):
        if device_type != "cuda" and cand not in ("native", "flex") and not cand.startswith("_native"):
            reasons.append(f"{cand}: needs a CUDA device (model is on {device_type})")
            continue
        try:
            transformer.set_attention_backend(cand)
        except (RuntimeError, ImportError, ValueError) as e:
            reasons.append(f"{cand}: {str(e).splitlines()[0]}")
            continue
        transformer._firered_attention = cand
        log.info("attention backend: %s", cand)
        return cand
    log.warning("attention backend %r is not available (%s); using PyTorch SDPA", name, "; ".join(reasons))
    if current not in (None, "native"):
        transformer.set_attention_backend("native")
    transformer._firered_attention = "native"
    return "native"


def current_attention(transformer: nn.Module) -> str:
    return getattr(transformer, "_firered_attention", None) or "native"
