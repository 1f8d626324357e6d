"""The FireRed / Qwen-Image-Edit MM-DiT from the files users hold.

>>> model = load_transformer("models/diffusion_models/qwen_image_edit_2509_fp8_e4m3fn.safetensors")
>>> model = load_transformer("FireRed-Image-Edit-1.1/transformer")          # diffusers folder

Formats, all detected from the content (the safetensors header: key names, dtypes, metadata),
never from the file name:

- one ``.safetensors`` file whose keys are the diffusers module names
  (``transformer_blocks.0.attn.to_q.weight``), bare or under a prefix
  (``model.diffusion_model.`` as ComfyUI saves, ``diffusion_model.``, ``transformer.``, ...).
  ComfyUI's ``comfy/ldm/qwen_image/model.py`` uses the diffusers names, so no renaming is needed
  beyond the prefix. Keys of other components under another prefix (``vae.``,
  ``text_encoders.``) in an all-in-one checkpoint are ignored;
- the diffusers ``transformer/`` folder (``*.safetensors.index.json`` + shards, or one file),
  or a release folder that holds it;
- weights stored in ``float8_e4m3fn`` / ``float8_e5m2`` ("fp8" files, a plain down-cast);
- ComfyUI's "scaled fp8": a ``scaled_fp8`` marker tensor and a per-layer float32
  ``<layer>.scale_weight`` (real weight = fp8 weight * scale; ``scale_input`` is only used by
  fp8 matmul kernels and ignored here);
- ComfyUI's mixed-precision files: per-layer ``<layer>.comfy_quant`` (JSON bytes naming the
  format) and ``<layer>.weight_scale`` (and ``input_scale``), or the same layer table in the
  ``_quantization_metadata`` header entry; layers not listed stay in bf16. Formats: the fp8 ones
  (``float8_e4m3fn``, ``float8_e5m2``) become :class:`FP8Linear`; ``int8_tensorwise``, ``mxfp8``
  and ``nvfp4`` (layouts in :mod:`.comfy_quant`) become :class:`~.comfy_quant.QuantLinear`, kept
  as stored and dequantized per layer in ``forward`` (this pack has no kernels for them; one log
  line says so). Any other format, or a layer whose scales are missing or misshapen, fails naming
  the layer and the format;
- the ``__index_timestep_zero__`` marker that ComfyUI's Qwen-Image-Edit-2511 files carry (an
  empty tensor: ComfyUI's Qwen-Image model registers it when the reference pictures are to be
  conditioned at timestep 0, its ``index_timestep_zero`` reference method). It is not a weight; the
  model is built with diffusers' ``zero_cond_t=True``, which does exactly that (the reference
  tokens are modulated with the embedding of t = 0, the target tokens with the real t). FireRed's
  own files do not carry it (FireRed does not use it); ``config={"zero_cond_t": False}`` overrides.

fp8 weights stay fp8 in memory: each such ``nn.Linear`` becomes an :class:`FP8Linear` that
dequantizes its weight into the input's dtype inside ``forward`` (one layer at a time), so the
model holds about one byte per linear weight.

The architecture (blocks, width, heads, text width, channels) is read from the key shapes; the
model is built with empty (meta) weights and every tensor is read from the memory-mapped file and
assigned in place, so two copies of the weights are never held.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._common import (
    FP8_DTYPES,
    ST_DTYPES,
    CheckpointFormatError,
    SafetensorsHeader,
    describe_keys,
    read_safetensors_header,
    sniff,
)
from .comfy_quant import BLOCK_FORMATS, QuantLinear, check_layer, decode_conf
from .comfy_quant import describe as describe_formats
from .fp8_layers import FP8Linear
from .transformer_config import INDEX_TIMESTEP_ZERO, ZERO_COND_T_NOTE, config_from_shapes

log = logging.getLogger(__name__)

__all__ = ["CheckpointFormatError", "QuantLinear", "TransformerCheckpoint", "inspect_transformer", "load_transformer"]


FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
EXPECTED = (
    "a Qwen-Image / FireRed MM-DiT: a .safetensors file (diffusers keys, bare or under a prefix such as "
    "'model.diffusion_model.') or a diffusers transformer/ folder"
)


# ---------------------------------------------------------------------------------------------
# checkpoint inspection
# ---------------------------------------------------------------------------------------------

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




# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

WEIGHT_DTYPES = ("auto", "fp8_e4m3fn", "fp8_e5m2", "dequantize")


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = tensor
    else:
        raise KeyError(key)


def _downcast_fp8(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lim = torch.finfo(dtype).max
    return w.clamp(-lim, lim).to(dtype)


def load_transformer(
    path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    weight_dtype: str = "auto",
    config: dict[str, Any] | None = None,
):
    """Load the MM-DiT from a single file or a diffusers folder (see the module docstring).

    Args:
        path: a ``.safetensors`` file (any name), a diffusers ``transformer/`` folder, or a release
            folder holding one. A GGUF file is handed to :func:`.gguf_files.load_gguf_transformer`
            (``weight_dtype`` and ``config`` do not apply to it).
        dtype: compute dtype: the dtype of every non-fp8 tensor and of fp8 layers' outputs.
        device: where the weights go (they are read straight onto it, tensor by tensor).
        weight_dtype: ``"auto"`` keeps fp8 layers fp8 and loads the rest in ``dtype``;
            ``"fp8_e4m3fn"`` / ``"fp8_e5m2"`` also down-casts every full-precision linear weight
            (the memory saving of an fp8 file from a bf16 one); ``"dequantize"`` turns fp8
            layers (and comfy_quant int8 / mxfp8 / nvfp4 layers) back into plain ``nn.Linear`` in ``dtype``.
        config: overrides of the architecture read from the keys (e.g. ``{"zero_cond_t": True}``,
            which the keys cannot show).

    Returns:
        ``diffusers.QwenImageTransformer2DModel`` in eval mode, ``requires_grad_(False)``.

    Raises:
        CheckpointFormatError: unreadable or truncated file, a model of another architecture,
            an unsupported quantization, missing or unexpected keys, or wrong shapes.
    """
    import accelerate
    from diffusers import QwenImageTransformer2DModel

    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if os.path.isfile(path) and sniff(path) == "gguf":  # one entry point for every MM-DiT file
        from .gguf_files import load_gguf_transformer

        return load_gguf_transformer(path, dtype=dtype, device=device)
    ckpt = inspect_transformer(path)
    cfg = {**ckpt.config, **(config or {})}
    with accelerate.init_empty_weights(include_buffers=False):
        model = QwenImageTransformer2DModel(**cfg)
    where = f"{ckpt.path} ({ckpt.format})"

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(ckpt.entries))
    extra = sorted(set(ckpt.entries) - set(expected))
    if missing or extra:
        raise CheckpointFormatError(
            f"{where}: keys do not match a QwenImageTransformer2DModel with {cfg['num_layers']} blocks: "
            f"{len(missing)} missing (e.g. {missing[:4]}), {len(extra)} unexpected (e.g. {extra[:4]}); "
            "expected the complete diffusers key set (the file may be incomplete or of a different variant)"
        )
    block = {n: f for n, f in ckpt.quant_formats.items() if f in BLOCK_FORMATS}  # checked per layer below
    wrong = [(k, ckpt.entries[k][3], s) for k, s in expected.items()
             if ckpt.entries[k][3] != s and k[: -len(".weight")] not in block]  # fmt: skip
    if wrong:
        raise CheckpointFormatError(
            f"{where}: tensor shapes differ from the architecture read from the keys, e.g. {wrong[:3]}"
        )

    fp8_target = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}.get(weight_dtype)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    not_linear = sorted(set(block) - set(linears))
    if not_linear:
        raise CheckpointFormatError(f"{where}: {not_linear[0]!r} is quantized as {block[not_linear[0]]!r} but is not "
                                    "a linear layer of the model; expected block formats on linear layers only")  # fmt: skip
    for name, fmt in block.items():  # the header alone: nothing is read before every layer is known good
        h = ckpt.headers[ckpt.entries[name + ".weight"][0]]
        aux_info = {suf: ckpt.headers[f].tensors[k] for suf, (f, k) in ckpt.aux.get(name, {}).items()}
        if name in ckpt.scales:
            aux_info["weight_scale"] = ckpt.headers[ckpt.scales[name][0]].tensors[ckpt.scales[name][1]]
        lin = linears[name]
        check_layer(fmt, name, ckpt.quant_confs.get(name), h.tensors[ckpt.entries[name + ".weight"][1]], aux_info,
                    lin.out_features, lin.in_features, where=where, error=CheckpointFormatError)  # fmt: skip
    device = torch.device(device)
    handles: dict[str, Any] = {}

    def get(file_key: tuple[str, str]) -> torch.Tensor:
        f, k = file_key
        if f not in handles:
            handles[f] = open(f, "rb")
        return ckpt.headers[f].read(handles[f], k).to(device)

    def stored_fp8(layer: str) -> torch.dtype | None:
        if layer in ckpt.quant_formats:
            return FP8_FORMATS[ckpt.quant_formats[layer]]
        dt = ST_DTYPES.get(ckpt.entries[layer + ".weight"][2])
        return dt if dt in FP8_DTYPES else None

    def put(name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

    done: set[str] = set()
    n_fp8 = n_block = 0
    try:
        for name, fmt in block.items():
            lin, wkey = linears[name], name + ".weight"
            aux = {suf: get(fk) for suf, fk in ckpt.aux.get(name, {}).items()}
            aux["weight_scale"] = get(ckpt.scales[name])
            bias = get(ckpt.entries[name + ".bias"][:2]).to(dtype) if lin.bias is not None else None
            q = QuantLinear.from_stored(fmt, get(ckpt.entries[wkey][:2]), aux, lin.out_features, lin.in_features, bias)
            if weight_dtype == "dequantize":
                _set_tensor(model, wkey, q.dequantized_weight(dtype))
                if bias is not None:
                    _set_tensor(model, name + ".bias", bias)
            else:
                put(name, q)
                n_block += 1
            done.update((wkey, name + ".bias"))
        for name, lin in linears.items():
            wkey = name + ".weight"
            if wkey in done:
                continue
            fp8 = stored_fp8(name)
            if fp8 is None and fp8_target is None:
                continue
            w = get(ckpt.entries[wkey][:2])
            if fp8 is not None and w.dtype not in FP8_DTYPES:
                w = w.view(fp8)  # comfy_quant files may store fp8 bytes in a uint8 / int8 container
            scale = get(ckpt.scales[name]) if name in ckpt.scales else None
            bias = get(ckpt.entries[name + ".bias"][:2]).to(dtype) if lin.bias is not None else None
            if fp8 is None:  # full-precision weight, down-cast on request
                if scale is not None:
                    w, scale = w.to(torch.float32) * scale.to(torch.float32), None
                w = _downcast_fp8(w, fp8_target)
            if weight_dtype == "dequantize":
                deq = w.to(torch.float32) * (scale.to(torch.float32) if scale is not None else 1.0)
                _set_tensor(model, wkey, deq.to(dtype))
                if bias is not None:
                    _set_tensor(model, name + ".bias", bias)
            else:
                put(name, FP8Linear(w, bias, scale))
                n_fp8 += 1
            done.update((wkey, name + ".bias"))
        for key, (f, k, _, _) in ckpt.entries.items():
            if key in done:
                continue
            t = get((f, k))
            layer = key[: -len(".weight")] if key.endswith(".weight") else None
            if layer in ckpt.scales:
                t = t.to(torch.float32) * get(ckpt.scales[layer]).to(torch.float32)
            _set_tensor(model, key, t.to(dtype))
    finally:
        for fh in handles.values():
            fh.close()

    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointFormatError(f"{where}: these tensors were never loaded: {left[:5]}")
    model.to(device)
    model.eval().requires_grad_(False)
    model.firered_source = {"path": ckpt.path, "format": ckpt.format, "fp8_linears": n_fp8,
                            "quant_linears": n_block, "zero_cond_t": bool(cfg.get("zero_cond_t"))}  # fmt: skip
    log.info(
        "loaded the MM-DiT from %s: %d blocks, width %d, %d fp8 linears",
        where,
        cfg["num_layers"],
        cfg["num_attention_heads"] * cfg["attention_head_dim"],
        n_fp8,
    )
    if n_block:
        log.info("%s: %d linears (%s) stay quantized and are dequantized per layer in forward: this pack has no "
                 "int8 / mxfp8 / nvfp4 matmul kernel on any device (the matmul runs in %s)", ckpt.path, n_block,
                 describe_formats({n: block[n] for n in block}), str(dtype).replace("torch.", ""))  # fmt: skip
    if INDEX_TIMESTEP_ZERO in ckpt.markers:
        log.info("%s: %s%s", ckpt.path, ZERO_COND_T_NOTE,
                 "" if cfg.get("zero_cond_t") else " -- but config overrides set zero_cond_t=False: reference "
                 "pictures are conditioned at the sampling timestep, which is not how this model was trained")  # fmt: skip
    return model
