"""The update each LoRA layer kind adds to a linear's output: LoRA (with LoCon's mid factor and a
bias), full-weight patches and DoRA (:class:`DeltaLayer`), LyCORIS LoHa and LoKr."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .comfy_quant import QuantLinear
from .fp8_layers import FP8Linear


@dataclass
class LoraLayer:
    """One adapted linear: ``down`` [rank, in], ``up`` [out, rank], ``scale`` = alpha / rank and an
    optional ``bias`` [out] of the up projection (PEFT's ``lora_bias``). ``layer(x)`` is the output
    a strength of 1 adds: ``scale * (up(down(x)) + bias)``, in ``x.dtype``."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None
    kind = "LoRA"

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"down": self.down, "up": self.up}
        return t if self.bias is None else {**t, "bias": self.bias}

    def to(self, device, dtype):
        return type(self)(**{k: v.to(device, dtype) for k, v in self.tensors().items()}, scale=self.scale)

    def delta_weight(self) -> torch.Tensor:
        """``scale * up @ down`` ([out, in], float32): the update a strength of 1 adds to W."""
        return self.scale * (self.up.float() @ self.down.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d, u = _cast(x, self.down, self.up)
        b = None if self.bias is None else _cast(x, self.bias)[0]
        return nn.functional.linear(nn.functional.linear(x, d), u, b) * self.scale


@dataclass
class DeltaLayer(LoraLayer):
    """A full update of a layer: ``delta`` [out, in] added to its weight and / or ``delta_b``
    [out] to its bias -- a ``diff`` / ``diff_b`` patch, or a DoRA layer's ``W' - W`` (built from
    the base weight at load). ``layer(x) = x @ delta^T + delta_b``."""

    down: torch.Tensor = None  # unused
    up: torch.Tensor = None
    scale: float = 1.0
    delta: torch.Tensor | None = None
    delta_b: torch.Tensor | None = None
    kind = "diff"

    @property
    def shape(self) -> tuple[int, int] | None:
        return tuple(self.delta.shape) if self.delta is not None else None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("delta", self.delta), ("delta_b", self.delta_b)) if v is not None}

    def to(self, device, dtype):
        new = super().to(device, dtype)
        new.kind = self.kind
        return new

    def delta_weight(self) -> torch.Tensor:
        return self.delta.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta is None:
            return _cast(x, self.delta_b)[0].expand(*x.shape[:-1], -1)
        d = _cast(x, self.delta)[0]
        b = None if self.delta_b is None else _cast(x, self.delta_b)[0]
        return nn.functional.linear(x, d, b)


def dense_weight(m: nn.Module) -> torch.Tensor:
    """A layer's weight as a float32 [out, in] tensor (fp8 and GGUF weights dequantized)."""
    if isinstance(m, (FP8Linear, QuantLinear)):
        return m.dequantized_weight(torch.float32)
    w = m.weight
    if type(w).__name__ == "GGUFParameter":
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        return dequantize_gguf_tensor(w).float().reshape(m.out_features, m.in_features)
    return w.detach().float()


def dora_delta(weight: torch.Tensor, lora_delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """``W' - W`` of a DoRA layer (float32): ``W' = dora_scale * V / (||V|| + eps)``, ``V = W +
    lora_delta``, the norm along the axis ``dora_scale`` does not span (module docstring)."""
    v = weight.float() + lora_delta.float()
    m = dora_scale.float()
    if m.dim() == 1:
        m = m[:, None]
    if m.shape == (v.shape[0], 1):  # a magnitude per output row (PEFT's layout)
        norm = v.norm(dim=1, keepdim=True)
    elif m.shape == (1, v.shape[1]):  # a magnitude per input column (LyCORIS / kohya)
        norm = v.norm(dim=0, keepdim=True)
    else:
        raise ValueError(f"dora_scale of shape {tuple(dora_scale.shape)} fits neither [out, 1] nor [1, in] "
                         f"of a {v.shape[1]} -> {v.shape[0]} layer")
    return v * (m / (norm + torch.finfo(torch.float32).eps)) - weight.float()


def _cast(x: torch.Tensor, *ts: torch.Tensor):
    return [t if t.dtype == x.dtype and t.device == x.device else t.to(x.device, x.dtype) for t in ts]


@dataclass
class LoHaLayer(LoraLayer):
    """LyCORIS LoHa: ``scale * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product), scale = alpha / rank.
    Its full update is rebuilt in every forward (one extra matmul of the layer's size)."""

    down: torch.Tensor = None  # unused
    up: torch.Tensor = None
    scale: float = 1.0
    w1_a: torch.Tensor = None
    w1_b: torch.Tensor = None
    w2_a: torch.Tensor = None
    w2_b: torch.Tensor = None
    kind = "LoHa"

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w1_a": self.w1_a, "w1_b": self.w1_b, "w2_a": self.w2_a, "w2_b": self.w2_b}

    def delta_weight(self) -> torch.Tensor:
        f = [t.float() for t in self.tensors().values()]
        return self.scale * (f[0] @ f[1]) * (f[2] @ f[3])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a1, b1, a2, b2 = _cast(x, *self.tensors().values())
        return nn.functional.linear(x, (a1 @ b1) * (a2 @ b2)) * self.scale


@dataclass
class LoKrLayer(LoraLayer):
    """LyCORIS LoKr: ``scale * kron(w1, w2)``, each factor full or a low-rank product; scale = alpha /
    rank of the decomposed factor (1 when both are full). Applied without forming the Kronecker
    product: ``kron(A, B) x = vec(A X B^T)``."""

    down: torch.Tensor = None  # unused
    up: torch.Tensor = None
    scale: float = 1.0
    w1: torch.Tensor = None
    w2: torch.Tensor = None
    kind = "LoKr"

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w1": self.w1, "w2": self.w2}

    def delta_weight(self) -> torch.Tensor:
        return self.scale * torch.kron(self.w1.float(), self.w2.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _cast(x, self.w1, self.w2)
        xs = x.reshape(*x.shape[:-1], a.shape[1], b.shape[1])
        y = torch.einsum("ij,...jl,kl->...ik", a, xs, b)
        return y.reshape(*x.shape[:-1], a.shape[0] * b.shape[0]) * self.scale


def lycoris_layer(g: dict[str, torch.Tensor]) -> LoraLayer:
    """A LoHa or LoKr layer from its factors (``g``: role -> tensor), scaled as LyCORIS does."""
    alpha = float(g["alpha"].float().item()) if "alpha" in g else None
    if "hada_w1_a" in g:
        rank = g["hada_w1_b"].shape[0]
        return LoHaLayer(
            scale=alpha / rank if alpha else 1.0,
            w1_a=g["hada_w1_a"], w1_b=g["hada_w1_b"], w2_a=g["hada_w2_a"], w2_b=g["hada_w2_b"],
        )  # fmt: skip
    w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
    w2 = g["lokr_w2"] if "lokr_w2" in g else g["lokr_w2_a"] @ g["lokr_w2_b"]
    rank = g["lokr_w2_b"].shape[0] if "lokr_w2_b" in g else g["lokr_w1_b"].shape[0] if "lokr_w1_b" in g else None
    return LoKrLayer(scale=alpha / rank if alpha and rank else 1.0, w1=w1, w2=w2)
