"""Where a Qwen2.5-VL text-encoder file's tensors belong: its two key layouts, its prefix, and a header check.

A file names its tensors in the classic Hugging Face layout that ComfyUI uses (``model.embed_tokens``,
``model.layers.N``, ``visual.*``) or in transformers 5's (``model.language_model.*``,
``model.visual.*``), possibly under a checkpoint-merge prefix (:data:`PREFIXES`). :func:`module_name`
maps either to the module names of ``Qwen2_5_VLForConditionalGeneration``; :func:`classic_name` goes
back, so shapes are compared in one layout. :func:`inspect_text_encoder` reads a file's header only.
"""

from __future__ import annotations

from pathlib import Path

from ._common import TextEncoderFileError, common_prefix, describe_keys, read_safetensors_header

__all__ = ["EXPECTED", "PREFIXES", "SCALE_SUFFIXES", "classic_name", "inspect_text_encoder", "module_name"]

EXPECTED = (
    "the Qwen2.5-VL-7B text encoder (ComfyUI's qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors, "
    "or a diffusers text_encoder/ folder)"
)
PREFIXES = ("text_encoders.qwen25_7b.transformer.", "qwen25_7b.transformer.", "text_encoder.", "transformer.")
#: the suffixes of a quantized layer's side tensors (scales, comfy_quant entries) next to its ``weight``
SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2",
                   ".pre_quant_scale")  # fmt: skip


def module_name(key: str) -> str:
    """File key (either layout) -> module name in transformers 5's Qwen2_5_VLForConditionalGeneration."""
    if key.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    return key


def classic_name(module_name: str) -> str:
    """Module name -> the classic (ComfyUI) name, used to read shapes in one layout."""
    if module_name.startswith("model.visual."):
        return module_name[len("model.") :]
    if module_name.startswith("model.language_model."):
        return "model." + module_name[len("model.language_model.") :]
    return module_name


def inspect_text_encoder(path) -> dict:
    """Read a text-encoder file's header: ``{"prefix", "shapes" (classic names), "dtypes",
    "scaled" (True for ComfyUI scaled fp8), "quant_formats"}``. Raises :class:`TextEncoderFileError`."""
    p = Path(path)
    h = read_safetensors_header(p, error=TextEncoderFileError, expected=EXPECTED)
    header, metadata = h.tensors, h.metadata
    prefix = common_prefix([k for k in header if k != "scaled_fp8"], PREFIXES)
    shapes, dtypes = {}, {}
    scaled = "scaled_fp8" in header or "scaled_fp8" in metadata
    for k, (dt, shape) in header.items():
        if k == "scaled_fp8":
            continue
        local = k[len(prefix) :] if prefix and k.startswith(prefix) else k
        classic = classic_name(module_name(local))
        if classic.endswith(SCALE_SUFFIXES):
            scaled = True
        shapes[classic] = shape
        dtypes[classic] = dt
    keys = set(shapes)
    if "model.embed_tokens.weight" not in keys or "model.layers.0.self_attn.k_proj.bias" not in keys:
        raise TextEncoderFileError(f"{str(p)!r} is {describe_keys(keys)}, but {EXPECTED} was expected")
    if "visual.patch_embed.proj.weight" not in keys:
        raise TextEncoderFileError(
            f"{str(p)!r} is {describe_keys(keys)}: it has no vision tower (visual.*), but {EXPECTED} was expected "
            "(FireRed reads the input pictures with it)"
        )
    return {"prefix": prefix, "shapes": shapes, "dtypes": dtypes, "scaled": scaled, "metadata": metadata}

