"""Every shipped workflow (``workflows/*.json``, ComfyUI UI format) checked against the node
definitions, without ComfyUI: node types exist, positional widget values match the inputs in
number, order and type, links join matching types, required sockets are connected, and loaders
name their files' download pages. (The ``COMFYUI_PATH`` tier runs each workflow in a real ComfyUI.)
"""

import json
import uuid
from pathlib import Path

import pytest

from tests.nodes.conftest import import_pack

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
#: model-file combos (choices depend on the user's folders): input name -> file suffixes
FILE_COMBOS = {
    "model_name": (".safetensors", ".sft", ".gguf"),
    "text_encoder_name": (".safetensors", ".sft"),
    "vae_name": (".safetensors", ".sft"),
    "lora_name": (".safetensors", ".sft"),
    "folder_name": ("",),
    "image": (".png", ".jpg", ".jpeg", ".webp"),
}
UI_ONLY = {"MarkdownNote", "Note", "Reroute", "PrimitiveNode"}

# ComfyUI core nodes the workflows use, as defined in ComfyUI 0.3.64 (required inputs in order:
# sockets are types in CAPS, widgets are lists / widget types); outputs.
CORE_NODES = {
    "LoadImage": ({"image": ["<file>"], "upload": ["image"]}, ["IMAGE", "MASK"]),
    "SaveImage": ({"images": "IMAGE", "filename_prefix": "STRING"}, []),
    "PreviewImage": ({"images": "IMAGE"}, []),
    "VAELoader": ({"vae_name": ["<file>"]}, ["VAE"]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"]),
    "VAEEncode": ({"pixels": "IMAGE", "vae": "VAE"}, ["LATENT"]),
    "ImageScaleToTotalPixels": ({"image": "IMAGE", "upscale_method": ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], "megapixels": "FLOAT"}, ["IMAGE"]),
    "MaskToImage": ({"mask": "MASK"}, ["IMAGE"]),
    "SamplerCustomAdvanced": ({"noise": "NOISE", "guider": "GUIDER", "sampler": "SAMPLER", "sigmas": "SIGMAS", "latent_image": "LATENT"}, ["LATENT", "LATENT"]),
    "KSamplerSelect": ({"sampler_name": ["<any>"]}, ["SAMPLER"]),
    "BasicScheduler": ({"model": "MODEL", "scheduler": ["<any>"], "steps": "INT", "denoise": "FLOAT"}, ["SIGMAS"]),
    "RandomNoise": ({"noise_seed": "INT*"}, ["NOISE"]),
    "UNETLoader": ({"unet_name": ["<file>"], "weight_dtype": ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]}, ["MODEL"]),
    "CLIPLoader": ({"clip_name": ["<file>"], "type": ["<any>"], "device": ["default", "cpu"]}, ["CLIP"]),
    "TextEncodeQwenImageEditPlus": ({"clip": "CLIP", "prompt": "STRING", "vae": "VAE", "image1": "IMAGE", "image2": "IMAGE", "image3": "IMAGE"}, ["CONDITIONING"]),
    "ModelSamplingAuraFlow": ({"model": "MODEL", "shift": "FLOAT"}, ["MODEL"]),
    "ConditioningZeroOut": ({"conditioning": "CONDITIONING"}, ["CONDITIONING"]),
    "LoadImageMask": ({"image": ["<file>"], "channel": ["alpha", "red", "green", "blue"], "upload": ["image"]}, ["MASK"]),
}
OPTIONAL_CORE_SOCKETS = {("TextEncodeQwenImageEditPlus", n) for n in ("vae", "image1", "image2", "image3")}


def definitions():
    """node type -> (ordered inputs [(name, type, options, required)], outputs [type])."""
    import importlib

    pack = import_pack()
    classes = dict(pack.NODE_CLASS_MAPPINGS)
    # the native GUIDER node registers only inside ComfyUI, but its definition is importable
    classes["FireRedConsistencyGuider"] = importlib.import_module(f"{pack.__name__}.nodes.native").FireRedConsistencyGuider
    out = {}
    for name, cls in classes.items():
        spec = cls.INPUT_TYPES()
        inputs = []
        for section in ("required", "optional"):
            for inp, s in spec.get(section, {}).items():
                inputs.append((inp, s[0], s[1] if len(s) > 1 else {}, section == "required"))
        out[name] = (inputs, list(cls.RETURN_TYPES))
    for name, (ins, outs) in CORE_NODES.items():
        inputs = []
        for inp, t in ins.items():
            opts = {"control_after_generate": True} if t == "INT*" else {}
            inputs.append((inp, "INT" if t == "INT*" else t, opts, (name, inp) not in OPTIONAL_CORE_SOCKETS))
        out[name] = (inputs, outs)
    return out


def is_widget(typ) -> bool:
    return isinstance(typ, list) or typ in WIDGET_TYPES


def check_widget(node_type, inp, typ, opts, value) -> str | None:
    where = f"{node_type}.{inp} = {value!r}"
    if isinstance(typ, list):
        if inp in FILE_COMBOS or typ in (["<file>"], ["<any>"]):
            if not isinstance(value, str) or not value:
                return f"{where}: expected a name"
            suffixes = FILE_COMBOS.get(inp, ("",))
            if not value.lower().endswith(suffixes):
                return f"{where}: expected a file ending in {suffixes}"
            return None
        return None if value in typ else f"{where}: not one of {typ}"
    if typ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{where}: expected a boolean"
    if typ == "STRING":
        return None if isinstance(value, str) else f"{where}: expected text"
    if typ == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{where}: expected an integer"
    if typ == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{where}: expected a number"
    lo, hi = opts.get("min", float("-inf")), opts.get("max", float("inf"))
    return None if lo <= value <= hi else f"{where}: outside [{lo}, {hi}]"


