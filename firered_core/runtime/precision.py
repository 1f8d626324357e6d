"""Compute precision of the MM-DiT: fp8 and int8 weights, scaled fp8 matmuls, block compilation.

What to pick (20.4 GB of fp8 / int8 weights instead of 40.9 GB of bf16):

- **scaled fp8** (``quantize_weights(model, "fp8_scaled")``, or a ComfyUI ``*_fp8_scaled``
  file): one float32 scale per output channel, so every row uses the full fp8 range. The
  Lightning LoRAs on a *plainly down-cast* fp8 base (``fp8_e4m3fn`` files, ``weight_dtype=
  "fp8_e4m3fn"``) are reported to give grid artefacts (Qwen-Image-Lightning issue #32); scaled fp8
  avoids it. **Pick scaled fp8 whenever you use a Lightning LoRA in fp8.**
- **fp8 matmul** (``enable_fp8_matmul``): on Ada / Hopper / Blackwell (compute capability >= 8.9)
  an fp8 layer's matmul runs as ``torch._scaled_mm`` -- the activation is quantized per call to
  e4m3 with a per-tensor scale, the weight's per-channel scale is applied to the output -- which
  doubles the linear FLOP rate. Elsewhere (and for e5m2 weights, or shapes that are not multiples
  of 16) the layer upcasts its weight per call (``FP8Linear``'s own path). It changes the numbers
  (activation rounding), so it is opt-in.
- **int8 weight-only** (``"int8"``): :class:`Int8Linear`, symmetric int8 with a per-output-channel
  scale, dequantized per call. Same memory as fp8, works on every GPU (and the CPU), typically a
  little more accurate than e4m3; saves memory, not FLOPs. (torchao is not required; this small
  layer keeps block swapping and LoRA working; torchao is not installed in CI and not used.)

Block compilation (:func:`compile_blocks`): ``torch.compile`` of each repeated
``QwenImageTransformerBlock``'s forward (one graph shared by the 60 identical blocks; the hooks of
block swap stay outside the graph). The warm-up is paid at the first forward and again for each new
picture size: measured on the CPU (``bench/speed_options.py``, 6 blocks of width 384, 192x192, 2
busy cores) the first sampling run took 125 s against 27 s eager, then ran at 0.57x the eager time;
on a GPU expect tens of seconds (not measured here).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..formats.fp8_layers import FP8Linear

log = logging.getLogger(__name__)

WEIGHT_MODES = ("int8", "fp8_scaled")
E4M3_MAX = 448.0


class Int8Linear(nn.Module):
    """A linear layer with int8 weights ``[out, in]`` and a float32 per-output-channel scale
    ``[out, 1]`` (``w ~ weight_int8 * scale``); ``forward`` dequantizes into the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"Int8Linear needs a 2-D floating weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        w = weight.detach().to(torch.float32)
        scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
        self.register_buffer("weight_int8", torch.round(w / scale).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def fp8_scaled_linear(lin: nn.Linear, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> FP8Linear:
    """An :class:`FP8Linear` with a per-output-channel scale (``absmax / fp8 max``) from a linear."""
    w = lin.weight.detach().to(torch.float32)
    fmax = torch.finfo(fp8_dtype).max
    scale = (w.abs().amax(dim=1, keepdim=True) / fmax).clamp_min(1e-12)
    wq = (w / scale).clamp_(-fmax, fmax).to(fp8_dtype)
    bias = lin.bias.detach().clone() if lin.bias is not None else None
    return FP8Linear(wq, bias, scale)


def _block_linears(model: nn.Module):
    """(parent, child name, linear) for every plain ``nn.Linear`` inside the MM-DiT blocks (the 846
    large linears; the small top-level ones -- img_in, txt_in, proj_out, embeddings -- stay)."""
    root = getattr(model, "transformer_blocks", model)
    for parent in root.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                yield parent, name, child


def quantize_weights(model: nn.Module, mode: str) -> int:
    """Replace the block linears of ``model`` in place, one at a time (so the peak is one layer):
    ``"int8"`` -> :class:`Int8Linear`, ``"fp8_scaled"`` -> :class:`FP8Linear` with per-channel
    scales. Returns the number of layers converted."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode must be one of {WEIGHT_MODES}, got {mode!r}")
    n = 0
    for parent, name, lin in list(_block_linears(model)):
        new = Int8Linear(lin.weight, lin.bias) if mode == "int8" else fp8_scaled_linear(lin)
        new.to(lin.weight.device)
        setattr(parent, name, new)
        n += 1
    log.info("quantized %d MM-DiT linears to %s", n, mode)
    return n


# ---------------------------------------------------------------------------------------------
# fp8 matmul
# ---------------------------------------------------------------------------------------------


def fp8_matmul_supported(device) -> bool:
    """True on CUDA devices of compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class FP8MatmulLinear(FP8Linear):
    """:class:`FP8Linear` whose matmul runs in fp8 (``torch._scaled_mm``) when it can.

    ``y = (x / sx)_e4m3 @ W_e4m3^T * sx * s_w + b``: the activation gets a per-tensor scale
    ``sx = max|x| / 448`` each call; the weight's scale (per tensor or per output channel) is applied
    by the kernel ("rowwise" scales, bf16 output and fused bias: Hopper, and the CPU) or, where the
    kernel refuses, to an fp32 output afterwards ("tensor" mode). Falls back to the upcast path for
    e5m2 weights, sizes that are not multiples of 16, or when ``_scaled_mm`` refuses both."""

    _mode = "rowwise"  # -> "tensor" -> "off": this layer's path, downgraded (for this layer only) at its first refusal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self._mode != "off" and self.fp8_dtype == torch.float8_e4m3fn and self.in_features % 16 == 0
                and self.out_features % 16 == 0):
            return super().forward(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        # the activation scaled in its own dtype (no float32 copy of it: on a GPU this pass costs more
        # than the fp8 matmul saves otherwise); the kernel undoes exactly the factor applied
        inv = (E4M3_MAX / x2.abs().amax().float().clamp_min(1e-12)).to(x2.dtype)
        sx = 1.0 / inv.float()
        xq = (x2 * inv).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        w = self.weight_fp8.view(torch.float8_e4m3fn)
        y = None
        if self._mode == "rowwise" and x.dtype == torch.bfloat16:
            ws = self.weight_scale if self.weight_scale is not None else torch.ones((), device=x.device)
            sb = ws.float().reshape(1, -1).expand(1, self.out_features).contiguous()
            sa = sx.reshape(1, 1).expand(x2.shape[0], 1).contiguous()
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            try:
                y = torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=x.dtype)
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:  # torch's checks raise all four
                log.info("rowwise-scaled fp8 matmul unavailable (%s); applying weight scales after the matmul", e)
                self._mode = "tensor"
        if y is None:
            one = torch.ones((), device=x.device, dtype=torch.float32)
            try:
                y = torch._scaled_mm(xq, w.t(), scale_a=sx.reshape(()), scale_b=one, out_dtype=torch.float32)
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:  # an unsupported device or layout: upcast from now on
                log.info("fp8 matmul unavailable (%s); upcasting fp8 weights per layer instead", e)
                self._mode = "off"
                return super().forward(x)
            if self.weight_scale is not None:
                y = y * (self.weight_scale.reshape(1, -1) if self.weight_scale.dim() else self.weight_scale)
            y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def enable_fp8_matmul(model: nn.Module, *, force: bool = False) -> int:
    """Switch every :class:`FP8Linear` of ``model`` to :class:`FP8MatmulLinear` when the device
    supports fp8 matmuls (``force`` skips the device check, e.g. for CPU tests). Returns how many
    layers were switched (0 when unsupported: a log line says so)."""
    from ..model.modules import module_device

    device = module_device(model)
    if not force and not fp8_matmul_supported(device):
        log.info("fp8 matmul needs a CUDA GPU of compute capability >= 8.9 (found %s): fp8 weights are upcast per layer", device)
        return 0
    n = 0
    for m in model.modules():
        if type(m) is FP8Linear:
            m.__class__ = FP8MatmulLinear
            n += 1
    return n


def disable_fp8_matmul(model: nn.Module) -> None:
    for m in model.modules():
        if type(m) is FP8MatmulLinear:
            m.__class__ = FP8Linear


# ---------------------------------------------------------------------------------------------
# compilation
# ---------------------------------------------------------------------------------------------


def compile_blocks(transformer: nn.Module, *, dynamic: bool | None = None, mode: str | None = None) -> int:
    """``torch.compile`` each MM-DiT block's ``forward`` (regional compilation; the repeated blocks
    share one compiled graph). Returns the number of blocks compiled. Undo with :func:`uncompile_blocks`."""
    import torch._dynamo

    blocks = transformer.transformer_blocks
    cfg = torch._dynamo.config
    key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, key, max(getattr(cfg, key), 8 * len(blocks)))  # one entry per picture size and block
    for b in blocks:
        if "forward" not in b.__dict__:
            b.forward = torch.compile(b.forward, dynamic=dynamic, mode=mode)
    return len(blocks)


def uncompile_blocks(transformer: nn.Module) -> None:
    for b in transformer.transformer_blocks:
        b.__dict__.pop("forward", None)
