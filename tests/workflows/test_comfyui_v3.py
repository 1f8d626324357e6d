"""The nodes registered through ComfyUI's V3 schema (nodes/v3.py) in a real ComfyUI (``COMFYUI_PATH``
tier): the session's server registers them as V3 (ComfyUI 0.3.64 has ``comfy_api.latest``), and its
``/object_info`` for every pack node is the classic one of a second server started with
``FIRERED_NODE_API=classic`` (same inputs in the same order with the same options, outputs, hidden
inputs), so saved workflows keep loading; the rest of the tier (every shipped workflow run, the
browser tests) runs on the V3 registration.
"""

from __future__ import annotations

import copy
import re

import pytest
from comfy_server import start_server

pytestmark = pytest.mark.comfyui

PACK_MODULE = "ComfyUI-FireRed-Image-Edit"


@pytest.fixture(scope="module")
def classic_server(comfy_server, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("comfyui_classic"), extra_env={"FIRERED_NODE_API": "classic"})
    yield server
    server.stop()


def pack_nodes(info: dict) -> dict:
    return {k: v for k, v in info.items() if v.get("python_module", "").endswith(PACK_MODULE)}


def as_classic(spec: list) -> list:
    """A V3 combo (``["COMBO", {"options": [...], "multiselect": false}]``) in the classic form
    (``[[...], {...}]``); both mean the same to the front end and to the workflow files."""
    typ, opts = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    if typ == "COMBO" and "options" in opts:
        choices = opts.pop("options")
        if opts.get("multiselect") is False:
            opts.pop("multiselect")
        return [choices, opts]
    return [typ, opts] if len(spec) > 1 else [typ]


def normalised(info: dict) -> dict:
    """Written the same way: combos in the classic form, hidden inputs as names (V3 writes
    ``["UNIQUE_ID"]`` where the classic nodes wrote ``"UNIQUE_ID"``; the front end never reads them)."""
    info = copy.deepcopy(info)
    for key in ("output", "output_is_list", "output_name", "output_tooltips"):  # none: [] or null
        info[key] = info.get(key) or []
    hidden = info.get("input", {}).get("hidden") or {}
    for name, spec in hidden.items():
        hidden[name] = spec[0] if isinstance(spec, list) else spec
    for key, section in info.get("input", {}).items():
        if key == "hidden":
            continue
        for name, spec in section.items():
            section[name] = as_classic(spec) if isinstance(spec, list) and len(spec) > 1 else spec
    return info


def test_the_pack_registers_its_nodes_through_the_v3_schema(comfy_server):
    log = comfy_server.log()
    m = re.search(r"FireRed: (\d+) of (\d+) nodes registered through the V3 schema", log)
    assert m, f"no V3 registration line in the log:\n{comfy_server.log_tail(80)}"
    ids = pack_nodes(comfy_server.object_info())
    assert int(m.group(1)) == int(m.group(2)) == len(ids), (m.group(0), sorted(ids))
    assert "Traceback" not in "\n".join(ln for ln in log.splitlines() if "FireRed" in ln), comfy_server.log_tail(80)


def test_v3_object_info_is_the_classic_one(comfy_server, classic_server):
    assert "nodes registered through the V3 schema" not in classic_server.log()
    v3, classic = pack_nodes(comfy_server.object_info()), pack_nodes(classic_server.object_info())
    assert sorted(v3) == sorted(classic)
    for node_id in classic:
        a, b = normalised(v3[node_id]), normalised(classic[node_id])
        if a.get("output_node"):  # V3 gives every output node the prompt and workflow (for saved metadata)
            added = {"prompt", "extra_pnginfo"} - set(b["input"].get("hidden") or {})
            hidden = {k: v for k, v in (a["input"].get("hidden") or {}).items() if k not in added}
            order = [k for k in (a.get("input_order") or {}).get("hidden", []) if k not in added]
            for where, value in ((a["input"], hidden), (a.get("input_order") or {}, order)):
                where.pop("hidden", None)
                if value:
                    where["hidden"] = value
        for key in ("input", "input_order", "output", "output_is_list", "output_name", "output_tooltips",
                    "display_name", "description", "category", "output_node"):  # fmt: skip
            assert a.get(key) == b.get(key), f"{node_id}.{key}: V3 {a.get(key)!r} != classic {b.get(key)!r}"
