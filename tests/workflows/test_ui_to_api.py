"""The harness's UI-format -> API-format converter (tests/workflows/workflow_prompts.py), on a
hand-written workflow and /object_info; runs without ComfyUI."""

import json

import pytest
from comfy_server import REPO
from workflow_prompts import load_image_names, ui_to_api

INFO = {
    "Loader": {
        "input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}], "dtype": [["auto", "fp32"], {}]}}
    },
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"control_after_generate": True}],
                "steps": ["INT", {}],
                "cfg": ["FLOAT", {}],
                "mode": ["COMBO", {"options": ["x", "y"]}],
            },
            "optional": {"latent": ["LATENT", {}], "note": ["STRING", {"forceInput": True}]},
        },
        "input_order": {"required": ["model", "seed", "steps", "cfg", "mode"], "optional": ["latent", "note"]},
    },
    "Filter": {"input": {"required": {"model": ["MODEL", {}], "amount": ["FLOAT", {}]}}},
    "LoadImage": {"input": {"required": {"image": [["pic.png"], {"image_upload": True}]}}},
}


def _wf():
    return {
        "nodes": [
            {
                "id": 1,
                "type": "Loader",
                "mode": 0,
                "inputs": [],
                "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}],
                "widgets_values": ["b.safetensors", "fp32"],
            },
            {"id": 2, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}], "outputs": [{"links": [2]}]},
            {
                "id": 3,
                "type": "Filter",
                "mode": 4,
                "inputs": [{"name": "model", "type": "MODEL", "link": 2}],
                "outputs": [{"name": "MODEL", "type": "MODEL", "links": [3]}],
                "widgets_values": [0.5],
            },
            {
                "id": 4,
                "type": "PrimitiveNode",
                "outputs": [{"name": "INT", "type": "INT", "links": [4]}],
                "widgets_values": [25, "fixed"],
            },
            {
                "id": 5,
                "type": "Sampler",
                "mode": 0,
                "inputs": [
                    {"name": "model", "type": "MODEL", "link": 3},
                    {"name": "steps", "type": "INT", "link": 4, "widget": {"name": "steps"}},
                    {"name": "latent", "type": "LATENT", "link": None},
                ],
                "outputs": [],
                "widgets_values": [7, "randomize", 40, 4.5, "y"],
            },
            {"id": 6, "type": "MarkdownNote", "widgets_values": ["hello"]},
            {"id": 7, "type": "Filter", "mode": 2, "inputs": [], "outputs": [], "widgets_values": [1.0]},
            {
                "id": 8,
                "type": "LoadImage",
                "mode": 0,
                "inputs": [],
                "outputs": [],
                "widgets_values": ["pic.png", "image"],
            },
        ],  # fmt: skip
        "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 5, 0, "MODEL"], [4, 4, 0, 5, 1, "INT"]],
    }


def test_widgets_links_and_ui_only_nodes():
    api = ui_to_api(_wf(), INFO)
    assert set(api) == {"1", "5", "8"}  # Reroute, bypassed / muted nodes, Primitive and notes dropped
    assert api["1"]["inputs"] == {"name": "b.safetensors", "dtype": "fp32"}
    # control_after_generate value skipped, Primitive's value wins over the stale widget value,
    # the bypassed Filter and the Reroute are passed through to the Loader
    assert api["5"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": 25, "cfg": 4.5, "mode": "y"}
    assert api["8"]["inputs"] == {"image": "pic.png"}  # the upload button's value is ignored
    assert load_image_names(api) == ["pic.png"]


def test_unknown_node_type_is_named():
    wf = _wf()
    wf["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(ValueError, match="NoSuchNode"):
        ui_to_api(wf, INFO)


def test_link_objects_of_schema_1():
    wf = _wf()
    wf["links"] = [
        dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link)) for link in wf["links"]
    ]
    assert ui_to_api(wf, INFO)["5"]["inputs"]["model"] == ["1", 0]


def test_shipped_workflows_are_ui_format():
    for path in sorted((REPO / "workflows").glob("*.json")):
        wf = json.loads(path.read_text())
        assert "nodes" in wf and "links" in wf, path.name
