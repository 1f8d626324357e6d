"""What a weight file is, in a few words, from its header alone (for the loaders' front end).

>>> describe_file("models/diffusion_models/firered_image_edit_1.1_fp8_scaled.safetensors")["summary"]
'MM-DiT · safetensors fp8 scaled · 60 layers · 20.4 GB'

:func:`describe_file` reads only headers -- the safetensors JSON header, the GGUF key/value table and
tensor infos (no tensor data, except the few scalar ``.alpha`` / ``comfy_quant`` entries the
inspectors read) -- and answers a plain dict, ready for JSON:

========== ===================================================================================
path, name the file (or folder) and its base name
container  ``safetensors`` / ``gguf`` / ``folder`` / ``pickle`` / ``zip`` / ``empty`` / ``unknown``
kind       ``mmdit`` / ``text_encoder`` / ``vae`` / ``lora`` / ``unknown``
what       the model the keys belong to, in words (:func:`~._common.describe_keys`)
precision  ``bf16`` / ``fp16`` / ``fp32`` / ``fp8_e4m3fn`` / ``fp8_e5m2`` / ``fp8 scaled`` /
           ``mixed (fp8 + bf16)`` / ``GGUF Q8_0`` ... (``None`` when unreadable)
size       bytes (a folder: its files added up); ``size_human``: ``"20.4 GB"``
layers     transformer blocks of an MM-DiT (``None`` otherwise)
lora       for a LoRA: ``{"format": "PEFT"|"kohya"|"ComfyUI"|"LoHa"|"LoKr"|..., "layout": the
           prefix in words, "rank", "alpha", "modules"}`` (``None`` otherwise)
mmproj     a Qwen2.5-VL GGUF text encoder only: the vision-tower GGUF found beside it
error      why the file could not be read, or why the pack's loader for its kind cannot load it
           (``None`` when it can)
loadable   ``True`` when the pack's loader for ``kind`` reads the file (a known kind, no ``error``)
summary    one short line: ``"GGUF Q4_K · 60 layers · 10.8 GB"``, ``"LoRA · PEFT · rank 16 · 295 MB"``
========== ===================================================================================

Format problems (a truncated download, a pickle, another model) are reported in ``error`` and
``summary`` rather than raised: the caller shows them. A path that does not exist raises
``FileNotFoundError``. The recognising is done by the loaders' own inspectors
(:func:`~.transformer_files.inspect_transformer`, :func:`~.gguf_files.inspect_gguf`,
:func:`~.vae_files.inspect_vae`, :func:`~.text_encoder_keys.inspect_text_encoder`) and the LoRA
key table of :mod:`.lora`, so what this says is what the loaders will find.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ._common import FileFormatError, SafetensorsHeader, describe_keys, read_safetensors_header, sniff

__all__ = ["describe_file", "human_size"]

#: safetensors dtype -> the name users know
_PRECISION = {
    "BF16": "bf16",
    "F16": "fp16",
    "F32": "fp32",
    "F64": "fp64",
    "F8_E4M3": "fp8_e4m3fn",
    "F8_E5M2": "fp8_e5m2",
    "I8": "int8",
    "U8": "uint8",
}
_KIND_WORDS = {"mmdit": "MM-DiT", "text_encoder": "Text encoder", "vae": "VAE", "lora": "LoRA"}
_UNQUANTIZED_GGML = {"F32", "F16", "BF16", "F64"}
_BLOCK_NAMES = ("int8_tensorwise", "mxfp8", "nvfp4")
#: a dtype holding at least this share of the weights names the file's precision; below, "mixed"
_DOMINANT = 0.9


def human_size(n: int) -> str:
    """Bytes in decimal units, as model pages show them: ``"20.4 GB"``, ``"295 MB"``."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{n} B"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _st_precision(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> str:
    """The precision of a safetensors file's weights (tensors of 2 or more dimensions, by count of
    elements), with ComfyUI's scaled-fp8 and mixed-precision markers recognised."""
    by_dtype: Counter[str] = Counter()
    for k, (dt, shape) in tensors.items():
        if len(shape) >= 2 and not k.endswith((".comfy_quant", ".scale_weight", ".weight_scale")):
            by_dtype[dt] += _numel(shape)
    if not by_dtype:
        return "?"
    names = [_PRECISION.get(d, d.lower()) for d, _ in by_dtype.most_common()]
    has_fp8 = any(d.startswith("F8") for d in by_dtype)
    if any(k.endswith(".comfy_quant") for k in tensors) or "_quantization_metadata" in metadata:
        return f"mixed ({' + '.join(names)})"
    scaled = (
        "scaled_fp8" in tensors
        or "scaled_fp8" in metadata
        or any(k.endswith((".scale_weight", ".weight_scale")) for k in tensors)
    )
    if has_fp8 and scaled:
        return "fp8 scaled"
    dtype, count = by_dtype.most_common(1)[0]
    if count >= _DOMINANT * sum(by_dtype.values()):
        return _PRECISION.get(dtype, dtype.lower())
    return f"mixed ({' + '.join(names)})"


# ---------------------------------------------------------------------------------------------
# LoRA files (no model needed: the key table of .lora)
# ---------------------------------------------------------------------------------------------


def _lora_keys(tensors) -> list[tuple[str, str, str]]:
    """(key, base name, role) of every LoRA / LyCORIS tensor."""
    from .lora_keys import split_suffix

    out = []
    for k in tensors:
        split = split_suffix(k)
        if split is not None:
            out.append((k, *split))
    return out


def _lora_info(header: SafetensorsHeader, path: Path | None) -> dict[str, Any]:
    from .lora import alpha_config
    from .lora_keys import FORMAT_NAMES, PREFIXES

    found = _lora_keys(header.tensors)
    prefixes: Counter[str] = Counter()
    for _, base, _ in found:
        prefixes[next((p for p in PREFIXES if base.startswith(p)), "")] += 1
    prefix = prefixes.most_common(1)[0][0] if prefixes else ""
    roles = {role for _, _, role in found}
    ranks: Counter[int] = Counter()
    for k, _, role in found:
        shape = header.tensors[k][1]
        if role == "down" and shape:
            ranks[int(shape[0])] += 1
        elif role in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b") and shape:
            ranks[int(shape[0])] += 1
    if any(r.startswith("hada_") for r in roles):
        fmt = "LoHa"
    elif any(r.startswith("lokr_") for r in roles):
        fmt = "LoKr"
    elif prefix in ("lora_unet_", "lora_transformer_"):
        fmt = "kohya"
    elif prefix in ("diffusion_model.", "model.diffusion_model."):
        fmt = "ComfyUI"
    elif prefix == "lycoris_":
        fmt = "LyCORIS"
    elif any(".lora_A" in k or ".lora_B" in k for k, _, _ in found):
        fmt = "PEFT"
    else:
        fmt = "diffusers (lora_down/lora_up)"
    alpha = None
    alphas = [k for k, _, role in found if role == "alpha"]
    if alphas and path is not None:
        try:
            with open(path, "rb") as f:
                alpha = float(header.read(f, alphas[0]).float().reshape(-1)[0])
        except (FileFormatError, OSError, IndexError, RuntimeError):
            alpha = None
    if alpha is None:
        conf = alpha_config(header.metadata, str(path) if path is not None else None)
        if conf.get("lora_alpha") is not None:
            try:
                alpha = float(conf["lora_alpha"])
            except (TypeError, ValueError):
                alpha = None
    rank = ranks.most_common(1)[0][0] if ranks else None
    return {
        "format": fmt,
        "layout": FORMAT_NAMES.get(prefix, repr(prefix)),
        "rank": rank,
        "ranks": sorted(ranks) if len(ranks) > 1 else None,
        "alpha": alpha,
        "modules": len({base for _, base, role in found if role != "alpha"}),
    }


def _is_lora(tensors) -> bool:
    found = [role for _, _, role in _lora_keys(tensors) if role != "alpha"]
    return bool(found) and len(found) >= 0.5 * len(tensors)


# ---------------------------------------------------------------------------------------------
# the kinds
# ---------------------------------------------------------------------------------------------


def _classify_safetensors(path: Path, header: SafetensorsHeader, info: dict[str, Any]) -> None:
    """Fill ``info`` for a safetensors file (or the merged header of a folder's files)."""
    from .transformer_inspect import _SIGNATURE, inspect_transformer

    tensors = header.tensors
    info["what"] = describe_keys(tensors)
    info["precision"] = _st_precision(tensors, header.metadata)
    if _is_lora(tensors):
        info["kind"] = "lora"
        info["lora"] = _lora_info(header, path if path.is_file() else None)
        return
    if any(k == _SIGNATURE or k.endswith("." + _SIGNATURE) for k in tensors):
        info["kind"] = "mmdit"
        try:
            ck = inspect_transformer(path)
        except FileFormatError as e:
            info["error"] = str(e)
            return
        info["layers"] = ck.config.get("num_layers")
        if path.is_dir():  # the precision of the transformer's own files, not a release folder's
            info["precision"] = _st_precision({k: (v[2], v[3]) for k, v in ck.entries.items()}, {})
        block = sorted({f for f in ck.quant_formats.values() if f in _BLOCK_NAMES})
        if block:  # comfy_quant int8 / mxfp8 / nvfp4 layers: name the formats, not the storage dtypes
            plain = sorted({_PRECISION.get(v[2], v[2].lower()) for k, v in ck.entries.items()
                            if k[: -len(".weight")] not in ck.quant_formats and v[2] in ("BF16", "F16", "F32")
                            and len(v[3]) == 2})  # fmt: skip
            info["precision"] = f"mixed ({' + '.join([*block, *plain])})"
        return
    if not path.is_file():
        return
    keys = " ".join(tensors)
    if "decoder." in keys and "encoder." in keys:
        from .vae_files import inspect_vae

        try:
            inspect_vae(path)
            info["kind"] = "vae"
        except FileFormatError as e:
            info["error"] = str(e)
        return
    if "embed_tokens" in keys:
        from .text_encoder_keys import inspect_text_encoder

        try:
            inspect_text_encoder(path)
            info["kind"] = "text_encoder"
        except FileFormatError as e:
            info["error"] = str(e)


def _ggml_name(t) -> str:
    return getattr(t, "name", str(t))


def _classify_gguf(path: Path, info: dict[str, Any]) -> None:
    from ._common import GGUFFileError, gguf_field, open_gguf
    from .gguf_files import TEXT_ARCHS, inspect_gguf

    info["container"] = "gguf"
    try:
        g = inspect_gguf(path)
    except FileFormatError as e:
        # not a Qwen-Image MM-DiT: say what it is from the header all the same
        info["error"] = str(e)
        try:
            reader = open_gguf(path, GGUFFileError)
        except (FileFormatError, ImportError):
            return
        arch = gguf_field(reader, "general.architecture")
        if arch in TEXT_ARCHS:
            info["kind"] = "text_encoder"
        if arch in ("qwen2vl", "clip"):
            _qwen_gguf(path, reader, info)
        names = [t.name for t in reader.tensors]
        info["what"] = f"a GGUF {arch!r} file holding {describe_keys(names)}" if arch else describe_keys(names)
        if info["kind"] == "text_encoder" and arch in ("qwen2vl", "clip"):
            info["what"] = ("the vision tower (mmproj) of a Qwen2.5-VL GGUF text encoder" if arch == "clip" else
                            "a Qwen2.5-VL text encoder (GGUF language model; vision tower in its mmproj GGUF)")  # fmt: skip
        by_type: Counter[str] = Counter()
        for t in reader.tensors:
            by_type[_ggml_name(t.tensor_type)] += int(t.n_elements)
        info["precision"] = _gguf_precision(by_type)
        return
    info["kind"] = "mmdit"
    info["what"] = describe_keys(g.shapes)
    info["layers"] = g.config.get("num_layers")
    by_type = Counter()
    for name, q in g.qtypes.items():
        by_type[q] += _numel(g.shapes[name])
    info["precision"] = _gguf_precision(by_type)


def _qwen_gguf(path: Path, reader, info: dict[str, Any]) -> None:
    """A Qwen2.5-VL GGUF text encoder (loadable when its mmproj vision tower sits beside it) or
    such an mmproj file (read with the text encoder, not alone)."""
    from .gguf_text_encoder import _is_mmproj, find_mmproj

    info["kind"] = "text_encoder"
    if _is_mmproj(reader):
        info["error"] = (f"{str(path)!r} is the vision tower (mmproj) of a Qwen2.5-VL GGUF text encoder; load the "
                         "qwen2vl GGUF beside it (this file is read with it)")  # fmt: skip
        return
    try:
        mm = find_mmproj(path)
    except FileFormatError as e:
        info["error"] = str(e)
        return
    info["error"] = None if mm is not None else (
        f"{str(path)!r} is a Qwen2.5-VL GGUF holding the language model only; FireRed also needs its vision tower, the "
        "mmproj GGUF (e.g. mmproj-Qwen2.5-VL-7B-Instruct-F16.gguf): put it beside this file")  # fmt: skip
    if mm is not None:
        info["mmproj"] = str(mm)


def _gguf_precision(by_type: Counter[str]) -> str:
    """``GGUF <type>``: the quantized type holding most of the weights (a K-quant file keeps some
    tensors in a higher type); ``GGUF BF16`` / ``F16`` for an unquantized file."""
    quant = Counter({t: n for t, n in by_type.items() if t not in _UNQUANTIZED_GGML})
    if quant:
        return f"GGUF {quant.most_common(1)[0][0]}"
    if by_type:
        return f"GGUF {by_type.most_common(1)[0][0]}"
    return "GGUF"


def _folder_files(path: Path) -> list[Path]:
    sub = path / "transformer"
    where = sub if sub.is_dir() else path
    return sorted(where.glob("*.safetensors"))


def _summary(info: dict[str, Any]) -> str:
    size = info["size_human"]
    if info["kind"] == "unknown":
        if "truncated" in (info.get("error") or ""):
            return f"unreadable: truncated file · {size}"
        return f"not a FireRed model file: {info.get('what') or info['container']} · {size}"
    parts = [_KIND_WORDS.get(info["kind"], "Unknown")]
    if info["kind"] == "lora" and info.get("lora"):
        lo = info["lora"]
        parts.append(lo["format"])
        if lo.get("rank"):
            parts.append(f"rank {lo['rank']}")
        parts.append(info["precision"] or "?")
    else:
        prec = info.get("precision") or "?"
        if info["container"] == "safetensors":
            prec = f"safetensors {prec}"
        elif info["container"] == "folder":
            prec = f"diffusers folder {prec}"
        parts.append(prec)
        if info.get("layers"):
            parts.append(f"{info['layers']} layers")
    parts.append(size)
    return " · ".join(parts)


def describe_file(path) -> dict[str, Any]:
    """What the weight file (or diffusers folder) at ``path`` is, from its header; see the module
    docstring for the keys. Raises ``FileNotFoundError`` when nothing is at ``path``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist")
    info: dict[str, Any] = {
        "path": str(p),
        "name": p.name,
        "container": "unknown",
        "kind": "unknown",
        "what": None,
        "precision": None,
        "size": 0,
        "layers": None,
        "lora": None,
        "error": None,
    }
    container = sniff(p)
    if container == "directory":
        info["container"] = "folder"
        info["size"] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        files = _folder_files(p)
        if files:
            try:
                headers = [read_safetensors_header(f) for f in files]
                merged = SafetensorsHeader(str(p), {k: v for h in headers for k, v in h.tensors.items()})
                for h in headers:
                    merged.metadata.update(h.metadata)
                _classify_safetensors(p, merged, info)
            except FileFormatError as e:
                info["error"] = str(e)
        else:
            info["error"] = f"{str(p)!r} holds no .safetensors weights"
    else:
        info["size"] = os.path.getsize(p)
        info["container"] = container
        if container == "safetensors":
            try:
                _classify_safetensors(p, read_safetensors_header(p), info)
            except FileFormatError as e:
                info["error"] = str(e)
        elif container == "gguf":
            _classify_gguf(p, info)
        else:
            from ._common import FORMAT_WORDS

            info["what"] = FORMAT_WORDS.get(container, container)
            info["error"] = f"{str(p)!r} is {info['what']}; expected a .safetensors or .gguf file"
    info["loadable"] = info["kind"] != "unknown" and info["error"] is None
    info["size_human"] = human_size(info["size"])
    info["summary"] = _summary(info)
    return json.loads(json.dumps(info))  # plain JSON types only (no tuples, no numpy scalars)
