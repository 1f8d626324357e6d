"""File formats the users hold, loaded straight into the core's modules.

- :mod:`.transformer_files`: the MM-DiT from one ``.safetensors`` file (bare diffusers keys or
  ComfyUI's ``model.diffusion_model.`` prefix; bf16 / fp16 / fp32, ``fp8_e4m3fn``, ComfyUI's
  "scaled fp8" and mixed-precision ``comfy_quant`` files) or from the diffusers ``transformer/``
  folder (sharded or not). fp8 weights stay fp8 in memory (:class:`FP8Linear`).
- :mod:`.lora`: LoRA files of every common layout (diffusers / PEFT, kohya, ComfyUI, Lightning),
  attached to a loaded transformer with a strength each, changed or removed without reloading.

Everything here detects the format from the file's content (header, keys, dtypes), never from
its name, and fails with a message naming the file, what was found and what was expected.
Importing this package is cheap: diffusers / accelerate are imported by the functions.
"""

from __future__ import annotations

__all__ = [
    "CheckpointFormatError",
    "FP8Linear",
    "LoraFormatError",
    "apply_loras",
    "inspect_transformer",
    "list_loras",
    "load_lora",
    "load_transformer",
    "model_memory_bytes",
    "parse_lora_spec",
    "read_lora",
    "remove_loras",
    "set_lora_strength",
]


def __getattr__(name: str):
    if name in ("CheckpointFormatError", "FP8Linear", "inspect_transformer", "load_transformer", "model_memory_bytes"):
        from . import transformer_files

        return getattr(transformer_files, name)
    if name in (
        "LoraFormatError", "apply_loras", "list_loras", "load_lora", "parse_lora_spec", "read_lora",
        "remove_loras", "set_lora_strength",
    ):  # fmt: skip
        from . import lora

        return getattr(lora, name)
    raise AttributeError(name)
