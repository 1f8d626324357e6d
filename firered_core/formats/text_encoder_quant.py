"""The quantized layers of a text-encoder file: (scaled) fp8 dequantized row chunk by row chunk, and ComfyUI's
block-quantized layers found (``comfy_quant`` tensors or the ``_quantization_metadata`` table) and checked."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ._common import TextEncoderFileError
from .comfy_quant import BLOCK_FORMATS, check_layer, decode_conf
from .text_encoder_keys import classic_name, module_name

__all__ = ["check_quant", "dequantize", "metadata_confs", "quant_conf"]


def quant_conf(t: torch.Tensor) -> dict:
    try:
        return decode_conf(t)
    except (ValueError, UnicodeDecodeError):
        return {"format": "?"}


def dequantize(
    w: torch.Tensor, scale: torch.Tensor | None, dtype, device, chunk_bytes: int = 256 << 20
) -> torch.Tensor:
    """fp8 (or any) weight times its scale, in ``dtype`` on ``device``, row chunk by row chunk."""
    if scale is None:
        return w.to(device=device, dtype=dtype)
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif w.ndim >= 1 and scale.numel() == w.shape[0]:
        scale = scale.reshape(-1, *([1] * (w.ndim - 1)))
    else:
        raise TextEncoderFileError(
            f"a weight scale of shape {tuple(scale.shape)} for a weight of shape {tuple(w.shape)} (block-wise quantization) is not supported"
        )
    scale = scale.to(device)
    if w.ndim == 0:
        return (w.to(device).to(torch.float32) * scale).to(dtype)
    out = torch.empty(w.shape, dtype=dtype, device=device)
    rows = max(1, chunk_bytes // max(1, 4 * w[0].numel()))
    for i in range(0, w.shape[0], rows):  # on the target device (fast on a GPU), a chunk at a time
        s = scale if scale.ndim == 0 else scale[i : i + rows]
        out[i : i + rows] = (w[i : i + rows].to(device).to(torch.float32) * s).to(dtype)
    return out


def metadata_confs(metadata: dict, prefix: str) -> dict[str, dict]:
    """Module name -> comfy_quant entry from a ``_quantization_metadata`` header table."""
    if "_quantization_metadata" not in metadata:
        return {}
    try:
        layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
    except (ValueError, AttributeError):
        return {}
    out = {}
    for name, conf in layers.items():
        name = name[len(prefix) :] if prefix and name.startswith(prefix) else name
        out[module_name(name)] = conf if isinstance(conf, dict) else {"format": str(conf)}
    return out


def check_quant(p: Path, confs: dict, scales: dict, by_module: dict, header: dict, expected: dict) -> dict[str, str]:
    """The block-quantized layers (module name -> format), every quantized layer checked from the header."""
    where = repr(str(p))
    formats = {o: str(c.get("format", "?")) for o, c in confs.items()}
    for owner, fmt in sorted(formats.items()):
        if fmt not in ("float8_e4m3fn", "float8_e5m2") and fmt not in BLOCK_FORMATS:
            raise TextEncoderFileError(
                f"{where}: layer {classic_name(owner)!r} is quantized as {fmt!r}; this loader reads bf16 / fp16 / fp32, "
                f"(scaled) fp8 and the comfy_quant formats {', '.join(BLOCK_FORMATS)}"
            )
    block = {o: f for o, f in formats.items() if f in BLOCK_FORMATS}
    for key in scales:
        owner, _, sfx = key.rpartition(".")
        if sfx in ("weight_scale_2", "pre_quant_scale") and owner not in block:
            raise TextEncoderFileError(
                f"{where}: {classic_name(owner)}.{sfx} belongs to no layer marked nvfp4 by a comfy_quant entry; "
                f"expected a {classic_name(owner)}.comfy_quant naming its format"
            )
    for owner, fmt in block.items():
        wkey = by_module.get(owner + ".weight")
        if wkey is None or owner + ".weight" not in expected or len(expected[owner + ".weight"]) != 2:
            raise TextEncoderFileError(f"{where}: layer {classic_name(owner)!r} is quantized as {fmt!r} but is not a "
                                       "2-D weight of the model")  # fmt: skip
        aux = {key.rpartition(".")[2]: header[k] for key, k in scales.items() if key.rpartition(".")[0] == owner}
        out_f, in_f = expected[owner + ".weight"]
        check_layer(fmt, classic_name(owner), confs.get(owner), header[wkey], aux, out_f, in_f, where=where,
                    error=TextEncoderFileError)  # fmt: skip
    return block
