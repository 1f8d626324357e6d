"""Loads the Qwen2.5-VL-7B text encoder from the files users hold (the entry point for the text encoder).

Text-encoder formats (detected from the keys and dtypes, never the file name):

- ComfyUI's ``qwen_2.5_vl_7b.safetensors`` (bf16): the classic Hugging Face names that ComfyUI's
  ``comfy/text_encoders/llama.py`` (``Qwen25_7BVLI``) and ``qwen_vl.py`` use --
  ``model.embed_tokens``, ``model.layers.N.{self_attn,mlp,...}``, ``model.norm``, ``visual.*``
  (``patch_embed.proj``, ``blocks.N.{norm1,norm2,attn.qkv,attn.proj,mlp.*}``, ``merger.*``) and,
  when present, ``lm_head``. transformers 5 still writes this layout when it saves the model.
- ComfyUI's ``qwen_2.5_vl_7b_fp8_scaled.safetensors``: the same names with ``float8_e4m3fn``
  weights, a ``scaled_fp8`` marker and one ``<layer>.scale_weight`` per Linear (newer ComfyUI files:
  ``<layer>.weight_scale`` plus a ``<layer>.comfy_quant`` JSON tensor; ``scale_input`` /
  ``input_scale`` are only used by fp8 matmuls and are ignored). The weights are dequantized to
  the compute dtype while loading (``w = fp8 * scale``, row chunk by row chunk): the 7B encoder in
  bf16 is about 16 GB, and it runs once per prompt.
- the same names with ComfyUI's block-quantized layers (``<layer>.comfy_quant`` naming
  ``int8_tensorwise``, ``mxfp8`` or ``nvfp4``, layouts in :mod:`.comfy_quant`, or the
  ``_quantization_metadata`` header table): checked layer by layer (a missing or misshapen scale
  fails naming the layer, the format and what was expected) and dequantized to the compute dtype;
- a Qwen2.5-VL GGUF (llama.cpp's ``qwen2vl`` language model, as ComfyUI-GGUF users hold it) with
  its vision tower from the ``mmproj`` GGUF beside it: :mod:`.gguf_text_encoder`;
- the current transformers names (``model.language_model.*``, ``model.visual.*``);
- a ComfyUI checkpoint merge (``text_encoders.qwen25_7b.transformer.`` prefix), stripped;
- the diffusers ``text_encoder/`` folder (or a release folder holding one).

The config is the Qwen2.5-VL-7B preset (:data:`QWEN25_VL_7B`) when the shapes are the 7B's;
other sizes (the tests' tiny files) get a config read from the shapes (:func:`config_from_shapes`).
The model is built on the meta device and each tensor from the file is assigned to it, so two
copies of the weights never exist. A file without ``lm_head`` (ComfyUI does not use it) gets the
input embedding tied in its place: only the hidden states are used for conditioning.

The pieces live beside this loader, one idea each: the key layouts and the header check
(:mod:`.text_encoder_keys`), the config (:mod:`.text_encoder_config`), the quantized layers
(:mod:`.text_encoder_quant`), the meta model filled tensor by tensor (:mod:`.text_encoder_model`)
and the tokenizer / image processor (:func:`find_processor`, :mod:`.text_encoder_processor`). Their
public names are importable from here too: this module is the text encoder's entry point.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ._common import (
    FP8_DTYPES,
    ProcessorNotFoundError,
    TextEncoderFileError,
    load_model_folder,
    read_safetensors_header,
    sniff,
)
from .comfy_quant import QuantLinear
from .comfy_quant import describe as describe_formats
from .text_encoder_config import QWEN25_VL_7B, config_from_shapes, vision_token_ids
from .text_encoder_keys import EXPECTED, SCALE_SUFFIXES, classic_name, inspect_text_encoder, module_name
from .text_encoder_model import check_keys, empty_model, finish
from .text_encoder_processor import COMFYUI_TOKENIZER_SUBDIR, QWEN2VL_IMAGE_PROCESSOR, find_processor
from .text_encoder_quant import check_quant, dequantize, metadata_confs, quant_conf

__all__ = [
    "COMFYUI_TOKENIZER_SUBDIR",
    "ProcessorNotFoundError",
    "QWEN25_VL_7B",
    "QWEN2VL_IMAGE_PROCESSOR",
    "TextEncoderFileError",
    "config_from_shapes",
    "find_processor",
    "inspect_text_encoder",
    "load_text_encoder",
    "vision_token_ids",
]

log = logging.getLogger(__name__)


def _load_folder(folder: Path, dtype, device):
    from transformers import Qwen2_5_VLForConditionalGeneration

    def load(f: Path):
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(f, dtype=dtype, local_files_only=True)

    return load_model_folder(folder, "text_encoder", load, device, error=TextEncoderFileError, expected=EXPECTED,
                             what="text-encoder")  # fmt: skip


def load_text_encoder(
    path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    processor=None,
    config: dict | None = None,
    mmproj=None,
):
    """Load the Qwen2.5-VL text encoder as a transformers ``Qwen2_5_VLForConditionalGeneration``.

    Args:
        path: ``qwen_2.5_vl_7b.safetensors``, ``qwen_2.5_vl_7b_fp8_scaled.safetensors`` (dequantized to
            ``dtype``), a file with ComfyUI's ``int8_tensorwise`` / ``mxfp8`` / ``nvfp4`` layers
            (:mod:`.comfy_quant`; dequantized to ``dtype`` at load), a file in the current
            transformers names, a diffusers ``text_encoder/`` folder, a release folder that has one,
            or a Qwen2.5-VL GGUF (:mod:`.gguf_text_encoder`).
        dtype: Parameter / compute dtype.
        device: Where the model goes (tensors are moved there one by one while loading).
        processor: The processor (or tokenizer) that goes with the encoder; its vision token ids
            are written into the config. Needed for vocabularies smaller than Qwen's (test models).
        config: ``Qwen2_5_VLConfig`` kwargs overriding the preset / shape-derived config.
        mmproj: GGUF only: the vision tower's ``mmproj`` GGUF (default: the one found beside ``path``).

    Raises:
        TextEncoderFileError: the file is missing, truncated, not a Qwen2.5-VL text encoder,
            incomplete, or quantized in a way not supported; the message names the file, what was
            found and what was expected.
    """
    from safetensors import safe_open

    p = Path(path)
    kind = sniff(p, error=TextEncoderFileError, expected=EXPECTED)
    if kind == "directory":
        return _load_folder(p, dtype, device)
    if kind == "gguf":
        from .gguf_text_encoder import load_gguf_text_encoder

        return load_gguf_text_encoder(p, mmproj=mmproj, dtype=dtype, device=device, processor=processor,
                                      config=config)  # fmt: skip
    info = inspect_text_encoder(p)
    prefix = info["prefix"]
    header = read_safetensors_header(p, error=TextEncoderFileError, expected=EXPECTED).tensors
    with safe_open(str(p), "pt", device="cpu") as f:
        file_keys = [k for k in f.keys() if k != "scaled_fp8" and (not prefix or k.startswith(prefix))]
        by_module: dict[str, str] = {}
        scales: dict[str, str] = {}
        for k in file_keys:
            local = k[len(prefix) :]
            for suffix in SCALE_SUFFIXES:
                if local.endswith(suffix):
                    scales[module_name(local[: -len(suffix)]) + suffix] = k
                    break
            else:
                by_module[module_name(local)] = k
        confs = {owner[: -len(".comfy_quant")]: quant_conf(f.get_tensor(key))
                 for owner, key in scales.items() if owner.endswith(".comfy_quant")}  # fmt: skip
        confs.update({o: c for o, c in metadata_confs(info["metadata"], prefix).items() if o not in confs})
        shapes = dict(info["shapes"])
        for owner, conf in confs.items():  # the layer's shape, not the packed nvfp4 storage's
            w = classic_name(owner) + ".weight"
            if conf.get("format") == "nvfp4" and len(shapes.get(w, ())) == 2:
                shapes[w] = (shapes[w][0], 2 * shapes[w][1])
        model, cfg = empty_model(p, shapes, processor, config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(p, cfg, expected, by_module)
        block = check_quant(p, confs, scales, by_module, header, expected)
        state = {}
        for name, key in by_module.items():
            owner = name[: -len(".weight")] if name.endswith(".weight") else None
            if owner in block:
                aux = {sfx: f.get_tensor(scales[owner + "." + sfx]) for sfx in ("weight_scale", "weight_scale_2")
                       if owner + "." + sfx in scales}  # fmt: skip
                out_f, in_f = expected[name]
                q = QuantLinear.from_stored(block[owner], f.get_tensor(key), aux, out_f, in_f)
                state[name] = q.dequantized_weight(dtype).to(device)
                continue
            t = f.get_tensor(key)
            if tuple(t.shape) != expected[name]:
                raise TextEncoderFileError(f"{str(p)!r}: {key} has shape {tuple(t.shape)}, expected {expected[name]}")
            scale_key = owner and (scales.get(owner + ".scale_weight") or scales.get(owner + ".weight_scale"))
            if scale_key or t.dtype in FP8_DTYPES:
                state[name] = dequantize(t, f.get_tensor(scale_key) if scale_key else None, dtype, device)
            else:
                state[name] = t.to(device=device, dtype=dtype)
            del t
    if block:
        log.info("%s: %d layers in %s dequantized to %s at load", p.name, len(block), describe_formats(block),
                 str(dtype).replace("torch.", ""))  # fmt: skip
    return finish(p, model, state, device)
