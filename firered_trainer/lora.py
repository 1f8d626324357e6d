"""LoRA on the diffusers ``QwenImageTransformer2DModel`` through PEFT, a frozen base optionally
held in fp8, and LoRA files that load everywhere.

* :func:`add_lora` -- PEFT adapters (``rank``, ``alpha``, target-module suffixes; the presets are
  :data:`firered_trainer.config.LORA_PRESETS`, FireRed's own set by default) through diffusers'
  ``add_adapter``; the adapter weights are kept in float32 (an 8-bit or fp32 optimizer on bf16
  weights loses small updates to rounding) and everything else is frozen.
* :func:`quantize_frozen_base` -- every frozen block linear (the base layer under each adapter and
  the untargeted ones) becomes a scaled-fp8 :class:`firered_core.formats.fp8_layers.FP8Linear`
  (one float32 scale per output channel), halving the base's memory; the adapters stay float32.
* :func:`quantize_frozen_base_nf4` -- QLoRA-style: every block linear becomes a bitsandbytes 4-bit
  NF4 ``Linear4bit`` (blocks of 64 weights, one float32 absmax each: 0.5625 bytes a weight, ~0.28x
  bf16), called *before* :func:`add_lora` so that PEFT wraps them with its bnb 4-bit LoRA layer;
  the base dequantizes per matmul into the compute dtype. bitsandbytes >= 0.48 runs this on the
  CPU too (checked with 0.50.2: quantize / dequantize, forward and backward).
* :func:`save_lora` -- two files from one state:

  - **ComfyUI** (``diffusion_model.<module>.lora_A.weight`` / ``lora_B.weight`` and an explicit 0-d
    ``diffusion_model.<module>.alpha``): ComfyUI maps the ``diffusion_model.`` prefix for Qwen-Image
    and scales by ``alpha / rank`` only when the ``.alpha`` tensor is there -- PEFT's own
    ``base_model.model.`` names are not mapped at all;
  - **diffusers / PEFT** (``transformer.<module>.lora_A.weight``, with the ``lora_adapter_metadata``
    header diffusers writes, holding ``r`` / ``lora_alpha``), for ``pipe.load_lora_weights``.

  Both carry metadata: base model, rank, alpha, targets, steps and the training config.
  Every write goes to a temporary file first and is renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

ADAPTER = "default"
logger = logging.getLogger(__name__)


def add_lora(transformer: nn.Module, *, rank: int, alpha: float, modules: list[str], dropout: float = 0.0) -> int:
    """Attach PEFT LoRA adapters to ``transformer`` (in place); returns the number of trainable
    parameters. ``modules`` are PEFT target suffixes such as ``"to_q"`` or ``"img_mod.1"``."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(modules), lora_dropout=dropout,
                        init_lora_weights=True)
    try:
        transformer.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"lora.modules {modules}: PEFT found no matching layer in the MM-DiT ({e})") from None
    n = 0
    for name, p in transformer.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            n += p.numel()
        else:
            p.requires_grad_(False)
    return n


