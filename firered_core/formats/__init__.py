"""File formats the users hold, loaded straight into the core's modules.

Every loader detects the format from the file's content (its first bytes, the safetensors header:
key names, dtypes, metadata; the GGUF header), never from its name, and fails with a message
naming the file, what was found and what was expected.

- MM-DiT (transformer), :mod:`.transformer_files` -- :func:`load_transformer`,
  :func:`inspect_transformer`: one ``.safetensors`` file with the diffusers key names, bare or
  under a prefix (ComfyUI's ``model.diffusion_model.``, ``diffusion_model.``, ``transformer.``;
  the other components of an all-in-one checkpoint are ignored), in bf16 / fp16 / fp32,
  ``float8_e4m3fn`` / ``float8_e5m2``, ComfyUI's "scaled fp8" (``scaled_fp8`` marker +
  per-layer ``scale_weight``) or mixed precision (per-layer ``comfy_quant`` / ``weight_scale``, or
  ``_quantization_metadata``); or the diffusers ``transformer/`` folder (sharded or not) or a
  release folder holding it. fp8 weights stay fp8 in memory (:class:`FP8Linear`); ComfyUI's
  ``int8_tensorwise`` / ``mxfp8`` / ``nvfp4`` layers stay as stored (:class:`QuantLinear`,
  :mod:`.comfy_quant`); a Qwen-Image-Edit-2511 ``__index_timestep_zero__`` marker builds the model
  with ``zero_cond_t``. A GGUF file given to :func:`load_transformer` goes to the GGUF loader.
- GGUF MM-DiT, :mod:`.gguf_files` -- :func:`load_gguf_transformer`, :func:`inspect_gguf`:
  city96 ComfyUI-GGUF files (``general.architecture = "qwen_image"``, or sd.cpp files judged by
  their keys): F32 / F16 / BF16, Q8_0, Q4_0 / Q4_1 / Q5_0 / Q5_1, the K-quants, kept quantized and
  dequantized layer by layer in ``forward``.
- LoRA, :mod:`.lora` -- :func:`load_lora`, :func:`apply_loras`, :func:`read_lora`,
  :func:`list_loras`, :func:`set_lora_strength`, :func:`remove_loras`, :func:`sync_loras`,
  :func:`parse_lora_spec`:
  diffusers / PEFT (``lora_A`` / ``lora_B``, ``adapter_config.json`` or
  ``lora_adapter_metadata``), kohya (``lora_unet_..._lora_down``), ComfyUI (``diffusion_model.``),
  Lightning (``lora_down`` / ``lora_up`` / ``alpha``), LyCORIS LoHa / LoKr; attached to a loaded
  transformer (full precision, fp8 or GGUF) with a strength each, changed or removed without
  reloading it.
- VAE, :mod:`.vae_files` -- :func:`load_vae`, :func:`inspect_vae`: ComfyUI's
  ``qwen_image_vae.safetensors`` (the Wan-2.1 layout), the same weights in diffusers names, or the
  ``vae/`` folder; a ``vae.`` / ``first_stage_model.`` prefix is stripped.
- Text encoder, :mod:`.text_encoder_files` -- :func:`load_text_encoder`,
  :func:`inspect_text_encoder` (:mod:`.text_encoder_keys`), :func:`find_processor`
  (:mod:`.text_encoder_processor`): Qwen2.5-VL-7B from ComfyUI's files (bf16,
  scaled fp8, comfy_quant int8 / mxfp8 / nvfp4; classic or transformers-5 key names, under a prefix
  or not), a GGUF with its mmproj vision tower (:mod:`.gguf_text_encoder`) or the
  ``text_encoder/`` folder; the tokenizer and image settings are looked for beside the file, in
  a ComfyUI install and in a release folder.
- :mod:`.writers`: the other direction -- writing these layouts (tiny models, tests, benchmarks).

Errors, all from :mod:`._common`: :class:`FileFormatError` (a ``ValueError``) is the base of
:class:`CheckpointFormatError` (transformer files; :class:`GGUFFileError` is one),
:class:`LoraFormatError`, :class:`VAEFileError`, :class:`TextEncoderFileError` and
:class:`ProcessorNotFoundError` (also a ``FileNotFoundError``).

Importing this package is cheap: a name is imported from its module on first use, and
diffusers / transformers / accelerate / gguf are imported by the functions that need them.
"""

from __future__ import annotations

_EXPORTS = {
    "_common": (
        "CheckpointFormatError",
        "FileFormatError",
        "GGUFFileError",
        "LoraFormatError",
        "ProcessorNotFoundError",
        "TextEncoderFileError",
        "VAEFileError",
        "describe_keys",
        "read_safetensors_header",
        "sniff",
    ),
    "transformer_files": ("inspect_transformer", "load_transformer"),
    "fp8_layers": ("FP8Linear", "model_memory_bytes"),
    "comfy_quant": ("QuantLinear",),
    "gguf_files": ("inspect_gguf", "is_gguf", "load_gguf_transformer", "quantized_linear_count"),
    "lora": (
        "apply_loras",
        "list_loras",
        "load_lora",
        "parse_lora_spec",
        "read_lora",
        "remove_loras",
        "set_lora_strength",
        "sync_loras",
    ),
    "vae_files": ("inspect_vae", "load_vae"),
    "text_encoder_files": ("load_text_encoder",),
    "text_encoder_keys": ("inspect_text_encoder",),
    "text_encoder_processor": ("find_processor",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
