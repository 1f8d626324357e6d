"""LoRA files on a loaded MM-DiT: any common layout, several at once, each with a strength,
changed or removed without reloading the base.

>>> apply_loras(model, [("Lightning-8steps.safetensors", 1.0), ("makeup.safetensors", 0.7)])
>>> set_lora_strength(model, "makeup", 0.4)
>>> remove_loras(model)                     # the base model again, bit for bit

Layouts, detected from the keys (never the file name):

=============================  ==============================================================
diffusers / PEFT               ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` /
                               ``lora_B.weight``; rank and alpha from the
                               ``lora_adapter_metadata`` header entry when present
bare PEFT names                ``transformer_blocks.0.attn.to_q.lora_A.weight`` (also
                               ``base_model.model.`` and ``lora_A.default.weight``; a PEFT
                               ``adapter_config.json`` next to the file gives alpha / rank)
kohya / musubi                 ``lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight``,
                               ``lora_up.weight``, ``alpha``
ComfyUI                        ``diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight``
                               (or ``lora_down`` / ``lora_up`` / ``alpha``)
Lightning (lightx2v, FireRed)  diffusers names with ``lora_down`` / ``lora_up`` / ``alpha``
                               (any of the prefixes above)
=============================  ==============================================================

Also: ``lora_A`` / ``lora_B`` without ``.weight``, diffusers' older ``.lora_linear_layer.down`` /
``.up``, a ``lora_mid`` factor (LoCon's Tucker form: ``up @ mid @ down``), a LoRA bias
(``lora_B.bias`` / ``lora_up.bias``, PEFT's ``lora_bias``: scaled with the layer), full-weight
``diff`` / ``diff_b`` patches, and DoRA (``dora_scale``).

The names are matched against the model's own linear layers (as ComfyUI's ``model_lora_keys_unet``
does), so the kohya underscore form is resolved exactly, not guessed. A layer's update is
``strength * alpha / rank * up @ down``, with ``alpha`` from the file's ``.alpha`` tensor where it
has one -- for ``lora_A`` / ``lora_B`` files too, as ComfyUI applies it (diffusers' loader ignores
an ``.alpha`` beside ``lora_A`` / ``lora_B`` names and scales by 1): the file's author wrote it to
be applied, and ComfyUI is what users compare a picture with. Without one, PEFT's ``lora_alpha /
r`` from the file's ``lora_adapter_metadata`` or an ``adapter_config.json`` (``lora_alpha /
sqrt(r)`` with ``use_rslora``), else 1. For the other layouts this is what diffusers'
``QwenImageLoraLoaderMixin.lora_state_dict`` does too; the tests check the two agree.

DoRA, as ComfyUI's weight decomposition computes it: ``V = W + alpha / rank * up @ down``, ``W' =
dora_scale * V / (||V|| + eps)`` with the norm taken along the axis ``dora_scale`` does not span
(per output row for ``[out, 1]``, per input column for ``[1, in]``), and at strength ``s`` the
layer computes ``W + s * (W' - W)``. That update depends on the base weight, so it is built once
from it at load (a full ``[out, in]`` tensor per layer, like a ``diff`` patch).

LoRAs are not merged: each adapted linear (``nn.Linear``, the fp8 :class:`FP8Linear` or a block-quantized
:class:`~.comfy_quant.QuantLinear`) gets a
forward hook that adds ``s * up(down(x))`` for every LoRA on it, so fp8 bases keep their fp8
weights untouched, a strength change is one number, and removal restores the exact base output.
LyCORIS LoHa (``hada_w1_a`` ...) and LoKr (``lokr_w1`` / ``lokr_w2`` or their ``_a`` / ``_b``
factors) load too, under any of the prefixes (SimpleTuner writes ``lycoris_``), scaled as LyCORIS
and ComfyUI scale them. Their CP-decomposed variants (``hada_t1``, ``lokr_t2``, conv-only) and
OFT are recognised and reported as not supported (listed among the unmatched keys; an error if
nothing else matched).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ._common import LoraFormatError, read_safetensors_header
from .comfy_quant import QuantLinear
from .fp8_layers import FP8Linear
from .lora_keys import FORMAT_NAMES, resolve, split_suffix, target_guess, unsupported_kind
from .lora_layers import DeltaLayer, LoraLayer, dense_weight, dora_delta, lycoris_layer

log = logging.getLogger(__name__)

__all__ = [
    "LoraEntry",
    "LoraFormatError",
    "ParsedLora",
    "apply_loras",
    "list_loras",
    "load_lora",
    "parse_lora_spec",
    "read_lora",
    "remove_loras",
    "set_lora_strength",
    "sync_loras",
]


@dataclass
class ParsedLora:
    """A LoRA file matched against a model. layers: module name -> :class:`LoraLayer`;
    unmatched: the file's keys that adapt nothing; format: the layout found."""

    source: str
    format: str
    layers: dict[str, LoraLayer]
    unmatched: list[str] = field(default_factory=list)


