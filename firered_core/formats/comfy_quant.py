"""ComfyUI's block-quantized layers (``comfy_quant`` formats ``int8_tensorwise``, ``mxfp8``, ``nvfp4``): checked, decoded and kept quantized.

ComfyUI marks a quantized linear with ``<layer>.comfy_quant`` (JSON bytes, ``{"format": ...}``) or
lists it in the ``_quantization_metadata`` header entry; the names of the extra tensors and what
they hold follow ComfyUI's ``QUANT_ALGOS`` (``comfy/quant_ops.py``) and the comfy-kitchen layouts
it stores (``state_dict_tensors``: ``""`` -> ``weight``, ``_scale`` -> ``weight_scale``,
``_scale_2`` -> ``weight_scale_2``):

``int8_tensorwise``
    ``weight`` int8 ``[out, in]``; ``weight_scale`` float32, one per tensor (a scalar) or one per
    output row (``[out]`` / ``[out, 1]``, comfy-kitchen's per-channel variant). ``w = q * scale``.
    A ``"convrot": true`` entry (Hadamard-rotated weights) is refused: it is not decoded here.
``mxfp8``
    ``weight`` float8_e4m3fn ``[R, C]`` (``R``, ``C`` the layer's sizes, or padded up to multiples of
    32); ``weight_scale`` E8M0 bytes (uint8 or ``F8_E8M0``: the value ``2**(b - 127)``), one per
    block of 32 consecutive inputs of a row. ``w[r, c] = q[r, c] * 2**(b[r, c // 32] - 127)``.
``nvfp4``
    ``weight`` uint8 ``[R, C / 2]``: two e2m1 codes per byte, the **high nibble first** (as
    comfy-kitchen packs and unpacks them); codes 0-7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6, bit 3 the
    sign; ``R``, ``C`` padded to multiples of 16 where needed. ``weight_scale`` float8_e4m3fn, one
    per block of 16 inputs; ``weight_scale_2`` a float32 scalar. ``w = e2m1 * (block scale * scale_2)``.
    ``pre_quant_scale`` (an input scale folded in by some exporters) is refused.

The block scales (mxfp8, nvfp4) are stored in the layout cuBLAS's block-scaled matmuls read
(comfy-kitchen ``to_blocked``): the ``[R, C / block]`` grid padded with zeros to ``[128 a, 4 b]``,
cut into 128 x 4 tiles stored one after the other (row of tiles by row of tiles), and inside a
tile the scale of (row ``r``, column ``c``) at byte ``(r % 32) * 16 + (r // 32) * 4 + c``. Files
hold it as a 2-D ``[128 a, 4 b]`` tensor (or flat); :func:`unswizzle` undoes it once at load.

:class:`QuantLinear` keeps the stored bytes (about 1 byte per weight for int8 / mxfp8, 0.56 for
nvfp4) and dequantizes its weight into the input's dtype inside ``forward``, one layer at a time:
this pack has no int8 / mxfp8 / nvfp4 matmul kernels (ComfyUI uses comfy-kitchen's on the GPUs
that have them), so on every device the matmul runs in the compute dtype. Float scales are held
as raw int32 bits so that ``model.to(torch.bfloat16)`` cannot round them.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

__all__ = [
    "BLOCK_FORMATS",
    "QuantLinear",
    "check_layer",
    "decode_conf",
    "e8m0_to_float",
    "swizzle",
    "unswizzle",
]

#: the comfy_quant formats decoded here -> (block size along the input, allowed weight dtypes)
BLOCK_FORMATS: dict[str, tuple[int, tuple[str, ...]]] = {
    "int8_tensorwise": (1, ("I8", "U8")),
    "mxfp8": (32, ("F8_E4M3", "U8", "I8")),
    "nvfp4": (16, ("U8", "I8")),
}
#: what the padded storage of a layer is rounded up to (rows and columns)
_PAD = {"int8_tensorwise": 1, "mxfp8": 32, "nvfp4": 16}
_FLOAT_NAMES = ("F32", "F16", "BF16", "F64")
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


def decode_conf(value: torch.Tensor) -> dict:
    """A ``<layer>.comfy_quant`` tensor (uint8 JSON bytes) as a dict; ``{"format": x}`` for a bare
    JSON string. Raises ``ValueError`` for bytes that are not JSON."""
    raw = bytes(value.to(torch.uint8).flatten().tolist()).decode("utf-8")
    conf = json.loads(raw)
    return conf if isinstance(conf, dict) else {"format": conf}


# ---------------------------------------------------------------------------------------------
# scale layouts and small number formats
# ---------------------------------------------------------------------------------------------


def swizzle(grid: torch.Tensor) -> torch.Tensor:
    """The ``[rows, cols]`` block-scale grid in cuBLAS's tiled layout, as a 2-D ``[128 a, 4 b]``
    tensor (zero padding), the way ComfyUI files store it (see the module docstring)."""
    rows, cols = grid.shape
    rp, cp = _up(rows, 128), _up(cols, 4)
    padded = grid.new_zeros(rp, cp)
    padded[:rows, :cols] = grid
    tiles = padded.reshape(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)  # tile row, tile col, r%32, r//32, c
    return tiles.reshape(rp, cp).contiguous()


def unswizzle(stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle`: the ``[rows, cols]`` grid from the stored scales (any shape with
    ``128 a x 4 b`` elements)."""
    rp, cp = _up(rows, 128), _up(cols, 4)
    tiles = stored.reshape(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)  # tile row, r//32, r%32, tile col, c
    return tiles.reshape(rp, cp)[:rows, :cols].contiguous()


