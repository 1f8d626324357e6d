"""The FireRed / Qwen-Image-Edit MM-DiT from the files users hold.

>>> model = load_transformer("models/diffusion_models/qwen_image_edit_2509_fp8_e4m3fn.safetensors")
>>> model = load_transformer("FireRed-Image-Edit-1.1/transformer")          # diffusers folder

Formats, all detected from the content (the safetensors header: key names, dtypes, metadata),
never from the file name:

- one ``.safetensors`` file whose keys are the diffusers module names
  (``transformer_blocks.0.attn.to_q.weight``), bare or under a prefix
  (``model.diffusion_model.`` as ComfyUI saves, ``diffusion_model.``, ``transformer.``, ...).
  ComfyUI's ``comfy/ldm/qwen_image/model.py`` uses the diffusers names, so no renaming is needed
  beyond the prefix. Keys of other components under another prefix (``vae.``,
  ``text_encoders.``) in an all-in-one checkpoint are ignored;
- the diffusers ``transformer/`` folder (``*.safetensors.index.json`` + shards, or one file),
  or a release folder that holds it;
- weights stored in ``float8_e4m3fn`` / ``float8_e5m2`` ("fp8" files, a plain down-cast);
- ComfyUI's "scaled fp8": a ``scaled_fp8`` marker tensor and a per-layer float32
  ``<layer>.scale_weight`` (real weight = fp8 weight * scale; ``scale_input`` is only used by
  fp8 matmul kernels and ignored here);
- ComfyUI's mixed-precision files: per-layer ``<layer>.comfy_quant`` (JSON bytes naming the
  format) and ``<layer>.weight_scale`` (and ``input_scale``), or the same layer table in the
  ``_quantization_metadata`` header entry; layers not listed stay in bf16. Formats: the fp8 ones
  (``float8_e4m3fn``, ``float8_e5m2``) become :class:`FP8Linear`; ``int8_tensorwise``, ``mxfp8``
  and ``nvfp4`` (layouts in :mod:`.comfy_quant`) become :class:`~.comfy_quant.QuantLinear`, kept
  as stored and dequantized per layer in ``forward`` (this pack has no kernels for them; one log
  line says so). Any other format, or a layer whose scales are missing or misshapen, fails naming
  the layer and the format;
- the ``__index_timestep_zero__`` marker that ComfyUI's Qwen-Image-Edit-2511 files carry (an
  empty tensor: ComfyUI's Qwen-Image model registers it when the reference pictures are to be
  conditioned at timestep 0, its ``index_timestep_zero`` reference method). It is not a weight; the
  model is built with diffusers' ``zero_cond_t=True``, which does exactly that (the reference
  tokens are modulated with the embedding of t = 0, the target tokens with the real t). FireRed's
  own files do not carry it (FireRed does not use it); ``config={"zero_cond_t": False}`` overrides.

fp8 weights stay fp8 in memory: each such ``nn.Linear`` becomes an :class:`FP8Linear` that
dequantizes its weight into the input's dtype inside ``forward`` (one layer at a time), so the
model holds about one byte per linear weight.

The architecture (blocks, width, heads, text width, channels) is read from the key shapes; the
model is built with empty (meta) weights and every tensor is read from the memory-mapped file and
assigned in place, so two copies of the weights are never held.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ._common import (
    FP8_DTYPES,
    ST_DTYPES,
    CheckpointFormatError,
    sniff,
)
from .comfy_quant import BLOCK_FORMATS, QuantLinear, check_layer
from .comfy_quant import describe as describe_formats
from .fp8_layers import FP8Linear
from .transformer_config import INDEX_TIMESTEP_ZERO, ZERO_COND_T_NOTE
from .transformer_inspect import FP8_FORMATS, TransformerCheckpoint, inspect_transformer

log = logging.getLogger(__name__)

__all__ = ["CheckpointFormatError", "QuantLinear", "TransformerCheckpoint", "inspect_transformer", "load_transformer"]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

WEIGHT_DTYPES = ("auto", "fp8_e4m3fn", "fp8_e5m2", "dequantize")


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = tensor
    else:
        raise KeyError(key)


def _downcast_fp8(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lim = torch.finfo(dtype).max
    return w.clamp(-lim, lim).to(dtype)


def load_transformer(
    path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    weight_dtype: str = "auto",
    config: dict[str, Any] | None = None,
):
    """Load the MM-DiT from a single file or a diffusers folder (see the module docstring).

    Args:
        path: a ``.safetensors`` file (any name), a diffusers ``transformer/`` folder, or a release
            folder holding one. A GGUF file is handed to :func:`.gguf_files.load_gguf_transformer`
            (``weight_dtype`` and ``config`` do not apply to it).
        dtype: compute dtype: the dtype of every non-fp8 tensor and of fp8 layers' outputs.
        device: where the weights go (they are read straight onto it, tensor by tensor).
        weight_dtype: ``"auto"`` keeps fp8 layers fp8 and loads the rest in ``dtype``;
            ``"fp8_e4m3fn"`` / ``"fp8_e5m2"`` also down-casts every full-precision linear weight
            (the memory saving of an fp8 file from a bf16 one); ``"dequantize"`` turns fp8
            layers (and comfy_quant int8 / mxfp8 / nvfp4 layers) back into plain ``nn.Linear`` in ``dtype``.
        config: overrides of the architecture read from the keys (e.g. ``{"zero_cond_t": True}``,
            which the keys cannot show).

    Returns:
        ``diffusers.QwenImageTransformer2DModel`` in eval mode, ``requires_grad_(False)``.

    Raises:
        CheckpointFormatError: unreadable or truncated file, a model of another architecture,
            an unsupported quantization, missing or unexpected keys, or wrong shapes.
    """
    import accelerate
    from diffusers import QwenImageTransformer2DModel

    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if os.path.isfile(path) and sniff(path) == "gguf":  # one entry point for every MM-DiT file
        from .gguf_files import load_gguf_transformer

        return load_gguf_transformer(path, dtype=dtype, device=device)
    ckpt = inspect_transformer(path)
    cfg = {**ckpt.config, **(config or {})}
    with accelerate.init_empty_weights(include_buffers=False):
        model = QwenImageTransformer2DModel(**cfg)
    where = f"{ckpt.path} ({ckpt.format})"

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(ckpt.entries))
    extra = sorted(set(ckpt.entries) - set(expected))
    if missing or extra:
        raise CheckpointFormatError(
            f"{where}: keys do not match a QwenImageTransformer2DModel with {cfg['num_layers']} blocks: "
            f"{len(missing)} missing (e.g. {missing[:4]}), {len(extra)} unexpected (e.g. {extra[:4]}); "
            "expected the complete diffusers key set (the file may be incomplete or of a different variant)"
        )
    block = {n: f for n, f in ckpt.quant_formats.items() if f in BLOCK_FORMATS}  # checked per layer below
    wrong = [(k, ckpt.entries[k][3], s) for k, s in expected.items()
             if ckpt.entries[k][3] != s and k[: -len(".weight")] not in block]  # fmt: skip
    if wrong:
        raise CheckpointFormatError(
            f"{where}: tensor shapes differ from the architecture read from the keys, e.g. {wrong[:3]}"
        )

    fp8_target = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}.get(weight_dtype)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    not_linear = sorted(set(block) - set(linears))
    if not_linear:
        raise CheckpointFormatError(f"{where}: {not_linear[0]!r} is quantized as {block[not_linear[0]]!r} but is not "
                                    "a linear layer of the model; expected block formats on linear layers only")  # fmt: skip
    for name, fmt in block.items():  # the header alone: nothing is read before every layer is known good
        h = ckpt.headers[ckpt.entries[name + ".weight"][0]]
        aux_info = {suf: ckpt.headers[f].tensors[k] for suf, (f, k) in ckpt.aux.get(name, {}).items()}
        if name in ckpt.scales:
            aux_info["weight_scale"] = ckpt.headers[ckpt.scales[name][0]].tensors[ckpt.scales[name][1]]
        lin = linears[name]
        check_layer(fmt, name, ckpt.quant_confs.get(name), h.tensors[ckpt.entries[name + ".weight"][1]], aux_info,
                    lin.out_features, lin.in_features, where=where, error=CheckpointFormatError)  # fmt: skip
    device = torch.device(device)
    handles: dict[str, Any] = {}

    def get(file_key: tuple[str, str]) -> torch.Tensor:
        f, k = file_key
        if f not in handles:
            handles[f] = open(f, "rb")
        return ckpt.headers[f].read(handles[f], k).to(device)

    def stored_fp8(layer: str) -> torch.dtype | None:
        if layer in ckpt.quant_formats:
            return FP8_FORMATS[ckpt.quant_formats[layer]]
        dt = ST_DTYPES.get(ckpt.entries[layer + ".weight"][2])
        return dt if dt in FP8_DTYPES else None

    def put(name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

    done: set[str] = set()
    n_fp8 = n_block = 0
    try:
        for name, fmt in block.items():
            lin, wkey = linears[name], name + ".weight"
            aux = {suf: get(fk) for suf, fk in ckpt.aux.get(name, {}).items()}
            aux["weight_scale"] = get(ckpt.scales[name])
            bias = get(ckpt.entries[name + ".bias"][:2]).to(dtype) if lin.bias is not None else None
            q = QuantLinear.from_stored(fmt, get(ckpt.entries[wkey][:2]), aux, lin.out_features, lin.in_features, bias)
            if weight_dtype == "dequantize":
                _set_tensor(model, wkey, q.dequantized_weight(dtype))
                if bias is not None:
                    _set_tensor(model, name + ".bias", bias)
            else:
                put(name, q)
                n_block += 1
            done.update((wkey, name + ".bias"))
        for name, lin in linears.items():
            wkey = name + ".weight"
            if wkey in done:
                continue
            fp8 = stored_fp8(name)
            if fp8 is None and fp8_target is None:
                continue
            w = get(ckpt.entries[wkey][:2])
            if fp8 is not None and w.dtype not in FP8_DTYPES:
                w = w.view(fp8)  # comfy_quant files may store fp8 bytes in a uint8 / int8 container
            scale = get(ckpt.scales[name]) if name in ckpt.scales else None
            bias = get(ckpt.entries[name + ".bias"][:2]).to(dtype) if lin.bias is not None else None
            if fp8 is None:  # full-precision weight, down-cast on request
                if scale is not None:
                    w, scale = w.to(torch.float32) * scale.to(torch.float32), None
                w = _downcast_fp8(w, fp8_target)
            if weight_dtype == "dequantize":
                deq = w.to(torch.float32) * (scale.to(torch.float32) if scale is not None else 1.0)
                _set_tensor(model, wkey, deq.to(dtype))
                if bias is not None:
                    _set_tensor(model, name + ".bias", bias)
            else:
                put(name, FP8Linear(w, bias, scale))
                n_fp8 += 1
            done.update((wkey, name + ".bias"))
        for key, (f, k, _, _) in ckpt.entries.items():
            if key in done:
                continue
            t = get((f, k))
            layer = key[: -len(".weight")] if key.endswith(".weight") else None
            if layer in ckpt.scales:
                t = t.to(torch.float32) * get(ckpt.scales[layer]).to(torch.float32)
            _set_tensor(model, key, t.to(dtype))
    finally:
        for fh in handles.values():
            fh.close()

    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointFormatError(f"{where}: these tensors were never loaded: {left[:5]}")
    model.to(device)
    model.eval().requires_grad_(False)
    model.firered_source = {"path": ckpt.path, "format": ckpt.format, "fp8_linears": n_fp8,
                            "quant_linears": n_block, "zero_cond_t": bool(cfg.get("zero_cond_t"))}  # fmt: skip
    log.info(
        "loaded the MM-DiT from %s: %d blocks, width %d, %d fp8 linears",
        where,
        cfg["num_layers"],
        cfg["num_attention_heads"] * cfg["attention_head_dim"],
        n_fp8,
    )
    if n_block:
        log.info("%s: %d linears (%s) stay quantized and are dequantized per layer in forward: this pack has no "
                 "int8 / mxfp8 / nvfp4 matmul kernel on any device (the matmul runs in %s)", ckpt.path, n_block,
                 describe_formats({n: block[n] for n in block}), str(dtype).replace("torch.", ""))  # fmt: skip
    if INDEX_TIMESTEP_ZERO in ckpt.markers:
        log.info("%s: %s%s", ckpt.path, ZERO_COND_T_NOTE,
                 "" if cfg.get("zero_cond_t") else " -- but config overrides set zero_cond_t=False: reference "
                 "pictures are conditioned at the sampling timestep, which is not how this model was trained")  # fmt: skip
    return model