def lora_layers(transformer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``module name -> (A [rank, in], B [out, rank])`` of the trained adapters."""
    out: dict[str, list] = {}
    for name, p in transformer.named_parameters():
        for part, i in ((f".lora_A.{ADAPTER}.weight", 0), (f".lora_B.{ADAPTER}.weight", 1)):
            if name.endswith(part):
                out.setdefault(name[: -len(part)], [None, None])[i] = p.detach()
    return {k: (a, b) for k, (a, b) in out.items() if a is not None and b is not None}


def _fp8_scaled(lin: nn.Linear):
    from firered_core.formats.fp8_layers import FP8Linear

    w = lin.weight.detach().float()
    fmax = torch.finfo(torch.float8_e4m3fn).max
    scale = (w.abs().amax(dim=1, keepdim=True) / fmax).clamp_min(1e-12)
    q = (w / scale).clamp_(-fmax, fmax).to(torch.float8_e4m3fn)
    bias = lin.bias.detach().clone() if lin.bias is not None else None
    return FP8Linear(q, bias, scale).to(lin.weight.device)


def quantize_frozen_base(transformer: nn.Module) -> int:
    """Replace every frozen ``nn.Linear`` inside the MM-DiT blocks (not the adapters) by a scaled
    fp8 layer, one at a time; returns how many were converted."""
    blocks = getattr(transformer, "transformer_blocks", transformer)
    n = 0
    for parent in list(blocks.modules()):
        if isinstance(parent, nn.ModuleDict):  # PEFT's lora_A / lora_B containers
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not child.weight.requires_grad:
                setattr(parent, name, _fp8_scaled(child))
                n += 1
    return n


NF4_BLOCKSIZE = 64
# bitsandbytes' 4-bit kernels take an input width that is a whole number of quantization blocks,
# and its CPU inference path repacks the weight in tiles of 32 output rows (0.50.2,
# ``functional._convert_weight_packed_for_cpu``, used where the processor has AVX512-BF16): a
# narrower layer quantizes, then fails at its first eval forward there ("shape '[192, 0]' is
# invalid"), on such processors only. Such layers are left unquantized.
NF4_OUT_MULTIPLE = 32


def _nf4_linear(lin: nn.Linear, compute_dtype: torch.dtype, blocksize: int = NF4_BLOCKSIZE) -> nn.Module:
    import bitsandbytes as bnb

    dev = lin.weight.device
    new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                            compress_statistics=False, quant_type="nf4", device="meta")
    new.weight = bnb.nn.Params4bit(lin.weight.detach(), requires_grad=False, compress_statistics=False,
                                   quant_type="nf4", blocksize=blocksize)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.detach().to(compute_dtype).clone(), requires_grad=False)
    # bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 CPU kernel at the first eval
    # forward and keeps it packed; a training forward on the packed weight then fails (0.50.2:
    # "a view of a leaf Variable ... in-place"). A trainer alternates eval and training, so the
    # layer keeps the one layout every processor shares.
    new.support_avx512bf16_for_cpu = False
    return new.to(dev)  # quantizes (on the CPU or the GPU, wherever the weight is)


def nf4_supported(lin: nn.Linear, blocksize: int = NF4_BLOCKSIZE) -> bool:
    """Whether bitsandbytes' NF4 kernels take this linear on every device: ``in_features`` a
    multiple of the block size and ``out_features`` a multiple of 32 (all of FireRed's block
    linears are: widths 3072, 12288, 18432)."""
    return lin.in_features % blocksize == 0 and lin.out_features % NF4_OUT_MULTIPLE == 0


def quantize_frozen_base_nf4(transformer: nn.Module, *, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """QLoRA-style frozen base: replace every ``nn.Linear`` inside the MM-DiT blocks by a
    bitsandbytes NF4 ``Linear4bit`` (computing in ``compute_dtype``), one at a time, and mark the
    model ``is_loaded_in_4bit`` so that PEFT's LoRA wraps the 4-bit layers. Call it before
    :func:`add_lora`. A linear the 4-bit kernels cannot take (see :func:`nf4_supported`: a small
    layer of a tiny or custom model) stays frozen in its own precision, and one log line says how
    many and which. Returns how many layers were converted."""
    try:
        import bitsandbytes as bnb  # noqa: F401
    except ImportError as e:
        raise ImportError("model.base_precision=nf4 needs bitsandbytes (pip install 'bitsandbytes>=0.48'); "
                          f"it could not be imported ({e})") from None
    blocks = getattr(transformer, "transformer_blocks", transformer)
    n = 0
    kept: list[str] = []
    for parent_name, parent in list(blocks.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                child.requires_grad_(False)
                if not nf4_supported(child):
                    kept.append(f"{parent_name}.{name}".lstrip(".") + f" ({child.in_features}->{child.out_features})")
                    continue
                setattr(parent, name, _nf4_linear(child, compute_dtype))
                n += 1
    if kept:
        shown = ", ".join(kept[:4]) + (f", ... ({len(kept) - 4} more)" if len(kept) > 4 else "")
        logger.warning("nf4 base: %d of %d block linears stay in their own precision (bitsandbytes' 4-bit kernels "
                       "need in_features a multiple of %d and out_features a multiple of %d): %s",
                       len(kept), len(kept) + n, NF4_BLOCKSIZE, NF4_OUT_MULTIPLE, shown)
    # PEFT dispatches its bnb 4-bit LoRA layer only for a model that says it is loaded in 4 bit
    transformer.is_loaded_in_4bit = True
    return n


def frozen_linear_bytes(transformer: nn.Module) -> int:
    """Bytes held by the frozen block linears' weights and their quantization state (scales,
    absmax, code book), biases and adapters excluded: what the quantized bases shrink."""
    from firered_core.formats.fp8_layers import FP8Linear

    blocks = getattr(transformer, "transformer_blocks", transformer)
    total = 0
    for mod in blocks.modules():
        if isinstance(mod, FP8Linear):
            total += sum(b.numel() * b.element_size() for n, b in mod.named_buffers() if n.startswith("weight"))
        elif isinstance(mod, nn.Linear) and not mod.weight.requires_grad:  # plain and bnb Linear4bit
            w = mod.weight
            total += w.numel() * w.element_size()
            qs = getattr(w, "quant_state", None)
            if qs is not None:
                total += sum(t.numel() * t.element_size() for t in (qs.absmax, qs.code) if t is not None)
    return total


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def lora_metadata(*, base_model: str, rank: int, alpha: float, modules: list[str], steps: int,
                  config: dict | None = None) -> dict[str, str]:
    meta = {
        "format": "pt",
        "firered.trainer": "firered-image-edit trainer",
        "firered.base_model": base_model,
        "firered.rank": str(rank),
        "firered.alpha": str(alpha),
        "firered.target_modules": ",".join(modules),
        "firered.steps": str(steps),
    }
    if config is not None:
        meta["firered.config"] = json.dumps(config, sort_keys=True)
    return meta


def save_lora(
    transformer: nn.Module,
    comfyui_path,
    diffusers_path=None,
    *,
    rank: int,
    alpha: float,
    modules: list[str],
    base_model: str = "FireRed-Image-Edit",
    steps: int = 0,
    config: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Path]:
    """Write the trained adapters in ComfyUI's format (and the diffusers one when a path is given)."""
    layers = lora_layers(transformer)
    if not layers:
        raise ValueError("the model has no trained LoRA adapters to save (was add_lora called?)")
    meta = lora_metadata(base_model=base_model, rank=rank, alpha=alpha, modules=modules, steps=steps, config=config)
    comfy = {}
    for name, (a, b) in sorted(layers.items()):
        comfy[f"diffusion_model.{name}.lora_A.weight"] = a.to(dtype).contiguous().cpu()
        comfy[f"diffusion_model.{name}.lora_B.weight"] = b.to(dtype).contiguous().cpu()
        comfy[f"diffusion_model.{name}.alpha"] = torch.tensor(float(alpha))
    out = {"comfyui": _atomic_save(comfy, Path(comfyui_path), meta)}
    if diffusers_path is not None:
        diff = {}
        for name, (a, b) in sorted(layers.items()):
            diff[f"transformer.{name}.lora_A.weight"] = a.to(dtype).contiguous().cpu()
            diff[f"transformer.{name}.lora_B.weight"] = b.to(dtype).contiguous().cpu()
        adapter = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(modules), "lora_dropout": 0.0,
                   "use_dora": False, "bias": "none", "init_lora_weights": True}
        dmeta = dict(meta)
        dmeta["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in adapter.items()},
                                                    indent=2, sort_keys=True)
        out["diffusers"] = _atomic_save(diff, Path(diffusers_path), dmeta)
    return out


def load_lora_weights_into(transformer: nn.Module, path) -> int:
    """Continue training from a LoRA file this trainer wrote (either format): copy its A / B
    matrices into the attached adapters; returns how many layers were filled."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    params = dict(transformer.named_parameters())
    n = 0
    for key, t in sd.items():
        for pre in ("diffusion_model.", "transformer."):
            if key.startswith(pre) and key.endswith((".lora_A.weight", ".lora_B.weight")):
                mod, ab = key[len(pre):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
                target = params.get(f"{mod}.{ab}.{ADAPTER}.weight")
                if target is None or target.shape != t.shape:
                    raise ValueError(f"{path}: {key} {tuple(t.shape)} does not fit this model's adapters "
                                     "(different rank, targets or model size?)")
                with torch.no_grad():
                    target.copy_(t.to(target.dtype))
                n += 1
    if n == 0:
        raise ValueError(f"{path}: no LoRA tensors written by this trainer (diffusion_model.* / transformer.*)")
    return n // 2
