"""Small helpers shared by the VAE, text-encoder and GGUF loaders.

- :func:`sniff` tells what a path holds from its first bytes (never its name);
- :func:`safetensors_header` reads and checks a ``.safetensors`` header without loading tensors
  (a truncated file fails here, naming what is missing);
- :func:`describe_keys` says in words what a state dict looks like, for error messages
  ("a Flux MM-DiT", "a Qwen-Image VAE (ComfyUI layout)", ...);
- :func:`strip_prefix` removes a prefix shared by the keys (checkpoint merges carry one).

Only the standard library and torch are imported here.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch


class FileFormatError(ValueError):
    """A weight file is unreadable, truncated, or not the model part that was asked for.

    The message names the file, the format that was found and what was expected.
    """


#: safetensors dtype names -> torch dtypes (those torch has).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)

FP8_DTYPES = tuple(getattr(torch, a) for a in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, a))


def sniff(path) -> str:
    """What ``path`` holds, from its content: ``"directory"``, ``"safetensors"``, ``"gguf"``,
    ``"zip"`` (a PyTorch ``.pt``/``.ckpt`` archive), ``"pickle"``, ``"empty"`` or ``"unknown"``.

    Raises :class:`FileFormatError` when the path does not exist.
    """
    p = Path(path)
    if p.is_dir():
        return "directory"
    if not p.exists():
        raise FileFormatError(f"{str(p)!r} does not exist")
    with open(p, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9:  # before pickle: a header length can start with the byte 0x80
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


FORMAT_WORDS = {
    "gguf": "a GGUF file",
    "zip": "a PyTorch zip checkpoint (.pt/.ckpt; not loaded: pickles can run code)",
    "pickle": "a PyTorch pickle checkpoint (not loaded: pickles can run code)",
    "empty": "an empty file",
    "unknown": "not a safetensors, GGUF or PyTorch file",
    "directory": "a folder",
}


def safetensors_header(path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``({name: (dtype, shape)}, metadata)`` of a safetensors file, checked against its size.

    Raises :class:`FileFormatError` for a file that is not safetensors or is truncated.
    """
    p = Path(path)
    kind = sniff(p)
    if kind != "safetensors":
        raise FileFormatError(f"{str(p)!r} is {FORMAT_WORDS.get(kind, kind)}, not a .safetensors file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise FileFormatError(
                f"{str(p)!r} is a truncated safetensors file: its header needs {8 + n} bytes but the file has "
                f"{size} (an interrupted download? download it again)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FileFormatError(f"{str(p)!r} has a corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, info in header.items():
        try:
            entries[name] = (info["dtype"], tuple(int(s) for s in info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise FileFormatError(f"{str(p)!r} has a corrupt safetensors header (entry {name!r})") from None
    if 8 + n + end > size:
        raise FileFormatError(
            f"{str(p)!r} is a truncated safetensors file: the tensors need {8 + n + end} bytes but the file has "
            f"{size} ({size / (8 + n + end):.0%}; an interrupted download? download it again)"
        )
    return entries, metadata


def common_prefix(keys: Iterable[str], candidates: Iterable[str]) -> str:
    """The first of ``candidates`` that every key starts with ('' if none)."""
    keys = list(keys)
    for c in candidates:
        if keys and all(k.startswith(c) for k in keys):
            return c
    return ""


def strip_prefix(mapping: Mapping[str, object], prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in mapping.items() if k.startswith(prefix)} if prefix else dict(mapping)


def describe_keys(keys: Iterable[str]) -> str:
    """A few words on what a state dict is, judged from its key names (for error messages)."""
    keys = set(keys)
    if not keys:
        return "a file with no tensors"

    def has(*subs: str) -> bool:
        return any(any(s in k for k in keys) for s in subs)

    if has("lora_A", "lora_B", "lora_down", "lora_up", ".hada_w1", ".lokr_w1"):
        return "a LoRA"
    if has("decoder.middle.0.residual.0.gamma"):
        if has("decoder.upsamples.0.upsamples.0."):
            return "a Wan-2.2 VAE (48 latent channels; not the Qwen-Image VAE)"
        return "a Qwen-Image / Wan-2.1 VAE (ComfyUI layout)"
    if has("decoder.mid_block.resnets.0.norm1.gamma"):
        return "a Qwen-Image VAE (diffusers layout)"
    if has("encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"):
        return "a Stable Diffusion / Flux style VAE (not the Qwen-Image VAE)"
    if has("txt_norm.weight", "img_mod.1.weight") and has("transformer_blocks.0.attn.to_q"):
        return "a Qwen-Image MM-DiT (transformer)"
    if has("double_blocks.0.img_attn", "single_transformer_blocks.0.", "single_blocks.0."):
        return "a Flux MM-DiT"
    if has("joint_blocks.0.", "model.diffusion_model.joint_blocks"):
        return "a Stable Diffusion 3 MM-DiT"
    if has("input_blocks.0.0.weight", "model.diffusion_model.input_blocks", "down_blocks.0.resnets.0.conv1.weight"):
        return "a Stable Diffusion UNet checkpoint"
    if has("blocks.0.self_attn.norm_q.weight", "head.modulation"):
        return "a Wan video DiT"
    if has("self_attn.k_proj.bias") and has("visual.blocks.", "visual.patch_embed"):
        return "a Qwen2.5-VL text encoder"
    if has("self_attn.k_proj.bias"):
        return "a Qwen2 / Qwen2.5 language model without a vision tower"
    if has("model.layers.0.", "language_model.layers.0."):
        return "a Llama-style language model (not Qwen2.5-VL)"
    if has("encoder.block.0.layer.0.SelfAttention"):
        return "a T5 text encoder"
    if has("text_model.encoder.layers.0."):
        return "a CLIP text encoder"
    sample = ", ".join(sorted(keys)[:4])
    return f"an unrecognised state dict ({len(keys)} tensors, e.g. {sample})"


def file_size_words(path) -> str:
    try:
        return f"{os.path.getsize(path) / 2**20:.1f} MiB"
    except OSError:
        return "unknown size"
