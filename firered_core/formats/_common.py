"""What every loader in :mod:`firered_core.formats` shares.

- the error hierarchy: :class:`FileFormatError` (a ``ValueError``) and one subclass per kind of
  file, so a caller catches one class for every weight file and a loader raises its own;
- :func:`sniff` tells what a path holds from its first bytes (never its name);
- :func:`read_safetensors_header` reads and checks a ``.safetensors`` header without loading a
  tensor (a truncated file fails here, naming what is missing) and reads single tensors later;
- :func:`describe_keys` says in words what a state dict is, for error messages
  ("a Flux-style MM-DiT", "a Qwen-Image VAE (diffusers layout)", ...);
- :func:`common_prefix` finds the prefix checkpoint merges put on the keys;
- :func:`load_model_folder` loads a diffusers / transformers model folder (or a release's sub-folder).

Only the standard library and torch are imported here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

__all__ = [
    "CheckpointFormatError",
    "FileFormatError",
    "GGUFFileError",
    "LoraFormatError",
    "ProcessorNotFoundError",
    "SafetensorsHeader",
    "TextEncoderFileError",
    "VAEFileError",
    "common_prefix",
    "describe_keys",
    "load_model_folder",
    "read_safetensors_header",
    "sniff",
]

# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


class FileFormatError(ValueError):
    """A weight file is unreadable, truncated, or not the model part that was asked for.

    The base of every error in :mod:`firered_core.formats`; the message names the file, what was
    found in it and what was expected.
    """


class CheckpointFormatError(FileFormatError):
    """An MM-DiT (transformer) checkpoint -- file or diffusers folder -- is unreadable, of another
    model, incomplete, or quantized in a way not supported."""


class GGUFFileError(CheckpointFormatError):
    """A GGUF file is not a readable Qwen-Image MM-DiT, or uses a quantization not supported.
    (A :class:`CheckpointFormatError`: :func:`load_transformer` hands GGUF files on.)"""


class LoraFormatError(FileFormatError):
    """A LoRA file is unreadable or matches nothing in the model."""


class VAEFileError(FileFormatError):
    """The file is not a Qwen-Image VAE in a layout the VAE loader knows."""


class TextEncoderFileError(FileFormatError):
    """The file is not a Qwen2.5-VL text encoder in a layout the text-encoder loader knows."""


class ProcessorNotFoundError(FileFormatError, FileNotFoundError):
    """No Qwen2.5-VL tokenizer / processor was found; the message lists where it looked and what to
    do. Also a ``FileNotFoundError``."""


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------

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
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)

FP8_DTYPES = tuple(getattr(torch, a) for a in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, a))

# ---------------------------------------------------------------------------------------------
# what a path holds
# ---------------------------------------------------------------------------------------------

#: the longest safetensors JSON header taken for one (real ones are well under a megabyte)
MAX_HEADER = 100_000_000


def sniff(path, *, error: type[FileFormatError] = FileFormatError, expected: str = "a weight file") -> str:
    """What ``path`` holds, from its content: ``"directory"``, ``"safetensors"``, ``"gguf"``,
    ``"zip"`` (a PyTorch ``.pt``/``.ckpt`` archive), ``"pickle"``, ``"empty"`` or ``"unknown"``.

    Raises ``error`` (naming the path and ``expected``) when the path does not exist.
    """
    p = Path(path)
    if p.is_dir():
        return "directory"
    if not p.exists():
        raise error(f"{str(p)!r} does not exist; expected {expected}")
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
        if 2 <= n < MAX_HEADER and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


#: :func:`sniff` results in words, for messages ("<file> is <words>, ...")
FORMAT_WORDS = {
    "safetensors": "a safetensors file",
    "gguf": "a GGUF file",
    "zip": "a PyTorch zip checkpoint (.pt/.ckpt; not loaded: pickles can run code)",
    "pickle": "a PyTorch pickle checkpoint (not loaded: pickles can run code)",
    "empty": "an empty file",
    "unknown": "a file with no known weight-file header (not safetensors, GGUF or PyTorch)",
    "directory": "a folder",
}


# ---------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------


@dataclass
class SafetensorsHeader:
    """What a safetensors file holds, read from its JSON header without loading any tensor.

    tensors: key -> (dtype name as in the header, e.g. ``"BF16"``, shape tuple);
    metadata: the ``__metadata__`` string table (empty if none);
    offsets: key -> (start, end) byte offsets of its data, counted from ``data_start``;
    error: the error class raised by :meth:`read`.
    """

    path: str
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str] = field(default_factory=dict)
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    data_start: int = 0
    error: type[FileFormatError] = field(default=FileFormatError, repr=False)

    def read(self, f, key: str) -> torch.Tensor:
        """Read one tensor from the open file ``f`` into a fresh, aligned CPU tensor.

        Plain reads, not a memory map: the process never holds the file's pages on top of the
        tensors (a memory map keeps every touched page resident until it is closed, doubling the
        peak for a full-precision load), and a fresh allocation computes exactly like the original.
        """
        dt, shape = self.tensors[key]
        if dt not in ST_DTYPES:
            raise self.error(
                f"{self.path!r}: tensor {key!r} has dtype {dt}, which torch cannot hold; "
                f"expected one of {sorted(ST_DTYPES)}"
            )
        start, end = self.offsets[key]
        out = torch.empty(shape, dtype=ST_DTYPES[dt])
        raw = out.reshape(-1).view(torch.uint8)
        if raw.numel() != end - start:
            raise self.error(
                f"{self.path!r}: tensor {key!r} ({dt} {list(shape)}) has {end - start} bytes of data; "
                f"expected {raw.numel()} (a corrupt header)"
            )
        f.seek(self.data_start + start)
        if raw.numel() and f.readinto(memoryview(raw.numpy())) != raw.numel():
            raise self.error(f"{self.path!r}: truncated while reading {key!r}; expected a complete file")
        return out


def read_safetensors_header(
    path, *, error: type[FileFormatError] = FileFormatError, expected: str = "a .safetensors weight file"
) -> SafetensorsHeader:
    """Read and check the header of a safetensors file against the file's size.

    Raises ``error`` -- naming the file, what it is and ``expected`` -- for a missing path, a file
    that is not safetensors (GGUF, a pickle, a folder, ...), a corrupt header or truncated data.
    """
    p = Path(path)
    kind = sniff(p, error=error, expected=expected)
    if kind != "safetensors":
        size = f" ({p.stat().st_size} bytes)" if kind != "directory" else ""
        raise error(f"{str(p)!r} is {FORMAT_WORDS.get(kind, kind)}{size}, not a safetensors file; expected {expected}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise error(
                f"{str(p)!r} is a truncated or corrupt safetensors file: its header needs {8 + n} bytes but the "
                f"file has {size} (an interrupted download? download it again); expected {expected}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{str(p)!r} has a corrupt safetensors header ({e}); expected a JSON table of tensors") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    offsets: dict[str, tuple[int, int]] = {}
    end_max = 0
    for name, info in header.items():
        try:
            start, end = (int(o) for o in info["data_offsets"])
            tensors[name] = (info["dtype"], tuple(int(s) for s in info["shape"]))
        except (KeyError, TypeError, ValueError):
            raise error(
                f"{str(p)!r} has a corrupt safetensors header entry {name!r}: {info!r}; "
                "expected dtype, shape and data_offsets"
            ) from None
        offsets[name] = (start, end)
        end_max = max(end_max, end)
    if 8 + n + end_max > size:
        need = 8 + n + end_max
        raise error(
            f"{str(p)!r} is a truncated safetensors file: its tensors need {need} bytes but the file has "
            f"{size} ({size / need:.0%}; an interrupted download? download it again); expected a complete file"
        )
    return SafetensorsHeader(str(p), tensors, dict(metadata), offsets, 8 + n, error)


# ---------------------------------------------------------------------------------------------
# key prefixes and what model a key set belongs to
# ---------------------------------------------------------------------------------------------


def common_prefix(keys: Iterable[str], candidates: Iterable[str]) -> str:
    """The first of ``candidates`` that every key starts with ('' if none)."""
    keys = list(keys)
    for c in candidates:
        if keys and all(k.startswith(c) for k in keys):
            return c
    return ""


# ---------------------------------------------------------------------------------------------
# what model a key set belongs to
# ---------------------------------------------------------------------------------------------


def describe_keys(keys: Iterable[str]) -> str:
    """A few words on what a state dict is, judged from its key names (for error messages)."""
    keys = set(keys)
    if not keys:
        return "a file with no tensors"

    def has(*subs: str) -> bool:
        return any(any(s in k for k in keys) for s in subs)

    if has("lora_A", "lora_B", "lora_down", "lora_up", ".hada_w1", ".lokr_w1", ".lora."):
        return "a LoRA / LyCORIS adapter (load it as a LoRA, not as a model)"
    if has("txt_norm.weight") and has("img_mod.1.weight", "img_mod.1.comfy_quant", "img_mod.1.scale_weight"):
        if has("__index_timestep_zero__"):
            return ("a Qwen-Image-Edit-2511 MM-DiT (transformer; its __index_timestep_zero__ marker: reference "
                    "pictures conditioned at timestep 0, loaded with zero_cond_t)")  # fmt: skip
        return "a Qwen-Image / Qwen-Image-Edit / FireRed MM-DiT (transformer)"
    if has("double_blocks.", "single_blocks.", "single_transformer_blocks."):
        return "a Flux-style MM-DiT (Flux / Chroma / HiDream)"
    if has("joint_blocks."):
        return "a Stable Diffusion 3 / 3.5 MM-DiT"
    if has("input_blocks.", "conditioner.embedders", "cond_stage_model."):
        return "a Stable Diffusion / SDXL UNet checkpoint"
    if has("blocks.0.self_attn.norm_q.weight", "head.modulation", "patch_embedding.", "blocks.0.cross_attn."):
        return "a Wan video DiT"
    if has("decoder.middle.0.residual.0.gamma"):
        if has("decoder.upsamples.0.upsamples.0."):
            return "a Wan-2.2 VAE (48 latent channels; not the Qwen-Image VAE)"
        return "a Qwen-Image / Wan-2.1 VAE (ComfyUI layout)"
    if has("decoder.mid_block.resnets.0.norm1.gamma"):
        return "a Qwen-Image VAE (diffusers layout)"
    if has("encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"):
        return "a Stable Diffusion / Flux style VAE (not the Qwen-Image VAE)"
    if has("down_blocks.0.resnets.0.conv1.weight"):
        return "a Stable Diffusion / SDXL UNet (diffusers layout)"
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
    if has("visual.blocks.", "language_model.", "embed_tokens."):
        return "a language / vision-language model"
    if has("post_quant_conv", "decoder.conv_in", "decoder.conv1"):
        return "a VAE of an unknown kind"
    sample = ", ".join(sorted(keys)[:4])
    return f"an unrecognised state dict ({len(keys)} tensors, e.g. {sample})"


def load_model_folder(folder: Path, sub: str, load, device, *, error: type[FileFormatError], expected: str, what: str):
    """``load(folder)`` for a model folder holding ``config.json``, or for its ``sub/`` folder (a release
    folder), moved to ``device`` in eval mode without gradients. A folder without config.json, or one
    ``load`` fails on, raises ``error`` naming the folder (``expected``: what was expected there;
    ``what``: the kind of folder, for the message)."""
    if (folder / sub).is_dir() and not (folder / "config.json").is_file():
        folder = folder / sub
    if not (folder / "config.json").is_file():
        raise error(f"{str(folder)!r} is a folder without config.json, but {expected} was expected")
    try:
        model = load(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise error(f"could not load the {what} folder {str(folder)!r}: {e}") from e
    return model.to(device).eval().requires_grad_(False)


# -- GGUF headers (the MM-DiT and the text-encoder readers share them) -------------------------


def gguf_module():
    """The ``gguf`` package, or an ImportError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install 'gguf>=0.10.0'") from None
    return gguf


def open_gguf(path, error: type[Exception]):
    """A ``GGUFReader`` over ``path``; a truncated or corrupt file raises ``error`` naming it."""
    import warnings

    gguf = gguf_module()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, EOFError) as e:
        raise error(
            f"{str(path)!r} is a truncated or corrupt GGUF file ({type(e).__name__}: {e}); download it again"
        ) from None


def gguf_field(reader, name):
    """The value of header field ``name``, or None when it is absent or malformed."""
    f = reader.get_field(name)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a malformed field is treated as absent
        return None
