"""Finds and loads the Qwen2.5-VL tokenizer with its image-processor settings (a ``Qwen2VLProcessor``).

:func:`find_processor` looks at a tokenizer folder the user names, one beside a single
text-encoder file, a release folder's ``processor/`` or ``tokenizer/``, and the
``qwen25_tokenizer/`` folder that every ComfyUI install carries
(``comfy/text_encoders/qwen25_tokenizer``: vocab.json, merges.txt, tokenizer_config.json).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._common import ProcessorNotFoundError
from .text_encoder_config import vision_token_ids

__all__ = ["COMFYUI_TOKENIZER_SUBDIR", "QWEN2VL_IMAGE_PROCESSOR", "find_processor"]

COMFYUI_TOKENIZER_SUBDIR = Path("comfy") / "text_encoders" / "qwen25_tokenizer"

#: Qwen2.5-VL's image-processor settings (its ``preprocessor_config.json``), used when a tokenizer
#: folder (e.g. ComfyUI's) carries none.
QWEN2VL_IMAGE_PROCESSOR: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "merge_size": 2,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},
}


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and (
        (folder / "tokenizer.json").is_file()
        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    )


def _processor_from_folder(folder: Path, image_settings: Path | None = None):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    if any((folder / n).is_file() for n in ("processor_config.json", "preprocessor_config.json")):
        try:
            return Qwen2VLProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # fall back to tokenizer + known image settings below
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    settings = image_settings if image_settings is not None else folder
    image_proc = None
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (settings / name).is_file():
            try:
                image_proc = Qwen2VLImageProcessor.from_pretrained(settings, local_files_only=True)
                break
            except (OSError, ValueError, KeyError, TypeError):
                pass
    if image_proc is None:
        image_proc = Qwen2VLImageProcessor(**QWEN2VL_IMAGE_PROCESSOR)
    # transformers 5's Qwen2VLProcessor requires a video processor (it needs torchvision); same settings
    video_proc = Qwen2VLVideoProcessor(**{k: v for k, v in QWEN2VL_IMAGE_PROCESSOR.items() if k != "do_convert_rgb"})
    return Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc)


def _comfyui_roots(comfyui_root) -> list[tuple[str, Path]]:
    roots = []
    if comfyui_root:
        roots.append(("the ComfyUI folder you named", Path(comfyui_root)))
    if os.environ.get("COMFYUI_PATH"):
        roots.append(("$COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"])))
    here = Path(__file__).resolve()
    if (
        len(here.parents) > 4 and here.parents[3].name == "custom_nodes"
    ):  # <ComfyUI>/custom_nodes/<pack>/firered_core/formats
        roots.append(("the ComfyUI install around this node pack", here.parents[4]))
    return roots


def find_processor(tokenizer_dir=None, model_dir=None, comfyui_root=None, text_encoder_file=None):
    """Find and load the Qwen2.5-VL tokenizer with its image-processor settings (a ``Qwen2VLProcessor``).

    Looks, in order, at: ``tokenizer_dir`` (a folder with tokenizer.json or vocab.json + merges.txt;
    a failure here is an error, since it was asked for), a ``<stem>_tokenizer/`` folder beside
    ``text_encoder_file`` (a single text-encoder file; ``make-tiny --layout comfyui`` writes its
    tokenizer there), ``model_dir``'s ``processor/`` and
    ``tokenizer/`` (or ``model_dir`` itself), then ``comfy/text_encoders/qwen25_tokenizer`` under
    ``comfyui_root``, ``$COMFYUI_PATH`` and the ComfyUI install this pack sits in. Image settings
    come from the folder's ``preprocessor_config.json`` / ``processor_config.json`` when present,
    else Qwen2.5-VL's (:data:`QWEN2VL_IMAGE_PROCESSOR`).

    Raises:
        ProcessorNotFoundError: nothing found; the message lists every place checked and what to do.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tried: list[str] = []
    if tokenizer_dir is not None:
        folder = Path(tokenizer_dir)
        if not _has_tokenizer(folder):
            raise ProcessorNotFoundError(
                f"the tokenizer folder {str(folder)!r} has no tokenizer.json and no vocab.json + merges.txt; "
                "name a Qwen2.5-VL tokenizer folder (e.g. a release's tokenizer/ or ComfyUI's comfy/text_encoders/qwen25_tokenizer)"
            )
        return _checked(_processor_from_folder(folder), folder)
    if text_encoder_file is not None and Path(text_encoder_file).is_file():
        beside = Path(text_encoder_file).with_name(Path(text_encoder_file).stem + "_tokenizer")
        if _has_tokenizer(beside):
            return _checked(_processor_from_folder(beside), beside)
    if model_dir is not None:
        root = Path(model_dir)
        if (root / "processor").is_dir() and _has_tokenizer(root / "processor"):
            return _checked(_processor_from_folder(root / "processor"), root / "processor")
        if _has_tokenizer(root / "tokenizer"):
            settings = root / "processor" if (root / "processor").is_dir() else None
            return _checked(_processor_from_folder(root / "tokenizer", settings), root / "tokenizer")
        if _has_tokenizer(root):
            return _checked(_processor_from_folder(root), root)
        tried.append(
            f"{str(root / 'processor')!r}, {str(root / 'tokenizer')!r} and {str(root)!r} (model folder): no tokenizer files"
        )
    for what, root in _comfyui_roots(comfyui_root):
        folder = root / COMFYUI_TOKENIZER_SUBDIR
        if _has_tokenizer(folder):
            return _checked(_processor_from_folder(folder), folder)
        tried.append(f"{str(folder)!r} ({what}): {'no vocab.json + merges.txt' if folder.is_dir() else 'not there'}")
    if not tried:
        tried.append("nowhere: no tokenizer folder, model folder or ComfyUI folder was given, $COMFYUI_PATH is not set, "
                     "and this pack is not inside a ComfyUI custom_nodes folder")  # fmt: skip
    raise ProcessorNotFoundError(
        "no Qwen2.5-VL tokenizer found. Looked at: " + "; ".join(tried) + ". To fix: name the tokenizer folder "
        "(a FireRed / Qwen-Image-Edit release's tokenizer/ or processor/ folder), or the release folder itself, or your "
        "ComfyUI folder (it ships comfy/text_encoders/qwen25_tokenizer), or set COMFYUI_PATH."
    )


def _checked(processor, folder: Path):
    try:
        vision_token_ids(processor)
    except ProcessorNotFoundError as e:
        raise ProcessorNotFoundError(f"{str(folder)!r}: {e}") from None
    return processor
