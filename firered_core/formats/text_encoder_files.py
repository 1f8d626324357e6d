"""The Qwen2.5-VL-7B text encoder and its tokenizer / image processor, from the files users hold.

Text-encoder formats (detected from the keys and dtypes, never the file name):

- ComfyUI's ``qwen_2.5_vl_7b.safetensors`` (bf16): the classic Hugging Face names that ComfyUI's
  ``comfy/text_encoders/llama.py`` (``Qwen25_7BVLI``) and ``qwen_vl.py`` use --
  ``model.embed_tokens``, ``model.layers.N.{self_attn,mlp,...}``, ``model.norm``, ``visual.*``
  (``patch_embed.proj``, ``blocks.N.{norm1,norm2,attn.qkv,attn.proj,mlp.*}``, ``merger.*``) and,
  when present, ``lm_head``. transformers 5 still writes this layout when it saves the model.
- ComfyUI's ``qwen_2.5_vl_7b_fp8_scaled.safetensors``: the same names with ``float8_e4m3fn``
  weights, a ``scaled_fp8`` marker and one ``<layer>.scale_weight`` per Linear (newer ComfyUI files:
  ``<layer>.weight_scale`` plus a ``<layer>.comfy_quant`` JSON tensor; ``scale_input`` /
  ``input_scale`` are only used by fp8 matmuls and are ignored). The weights are dequantized to
  the compute dtype while loading (``w = fp8 * scale``, row chunk by row chunk): the 7B encoder in
  bf16 is about 16 GB, and it runs once per prompt.
- the same names with ComfyUI's block-quantized layers (``<layer>.comfy_quant`` naming
  ``int8_tensorwise``, ``mxfp8`` or ``nvfp4``, layouts in :mod:`.comfy_quant`, or the
  ``_quantization_metadata`` header table): checked layer by layer (a missing or misshapen scale
  fails naming the layer, the format and what was expected) and dequantized to the compute dtype;
- a Qwen2.5-VL GGUF (llama.cpp's ``qwen2vl`` language model, as ComfyUI-GGUF users hold it) with
  its vision tower from the ``mmproj`` GGUF beside it: :mod:`.gguf_text_encoder`;
- the current transformers names (``model.language_model.*``, ``model.visual.*``);
- a ComfyUI checkpoint merge (``text_encoders.qwen25_7b.transformer.`` prefix), stripped;
- the diffusers ``text_encoder/`` folder (or a release folder holding one).

The config is the Qwen2.5-VL-7B preset (:data:`QWEN25_VL_7B`) when the shapes are the 7B's;
other sizes (the tests' tiny files) get a config read from the shapes (:func:`config_from_shapes`).
The model is built on the meta device and each tensor from the file is assigned to it, so two
copies of the weights never exist. A file without ``lm_head`` (ComfyUI does not use it) gets the
input embedding tied in its place: only the hidden states are used for conditioning.

:func:`find_processor` finds the tokenizer and image-processor settings: a tokenizer folder the user
names, the release folder's ``processor/`` or ``tokenizer/``, or the ``qwen25_tokenizer/`` folder
that every ComfyUI install carries (``comfy/text_encoders/qwen25_tokenizer``: vocab.json,
merges.txt, tokenizer_config.json).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from ._common import (
    FP8_DTYPES,
    ProcessorNotFoundError,
    TextEncoderFileError,
    common_prefix,
    describe_keys,
    read_safetensors_header,
    sniff,
)
from .comfy_quant import BLOCK_FORMATS, QuantLinear, check_layer, decode_conf
from .comfy_quant import describe as describe_formats

__all__ = [
    "COMFYUI_TOKENIZER_SUBDIR",
    "ProcessorNotFoundError",
    "QWEN25_VL_7B",
    "QWEN2VL_IMAGE_PROCESSOR",
    "TextEncoderFileError",
    "config_from_shapes",
    "find_processor",
    "inspect_text_encoder",
    "load_text_encoder",
    "vision_token_ids",
]

log = logging.getLogger(__name__)

EXPECTED = (
    "the Qwen2.5-VL-7B text encoder (ComfyUI's qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors, "
    "or a diffusers text_encoder/ folder)"
)
PREFIXES = ("text_encoders.qwen25_7b.transformer.", "qwen25_7b.transformer.", "text_encoder.", "transformer.")
COMFYUI_TOKENIZER_SUBDIR = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
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


# --------------------------------------------------------------------------- key layout


_SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2",
                   ".pre_quant_scale")  # fmt: skip


def _module_name(key: str) -> str:
    """File key (either layout) -> module name in transformers 5's Qwen2_5_VLForConditionalGeneration."""
    if key.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    return key


