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

from .sampling.schedules import FlowMatchConfig

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
    """The release folder's ``processor/`` (tokenizer + image-processor settings), or its
    ``tokenizer/`` with the image settings beside it (see :func:`formats.find_processor`)."""
    from .formats.text_encoder_files import find_processor

    return find_processor(model_dir=root)


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


def load_components(
    model=None,
    *,
    transformer=None,
    text_encoder=None,
    vae=None,
    tokenizer=None,
    loras=(),
    weight_dtype: str = "auto",
    device="cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> FireRedComponents:
    """Load a FireRed model from any mix of the files users hold.

    ``model`` is a release folder (diffusers layout) supplying whatever part is not given as a
    file. ``transformer``: a ``diffusion_models/`` file (bf16, fp8, scaled fp8, GGUF) or a
    ``transformer/`` folder; ``text_encoder``: ``qwen_2.5_vl_7b*.safetensors`` or a folder;
    ``vae``: ``qwen_image_vae.safetensors`` or a folder; ``tokenizer``: a tokenizer folder (else the
    release folder's, else the one a ComfyUI install carries); ``loras``: ``[(path, strength), ...]``
    (or bare paths, strength 1) attached to the transformer; ``weight_dtype``: ``"auto"`` keeps fp8
    files in fp8, ``"fp8_e4m3fn"`` stores bf16 weights in fp8, ``"dequantize"`` upcasts at load.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .formats import lora as lora_mod
    from .formats.text_encoder_files import find_processor, load_text_encoder
    from .formats.transformer_files import load_transformer
    from .formats.vae_files import load_vae

    root = check_model_folder(model) if model is not None else None
    missing = [n for n, v in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)) if v is None]
    if root is None and missing:
        raise ModelFolderError(
            f"no model folder given and no file for the {', '.join(missing)}: give a release folder or a file for each part"
        )
    processor = find_processor(tokenizer_dir=tokenizer, model_dir=root, text_encoder_file=text_encoder)
    tr = load_transformer(transformer or root / "transformer", dtype=dtype, device=device, weight_dtype=weight_dtype)
    te = load_text_encoder(text_encoder or root / "text_encoder", dtype=dtype, device=device, processor=processor)
    va = load_vae(vae or root / "vae", dtype=dtype, device=device)
    for m in (tr, te, va):
        m.to(device).eval().requires_grad_(False)
    if loras:
        lora_mod.apply_loras(tr, list(loras))
    sched = load_scheduler_config(root) if root is not None else FlowMatchConfig()
    source = ", ".join(str(p) for p in (model, transformer, text_encoder, vae) if p is not None)
    return FireRedComponents(tr, va, te, processor, sched, source)