@dataclass
class LoraEntry:
    """A LoRA attached to a model (what :func:`list_loras` returns)."""

    name: str
    source: str
    format: str
    strength: float
    layers: list[str]
    unmatched: list[str]


def _adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, FP8Linear, QuantLinear))}


def _read_state_dict(path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    path = str(path)
    header = read_safetensors_header(path, error=LoraFormatError, expected="a LoRA .safetensors file")
    with open(path, "rb") as f:
        sd = {k: header.read(f, k) for k in header.tensors}
    return sd, header.metadata, path


def alpha_config(metadata: Mapping[str, str], path: str | None) -> dict[str, Any]:
    """PEFT-style rank / alpha from diffusers' ``lora_adapter_metadata`` or an adapter_config.json."""
    conf: dict[str, Any] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            conf = json.loads(raw)
        except ValueError:
            conf = {}
        conf = {k.removeprefix("transformer."): v for k, v in conf.items()}
    elif path:
        cfg = Path(path).with_name("adapter_config.json")
        if cfg.is_file():
            try:
                conf = json.loads(cfg.read_text())
            except ValueError:
                conf = {}
    return conf


def _pattern_value(module: str, patterns: Mapping[str, Any] | None):
    for p, v in (patterns or {}).items():
        if module == p or module.endswith("." + p):
            return v
    return None


def _lora_pair(src: str, module: str, g: dict, extra: dict, conf: Mapping[str, Any]) -> LoraLayer:
    """The :class:`LoraLayer` of a ``down`` / ``up`` pair (with ``lora_mid`` and the up bias when
    present), scaled by the file's alpha, else PEFT's config (rsLoRA included), else 1."""
    down, up = g["down"], g["up"]
    if down.dim() == 4:  # 1x1 conv form some trainers write
        down, up = down.flatten(1), up.flatten(1)
    rank = down.shape[0]
    mid = extra.get("mid")
    if mid is not None:  # LoCon's Tucker form: up @ mid @ down
        if mid.dim() == 4 and tuple(mid.shape[2:]) == (1, 1):
            mid = mid.flatten(1)
        if mid.dim() != 2 or mid.shape != (up.shape[1], rank):
            raise LoraFormatError(f"{src}: layer {module!r} has lora_mid {tuple(extra['mid'].shape)}, expected "
                                  f"[{up.shape[1] if up.dim() == 2 else '?'}, {rank}] between its up and down")
        down = mid.to(down.dtype) @ down
    if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
        raise LoraFormatError(
            f"{src}: layer {module!r} has down {tuple(down.shape)} / up {tuple(up.shape)}, not a LoRA pair"
        )
    if "alpha" in g:
        scale = float(g["alpha"].float().item()) / rank
    else:
        # PEFT scales by lora_alpha / r (its configured rank; rsLoRA: / sqrt(r)); no alpha at all: 1
        a = _pattern_value(module, conf.get("alpha_pattern")) or conf.get("lora_alpha")
        r = float(_pattern_value(module, conf.get("rank_pattern")) or conf.get("r") or rank)
        scale = float(a) / (r**0.5 if conf.get("use_rslora") else r) if a else 1.0
    bias = extra.get("up_bias")
    if bias is not None and tuple(bias.shape) != (up.shape[0],):
        raise LoraFormatError(f"{src}: layer {module!r} has a LoRA bias of {tuple(bias.shape)}, expected [{up.shape[0]}]")
    return LoraLayer(down, up, scale, bias=bias)


def _with_full_patches(src: str, module: str, m: nn.Module, layer: LoraLayer | None, extra: dict) -> LoraLayer:
    """``layer`` with the layer's ``diff`` / ``diff_b`` patches and DoRA applied (a
    :class:`DeltaLayer` then), or ``layer`` itself when it has none."""
    diff, diff_b, dora = extra.get("diff"), extra.get("diff_b"), extra.get("dora_scale")
    if diff is None and diff_b is None and dora is None:
        return layer
    out_f, in_f = m.out_features, m.in_features
    if diff is not None and tuple(diff.shape) != (out_f, in_f):
        raise LoraFormatError(f"{src}: the diff patch for layer {module!r} is {tuple(diff.shape)}, but the layer is "
                              f"{in_f} -> {out_f} (expected [{out_f}, {in_f}])")
    if diff_b is not None and tuple(diff_b.shape) != (out_f,):
        raise LoraFormatError(f"{src}: the diff_b patch for layer {module!r} is {tuple(diff_b.shape)}, expected [{out_f}]")
    bias = diff_b.float() if diff_b is not None else None
    if layer is not None and layer.bias is not None:  # a LoRA bias joins the bias update
        lb = layer.bias.float() * layer.scale
        bias = lb if bias is None else bias + lb
    delta = layer.delta_weight() if layer is not None else None
    if diff is not None:
        delta = diff.float() if delta is None else delta + diff.float()
    kind = "diff"
    if dora is not None:
        if delta is None:
            raise LoraFormatError(f"{src}: layer {module!r} has a dora_scale but no LoRA update to decompose")
        try:
            delta = dora_delta(dense_weight(m), delta, dora)
        except ValueError as e:
            raise LoraFormatError(f"{src}: layer {module!r}: {e}") from None
        kind = "DoRA"
    out = DeltaLayer(delta=delta, delta_b=bias)
    out.kind = kind
    return out


def read_lora(lora, model: nn.Module, *, source: str | None = None) -> ParsedLora:
    """Parse a LoRA (a file path or a state dict) and match it to ``model``'s linear layers.

    Raises :class:`LoraFormatError` if the file is unreadable, nothing matches, or a matched
    layer's shapes do not fit the model's.
    """
    if isinstance(lora, (str, os.PathLike)):
        sd, metadata, src = _read_state_dict(lora)
        path = src
    else:
        sd, metadata, src, path = dict(lora), {}, source or "<state dict>", None
    src = source or src
    modules = _adaptable_modules(model)
    lookup: dict[str, str] = {}
    for n in modules:
        lookup[n] = n
        lookup.setdefault(n.replace(".", "_"), n)

    groups: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    unsupported: dict[str, int] = {}
    prefixes: dict[str, int] = {}
    styles: set[str] = set()
    for key, t in sd.items():
        kind = unsupported_kind(key)
        split = None if kind else split_suffix(key)
        if split is None:
            if kind:
                unsupported[kind] = unsupported.get(kind, 0) + 1
            unmatched.append(key)
            continue
        base, role = split
        hit = resolve(base, lookup)
        if hit is None:
            unmatched.append(key)
            continue
        module, pre = hit
        prefixes[pre] = prefixes.get(pre, 0) + 1
        if role in ("down", "up"):
            styles.add("lora_A/lora_B" if ".lora_A" in key or ".lora_B" in key else "lora_down/lora_up")
        g = groups.setdefault(module, {})
        g[role] = t
        g.setdefault("_keys", []).append(key)  # type: ignore[union-attr]

    conf = alpha_config(metadata, path)
    layers: dict[str, LoraLayer] = {}
    for module, g in groups.items():
        keys = g.pop("_keys")  # type: ignore[arg-type]
        m = modules[module]
        extra = {k: g.pop(k) for k in ("dora_scale", "diff", "diff_b", "mid", "up_bias") if k in g}
        try:
            layer = lycoris_layer(g) if any(k.startswith(("hada_", "lokr_")) for k in g) else None
        except (KeyError, RuntimeError, IndexError) as e:
            raise LoraFormatError(
                f"{src}: incomplete or inconsistent LyCORIS factors for layer {module!r}: {e!r}"
            ) from None
        pair = "down" in g and "up" in g
        if layer is None and not pair and "diff" not in extra and "diff_b" not in extra:
            unmatched.extend(keys)
            continue
        if layer is None and pair:
            layer = _lora_pair(src, module, g, extra, conf)
        if layer is not None and layer.shape != (m.out_features, m.in_features):
            found = (
                f"down {tuple(g['down'].shape)} / up {tuple(g['up'].shape)}"
                if pair and layer.kind == "LoRA"
                else f"a {layer.kind} update of {tuple(layer.shape)}"
            )
            raise LoraFormatError(
                f"{src}: the LoRA for layer {module!r} has {found}, but the "
                f"layer is {m.in_features} -> {m.out_features}; expected a LoRA made for this model size "
                "(is it for another Qwen-Image variant or another model?)"
            )
        layers[module] = _with_full_patches(src, module, m, layer, extra)

    if not layers:
        raise LoraFormatError(
            f"{src}: none of its {len(sd)} tensors adapts a layer of this MM-DiT "
            f"(found {target_guess(sd.keys())}; first keys {sorted(sd)[:3]}"
            + (f"; unsupported kinds: {unsupported}" if unsupported else "")
            + "); expected a Qwen-Image / FireRed LoRA with keys such as "
            "'transformer_blocks.0.attn.to_q.lora_A.weight' (optionally under 'transformer.' or "
            "'diffusion_model.') or 'lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight'"
        )
    pre = max(prefixes, key=prefixes.get) if prefixes else ""
    styles |= {f"LyCORIS {la.kind}" if la.kind in ("LoHa", "LoKr") else la.kind
               for la in layers.values() if la.kind != "LoRA"}
    fmt = f"{FORMAT_NAMES.get(pre, repr(pre))}, {'+'.join(sorted(styles))}"
    if unmatched:
        detail = f" ({', '.join(f'{v} {k}' for k, v in unsupported.items())} not supported)" if unsupported else ""
        msg = (
            f"{src}: {len(unmatched)} of {len(sd)} LoRA tensors match no layer of this model and are ignored"
            f"{detail}, e.g. {unmatched[:5]}"
        )
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
    return ParsedLora(src, fmt, layers, unmatched)


# ---------------------------------------------------------------------------------------------
# attaching adapters
# ---------------------------------------------------------------------------------------------

_ATTR = "_firered_lora"  # on each adapted module: {lora name: (entry, layer on the module's device / dtype)}
_HOOK = "_firered_lora_hook"
_REGISTRY = "_firered_loras"  # on the model: {lora name: LoraEntry}


def _lora_hook(module: nn.Module, args, output):
    x = args[0]
    adapters = getattr(module, _ATTR)
    for name, (entry, layer) in list(adapters.items()):
        if entry.strength == 0:
            continue
        held = next(iter(layer.tensors().values()))
        if held.device != x.device:  # the model was moved after the LoRA was attached: follow it once
            layer = layer.to(x.device, held.dtype)
            adapters[name] = (entry, layer)
        output = output + layer(x) * entry.strength
    return output


def _module_dtype_device(m: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Where and in what dtype a layer's adapters are kept: its compute dtype (GGUF and fp8 layers
    hold their weights in a storage dtype), on its device."""
    t = (m.bias if getattr(m, "bias", None) is not None else m.weight_fp8 if isinstance(m, FP8Linear)
         else m.qdata if isinstance(m, QuantLinear) else m.weight)  # fmt: skip
    dtype = getattr(m, "compute_dtype", None) or t.dtype
    if not dtype.is_floating_point or dtype.itemsize == 1:
        dtype = torch.bfloat16
    return dtype, t.device


def load_lora(model: nn.Module, lora, strength: float = 1.0, *, name: str | None = None) -> LoraEntry:
    """Attach one LoRA (file path, state dict or :class:`ParsedLora`) to ``model`` with ``strength``.

    ``name`` (default: the file's stem, made unique) identifies it for :func:`set_lora_strength`
    and :func:`remove_loras`; naming a LoRA that is already attached replaces it.
    """
    parsed = lora if isinstance(lora, ParsedLora) else read_lora(lora, model)
    registry: dict[str, LoraEntry] = model.__dict__.setdefault(_REGISTRY, {})
    if name is None:  # a fresh name: the file's stem, made unique
        stem = Path(parsed.source).stem if parsed.source != "<state dict>" else "lora"
        name, i = stem, 1
        while name in registry:
            i += 1
            name = f"{stem}_{i}"
    if name in registry:
        remove_loras(model, [name])
    entry = LoraEntry(name, parsed.source, parsed.format, float(strength), sorted(parsed.layers), parsed.unmatched)
    modules = dict(model.named_modules())
    for mod_name, layer in parsed.layers.items():
        m = modules[mod_name]
        dtype, device = _module_dtype_device(m)
        adapters = m.__dict__.setdefault(_ATTR, {})
        adapters[name] = (entry, layer.to(device, dtype))
        if _HOOK not in m.__dict__:
            m.__dict__[_HOOK] = m.register_forward_hook(_lora_hook)
    registry[name] = entry
    log.info(
        "LoRA %r (%s): %d layers, strength %g, %d keys unmatched",
        name,
        parsed.format,
        len(parsed.layers),
        strength,
        len(parsed.unmatched),
    )
    return entry


def apply_loras(model: nn.Module, loras: Iterable) -> list[LoraEntry]:
    """Attach several LoRAs: each item is a path / state dict, or ``(lora, strength)``."""
    out = []
    for item in loras:
        lora, strength = item if isinstance(item, tuple) else (item, 1.0)
        out.append(load_lora(model, lora, strength))
    return out


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """A command-line ``FILE[:STRENGTH]`` -> ``(file, strength)`` (strength 1 by default). Only a
    trailing ``:<number>`` is a strength, so ``C:\\loras\\x.safetensors`` stays a path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def list_loras(model: nn.Module) -> list[LoraEntry]:
    return list(model.__dict__.get(_REGISTRY, {}).values())


def set_lora_strength(model: nn.Module, name: str, strength: float) -> None:
    """Change an attached LoRA's strength (takes effect on the next forward)."""
    registry = model.__dict__.get(_REGISTRY, {})
    if name not in registry:
        raise KeyError(f"no LoRA named {name!r} is attached (attached: {sorted(registry)})")
    registry[name].strength = float(strength)


def remove_loras(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Detach the named LoRAs (all if ``names`` is None); with none left a layer's hook is removed,
    so the model computes exactly what it computed before."""
    registry: dict[str, LoraEntry] = model.__dict__.get(_REGISTRY, {})
    names = list(registry) if names is None else list(names)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise KeyError(f"no LoRA named {unknown} is attached (attached: {sorted(registry)})")
    for m in model.modules():
        adapters = m.__dict__.get(_ATTR)
        if not adapters:
            continue
        for n in names:
            adapters.pop(n, None)
        if not adapters:
            m.__dict__.pop(_HOOK).remove()
            del m.__dict__[_ATTR]
    for n in names:
        registry.pop(n)


def sync_loras(model: nn.Module, stack: Iterable[tuple[str, float]]) -> None:
    """Attach to ``model`` exactly the LoRAs of ``stack`` (``(path, strength)`` in stacking order),
    re-reading files only when the files changed; a strength change alone is applied in place."""
    want = [(str(p), float(s)) for p, s in stack]
    have = [(e.source, e.strength) for e in list_loras(model)]
    if [p for p, _ in want] == [p for p, _ in have]:
        for entry, (_, s) in zip(list_loras(model), want):
            entry.strength = s
        return
    if have:
        remove_loras(model)
    for p, s in want:
        load_lora(model, p, s)