def _classic_name(module_name: str) -> str:
    """Module name -> the classic (ComfyUI) name, used to read shapes in one layout."""
    if module_name.startswith("model.visual."):
        return module_name[len("model.") :]
    if module_name.startswith("model.language_model."):
        return "model." + module_name[len("model.language_model.") :]
    return module_name


def inspect_text_encoder(path) -> dict:
    """Read a text-encoder file's header: ``{"prefix", "shapes" (classic names), "dtypes",
    "scaled" (True for ComfyUI scaled fp8), "quant_formats"}``. Raises :class:`TextEncoderFileError`."""
    p = Path(path)
    h = read_safetensors_header(p, error=TextEncoderFileError, expected=EXPECTED)
    header, metadata = h.tensors, h.metadata
    prefix = common_prefix([k for k in header if k != "scaled_fp8"], PREFIXES)
    shapes, dtypes = {}, {}
    scaled = "scaled_fp8" in header or "scaled_fp8" in metadata
    for k, (dt, shape) in header.items():
        if k == "scaled_fp8":
            continue
        local = k[len(prefix) :] if prefix and k.startswith(prefix) else k
        classic = _classic_name(_module_name(local))
        if classic.endswith(_SCALE_SUFFIXES):
            scaled = True
        shapes[classic] = shape
        dtypes[classic] = dt
    keys = set(shapes)
    if "model.embed_tokens.weight" not in keys or "model.layers.0.self_attn.k_proj.bias" not in keys:
        raise TextEncoderFileError(f"{str(p)!r} is {describe_keys(keys)}, but {EXPECTED} was expected")
    if "visual.patch_embed.proj.weight" not in keys:
        raise TextEncoderFileError(
            f"{str(p)!r} is {describe_keys(keys)}: it has no vision tower (visual.*), but {EXPECTED} was expected "
            "(FireRed reads the input pictures with it)"
        )
    return {"prefix": prefix, "shapes": shapes, "dtypes": dtypes, "scaled": scaled, "metadata": metadata}


# --------------------------------------------------------------------------- config


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


# --------------------------------------------------------------------------- loading


def _quant_conf(t: torch.Tensor) -> dict:
    try:
        return decode_conf(t)
    except (ValueError, UnicodeDecodeError):
        return {"format": "?"}


