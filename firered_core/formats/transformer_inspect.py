"""What a MM-DiT file or folder holds, read from the safetensors header alone (no weight is
loaded): the files and shards, the key prefix, each layer's storage (bf16, fp8, scaled fp8,
ComfyUI mixed precision), the scales and markers, the architecture; every format decision of
:func:`~.transformer_files.load_transformer` is made here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._common import (
    CheckpointFormatError,
    SafetensorsHeader,
    describe_keys,
    read_safetensors_header,
)
from .comfy_quant import BLOCK_FORMATS, decode_conf
from .comfy_quant import describe as describe_formats
from .transformer_config import INDEX_TIMESTEP_ZERO, ZERO_COND_T_NOTE, config_from_shapes

__all__ = ["EXPECTED", "FP8_FORMATS", "TransformerCheckpoint", "inspect_transformer"]

FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
EXPECTED = (
    "a Qwen-Image / FireRed MM-DiT: a .safetensors file (diffusers keys, bare or under a prefix such as "
    "'model.diffusion_model.') or a diffusers transformer/ folder"
)



# Auxiliary per-layer keys of quantized files: suffix -> role.
_AUX_SUFFIXES = {
    ".scale_weight": "scale",  # ComfyUI "scaled fp8" (old)
    ".weight_scale": "scale",  # ComfyUI mixed precision (new)
    ".scale_input": "input_scale",
    ".input_scale": "input_scale",
    ".comfy_quant": "quant_conf",
    ".weight_scale_2": "aux",  # nvfp4's per-tensor scale
    ".pre_quant_scale": "aux",  # refused by comfy_quant.check_layer
}
_MARKERS = ("scaled_fp8",)
_SIGNATURE = "txt_norm.weight"  # only the Qwen-Image DiT has it (ComfyUI detects the model by it too)
_PREFIX_HINTS = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "")


@dataclass
class TransformerCheckpoint:
    """A Qwen-Image MM-DiT checkpoint, inspected without loading its tensors.

    path: what the user named; files: the safetensors files read (one, or the shards);
    prefix: the key prefix stripped (``""``, ``"model.diffusion_model."``, ...);
    entries: local key (diffusers name) -> (file, key in the file, header dtype, shape);
    scales: layer name -> (file, key) of its per-tensor weight scale;
    quant_formats: layer name -> quant format name (``"float8_e4m3fn"``, ``"mxfp8"``, ...) for
    quantized layers; quant_confs: layer name -> its whole comfy_quant entry (a dict);
    aux: layer name -> {``"weight_scale_2"`` / ``"pre_quant_scale"``: (file, key)};
    markers: non-weight marker keys found (``"scaled_fp8"``, ``"__index_timestep_zero__"``);
    format: a one-line description (``"single file, prefix 'model.diffusion_model.', scaled fp8"``);
    config: the ``QwenImageTransformer2DModel`` arguments read from the key shapes (with
    ``zero_cond_t=True`` for a file carrying the 2511 marker).
    """

    path: str
    files: list[str]
    prefix: str
    entries: dict[str, tuple[str, str, str, tuple[int, ...]]]
    scales: dict[str, tuple[str, str]]
    quant_formats: dict[str, str]
    format: str
    config: dict[str, Any]
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict, repr=False)
    quant_confs: dict[str, dict] = field(default_factory=dict)
    aux: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    markers: tuple[str, ...] = ()

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[3] for k, v in self.entries.items()}


def _resolve_files(path: Path) -> tuple[list[str], dict[str, str] | None, dict[str, Any], str]:
    """(files, key->file map from an index or None, config.json content, layout name)."""
    if path.is_dir():
        if (path / "transformer").is_dir():
            path = path / "transformer"
        config: dict[str, Any] = {}
        if (path / "config.json").is_file():
            try:
                config = json.loads((path / "config.json").read_text())
            except ValueError as e:
                raise CheckpointFormatError(f"{str(path / 'config.json')!r} is not valid JSON ({e})") from None
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointFormatError(
                    f"{str(indexes[0])!r} is not a valid shard index ({e!r}); expected JSON with a 'weight_map'"
                ) from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointFormatError(
                    f"sharded transformer folder {str(path)!r} is incomplete: {indexes[0].name} lists "
                    f"{len(shards)} shards but {missing} are missing; expected every shard next to the index"
                )
            return (
                [str(path / s) for s in shards],
                {k: str(path / v) for k, v in weight_map.items()},
                config,
                "diffusers folder (sharded)",
            )
        files = sorted(str(p) for p in path.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in path.iterdir())[:12]
            raise CheckpointFormatError(
                f"folder {str(path)!r} holds no .safetensors weights (found: {found}); expected a diffusers "
                "transformer/ folder (diffusion_pytorch_model*.safetensors, maybe with an index .json)"
            )
        return files, None, config, "diffusers folder"
    if not path.exists():
        raise CheckpointFormatError(
            f"{str(path)!r} does not exist; expected a .safetensors file or a transformer/ folder"
        )
    return [str(path)], None, {}, "single file"


def _find_prefix(keys, where: str) -> str:
    cands = [k[: -len(_SIGNATURE)] for k in keys if k == _SIGNATURE or k.endswith("." + _SIGNATURE)]
    cands = [c for c in cands if "transformer_blocks" not in c]
    if not cands:
        raise CheckpointFormatError(
            f"{where}: found {describe_keys(keys)}; expected a Qwen-Image / FireRed MM-DiT "
            f"(keys such as 'img_in.weight', 'txt_norm.weight', 'transformer_blocks.0.attn.to_q.weight', "
            f"optionally under 'model.diffusion_model.')"
        )
    cands.sort(key=lambda c: (_PREFIX_HINTS.index(c) if c in _PREFIX_HINTS else len(_PREFIX_HINTS), len(c)))
    return cands[0]


def _decode_quant_conf(value: torch.Tensor, where: str) -> dict:
    try:
        return decode_conf(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{where}: unreadable comfy_quant entry ({e})") from None




def inspect_transformer(path) -> TransformerCheckpoint:
    """Read the headers of a transformer checkpoint (file or folder) and work out its layout,
    prefix, quantization and architecture, without loading tensors."""
    p = Path(path)
    files, weight_map, file_config, layout = _resolve_files(p)
    headers = [read_safetensors_header(f, error=CheckpointFormatError, expected=EXPECTED) for f in files]
    where = str(p)
    all_keys: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    metadata: dict[str, str] = {}
    for h in headers:
        metadata.update(h.metadata)
        for k, (dt, shape) in h.tensors.items():
            all_keys[k] = (h.path, dt, shape)
    if weight_map is not None:
        absent = [k for k in weight_map if k not in all_keys]
        if absent:
            raise CheckpointFormatError(
                f"{where}: the shard index lists {len(absent)} tensors that no shard holds (e.g. {absent[:3]}); "
                "expected shards matching their index"
            )
    prefix = _find_prefix(all_keys, where)

    entries: dict[str, tuple[str, str, str, tuple[int, ...]]] = {}
    scales: dict[str, tuple[str, str]] = {}
    conf_keys: dict[str, tuple[str, str]] = {}
    aux: dict[str, dict[str, tuple[str, str]]] = {}
    markers: list[str] = []
    for k, (f, dt, shape) in all_keys.items():
        if not k.startswith(prefix):
            continue  # another component of an all-in-one checkpoint (vae., text_encoders., ...)
        local = k[len(prefix) :]
        if local in _MARKERS or local == INDEX_TIMESTEP_ZERO:
            markers.append(local)
            continue
        for suf, role in _AUX_SUFFIXES.items():
            if local.endswith(suf):
                layer = local[: -len(suf)]
                if role == "scale":
                    scales[layer] = (f, k)
                elif role == "quant_conf":
                    conf_keys[layer] = (f, k)
                elif role == "aux":
                    aux.setdefault(layer, {})[suf[1:]] = (f, k)
                break
        else:
            entries[local] = (f, k, dt, shape)

    quant_formats: dict[str, str] = {}
    quant_confs: dict[str, dict] = {}
    if "_quantization_metadata" in metadata:
        try:
            layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
        except (ValueError, AttributeError) as e:
            raise CheckpointFormatError(f"{where}: unreadable _quantization_metadata ({e})") from None
        for name, conf in layers.items():
            name = name[len(prefix) :] if prefix and name.startswith(prefix) else name
            quant_confs[name] = conf if isinstance(conf, dict) else {"format": str(conf)}
    by_path = {h.path: h for h in headers}
    for layer, (f, k) in conf_keys.items():
        with open(f, "rb") as fh:
            quant_confs[layer] = _decode_quant_conf(by_path[f].read(fh, k), f"{f}: {k}")
    quant_formats = {layer: str(conf.get("format", "?")) for layer, conf in quant_confs.items()}
    for layer in scales:
        # old scaled fp8: every layer with a scale and an 8-bit weight is fp8 (a full-precision weight
        # with a scale is multiplied out at load)
        dt = entries.get(layer + ".weight", ("", "", "", ()))[2]
        if layer not in quant_formats and dt in ("F8_E4M3", "F8_E5M2", "U8", "I8"):
            quant_formats[layer] = "float8_e5m2" if dt == "F8_E5M2" else "float8_e4m3fn"
    bad = {layer: fmt for layer, fmt in quant_formats.items() if fmt not in FP8_FORMATS and fmt not in BLOCK_FORMATS}
    if bad:
        layer, fmt = next(iter(sorted(bad.items())))
        raise CheckpointFormatError(
            f"{where}: layer {layer!r} is quantized as {fmt!r} ({len(bad)} layers in formats "
            f"{sorted(set(bad.values()))}); this loader reads the comfy_quant formats "
            f"{', '.join([*FP8_FORMATS, *BLOCK_FORMATS])}, scaled fp8 and GGUF files; "
            "use a bf16, fp8 or GGUF file of the model instead"
        )
    stray = sorted(layer for layer in aux if quant_formats.get(layer) not in BLOCK_FORMATS)
    if stray:
        names = [f"{layer}.{suf}" for layer in stray for suf in aux[layer]]
        raise CheckpointFormatError(
            f"{where}: {names[:3]} belong to no layer marked nvfp4 (or another block format) by a comfy_quant "
            f"entry; expected a <layer>.comfy_quant naming the format of {stray[0]!r}"
        )
    for layer in quant_formats:
        if layer + ".weight" not in entries:
            raise CheckpointFormatError(f"{where}: quantization info for layer {layer!r} but no {layer}.weight tensor")

    shapes = {k: v[3] for k, v in entries.items()}
    for layer, fmt in quant_formats.items():  # the layer's shape, not the packed storage's
        if fmt == "nvfp4" and len(shapes[layer + ".weight"]) == 2:
            rows, packed = shapes[layer + ".weight"]
            shapes[layer + ".weight"] = (rows, 2 * packed)
    base = dict(file_config)
    if INDEX_TIMESTEP_ZERO in markers:
        base.setdefault("zero_cond_t", True)
    config = config_from_shapes(shapes, base, where=where)

    dtypes = sorted({v[2] for k, v in entries.items() if k.endswith(".weight") and len(v[3]) == 2})
    if scales and "scaled_fp8" in markers:
        quant = "scaled fp8 (ComfyUI scaled_fp8, per-tensor scale_weight)"
    elif conf_keys or "_quantization_metadata" in metadata:
        plain = [d for d in dtypes if d in ("BF16", "F16", "F32")]
        quant = f"mixed precision (comfy_quant: {describe_formats(quant_formats)}; others {plain})"
    elif scales:
        quant = "fp8 with per-tensor scales"
    elif any(d.startswith("F8") for d in dtypes):
        quant = f"fp8 ({', '.join(d for d in dtypes if d.startswith('F8'))}, unscaled)"
    else:
        quant = "/".join(dtypes) or "?"
    fmt = f"{layout}, prefix {prefix!r}, {quant}"
    if INDEX_TIMESTEP_ZERO in markers:
        fmt += f"; {ZERO_COND_T_NOTE}"
    return TransformerCheckpoint(where, files, prefix, entries, scales, quant_formats, fmt, config, by_path,
                                 quant_confs, aux, tuple(markers))  # fmt: skip
