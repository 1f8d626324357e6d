"""The Qwen2.5-VL text encoder from GGUF files as ComfyUI-GGUF users hold them: the language model from the ``qwen2vl`` GGUF, the vision tower from its ``mmproj`` GGUF.

llama.cpp's ``convert_hf_to_gguf.py`` splits Qwen2.5-VL in two files, and city96's ComfyUI-GGUF
reads both (its ``CLIPLoaderGGUF`` looks for an ``mmproj`` GGUF beside the text encoder):

- the language model, ``general.architecture = "qwen2vl"``: ``token_embd``, ``blk.N.attn_norm``,
  ``blk.N.attn_q`` / ``attn_k`` / ``attn_v`` (weight and bias), ``blk.N.attn_output``,
  ``blk.N.ffn_norm``, ``blk.N.ffn_gate`` / ``ffn_up`` / ``ffn_down``, ``output_norm``, ``output``
  (the lm_head; unused here). Qwen2 weights are not permuted (only llama's q / k are), so the names
  map one to one onto the Hugging Face layers;
- the vision tower, ``general.architecture = "clip"`` (``clip.projector_type`` ``qwen2.5vl_merger``):
  ``v.patch_embd.weight`` and ``v.patch_embd.weight.1`` (the Conv3d's two temporal slices, stacked
  back on axis 2), ``v.blk.N.attn_q`` / ``attn_k`` / ``attn_v`` (the fused ``attn.qkv``, concatenated
  back in that order), ``v.blk.N.attn_out``, ``v.blk.N.ln1`` / ``ln2``, ``v.blk.N.ffn_*``,
  ``v.post_ln`` (the merger's ``ln_q``) and ``mm.0`` / ``mm.2`` (the merger MLP).

FireRed reads the input pictures with the vision tower, so a language-model GGUF without its
mmproj fails with an error that says so (name it with ``mmproj=``, or put it beside the file:
the GGUF files in the same folder are checked by content, and one whose name shares the text
encoder's stem wins when several fit). Every tensor is dequantized to the compute dtype at load
(F32 / F16 / BF16 as stored, quantized blocks in float32 with diffusers' GGUF kernels, gguf-py's for
types diffusers lacks), like the fp8 text encoder: it runs once per prompt. The architecture comes
from the shapes (:func:`.text_encoder_config.config_from_shapes`), with the head counts, RoPE base,
norm epsilon and full-attention pattern taken from the GGUF metadata where present.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ._common import TextEncoderFileError, gguf_field, gguf_module, open_gguf, sniff
from .text_encoder_config import shape_config
from .text_encoder_keys import EXPECTED, module_name
from .text_encoder_model import check_keys, empty_model, finish

__all__ = ["find_mmproj", "gguf_to_classic", "load_gguf_text_encoder"]

log = logging.getLogger(__name__)

_TEXT = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_VISION = {
    "attn_out": "attn.proj",
    "ln1": "norm1",
    "ln2": "norm2",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_VTOP = {"v.post_ln": "visual.merger.ln_q", "mm.0": "visual.merger.mlp.0", "mm.2": "visual.merger.mlp.2"}
_QUANT_SUFFIX = re.compile(r"[-_.]?(?:ud-)?(?:i?q\d_[a-z0-9_]{1,8}|f16|bf16|f32)$", re.IGNORECASE)


def gguf_to_classic(name: str) -> str | None:
    """A llama.cpp tensor name -> the classic Hugging Face name (``model.layers.N...`` / ``visual.*``)
    that :mod:`.text_encoder_keys` reads; ``None`` for names that are not Qwen2.5-VL's. The
    split vision tensors map to their parts (``visual.blocks.N.attn.q.weight``,
    ``visual.patch_embed.proj.weight.1``), joined by the loader."""
    stem, dot, leaf = name.rpartition(".")
    if name == "v.patch_embd.weight.1":
        return "visual.patch_embed.proj.weight.1"
    if leaf not in ("weight", "bias"):
        return None
    if stem in _TOP:
        return f"{_TOP[stem]}.{leaf}"
    if stem in _VTOP:
        return f"{_VTOP[stem]}.{leaf}"
    if stem == "v.patch_embd":
        return f"visual.patch_embed.proj.{leaf}"
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", stem):
        return f"model.layers.{m[1]}.{_TEXT[m[2]]}.{leaf}" if m[2] in _TEXT else None
    if m := re.fullmatch(r"v\.blk\.(\d+)\.(\w+)", stem):
        if m[2] in ("attn_q", "attn_k", "attn_v"):
            return f"visual.blocks.{m[1]}.attn.{m[2][-1]}.{leaf}"
        return f"visual.blocks.{m[1]}.{_VISION[m[2]]}.{leaf}" if m[2] in _VISION else None
    return None


def _is_mmproj(reader) -> bool:
    """A Qwen2.5-VL vision tower GGUF: ``clip`` with a ``qwen2.5vl_merger`` projector (or none named)."""
    return (gguf_field(reader, "general.architecture") == "clip"
            and gguf_field(reader, "clip.projector_type") in (None, "qwen2.5vl_merger")
            and any(t.name == "v.patch_embd.weight" for t in reader.tensors))  # fmt: skip


def find_mmproj(path) -> Path | None:
    """The mmproj GGUF beside the text-encoder GGUF ``path`` (judged by content), or ``None``."""
    p = Path(path)
    stem = _QUANT_SUFFIX.sub("", p.stem).lower()
    found = []
    for f in sorted(p.parent.glob("*")):
        if f == p or not f.is_file() or f.suffix.lower() != ".gguf" or sniff(f) != "gguf":
            continue
        try:
            if _is_mmproj(open_gguf(f, TextEncoderFileError)):
                found.append(f)
        except TextEncoderFileError:
            continue
    if len(found) > 1:
        matching = [f for f in found if stem and stem in f.name.lower()]
        if len(matching) == 1:
            return matching[0]
        raise TextEncoderFileError(
            f"{str(p)!r}: several mmproj (vision tower) GGUF files sit beside it ({[f.name for f in found]}) and none "
            "is named after it; name the one that belongs to it (mmproj=...)"
        )
    return found[0] if found else None


def _dequantize(t, device) -> torch.Tensor:
    """A GGUF tensor as float32 in its torch shape (F32 / F16 / BF16 exact; quantized blocks exact in float32)."""
    gguf = gguf_module()
    Q = gguf.GGMLQuantizationType
    shape = tuple(int(v) for v in reversed(t.shape.tolist()))
    raw = torch.from_numpy(t.data.copy()).reshape(-1).view(torch.uint8).to(device)
    if t.tensor_type in (Q.F32, Q.F16, Q.BF16):
        dt = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[t.tensor_type]
        return raw.view(dt).reshape(shape).to(torch.float32)
    from diffusers.quantizers.gguf.utils import dequantize_functions

    block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    fn = dequantize_functions.get(t.tensor_type)
    if fn is None:  # gguf-py's reference code (numpy, slower) for the types diffusers lacks
        import numpy as np

        out = gguf.quants.dequantize(np.ascontiguousarray(t.data), t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape).to(device)
    return fn(raw.reshape(-1, type_size), block, type_size, dtype=torch.float32).reshape(shape).to(torch.float32)


def _read(reader, device, dtype, where: str) -> dict[str, torch.Tensor]:
    """Every tensor (classic names) dequantized and rounded to ``dtype`` one at a time (so the peak
    is the model in ``dtype`` plus one float32 tensor); llama.cpp's ``output`` (the lm_head) is skipped."""
    out, unknown = {}, []
    for t in reader.tensors:
        name = gguf_to_classic(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        if name == "lm_head.weight":
            continue  # only the hidden states are used: tied to the embedding, as for ComfyUI's files
        try:
            out[name] = _dequantize(t, device).to(dtype)
        except (KeyError, ValueError, RuntimeError) as e:
            qname = getattr(t.tensor_type, "name", t.tensor_type)
            raise TextEncoderFileError(f"{where}: tensor {t.name} ({qname}) cannot be dequantized ({e})") from None
    if unknown:
        raise TextEncoderFileError(
            f"{where}: tensors {unknown[:4]} are not Qwen2.5-VL's; expected llama.cpp's qwen2vl names "
            "(token_embd, blk.N.attn_q, ...) and, in the mmproj file, v.patch_embd / v.blk.N.* / mm.N"
        )
    return out


def _join_vision(v: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The mmproj's split tensors put back together: the Conv3d and the fused qkv projections."""
    out = {}
    w0, w1 = v.pop("visual.patch_embed.proj.weight", None), v.pop("visual.patch_embed.proj.weight.1", None)
    if w0 is None or w1 is None:
        raise TextEncoderFileError(f"{where}: the patch embedding needs v.patch_embd.weight and v.patch_embd.weight.1 "
                                   "(the two temporal slices of the Conv3d); the file is incomplete")  # fmt: skip
    out["visual.patch_embed.proj.weight"] = torch.stack([w0, w1], dim=2)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in v.items():
        m = re.fullmatch(r"(visual\.blocks\.\d+\.attn)\.([qkv])\.(weight|bias)", k)
        if m:
            parts.setdefault(f"{m[1]}.qkv.{m[3]}", {})[m[2]] = t
        else:
            out[k] = t
    for k, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise TextEncoderFileError(f"{where}: {k} needs attn_q, attn_k and attn_v; found only {sorted(qkv)}")
        out[k] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def _metadata_config(cfg: dict, text, vision) -> dict:
    """``cfg`` with what the GGUF metadata states: head counts, RoPE base and sections, epsilon,
    the vision tower's heads, full-attention pattern and window."""
    tc, vc = cfg["text_config"], cfg["vision_config"]
    for key, field, cast in (("num_attention_heads", "qwen2vl.attention.head_count", int),
                             ("num_key_value_heads", "qwen2vl.attention.head_count_kv", int),
                             ("rms_norm_eps", "qwen2vl.attention.layer_norm_rms_epsilon", float)):  # fmt: skip
        v = gguf_field(text, field)
        if v is not None:
            tc[key] = cast(v)
    theta, sections = gguf_field(text, "qwen2vl.rope.freq_base"), gguf_field(text, "qwen2vl.rope.dimension_sections")
    if theta is not None or sections:
        rope = dict(tc.get("rope_parameters") or {})
        if theta is not None:
            rope["rope_theta"] = float(theta)
        if sections:
            rope["mrope_section"] = [int(s) for s in list(sections)[:3]]
        tc["rope_parameters"] = rope
    heads, pattern = gguf_field(vision, "clip.vision.attention.head_count"), gguf_field(vision, "clip.vision.n_wa_pattern")
    if heads is not None:
        vc["num_heads"] = int(heads)
    if pattern:
        vc["fullatt_block_indexes"] = [i for i in range(vc["depth"]) if (i + 1) % int(pattern) == 0]
    window = gguf_field(vision, "clip.vision.window_size")
    if window:
        vc["window_size"] = int(window)
    return cfg


def load_gguf_text_encoder(path, *, mmproj=None, dtype=torch.bfloat16, device="cpu", processor=None,
                           config: dict | None = None):  # fmt: skip
    """Load a Qwen2.5-VL GGUF text encoder (with its mmproj vision tower) as a transformers
    ``Qwen2_5_VLForConditionalGeneration`` in ``dtype`` on ``device`` (see the module docstring).

    Raises:
        TextEncoderFileError: not a Qwen2.5-VL GGUF, no mmproj found, tensors missing, unknown or of
            the wrong shapes; the message names the file, what was found and what was expected.
    """
    p = Path(path)
    where = repr(str(p))
    reader = open_gguf(p, TextEncoderFileError)
    arch = gguf_field(reader, "general.architecture")
    if _is_mmproj(reader):
        raise TextEncoderFileError(f"{where} is the vision tower (mmproj) of a Qwen2.5-VL GGUF, not the text encoder; "
                                   "load the qwen2vl GGUF beside it (this file is read with it)")  # fmt: skip
    if arch != "qwen2vl":
        raise TextEncoderFileError(f"{where} is a GGUF {arch!r} model, but {EXPECTED} or a Qwen2.5-VL GGUF "
                                   "(general.architecture 'qwen2vl') was expected")  # fmt: skip
    mm = Path(mmproj) if mmproj is not None else find_mmproj(p)
    if mm is None:
        raise TextEncoderFileError(
            f"{where} is a Qwen2.5-VL GGUF holding the language model only: its vision tower is in a separate mmproj "
            "GGUF (llama.cpp's split, e.g. mmproj-Qwen2.5-VL-7B-Instruct-F16.gguf), and FireRed needs it to read the "
            f"input pictures. Put that file beside {p.name} or name it (mmproj=...); none was found in {str(p.parent)!r}"
        )
    vreader = open_gguf(mm, TextEncoderFileError)
    if not _is_mmproj(vreader):
        raise TextEncoderFileError(f"{str(mm)!r} was given as the mmproj of {where} but is not a vision-tower GGUF "
                                   "(general.architecture 'clip' with v.patch_embd.weight)")  # fmt: skip
    names = {gguf_to_classic(t.name): t for t in reader.tensors}
    vnames = {gguf_to_classic(t.name): t for t in vreader.tensors}
    wrong = [n for n in vnames if n is not None and not n.startswith("visual.")]
    if wrong or any(n is not None and n.startswith("visual.") for n in names):
        raise TextEncoderFileError(f"{where} / {str(mm)!r}: the language-model and vision files are mixed up; expected "
                                   "the language model in the qwen2vl GGUF and v.* / mm.* tensors in the mmproj")  # fmt: skip
    shapes = {n: tuple(int(v) for v in reversed(t.shape.tolist())) for n, t in names.items() if n}
    vshapes = {n: tuple(int(v) for v in reversed(t.shape.tolist())) for n, t in vnames.items() if n}
    if "visual.patch_embed.proj.weight" in vshapes:  # the Conv3d's shape, for the config
        o, i, h, w = vshapes["visual.patch_embed.proj.weight"]
        vshapes["visual.patch_embed.proj.weight"] = (o, i, 2, h, w)
    for k in [k for k in vshapes if ".attn." in k and re.search(r"\.attn\.[qkv]\.", k)]:
        if ".attn.q." in k:
            fused = k.replace(".attn.q.", ".attn.qkv.")
            vshapes[fused] = (3 * vshapes[k][0], *vshapes[k][1:])
        del vshapes[k]
    vshapes.pop("visual.patch_embed.proj.weight.1", None)
    cfg = config or _metadata_config(shape_config(p, {**shapes, **vshapes}, processor), reader, vreader)
    model, cfg = empty_model(p, {}, processor, cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(p, cfg, expected, {module_name(k): k for k in {**shapes, **vshapes}})
    vision = _join_vision(_read(vreader, device, dtype, repr(str(mm))), repr(str(mm)))
    state = {}
    for k, t in {**_read(reader, device, dtype, where), **vision}.items():
        name = module_name(k)
        if tuple(t.shape) != expected[name]:
            raise TextEncoderFileError(f"{where}: {k} has shape {tuple(t.shape)}, expected {expected[name]}")
        state[name] = t
    counts: dict[str, int] = {}
    for t in list(reader.tensors) + list(vreader.tensors):
        qn = getattr(t.tensor_type, "name", str(t.tensor_type))
        counts[qn] = counts.get(qn, 0) + 1
    log.info("loaded the Qwen2.5-VL text encoder from %s + %s (GGUF %s), dequantized to %s", p.name, mm.name,
             ", ".join(f"{k} x {v}" for k, v in sorted(counts.items())), str(dtype).replace("torch.", ""))  # fmt: skip
    return finish(p, model, state, device)