def _dequantize(
    w: torch.Tensor, scale: torch.Tensor | None, dtype, device, chunk_bytes: int = 256 << 20
) -> torch.Tensor:
    """fp8 (or any) weight times its scale, in ``dtype`` on ``device``, row chunk by row chunk."""
    if scale is None:
        return w.to(device=device, dtype=dtype)
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif w.ndim >= 1 and scale.numel() == w.shape[0]:
        scale = scale.reshape(-1, *([1] * (w.ndim - 1)))
    else:
        raise TextEncoderFileError(
            f"a weight scale of shape {tuple(scale.shape)} for a weight of shape {tuple(w.shape)} (block-wise quantization) is not supported"
        )
    scale = scale.to(device)
    if w.ndim == 0:
        return (w.to(device).to(torch.float32) * scale).to(dtype)
    out = torch.empty(w.shape, dtype=dtype, device=device)
    rows = max(1, chunk_bytes // max(1, 4 * w[0].numel()))
    for i in range(0, w.shape[0], rows):  # on the target device (fast on a GPU), a chunk at a time
        s = scale if scale.ndim == 0 else scale[i : i + rows]
        out[i : i + rows] = (w[i : i + rows].to(device).to(torch.float32) * s).to(dtype)
    return out


def _find_folder(p: Path) -> Path:
    if (p / "text_encoder").is_dir() and not (p / "config.json").is_file():
        return p / "text_encoder"
    return p


def _load_folder(folder: Path, dtype, device):
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = _find_folder(folder)
    if not (folder / "config.json").is_file():
        raise TextEncoderFileError(f"{str(folder)!r} is a folder without config.json, but {EXPECTED} was expected")
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise TextEncoderFileError(f"could not load the text-encoder folder {str(folder)!r}: {e}") from e
    return model.to(device).eval().requires_grad_(False)


def load_text_encoder(
    path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    processor=None,
    config: dict | None = None,
    mmproj=None,
):
    """Load the Qwen2.5-VL text encoder as a transformers ``Qwen2_5_VLForConditionalGeneration``.

    Args:
        path: ``qwen_2.5_vl_7b.safetensors``, ``qwen_2.5_vl_7b_fp8_scaled.safetensors`` (dequantized to
            ``dtype``), a file with ComfyUI's ``int8_tensorwise`` / ``mxfp8`` / ``nvfp4`` layers
            (:mod:`.comfy_quant`; dequantized to ``dtype`` at load), a file in the current
            transformers names, a diffusers ``text_encoder/`` folder, a release folder that has one,
            or a Qwen2.5-VL GGUF (:mod:`.gguf_text_encoder`).
        dtype: Parameter / compute dtype.
        device: Where the model goes (tensors are moved there one by one while loading).
        processor: The processor (or tokenizer) that goes with the encoder; its vision token ids
            are written into the config. Needed for vocabularies smaller than Qwen's (test models).
        config: ``Qwen2_5_VLConfig`` kwargs overriding the preset / shape-derived config.
        mmproj: GGUF only: the vision tower's ``mmproj`` GGUF (default: the one found beside ``path``).

    Raises:
        TextEncoderFileError: the file is missing, truncated, not a Qwen2.5-VL text encoder,
            incomplete, or quantized in a way not supported; the message names the file, what was
            found and what was expected.
    """
    from safetensors import safe_open

    p = Path(path)
    kind = sniff(p, error=TextEncoderFileError, expected=EXPECTED)
    if kind == "directory":
        return _load_folder(p, dtype, device)
    if kind == "gguf":
        from .gguf_text_encoder import load_gguf_text_encoder

        return load_gguf_text_encoder(p, mmproj=mmproj, dtype=dtype, device=device, processor=processor,
                                      config=config)  # fmt: skip
    info = inspect_text_encoder(p)
    prefix = info["prefix"]
    header = read_safetensors_header(p, error=TextEncoderFileError, expected=EXPECTED).tensors
    with safe_open(str(p), "pt", device="cpu") as f:
        file_keys = [k for k in f.keys() if k != "scaled_fp8" and (not prefix or k.startswith(prefix))]
        by_module: dict[str, str] = {}
        scales: dict[str, str] = {}
        for k in file_keys:
            local = k[len(prefix) :]
            for suffix in _SCALE_SUFFIXES:
                if local.endswith(suffix):
                    scales[_module_name(local[: -len(suffix)]) + suffix] = k
                    break
            else:
                by_module[_module_name(local)] = k
        confs = {owner[: -len(".comfy_quant")]: _quant_conf(f.get_tensor(key))
                 for owner, key in scales.items() if owner.endswith(".comfy_quant")}  # fmt: skip
        confs.update({o: c for o, c in _metadata_confs(info["metadata"], prefix).items() if o not in confs})
        shapes = dict(info["shapes"])
        for owner, conf in confs.items():  # the layer's shape, not the packed nvfp4 storage's
            w = _classic_name(owner) + ".weight"
            if conf.get("format") == "nvfp4" and len(shapes.get(w, ())) == 2:
                shapes[w] = (shapes[w][0], 2 * shapes[w][1])
        model, cfg = _empty_model(p, shapes, processor, config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        _check_keys(p, cfg, expected, by_module)
        block = _check_quant(p, confs, scales, by_module, header, expected)
        state = {}
        for name, key in by_module.items():
            owner = name[: -len(".weight")] if name.endswith(".weight") else None
            if owner in block:
                aux = {sfx: f.get_tensor(scales[owner + "." + sfx]) for sfx in ("weight_scale", "weight_scale_2")
                       if owner + "." + sfx in scales}  # fmt: skip
                out_f, in_f = expected[name]
                q = QuantLinear.from_stored(block[owner], f.get_tensor(key), aux, out_f, in_f)
                state[name] = q.dequantized_weight(dtype).to(device)
                continue
            t = f.get_tensor(key)
            if tuple(t.shape) != expected[name]:
                raise TextEncoderFileError(f"{str(p)!r}: {key} has shape {tuple(t.shape)}, expected {expected[name]}")
            scale_key = owner and (scales.get(owner + ".scale_weight") or scales.get(owner + ".weight_scale"))
            if scale_key or t.dtype in FP8_DTYPES:
                state[name] = _dequantize(t, f.get_tensor(scale_key) if scale_key else None, dtype, device)
            else:
                state[name] = t.to(device=device, dtype=dtype)
            del t
    if block:
        log.info("%s: %d layers in %s dequantized to %s at load", p.name, len(block), describe_formats(block),
                 str(dtype).replace("torch.", ""))  # fmt: skip
    return _finish(p, model, state, device)


def _shape_config(p: Path, shapes: dict, processor) -> dict:
    """:func:`config_from_shapes` with the processor's token ids, its errors naming the file."""
    try:
        return config_from_shapes(shapes, vision_token_ids(processor) if processor is not None else None)
    except KeyError as e:
        raise TextEncoderFileError(
            f"{str(p)!r} is a Qwen2.5-VL text encoder without {e.args[0]}: the file is incomplete"
        ) from None
    except TextEncoderFileError as e:
        raise TextEncoderFileError(f"{str(p)!r}: {e}") from None


def _empty_model(p: Path, shapes: dict, processor, config: dict | None):
    """(the model on the meta device, its config) for a state dict of ``shapes`` (classic names)."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = config or _shape_config(p, shapes, processor)
    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(cfg)))
    return model, cfg


def _check_keys(p: Path, cfg: dict, expected: dict, by_module) -> None:
    missing = sorted(set(expected) - set(by_module) - {"lm_head.weight"})
    extra = sorted(set(by_module) - set(expected))
    if missing or extra:
        raise TextEncoderFileError(
            f"{str(p)!r} is a Qwen2.5-VL text encoder with the wrong tensors for a "
            f"{cfg['text_config']['num_hidden_layers']}-layer model: missing {[_classic_name(m) for m in missing[:5]]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {[_classic_name(m) for m in extra[:5]]}{'...' if len(extra) > 5 else ''}"
        )


def _finish(p: Path, model, state: dict, device):
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


def _metadata_confs(metadata: dict, prefix: str) -> dict[str, dict]:
    """Module name -> comfy_quant entry from a ``_quantization_metadata`` header table."""
    if "_quantization_metadata" not in metadata:
        return {}
    try:
        layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
    except (ValueError, AttributeError):
        return {}
    out = {}
    for name, conf in layers.items():
        name = name[len(prefix) :] if prefix and name.startswith(prefix) else name
        out[_module_name(name)] = conf if isinstance(conf, dict) else {"format": str(conf)}
    return out


def _check_quant(p: Path, confs: dict, scales: dict, by_module: dict, header: dict, expected: dict) -> dict[str, str]:
    """The block-quantized layers (module name -> format), every quantized layer checked from the header."""
    where = repr(str(p))
    formats = {o: str(c.get("format", "?")) for o, c in confs.items()}
    for owner, fmt in sorted(formats.items()):
        if fmt not in ("float8_e4m3fn", "float8_e5m2") and fmt not in BLOCK_FORMATS:
            raise TextEncoderFileError(
                f"{where}: layer {_classic_name(owner)!r} is quantized as {fmt!r}; this loader reads bf16 / fp16 / fp32, "
                f"(scaled) fp8 and the comfy_quant formats {', '.join(BLOCK_FORMATS)}"
            )
    block = {o: f for o, f in formats.items() if f in BLOCK_FORMATS}
    for key in scales:
        owner, _, sfx = key.rpartition(".")
        if sfx in ("weight_scale_2", "pre_quant_scale") and owner not in block:
            raise TextEncoderFileError(
                f"{where}: {_classic_name(owner)}.{sfx} belongs to no layer marked nvfp4 by a comfy_quant entry; "
                f"expected a {_classic_name(owner)}.comfy_quant naming its format"
            )
    for owner, fmt in block.items():
        wkey = by_module.get(owner + ".weight")
        if wkey is None or owner + ".weight" not in expected or len(expected[owner + ".weight"]) != 2:
            raise TextEncoderFileError(f"{where}: layer {_classic_name(owner)!r} is quantized as {fmt!r} but is not a "
                                       "2-D weight of the model")  # fmt: skip
        aux = {key.rpartition(".")[2]: header[k] for key, k in scales.items() if key.rpartition(".")[0] == owner}
        out_f, in_f = expected[owner + ".weight"]
        check_layer(fmt, _classic_name(owner), confs.get(owner), header[wkey], aux, out_f, in_f, where=where,
                    error=TextEncoderFileError)  # fmt: skip
    return block


# --------------------------------------------------------------------------- tokenizer / processor


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
