"""The empty Qwen2.5-VL built on the meta device and filled from a state dict, every tensor checked.

Shared by the safetensors loader (:mod:`.text_encoder_files`) and the GGUF one
(:mod:`.gguf_text_encoder`): each tensor read is assigned to the meta model, so two copies of the
weights never exist; a file without ``lm_head`` gets the input embedding tied in its place.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from ._common import TextEncoderFileError
from .text_encoder_config import shape_config
from .text_encoder_keys import classic_name

__all__ = ["check_keys", "empty_model", "finish"]

log = logging.getLogger(__name__)


def empty_model(p: Path, shapes: dict, processor, config: dict | None):
    """(the model on the meta device, its config) for a state dict of ``shapes`` (classic names)."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = config or shape_config(p, shapes, processor)
    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(cfg)))
    return model, cfg


def check_keys(p: Path, cfg: dict, expected: dict, by_module) -> None:
    missing = sorted(set(expected) - set(by_module) - {"lm_head.weight"})
    extra = sorted(set(by_module) - set(expected))
    if missing or extra:
        raise TextEncoderFileError(
            f"{str(p)!r} is a Qwen2.5-VL text encoder with the wrong tensors for a "
            f"{cfg['text_config']['num_hidden_layers']}-layer model: missing {[classic_name(m) for m in missing[:5]]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {[classic_name(m) for m in extra[:5]]}{'...' if len(extra) > 5 else ''}"
        )


def finish(p: Path, model, state: dict, device):
    """Assign ``state`` (module names) to the meta model, tie a missing lm_head, check nothing is left."""
    if "lm_head.weight" not in state:
        log.info("%s has no lm_head; tying it to the input embedding (only hidden states are used)", p.name)
    model.load_state_dict(state, strict=False, assign=True)
    if "lm_head.weight" not in state:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model = model.to(device).eval().requires_grad_(False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise TextEncoderFileError(f"{str(p)!r}: tensors not in the file: {left[:5]}")
    return model