def e8m0_to_float(b: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8) as float32 ``2**(b - 127)``, exactly (``b = 0`` is the subnormal
    ``2**-127``, ``255`` is NaN), built from the float32 bit pattern."""
    e = b.to(torch.int32)
    bits = torch.where(e == 0, torch.full_like(e, 1 << 22), e << 23)
    bits = torch.where(e == 255, torch.full_like(e, 0x7FC00000), bits)
    return bits.view(torch.float32)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().view(torch.int32)


def _from_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float32)


# ---------------------------------------------------------------------------------------------
# checks on the header (dtype names and shapes), before any tensor is read
# ---------------------------------------------------------------------------------------------


def check_layer(
    fmt: str,
    layer: str,
    conf: dict | None,
    weight: tuple[str, tuple[int, ...]],
    aux: dict[str, tuple[str, tuple[int, ...]]],
    out_features: int,
    in_features: int,
    *,
    where: str,
    error: type[Exception],
) -> None:
    """Check one quantized layer against the layout of ``fmt`` (module docstring) from its header
    entries: ``weight`` and ``aux`` (suffix such as ``"weight_scale"`` -> (dtype name, shape)).
    Raises ``error`` naming ``where``, the layer, the format and what was expected."""
    head = f"{where}: layer {layer!r} ({fmt})"
    if fmt not in BLOCK_FORMATS:
        raise error(f"{head}: unknown quantization format; expected one of {sorted(BLOCK_FORMATS)} or fp8")
    conf = conf or {}
    if fmt == "int8_tensorwise" and conf.get("convrot"):
        raise error(f"{head}: Hadamard-rotated int8 (\"convrot\": true) is not supported; use a plain "
                    "int8_tensorwise, fp8, bf16 or GGUF file")  # fmt: skip
    if "pre_quant_scale" in aux:
        raise error(f"{head}: has a pre_quant_scale (an input scale), which is not supported; use a file without it")
    block, dtypes = BLOCK_FORMATS[fmt]
    wdt, wshape = weight
    if wdt not in dtypes:
        raise error(f"{head}: weight is {wdt}; expected {' or '.join(dtypes)}")
    if len(wshape) != 2:
        raise error(f"{head}: weight has shape {list(wshape)}; expected a 2-D [out, in] weight")
    rows, cols = wshape[0], wshape[1] * (2 if fmt == "nvfp4" else 1)
    pad = _PAD[fmt]
    ok_rows, ok_cols = {out_features, _up(out_features, pad)}, {in_features, _up(in_features, pad)}
    if rows not in ok_rows or cols not in ok_cols or cols % block:
        packed = " (two 4-bit values per byte)" if fmt == "nvfp4" else ""
        want = [out_features, in_features // 2 if fmt == "nvfp4" else in_features]
        raise error(f"{head}: weight has shape {list(wshape)}{packed}; expected {want} for a "
                    f"{in_features} -> {out_features} layer (rows and inputs padded to multiples of {pad} at most)")  # fmt: skip
    if "weight_scale" not in aux:
        raise error(f"{head}: no {layer}.weight_scale; expected {_scale_words(fmt, rows, cols)}")
    sdt, sshape = aux["weight_scale"]
    n = math.prod(sshape)
    if fmt == "int8_tensorwise":
        good = sdt in _FLOAT_NAMES and (n == 1 or (n == out_features and len(sshape) <= 2 and
                                                   sshape[0] == out_features))  # fmt: skip
    else:
        grid = _up(rows, 128) * _up(cols // block, 4)
        sdts = ("U8", "F8_E8M0") if fmt == "mxfp8" else ("F8_E4M3", "U8")
        good = sdt in sdts and n == grid
    if not good:
        raise error(f"{head}: weight_scale is {sdt} {list(sshape)}; expected {_scale_words(fmt, rows, cols)}")
    if fmt == "nvfp4":
        if "weight_scale_2" not in aux:
            raise error(f"{head}: no {layer}.weight_scale_2; expected a float32 scalar (the per-tensor scale)")
        s2dt, s2shape = aux["weight_scale_2"]
        if s2dt not in _FLOAT_NAMES or math.prod(s2shape) != 1:
            raise error(f"{head}: weight_scale_2 is {s2dt} {list(s2shape)}; expected a float32 scalar")


def _scale_words(fmt: str, rows: int, cols: int) -> str:
    if fmt == "int8_tensorwise":
        return f"a float32 scale: a scalar, or one per output row ([{rows}] or [{rows}, 1])"
    block = BLOCK_FORMATS[fmt][0]
    kind = "E8M0 bytes (uint8)" if fmt == "mxfp8" else "float8_e4m3fn"
    shape = [_up(rows, 128), _up(cols // block, 4)]
    return (f"{kind} block scales, one per {block} inputs of a row, in cuBLAS's tiled layout: "
            f"{shape} ({shape[0] * shape[1]} values)")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """A linear layer holding a ComfyUI ``int8_tensorwise`` / ``mxfp8`` / ``nvfp4`` weight as stored,
    dequantized into the input's dtype in ``forward`` (one layer at a time).

    Buffers: ``qdata`` (int8 ``[R, C]``, the e4m3 bytes ``[R, C]`` as uint8, or the packed nvfp4
    bytes ``[R, C / 2]``; ``R >= out_features``, ``C >= in_features`` when the file padded them);
    ``scale`` (int8: the float32 bits of the scalar or ``[out, 1]`` scale; mxfp8 / nvfp4: the
    unswizzled block-scale bytes ``[R, C / block]``); ``scale_2`` (nvfp4: the float32 bits of the
    per-tensor scale). ``bias`` ([out]) is a parameter in the compute dtype.
    """

    def __init__(self, fmt: str, qdata: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None, scale_2: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        if fmt not in BLOCK_FORMATS:
            raise ValueError(f"QuantLinear: unknown format {fmt!r}; expected one of {sorted(BLOCK_FORMATS)}")
        self.fmt, self.out_features, self.in_features = fmt, out_features, in_features
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_2", scale_2)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_stored(cls, fmt: str, weight: torch.Tensor, aux: dict[str, torch.Tensor], out_features: int,
                    in_features: int, bias: torch.Tensor | None = None) -> QuantLinear:  # fmt: skip
        """The layer from the tensors as the file stores them (checked with :func:`check_layer`
        first): ``weight`` and ``aux`` (``"weight_scale"``, ``"weight_scale_2"``)."""
        s = aux["weight_scale"]
        if fmt == "int8_tensorwise":
            scale = s.reshape(()) if s.numel() == 1 else s.reshape(out_features, 1)
            return cls(fmt, weight.view(torch.int8), _as_bits(scale), out_features, in_features, bias)
        q = weight.view(torch.uint8)
        rows, cols = q.shape[0], q.shape[1] * (2 if fmt == "nvfp4" else 1)
        grid = unswizzle(s.view(torch.uint8), rows, cols // BLOCK_FORMATS[fmt][0])
        s2 = _as_bits(aux["weight_scale_2"].reshape(())) if fmt == "nvfp4" else None
        return cls(fmt, q, grid, out_features, in_features, bias, s2)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The real weight ``[out, in]`` in ``dtype`` (default: the bias dtype, else bf16): a new tensor,
        computed in float32 and rounded once."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.bfloat16
        q = self.qdata
        if self.fmt == "int8_tensorwise":
            w = q.to(torch.float32).mul_(_from_bits(self.scale))
        elif self.fmt == "mxfp8":
            rows, cols = q.shape
            w = q.view(torch.float8_e4m3fn).to(torch.float32).reshape(rows, cols // 32, 32)
            w = w.mul_(e8m0_to_float(self.scale).unsqueeze(-1)).reshape(rows, cols)
        else:
            rows = q.shape[0]
            codes = torch.stack((q >> 4, q & 0x0F), dim=-1).reshape(rows, -1)
            lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=q.device)
            block = self.scale.view(torch.float8_e4m3fn).to(torch.float32) * _from_bits(self.scale_2)
            w = lut[codes.long()].reshape(rows, -1, 16).mul_(block.unsqueeze(-1)).reshape(rows, -1)
        w = w[: self.out_features, : self.in_features]
        return w.to(dtype) if w.dtype != dtype or not w.is_contiguous() else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, self.dequantized_weight(x.dtype).contiguous(), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}"


def describe(formats: dict[str, Any]) -> str:
    """``"int8_tensorwise x 12, float8_e4m3fn x 3"``: a count of the quantization formats of a file."""
    counts: dict[str, int] = {}
    for f in formats.values():
        counts[str(f)] = counts.get(str(f), 0) + 1
    return ", ".join(f"{k} x {v}" for k, v in sorted(counts.items()))
