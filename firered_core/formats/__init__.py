"""File formats the users hold, loaded straight into the core's modules.

- :mod:`.transformer_files`: the MM-DiT from one ``.safetensors`` file (bare diffusers keys or
  ComfyUI's ``model.diffusion_model.`` prefix; bf16 / fp16 / fp32, ``fp8_e4m3fn``, ComfyUI's
  "scaled fp8" and mixed-precision ``comfy_quant`` files) or from the diffusers ``transformer/``
  folder (sharded or not). fp8 weights stay fp8 in memory (:class:`FP8Linear`).
- :mod:`.lora`: LoRA files of every common layout (diffusers / PEFT, kohya, ComfyUI, Lightning,
  LyCORIS LoHa / LoKr), attached to a loaded transformer with a strength each, changed or
  removed without reloading.
- :mod:`.gguf_files`: GGUF MM-DiT files (Q8_0, Q4/Q5, K-quants), kept quantized.
- :mod:`.vae_files`: the Qwen-Image VAE from ComfyUI's ``qwen_image_vae.safetensors`` layout, a
  diffusers-named file or the ``vae/`` folder.
- :mod:`.text_encoder_files`: Qwen2.5-VL-7B from ComfyUI's files (bf16, scaled fp8) or the
  ``text_encoder/`` folder, and :func:`find_processor` for the tokenizer / image settings.
- :mod:`.writers`: the other direction -- writing these layouts (tiny models, tests, benchmarks).

Every error is a :class:`FileFormatError` (a ``ValueError``).

Everything here detects the format from the file's content (header, keys, dtypes), never from
its name, and fails with a message naming the file, what was found and what was expected.
Importing this package is cheap: diffusers / accelerate are imported by the functions.
"""

from __future__ import annotations

_EXPORTS = {
    "_common": ("FileFormatError",),
    "transformer_files": ("CheckpointFormatError", "FP8Linear", "inspect_transformer", "load_transformer",
                          "model_memory_bytes"),
    "lora": ("LoraFormatError", "apply_loras", "list_loras", "load_lora", "parse_lora_spec", "read_lora",
             "remove_loras", "set_lora_strength"),
    "gguf_files": ("GGUFFileError", "inspect_gguf", "load_gguf_transformer"),
    "vae_files": ("VAEFileError", "inspect_vae", "load_vae"),
    "text_encoder_files": ("TextEncoderFileError", "ProcessorNotFoundError", "find_processor", "inspect_text_encoder",
                           "load_text_encoder"),
}

__all__ = sorted(n for names in _EXPORTS.values() for n in names)


def __getattr__(name: str):
    import importlib

    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(name)
