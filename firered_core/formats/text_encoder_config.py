"""The ``Qwen2_5_VLConfig`` of a text-encoder file: the Qwen2.5-VL-7B preset, or one read from the tensor shapes.

:func:`config_from_shapes` gives the 7B preset (:data:`QWEN25_VL_7B`) for the 7B's shapes and reads
other sizes (the tests' tiny files) from the shapes; :func:`vision_token_ids` takes the vision token
ids from the tokenizer that goes with the encoder, for vocabularies smaller than Qwen's.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

from ._common import ProcessorNotFoundError, TextEncoderFileError

__all__ = ["QWEN25_VL_7B", "VISION_TOKENS", "config_from_shapes", "shape_config", "vision_token_ids"]

VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}

#: ``Qwen2_5_VLConfig`` keyword arguments of Qwen2.5-VL-7B-Instruct (the Qwen-Image / FireRed
#: text encoder), with transformers 5 field names. Nothing is downloaded.
QWEN25_VL_7B: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 28,
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}



def _count(shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in shapes if (m := rx.match(k))}
    if idx != set(range(len(idx))):
        raise TextEncoderFileError(f"layer numbers are not contiguous: {sorted(idx)}")
    return len(idx)


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    first = max(1, half // 4)
    rest = half - first
    return [first + rest % 2, rest // 2, rest // 2]


def config_from_shapes(shapes: dict[str, tuple[int, ...]], token_ids: dict[str, int] | None = None) -> dict:
    """``Qwen2_5_VLConfig`` kwargs for a state dict (classic names -> shapes).

    The 7B shapes give :data:`QWEN25_VL_7B`. Other sizes are read from the shapes; what the weights
    do not store is assumed as in Qwen2.5-VL: text head size ``gcd(128, k_proj rows, hidden)``,
    vision head size 80 (else 16), full attention every 8th vision block (else the last),
    M-RoPE split like the 7B's. ``token_ids`` (from the tokenizer, see :func:`vision_token_ids`) sets
    the vision token ids; without it they are Qwen's, which need the full vocabulary.
    """
    s = shapes
    vocab, hidden = s["model.embed_tokens.weight"]
    layers = _count(s, r"model\.layers\.(\d+)\.")
    kv_rows = s["model.layers.0.self_attn.k_proj.weight"][0]
    inter = s["model.layers.0.mlp.gate_proj.weight"][0]
    v_hidden, in_ch, t_patch, patch, _ = s["visual.patch_embed.proj.weight"]
    depth = _count(s, r"visual\.blocks\.(\d+)\.")
    v_inter = s["visual.blocks.0.mlp.gate_proj.weight"][0]
    out_hidden, merge_in = s["visual.merger.mlp.2.weight"]
    merge = math.isqrt(merge_in // v_hidden)
    if out_hidden != hidden:
        raise TextEncoderFileError(
            f"the vision tower outputs {out_hidden} features but the language model has {hidden}"
        )
    seven_b = QWEN25_VL_7B["text_config"], QWEN25_VL_7B["vision_config"]
    if (vocab, hidden, layers, kv_rows, inter, v_hidden, depth, v_inter) == (
        seven_b[0]["vocab_size"], seven_b[0]["hidden_size"], seven_b[0]["num_hidden_layers"], 512,
        seven_b[0]["intermediate_size"], seven_b[1]["hidden_size"], seven_b[1]["depth"], seven_b[1]["intermediate_size"],
    ):  # fmt: skip
        cfg = copy.deepcopy(QWEN25_VL_7B)
    else:
        head_dim = math.gcd(128, kv_rows, hidden)
        v_head = 80 if v_hidden % 80 == 0 else 16
        cfg = {
            "text_config": {
                **copy.deepcopy(QWEN25_VL_7B["text_config"]),
                "vocab_size": vocab,
                "hidden_size": hidden,
                "intermediate_size": inter,
                "num_hidden_layers": layers,
                "num_attention_heads": hidden // head_dim,
                "num_key_value_heads": kv_rows // head_dim,
                "max_window_layers": layers,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1000000.0,
                    "mrope_section": _mrope_section(head_dim),
                },
            },
            "vision_config": {
                **copy.deepcopy(QWEN25_VL_7B["vision_config"]),
                "depth": depth,
                "hidden_size": v_hidden,
                "intermediate_size": v_inter,
                "num_heads": max(1, v_hidden // v_head),
                "in_channels": in_ch,
                "patch_size": patch,
                "temporal_patch_size": t_patch,
                "spatial_merge_size": merge,
                "out_hidden_size": out_hidden,
                "fullatt_block_indexes": [i for i in range(depth) if (i + 1) % 8 == 0] or [depth - 1],
            },
            **{k: QWEN25_VL_7B[k] for k in VISION_TOKENS},
            "tie_word_embeddings": False,
        }
    if token_ids:
        cfg.update({k: int(v) for k, v in token_ids.items() if k in VISION_TOKENS})
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if k in token_ids and token_ids[k] is not None:
                cfg["text_config"][k] = int(token_ids[k])
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        # the 7B preset's ids do not exist in a smaller vocabulary whose tokenizer names none (the
        # encoder only reads, so they are unused): unset rather than a config warning on every load
        v = cfg["text_config"].get(k)
        if isinstance(v, int) and v >= vocab:
            cfg["text_config"][k] = None
    too_big = {k: cfg[k] for k in VISION_TOKENS if cfg[k] >= vocab}
    if too_big:
        raise TextEncoderFileError(
            f"the vision token ids {too_big} do not fit this text encoder's vocabulary of {vocab}: pass the "
            "processor (tokenizer) that belongs to it"
        )
    return cfg


def vision_token_ids(processor) -> dict[str, int]:
    """The vision token ids (``image_token_id`` ...) and bos/eos/pad of a processor's tokenizer."""
    tok = getattr(processor, "tokenizer", processor)
    out = {}
    for field, token in VISION_TOKENS.items():
        i = tok.convert_tokens_to_ids(token)
        if i is None or i == getattr(tok, "unk_token_id", None):
            raise ProcessorNotFoundError(f"the tokenizer has no {token} token: it is not a Qwen2.5-VL tokenizer")
        out[field] = int(i)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tok, name, None)
        if isinstance(v, int):
            out[name] = v
    return out


def shape_config(p: Path, shapes: dict, processor) -> dict:
    """:func:`config_from_shapes` with the processor's token ids, its errors naming the file."""
    try:
        return config_from_shapes(shapes, vision_token_ids(processor) if processor is not None else None)
    except KeyError as e:
        raise TextEncoderFileError(
            f"{str(p)!r} is a Qwen2.5-VL text encoder without {e.args[0]}: the file is incomplete"
        ) from None
    except TextEncoderFileError as e:
        raise TextEncoderFileError(f"{str(p)!r}: {e}") from None
