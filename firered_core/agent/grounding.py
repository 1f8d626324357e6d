"""Crop boxes from a local grounding model: Qwen2.5-VL (with its language head) asked, picture by
picture, for the box of the part the edit instruction needs, as FireRed's agent asks Gemini.

Qwen2.5-VL was trained to answer grounding requests with ``{"bbox_2d": [x1, y1, x2, y2]}`` in the
pixels of the picture it was shown. Each picture is therefore shown at a size the processor keeps
as it is (sides multiples of its 28-pixel patch grid, at most ``max_side``), so the answer maps
back to the original by one scale. Decoding is greedy: the same model and inputs give the same
boxes. An answer without a usable box (none, empty, outside the picture, or nearly the whole
picture) gives None: keep the whole picture. Needs the language head: the diffusers release's
``text_encoder/`` folder has it; ComfyUI's single text-encoder files do not, and
:class:`~.vlm.NoLanguageHeadError` says so (:func:`~.vlm.check_language_head`).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Sequence

from . import vlm
from .layout import Box, check_count

log = logging.getLogger("FireRed")

#: the longer side a picture is shown at (Qwen2.5-VL grounds at any size; this bounds the cost)
MAX_SIDE = 768
#: a box covering more than this share of the picture is taken as "the whole picture"
WHOLE = 0.95
PROMPT = (
    'The image edit instruction is: "{instruction}". This is Picture {number} of {count}. Locate the part of this '
    "picture that the instruction needs (the object or area it names or uses) and output its bbox coordinates in "
    'JSON format, as {{"bbox_2d": [x1, y1, x2, y2]}}. If the instruction needs the whole picture, output the whole picture.'
)
_NUM = r"-?\d+(?:\.\d+)?"
_BOX = re.compile(r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]")


def _grid(processor) -> int:
    ip = getattr(processor, "image_processor", None)
    return int(getattr(ip, "patch_size", 14) or 14) * int(getattr(ip, "merge_size", 2) or 2)


def shown_size(size: tuple[int, int], grid: int = 28, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The size a ``(width, height)`` picture is shown at: scaled so its longer side is at most
    ``max_side``, each side a multiple of ``grid`` (at least one grid step)."""
    w, h = size
    s = min(1.0, max_side / max(w, h))
    return max(grid, round(w * s / grid) * grid), max(grid, round(h * s / grid) * grid)


def parse_box(text: str, shown: tuple[int, int], size: tuple[int, int], whole: float = WHOLE) -> Box | None:
    """The first ``[x1, y1, x2, y2]`` of a model answer (in ``shown`` pixels), mapped to ``size``
    pixels and clamped; None when there is none, it is empty, or it covers nearly all the picture."""
    m = None
    try:  # the JSON answer first ({"bbox_2d": [...]}, or a list of them), else any four numbers in brackets
        data = json.loads(re.sub(r"^```(?:json)?|```$", "", text.strip(), flags=re.M).strip())
        item = data[0] if isinstance(data, list) and data else data
        if isinstance(item, dict) and isinstance(item.get("bbox_2d"), list) and len(item["bbox_2d"]) == 4:
            m = [float(v) for v in item["bbox_2d"]]
    except (ValueError, TypeError, KeyError, IndexError):
        pass
    if m is None:
        found = _BOX.search(text)
        if found is None:
            return None
        m = [float(v) for v in found.groups()]
    (sw, sh), (w, h) = shown, size
    x0, y0, x1, y1 = m[0] * w / sw, m[1] * h / sh, m[2] * w / sw, m[3] * h / sh
    x0, x1 = sorted((max(0, min(w, round(x0))), max(0, min(w, round(x1)))))
    y0, y1 = sorted((max(0, min(h, round(y0))), max(0, min(h, round(y1)))))
    if x1 - x0 < 2 or y1 - y0 < 2 or (x1 - x0) * (y1 - y0) > whole * w * h:
        return None
    return x0, y0, x1, y1


def ground_boxes(
    pictures: Sequence[Any],
    instruction: str,
    model: Any,
    processor: Any = None,
    *,
    skip: Sequence[bool] | None = None,
    max_side: int = MAX_SIDE,
    max_new_tokens: int = 64,
    source: str = "",
) -> list[Box | None]:
    """One crop box (or None: the whole picture) per picture, found by the grounding model.

    model: a :class:`~.vlm.LocalVLM`, a loaded Qwen2.5-VL with its language head (and its
    ``processor``), or a folder (:meth:`~.vlm.LocalVLM.load`). skip: per picture, True to leave it
    whole without asking (e.g. the base picture, or one the user cropped). Raises
    :class:`~.vlm.NoLanguageHeadError` for a model without a language head, naming ``source``."""
    check_count(len(pictures))
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("grounding needs the edit instruction (it says what to keep of each picture)")
    job = "finding crop boxes (grounding)"
    if isinstance(model, vlm.LocalVLM):
        local = model
    elif isinstance(model, str) or hasattr(model, "__fspath__"):
        local = vlm.LocalVLM.load(model, processor=processor, job=job)
    else:
        local = vlm.LocalVLM.from_model(model, processor, source, job)
    grid = _grid(local.processor)
    out: list[Box | None] = []
    for i, pic in enumerate(pictures):
        if skip is not None and i < len(skip) and skip[i]:
            out.append(None)
            continue
        img = vlm.to_pil(pic, f"picture {i + 1}")
        shown = shown_size(img.size, grid, max_side)
        text = local.chat_text(vlm.chat_messages(PROMPT.format(instruction=instruction, number=i + 1, count=len(pictures)), [img]))
        answer = local.generate(text, [img.resize(shown)], temperature=0.0, max_new_tokens=max_new_tokens)
        box = parse_box(answer, shown, img.size)
        log.info("FireRed grounding: picture %d -> %s (answer %r)", i + 1, box or "whole picture", answer[:200])
        out.append(box)
    return out
