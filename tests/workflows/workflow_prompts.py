"""UI-format workflows (what ``workflows/*.json`` holds) as API prompts, for the ``COMFYUI_PATH`` test tier:
:func:`ui_to_api` reads the node definitions from a server's ``/object_info`` and does what the front
end's "queue" does (widget values by input order, control widgets skipped, UI-only and muted nodes
left out); :func:`load_image_names` lists the pictures a prompt reads. Pure functions: nothing here
starts or talks to ComfyUI (:mod:`comfy_server` does).
"""

from __future__ import annotations

from typing import Any

#: UI-only node types of the front end: never sent to /prompt
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _input_specs(info: dict) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of a node's inputs in widget order (required, then optional)."""
    out = []
    inputs = info.get("input", {})
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        sec = inputs.get(section) or {}
        names = order.get(section) or list(sec)
        for name in names:
            spec = sec[name]
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, typ, opts))
    return out


def _is_widget(typ: Any, opts: dict) -> bool:
    if isinstance(typ, list):
        return True  # classic COMBO
    return typ in WIDGET_TYPES and not opts.get("forceInput")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format (0.4) workflow into an API prompt.

    Positional ``widgets_values`` are named with ``/object_info`` (a ``control_after_generate``
    value after an INT widget is skipped; trailing UI-only values such as the upload button are
    ignored). Note / MarkdownNote are dropped, Reroute links are followed, a PrimitiveNode's value
    is written into the widgets it feeds, muted nodes (mode 2) are dropped and bypassed nodes
    (mode 4) pass their input of the same type through.
    """
    if "nodes" not in workflow:
        raise ValueError("not a UI-format workflow (no 'nodes'); API prompts can be posted as they are")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links: dict[int, tuple[int, int, int, int, str]] = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (
                link["origin_id"],
                link["origin_slot"],
                link["target_id"],
                link["target_slot"],
                link.get("type"),
            )
        else:
            lid, a, aslot, b, bslot, typ = link[:6]
            links[lid] = (a, aslot, b, bslot, typ)

    def resolve(link_id: int, depth: int = 0):
        """The (node id, slot) a link really comes from, or ("value", v) for a PrimitiveNode."""
        if depth > 64:
            raise ValueError(f"link {link_id}: reroute / bypass loop")
        src, slot, _, _, typ = links[link_id]
        n = nodes[src]
        if n["type"] == "Reroute":
            inp = (n.get("inputs") or [{}])[0].get("link")
            return None if inp is None else resolve(inp, depth + 1)
        if n["type"] == "PrimitiveNode":
            return ("value", (n.get("widgets_values") or [None])[0])
        if n.get("mode", 0) == 4:  # bypassed: pass the first input of the same type through
            out_type = (n.get("outputs") or [])[slot].get("type") if slot < len(n.get("outputs") or []) else typ
            for inp in n.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return resolve(inp["link"], depth + 1)
            return None
        if n.get("mode", 0) == 2:
            return None
        return (str(src), slot)

    prompt: dict[str, dict] = {}
    for n in workflow["nodes"]:
        t = n["type"]
        if t in UI_ONLY or n.get("mode", 0) in (2, 4):
            continue
        if t not in object_info:
            raise ValueError(f"node {n['id']}: type {t!r} is not known to this ComfyUI (/object_info)")
        specs = _input_specs(object_info[t])
        spec_by_name = {name: (typ, opts) for name, typ, opts in specs}
        inputs: dict[str, Any] = {}
        values = n.get("widgets_values")
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in spec_by_name})
        elif values:
            vals = list(values)
            i = 0
            for name, typ, opts in specs:
                if not _is_widget(typ, opts):
                    continue
                if i >= len(vals):
                    break
                inputs[name] = vals[i]
                i += 1
                if typ == "INT" and i < len(vals) and isinstance(vals[i], str) and vals[i] in CONTROL_VALUES:
                    i += 1  # control_after_generate
        for inp in n.get("inputs") or []:
            lid = inp.get("link")
            if lid is None:
                continue
            src = resolve(lid)
            name = inp.get("widget", {}).get("name") if inp.get("widget") else inp.get("name")
            if name not in spec_by_name:
                name = inp.get("name")
            if src is None:
                inputs.pop(name, None)
            elif src[0] == "value":
                inputs[name] = src[1]
            else:
                inputs[name] = [src[0], src[1]]
        prompt[str(n["id"])] = {"class_type": t, "inputs": inputs, "_meta": {"title": n.get("title") or t}}
    return prompt


def load_image_names(prompt: dict) -> list[str]:
    """File names LoadImage(-like) nodes of an API prompt read from the input folder."""
    names = []
    for node in prompt.values():
        if node["class_type"] in ("LoadImage", "LoadImageMask", "LoadImageOutput"):
            v = node["inputs"].get("image")
            if isinstance(v, str):
                names.append(v.split(" [")[0])
    return names