def problems_in(path: Path) -> list[str]:
    defs = definitions()
    wf = json.loads(path.read_text())
    found = []
    if wf.get("version") != 0.4:
        found.append(f"schema version {wf.get('version')!r}, expected 0.4")
    try:  # ComfyUI's front end rejects a workflow whose id is not a UUID
        uuid.UUID(str(wf.get("id")))
    except ValueError:
        found.append(f"id {wf.get('id')!r} is not a UUID")
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        t = n["type"]
        if t in UI_ONLY:
            continue
        if t not in defs:
            found.append(f"node {n['id']}: unknown type {t}")
            continue
        inputs, outputs = defs[t]
        expected = []
        for inp, typ, opts, _ in inputs:
            if is_widget(typ) and not opts.get("forceInput"):
                expected.append((inp, typ, opts))
                if opts.get("control_after_generate"):
                    expected.append((f"{inp} (control after generate)", list(CONTROL_VALUES), {}))
        values = n.get("widgets_values", [])
        if len(values) != len(expected):
            found.append(f"{t} (node {n['id']}): {len(values)} widget values, expected {len(expected)}: {[e[0] for e in expected]}")
        else:
            for (inp, typ, opts), v in zip(expected, values):
                if (msg := check_widget(t, inp, typ, opts, v)) is not None:
                    found.append(msg)
        sockets = {inp: typ for inp, typ, opts, _ in inputs if not is_widget(typ)}
        for slot in n.get("inputs", []):
            if slot["name"] not in sockets and not slot.get("widget"):
                found.append(f"{t} (node {n['id']}): input {slot['name']!r} does not exist")
            elif slot["name"] in sockets and slot["type"] != sockets[slot["name"]]:
                found.append(f"{t}.{slot['name']}: typed {slot['type']}, defined {sockets[slot['name']]}")
        connected = {s["name"] for s in n.get("inputs", []) if s.get("link") is not None}
        for inp, typ, opts, required in inputs:
            if required and not is_widget(typ) and inp not in connected:
                found.append(f"{t} (node {n['id']}): required input {inp!r} is not connected")
        if [o["type"] for o in n.get("outputs", [])] != outputs:
            found.append(f"{t} (node {n['id']}): outputs {[o['type'] for o in n.get('outputs', [])]}, defined {outputs}")
        if t.startswith("FireRed") and t.endswith("Loader") and t != "FireRedDiffusersLoader" or t in ("VAELoader", "UNETLoader", "CLIPLoader"):
            models = n.get("properties", {}).get("models", [])
            if not models or models[0].get("name") not in values or not str(models[0].get("url", "")).startswith("https://huggingface.co/"):
                found.append(f"{t} (node {n['id']}): properties.models must name its file and a Hugging Face download page")
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        if src not in nodes or dst not in nodes:
            found.append(f"link {lid}: joins a missing node")
            continue
        s, d = nodes[src], nodes[dst]
        out = s["outputs"][sslot] if sslot < len(s["outputs"]) else None
        inp = d["inputs"][dslot] if dslot < len(d["inputs"]) else None
        if out is None or inp is None:
            found.append(f"link {lid}: slot out of range")
            continue
        if not (out["type"] == inp["type"] == typ):
            found.append(f"link {lid}: {s['type']}.{out['name']} ({out['type']}) -> {d['type']}.{inp['name']} ({inp['type']}), link says {typ}")
        if lid not in (out.get("links") or []) or inp.get("link") != lid:
            found.append(f"link {lid}: not recorded on both ends")
    return found


def test_there_are_workflows_for_each_shipped_path():
    names = {p.stem for p in WORKFLOWS}
    assert {"firered_edit_single", "firered_edit_three_pictures", "firered_lightning_8steps", "firered_native_vae_nodes"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_matches_the_node_definitions(path):
    assert problems_in(path) == []


def test_the_checker_catches_a_widget_shift(tmp_path):
    """A workflow saved before an input was inserted mid-list must fail: widget values are positional."""
    wf = json.loads((ROOT / "workflows" / "firered_edit_single.json").read_text())
    smp = next(n for n in wf["nodes"] if n["type"] == "FireRedSampler")
    smp["widgets_values"].insert(2, 1.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(wf))
    assert any("FireRedSampler" in p for p in problems_in(bad))
    smp["widgets_values"].pop(2)
    smp["widgets_values"][4], smp["widgets_values"][5] = smp["widgets_values"][5], smp["widgets_values"][4]
    bad.write_text(json.dumps(wf))
    assert any("not one of" in p for p in problems_in(bad))


def test_the_shipped_workflows_are_up_to_date(tmp_path):
    """workflows/make_workflows.py writes what is checked in (edit the script, not the JSON)."""
    import runpy

    written = runpy.run_path(str(ROOT / "workflows" / "make_workflows.py"))["build_all"](tmp_path)
    assert written
    for name in written:
        assert (tmp_path / name).read_text() == (ROOT / "workflows" / name).read_text(), f"{name} is stale: run workflows/make_workflows.py"
