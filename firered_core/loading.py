"""Loading the Hugging Face release layout of FireRed-Image-Edit (a diffusers model folder).

A release folder holds ``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``,
``processor/`` and ``scheduler/`` (plus ``model_index.json``). Each part is loaded with its
library class -- diffusers ``QwenImageTransformer2DModel`` / ``AutoencoderKLQwenImage``,
transformers ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2VLProcessor`` -- fully offline.
Errors name the folder, what is missing and what was expected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .schedules import FlowMatchConfig

SUBFOLDERS = ("transformer", "text_encoder", "vae", "scheduler")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class ModelFolderError(FileNotFoundError):
    """A model folder is missing, incomplete, or not a FireRed / Qwen-Image-Edit release."""


def resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None


@dataclass
class FireRedComponents:
    """The loaded parts of a FireRed model.

    transformer: ``QwenImageTransformer2DModel``; vae: ``AutoencoderKLQwenImage``;
    text_encoder: ``Qwen2_5_VLForConditionalGeneration``; processor: ``Qwen2VLProcessor``
    (tokenizer + image processor); scheduler_config: the sigma-schedule settings.
    """

    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    processor: Any
    scheduler_config: FlowMatchConfig
    source: str = ""


def check_model_folder(path) -> Path:
    """Verify ``path`` is a release folder; raise :class:`ModelFolderError` saying what is wrong."""
    root = Path(path)
    if not root.exists():
        raise ModelFolderError(f"model folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ModelFolderError(f"{str(root)!r} is a file, but a model folder (diffusers layout) was expected")
    missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
    if not (root / "processor").is_dir() and not (root / "tokenizer").is_dir():
        missing.append("processor (or tokenizer)")
    if missing:
        present = sorted(p.name for p in root.iterdir())
        raise ModelFolderError(
            f"model folder {str(root)!r} is missing {', '.join(missing)}; a FireRed-Image-Edit release folder "
            f"has transformer/, text_encoder/, vae/, tokenizer/, processor/ and scheduler/ (found: {present})"
        )
    return root


def load_scheduler_config(root: Path) -> FlowMatchConfig:
    f = root / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return FlowMatchConfig()
    try:
        return FlowMatchConfig.from_dict(json.loads(f.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ModelFolderError(f"{str(f)!r} is not a valid scheduler config: {e}") from None


def load_processor(root: Path):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor

    proc_dir = root / "processor"
    if proc_dir.is_dir() and any(proc_dir.glob("tokenizer*")):
        return Qwen2VLProcessor.from_pretrained(proc_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    if proc_dir.is_dir():
        image_proc = Qwen2VLImageProcessor.from_pretrained(proc_dir, local_files_only=True)
    else:
        image_proc = Qwen2VLImageProcessor()
    return Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok)


def _load(kind: str, fn, folder: Path):
    try:
        return fn()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelFolderError(f"could not load the {kind} from {str(folder)!r}: {e}") from e


def load_pretrained(path, *, device="cpu", dtype: torch.dtype = torch.bfloat16) -> FireRedComponents:
    """Load a release folder onto ``device`` in ``dtype`` (offline; nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    root = check_model_folder(path)
    transformer = _load(
        "MM-DiT",
        lambda: QwenImageTransformer2DModel.from_pretrained(root / "transformer", dtype=dtype, local_files_only=True),
        root / "transformer",
    )
    vae = _load(
        "VAE",
        lambda: AutoencoderKLQwenImage.from_pretrained(root / "vae", dtype=dtype, local_files_only=True),
        root / "vae",
    )
    text_encoder = _load(
        "text encoder",
        lambda: Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder", dtype=dtype, local_files_only=True),
        root / "text_encoder",
    )
    processor = _load("processor", lambda: load_processor(root), root / "processor")
    for m in (transformer, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    return FireRedComponents(transformer, vae, text_encoder, processor, load_scheduler_config(root), str(root))
