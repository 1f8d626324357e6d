"""The fp8 linear layer of fp8 and ComfyUI "scaled fp8" MM-DiT files (:class:`FP8Linear`: weights
kept in 8 bits, a scaled ``_scaled_mm`` matmul where the device has one, else an upcast copy kept
while memory allows), and the memory accounting of models built from it."""

from __future__ import annotations

import torch
from torch import nn

from ._common import FP8_DTYPES

# Upcast copies kept on the CPU must leave this much of the machine's memory available (the rule of
# ``FP8Linear.keep_upcast = None``): a quarter of the RAM, and at least 2 GiB.
UPCAST_RESERVE_FRACTION = 0.25
UPCAST_RESERVE_MIN = 2 << 30


def _meminfo() -> tuple[int, int] | None:
    """(MemAvailable, MemTotal) in bytes from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            vals = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split(":")[0] in
                    ("MemAvailable", "MemTotal")}
        return vals["MemAvailable"], vals["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


def upcast_fits(nbytes: int) -> bool:
    """The memory rule of the automatic upcast copy: ``nbytes`` more leaves at least
    ``max(UPCAST_RESERVE_FRACTION x RAM, UPCAST_RESERVE_MIN)`` available (False where unknown)."""
    info = _meminfo()
    if info is None:
        return False
    avail, total = info
    return avail - nbytes >= max(UPCAST_RESERVE_FRACTION * total, UPCAST_RESERVE_MIN)


def fp8_to(w8: torch.Tensor, fp8_dtype: torch.dtype, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """``(t, f)`` with ``t * f`` exactly the fp8 values (raw bytes ``w8``, uint8) in ``dtype``; ``t``
    is a new tensor (the caller may scale it in place).

    On the CPU torch converts fp8 element by element; here the bytes are moved into place with
    vectorised integer ops instead (2-3x faster, bit-exact for every finite code): e4m3 into the
    top of a float32 / bfloat16 (sign, 4 exponent and 3 mantissa bits), which reads as the value
    times 2^-120 (subnormals included), so ``f = 2**120``, to be folded into the scale; e5m2 is the
    top byte of a float16. Elsewhere (GPUs convert in hardware) a plain ``.to(dtype)``, ``f = 1``.
    """
    if w8.device.type == "cpu":
        if fp8_dtype == torch.float8_e4m3fn and dtype in (torch.float32, torch.bfloat16):
            # sign-extend the byte, shift it into place, keep the sign and the 7 low bits (one
            # allocation, updated in place: no temporaries for the allocator to churn through)
            if dtype == torch.float32:
                i = w8.view(torch.int8).to(torch.int32)
                return i.bitwise_left_shift_(20).bitwise_and_(0x87F00000 - (1 << 32)).view(torch.float32), 2.0**120
            i = w8.view(torch.int8).to(torch.int16)
            return i.bitwise_left_shift_(4).bitwise_and_(0x87F0 - (1 << 16)).view(torch.bfloat16), 2.0**120
        if fp8_dtype == torch.float8_e5m2:
            h = w8.to(torch.int16).bitwise_left_shift_(8).view(torch.float16)
            return (h if dtype == torch.float16 else h.to(dtype)), 1.0
    return w8.view(fp8_dtype).to(dtype), 1.0


class FP8Linear(nn.Module):
    """A linear layer whose weight stays fp8 in memory and is dequantized in ``forward``.

    The weight is held as a ``uint8`` buffer ``weight_fp8`` ([out, in], the raw fp8 bytes) so that
    ``model.to(dtype)`` can never upcast it and ``next(model.parameters()).dtype`` stays the compute
    dtype; ``weight_scale`` (float32, scalar or [out, 1]) multiplies it when present (scaled fp8).
    ``bias`` ([out]) is a parameter in the compute dtype. ``forward(x)`` computes
    ``x @ (w_fp8.to(x.dtype) * scale).T + bias`` in ``x.dtype``.

    The upcast copy (``keep_upcast``): dequantizing per call costs a pass over the weight, which on
    the CPU (no fp8 hardware) made a small model's step 1.68x the bf16 one. ``keep_upcast = True``
    keeps the dequantized weight after the first call (per dtype and device; ``.to()`` and a new
    weight drop it), so later calls cost what a bf16 layer costs, at the price of the upcast
    copy's memory on top of the fp8 bytes; ``False`` never keeps it (the fp8 memory saving
    stays whole); ``None`` (the default) decides by this rule: keep it **only on the CPU, and only
    while the machine keeps at least a quarter of its RAM (and 2 GiB) available after the copy**
    (:func:`upcast_fits`) -- never on a GPU, where fp8 is there to save memory and the upcast runs
    in hardware at memory bandwidth; never while ``torch.compile`` traces. Set it on every layer
    with :func:`set_fp8_upcast`. The copy holds the same numbers as the per-call upcast.
    """

    keep_upcast: bool | None = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype not in FP8_DTYPES or weight.dim() != 2:
            raise ValueError(f"FP8Linear needs a 2-D fp8 weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.fp8_dtype = weight.dtype
        self.register_buffer("weight_fp8", weight.view(torch.uint8))
        if scale is not None:
            scale = scale.to(torch.float32)
            if scale.numel() == self.out_features and scale.numel() > 1:
                scale = scale.reshape(self.out_features, 1)
            elif scale.numel() != 1:
                raise ValueError(
                    f"weight scale of shape {tuple(scale.shape)} does not fit a weight {tuple(weight.shape)}"
                )
            else:
                scale = scale.reshape(())
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._upcast = None  # (key, tensor): the kept upcast copy

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The real weight ([out, in]) in ``dtype`` (default: the bias dtype, else bf16): a new tensor."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.bfloat16
        w, f = fp8_to(self.weight_fp8, self.fp8_dtype, dtype)  # a fresh tensor: scaled in place
        s = self.weight_scale
        if s is not None:
            s = s.to(dtype)
            if f != 1.0 and bool((s.abs() < 2.0**6).all()):  # f folds into the scale exactly
                return w.mul_(s * f)
            if f != 1.0:
                w.mul_(f)
            return w.mul_(s)
        return w.mul_(f) if f != 1.0 else w

    def _keep(self, x: torch.Tensor) -> bool:
        keep = self.keep_upcast
        if keep is False or torch.compiler.is_compiling():
            return False
        if keep is None:
            return x.device.type == "cpu" and upcast_fits(self.out_features * self.in_features * x.element_size())
        return True

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The real weight in ``x``'s dtype: the kept upcast copy where there is one (or one is
        kept now, see ``keep_upcast``), else a fresh dequantization."""
        if self.keep_upcast is False or torch.compiler.is_compiling() or (
                self.keep_upcast is None and x.device.type != "cpu"):
            return self.dequantized_weight(x.dtype)
        s = self.weight_scale
        key = (x.dtype, self.weight_fp8.device, self.weight_fp8.data_ptr(), None if s is None else s.data_ptr())
        kept = self.__dict__.get("_upcast")
        if kept is not None and kept[0] == key:
            return kept[1]
        self._upcast = None
        if not self._keep(x):
            return self.dequantized_weight(x.dtype)
        with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, usable in any mode
            w = self.dequantized_weight(x.dtype)
        self._upcast = (key, w)
        return w

    def drop_upcast(self) -> None:
        self._upcast = None

    def _apply(self, fn, recurse=True):
        self._upcast = None  # .to() / .cuda() / .half(): the copy would be stale (and held in vain)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, self.weight_for(x), bias)

    def extra_repr(self) -> str:
        scaled = ", scaled" if self.weight_scale is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fp8_dtype}{scaled}"


def set_fp8_upcast(model: nn.Module, keep: bool | None) -> int:
    """Set ``keep_upcast`` (True / False / None = the automatic rule, see :class:`FP8Linear`) on every
    fp8 layer of ``model``, dropping copies it no longer keeps. Returns the number of layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.keep_upcast = keep
            if keep is False:
                m.drop_upcast()
            n += 1
    return n


def upcast_bytes(model: nn.Module) -> int:
    """Bytes of the upcast copies the fp8 layers of ``model`` keep now (not in :func:`model_memory_bytes`)."""
    return sum(m._upcast[1].nbytes for m in model.modules()
               if isinstance(m, FP8Linear) and m.__dict__.get("_upcast") is not None)


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total
