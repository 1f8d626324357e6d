"""ComfyUI's V3 node schema (``comfy_api.latest.io``) for the pack's nodes, generated from their one
classic definition.

Each node is written once, in the classic form (``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``...).
Where the running ComfyUI offers ``comfy_api.latest`` with ``io.ComfyNode``, :func:`upgrade` builds an
``io.ComfyNode`` subclass from each class: the same node id, the inputs in the same order with the same
options (so saved workflows' positional widget values land where they did), the same outputs, hidden
inputs, output-node flag, ``INPUT_IS_LIST`` / ``OUTPUT_IS_LIST`` and ``IS_CHANGED``. Its ``execute``
calls the classic function and turns what it returns (a tuple, or ``{"ui", "result"}``) into an
``io.NodeOutput``. A class using something this does not translate (``VALIDATE_INPUTS``, lazy inputs,
``check_lazy_status``) stays classic; so does every class on a ComfyUI without the V3 API, or when
``FIRERED_NODE_API=classic`` is set. Nothing from ComfyUI is imported until :func:`upgrade` runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("FireRed")

#: the environment variable that keeps the classic API ("classic"), or asks for V3 ("v3", the default)
API_ENV = "FIRERED_NODE_API"
#: classic features with no translation here: a class that has one stays classic
UNTRANSLATED = ("VALIDATE_INPUTS", "check_lazy_status")
#: the V3 input class of each classic type; a classic option dict is passed through ``extra_dict`` as it is
WIDGETS = {"INT": "Int", "FLOAT": "Float", "STRING": "String", "BOOLEAN": "Boolean"}
SOCKETS = {"IMAGE": "Image", "MASK": "Mask", "LATENT": "Latent"}
#: the fields of a V3 input kept when its classic options replace the rest
KEEP = {"id", "optional", "extra_dict", "options", "multiselect"}


class NotTranslated(Exception):
    """A classic class uses something :func:`v3_class` does not translate."""


def io_module():
    """``comfy_api.latest.io`` when this ComfyUI has the V3 node API (``io.ComfyNode``), else None."""
    try:
        from comfy_api.latest import io
    except Exception:  # no ComfyUI, or one before the V3 API
        return None
    return io if hasattr(io, "ComfyNode") and hasattr(io, "Schema") else None


def _input(io, name: str, spec: tuple, optional: bool):
    """One V3 input from a classic ``(type, options)`` spec, its options kept as they are."""
    typ = spec[0]
    opts = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("lazy"):
        raise NotTranslated(f"input {name!r} is lazy")
    if isinstance(typ, (list, tuple)):  # a classic COMBO: its choices
        inp = io.Combo.Input(name, options=list(typ), optional=optional)
    elif typ == "COMBO":
        inp = io.Combo.Input(name, options=list(opts.pop("options", [])), optional=optional)
    elif typ in WIDGETS:
        inp = getattr(io, WIDGETS[typ]).Input(name, optional=optional)
    elif typ in SOCKETS:
        inp = getattr(io, SOCKETS[typ]).Input(name, optional=optional)
    elif isinstance(typ, str):
        inp = io.Custom(typ).Input(name, optional=optional)
    else:
        raise NotTranslated(f"input {name!r} has type {typ!r}")
    # every classic option (default, min, max, tooltip, multiline, ...) as the classic node had it: the
    # typed input's own fields are cleared (their defaults, e.g. String's multiline=False, would win)
    for attr in list(vars(inp)):
        if attr not in KEEP:
            setattr(inp, attr, None)
    inp.extra_dict = opts
    if isinstance(typ, (list, tuple)):
        # the classic form ([choices], options), not ("COMBO", {"options": ...}): ComfyUI 0.3.64 checks a
        # prompt's value against the choices only in this form (an unknown model file is refused at once)
        choices = list(typ)
        inp.options = inp.multiselect = None
        inp.get_io_type = lambda: choices
    return inp


def _output(io, i: int, typ: Any, name: str | None, tooltip: str | None, is_list: bool):
    out_id = f"output{i}"  # an output may share its name with an input ("dit" in, "dit" out)
    if isinstance(typ, (list, tuple)):
        return io.Combo.Output(out_id, display_name=name, options=list(typ), tooltip=tooltip, is_output_list=is_list)
    kind = SOCKETS.get(typ) or WIDGETS.get(typ)
    cls = getattr(io, kind) if kind else io.Custom(typ)
    return cls.Output(out_id, display_name=name, tooltip=tooltip, is_output_list=is_list)


def schema_parts(io, classic: type) -> dict:
    """The keyword arguments of ``io.Schema`` (without node id and display name) for a classic class."""
    for feature in UNTRANSLATED:
        if hasattr(classic, feature):
            raise NotTranslated(f"it defines {feature}")
    spec = classic.INPUT_TYPES()
    unknown = set(spec) - {"required", "optional", "hidden"}
    if unknown:
        raise NotTranslated(f"INPUT_TYPES has sections {sorted(unknown)}")
    inputs = [_input(io, n, s, False) for n, s in (spec.get("required") or {}).items()]
    inputs += [_input(io, n, s, True) for n, s in (spec.get("optional") or {}).items()]
    hidden = [io.Hidden(v if isinstance(v, str) else v[0]) for v in (spec.get("hidden") or {}).values()]
    types = tuple(getattr(classic, "RETURN_TYPES", ()))
    names = tuple(getattr(classic, "RETURN_NAMES", None) or types)
    tips = tuple(getattr(classic, "OUTPUT_TOOLTIPS", None) or ())
    lists = getattr(classic, "OUTPUT_IS_LIST", None) or (False,) * len(types)
    outputs = [
        _output(io, i, t, names[i] if i < len(names) else None, tips[i] if i < len(tips) else None, bool(lists[i]))
        for i, t in enumerate(types)
    ]
    return {
        "category": getattr(classic, "CATEGORY", "FireRed"),
        "description": getattr(classic, "DESCRIPTION", "") or "",
        "inputs": inputs,
        "outputs": outputs,
        "hidden": hidden,
        "is_output_node": bool(getattr(classic, "OUTPUT_NODE", False)),
        "is_input_list": bool(getattr(classic, "INPUT_IS_LIST", False)),
        "is_deprecated": bool(getattr(classic, "DEPRECATED", False)),
        "is_experimental": bool(getattr(classic, "EXPERIMENTAL", False)),
        "not_idempotent": bool(getattr(classic, "NOT_IDEMPOTENT", False)),
    }


def _node_output(io, result):
    """A classic return value (tuple, or ``{"ui": ..., "result": ...}``) as an ``io.NodeOutput``."""
    if isinstance(result, dict):
        return io.NodeOutput(*tuple(result.get("result") or ()), ui=result.get("ui"))
    if result is None:
        return io.NodeOutput()
    return io.NodeOutput(*tuple(result))


def v3_class(io, node_id: str, classic: type, display_name: str | None = None) -> type:
    """An ``io.ComfyNode`` subclass for ``classic`` (raises :class:`NotTranslated`)."""
    parts = schema_parts(io, classic)  # checked now, so a class that cannot be translated stays classic
    hidden = {
        key: io.Hidden(v if isinstance(v, str) else v[0]).name
        for key, v in (classic.INPUT_TYPES().get("hidden") or {}).items()
    }
    as_list = parts["is_input_list"]
    function = classic.FUNCTION

    def define_schema(cls):
        return io.Schema(node_id=node_id, display_name=display_name, **schema_parts(io, classic))

    def execute(cls, **kwargs):
        for key, attr in hidden.items():  # V3 hands hidden inputs over on cls.hidden; classic as arguments
            value = getattr(cls.hidden, attr, None)
            kwargs[key] = [value] if as_list else value
        return _node_output(io, getattr(classic(), function)(**kwargs))

    body = {
        "__doc__": classic.__doc__,
        "__module__": classic.__module__,
        "CLASSIC": classic,
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
    }
    if hasattr(classic, "IS_CHANGED"):
        body["fingerprint_inputs"] = classmethod(lambda cls, **kwargs: classic.IS_CHANGED(**kwargs))
    return type(classic.__name__, (io.ComfyNode,), body)


def upgrade(mappings: dict[str, type], display_names: dict[str, str]) -> dict[str, type]:
    """``mappings`` with each class turned into its V3 form where this ComfyUI has the V3 API (and
    ``$FIRERED_NODE_API`` is not "classic"); a class that cannot be translated stays as it is."""
    choice = os.environ.get(API_ENV, "v3").strip().lower()
    if choice not in ("v3", "classic"):
        raise ValueError(f"${API_ENV}={choice!r}: expected 'v3' or 'classic'")
    io = io_module() if choice == "v3" else None
    if io is None:
        return dict(mappings)
    out = {}
    for node_id, classic in mappings.items():
        try:
            out[node_id] = v3_class(io, node_id, classic, display_names.get(node_id))
        except NotTranslated as e:
            log.info("FireRed: %s stays a classic node (%s)", node_id, e)
            out[node_id] = classic
    v3 = sorted(k for k, c in out.items() if c is not mappings[k])
    log.info("FireRed: %d of %d nodes registered through the V3 schema (comfy_api.latest)", len(v3), len(out))
    return out
