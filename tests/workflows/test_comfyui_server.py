"""The pack in a real ComfyUI server (``COMFYUI_PATH`` tier; skipped when it is unset).

A ComfyUI checkout is started on the CPU with the pack installed through an extra custom_nodes
folder and a temp models folder holding the tiny model in ComfyUI's file layouts (conftest
``comfy_server``). Run::

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy-venv/bin/python \
        /path/to/comfy-venv/bin/python -m pytest tests/workflows -q
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest
from comfy_server import REPO, output_images
from tier_files import substitute_native, uses_native_qwen, write_test_picture
from workflow_prompts import load_image_names, ui_to_api

pytestmark = pytest.mark.comfyui

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
PACK_LOG_NAME = "ComfyUI-FireRed-Image-Edit"


def _pack_ids() -> list[str]:
    """Node ids of the pack, read from the ``NODE_CLASS_MAPPINGS = {...}`` literals of ``nodes/*.py``
    (importing the pack here would not show ``native``'s nodes, which need ComfyUI)."""
    ids = set()
    for py in (REPO / "nodes").glob("*.py"):
        m = re.search(r"^NODE_CLASS_MAPPINGS\s*=\s*\{(.*?)^\}", py.read_text(), re.S | re.M)
        if m:
            ids.update(re.findall(r"""^\s*["']([A-Za-z0-9_]+)["']\s*:""", m.group(1), re.M))
    return sorted(ids)


def _prepare_inputs(server, prompt: dict) -> None:
    for i, name in enumerate(load_image_names(prompt)):
        path = server.input_dir / name
        if not path.exists():
            write_test_picture(path, size=(96 + 32 * (i % 2), 64 + 16 * i), seed=i)


#: Test-time overrides (to fit the tier into a few minutes on 2 CPU cores): the workflows run as
#: shipped except for fewer steps and smaller pictures. Input name -> function of the shipped value.
FAST = {
    "steps": lambda v: min(v, 3),
    "ref_size": lambda v: 256,
    "vl_size": lambda v: 128,
    "megapixels": lambda v: min(v, 0.05),
}


#: the automatic output size is ~1024x1024 (4096 tokens a step): sampling nodes without an input
#: latent get this one instead, at the aspect of the first test picture (96x64)
FAST_SIZE = (96, 64)


def _fast(prompt: dict) -> dict:
    for node in prompt.values():
        inputs = node["inputs"]
        for name, f in FAST.items():
            if isinstance(inputs.get(name), (int, float)):
                inputs[name] = f(inputs[name])
        if "steps" in inputs and inputs.get("width") == 0 and inputs.get("height") == 0 and "latent" not in inputs:
            inputs["width"], inputs["height"] = FAST_SIZE
    return prompt


def _workflow_prompt(server, path: Path, *, fast: bool = True) -> tuple[dict, dict]:
    wf = json.loads(path.read_text())
    if "nodes" in wf:
        prompt = ui_to_api(wf, server.object_info())
    else:  # an API-format file
        prompt, wf = wf, None
    _prepare_inputs(server, prompt)
    return (_fast(prompt) if fast else prompt), wf


# -- the pack loads ---------------------------------------------------------------------------


def test_object_info_lists_every_pack_node(comfy_server):
    info = comfy_server.object_info()
    ids = _pack_ids()
    assert ids, "the pack's NODE_CLASS_MAPPINGS is empty"
    missing = [i for i in ids if i not in info]
    assert not missing, f"/object_info lacks {missing}; log:\n{comfy_server.log_tail(80)}"
    for i in ids:
        assert info[i]["python_module"].startswith("custom_nodes."), info[i]["python_module"]
        assert info[i]["category"].startswith("FireRed"), (i, info[i]["category"])
    log = comfy_server.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_LOG_NAME in line]
    assert not failed, failed
    disabled = [ln for ln in log.splitlines() if "FireRed" in ln and "disabled" in ln]
    assert not disabled, disabled  # every optional feature's dependency is installed here


def test_every_input_has_a_tooltip(comfy_server):
    info = comfy_server.object_info()
    missing = []
    for i in _pack_ids():
        for section in ("required", "optional"):
            for name, spec in (info[i]["input"].get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not opts.get("tooltip"):
                    missing.append(f"{i}.{name}")
    assert not missing, f"inputs without a tooltip: {missing}"


# -- every shipped workflow runs ----------------------------------------------------------------


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs(comfy_server, path, request):
    prompt, wf = _workflow_prompt(comfy_server, path)
    if uses_native_qwen(prompt):
        # ComfyUI's own Qwen-Image loaders: full-width test files, test conditioning for the 7B encoder
        request.getfixturevalue("native_files")
        prompt = substitute_native(prompt, comfy_server)
    res = comfy_server.run(prompt, workflow=wf, timeout=240)
    assert res.status == "execution_success", f"{path.name}: {res.describe()}"
    images = output_images(comfy_server.history(res.prompt_id))
    assert images, f"{path.name} ran but produced no image"
    for im in images:
        if im.get("type") == "output":
            f = comfy_server.output_dir / im.get("subfolder", "") / im["filename"]
            assert f.is_file() and f.stat().st_size > 0, f
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f


# -- errors and cancel --------------------------------------------------------------------------


def _loader_prompt(server) -> tuple[dict, str, str]:
    """An API prompt of a shipped workflow, and (node id, input) of a model-file combo in it."""
    info = server.object_info()
    for path in WORKFLOWS:
        prompt, _ = _workflow_prompt(server, path)
        for nid, node in prompt.items():
            spec = info[node["class_type"]]["input"]
            for section in ("required", "optional"):
                for name, s in (spec.get(section) or {}).items():
                    if (
                        name in node["inputs"]
                        and isinstance(node["inputs"][name], str)
                        and node["inputs"][name].endswith((".safetensors", ".gguf"))
                    ):
                        return prompt, nid, name
    pytest.skip("no shipped workflow has a model-file widget yet")


def test_unknown_model_file_is_refused_and_server_keeps_serving(comfy_server):
    prompt, nid, name = _loader_prompt(comfy_server)
    bad = copy.deepcopy(prompt)
    bad[nid]["inputs"][name] = "no_such_model_file.safetensors"
    status, out = comfy_server.post_prompt(bad)
    assert status == 400, (status, out)
    assert nid in out.get("node_errors", {}), out
    errs = out["node_errors"][nid]["errors"]
    assert any(name in json.dumps(e) for e in errs), errs
    assert comfy_server.alive()
    assert "system" in comfy_server.get("/system_stats")
    # a valid prompt still runs after the refusal
    res = comfy_server.run(
        {
            "1": {"class_type": "FireRedTestSlow", "inputs": {"seconds": 0.0, "size": 16}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        },
        timeout=60,
    )
    assert res.status == "execution_success", res.describe()


def _slow_edit_prompt(server) -> dict:
    """A shipped workflow that samples, with its steps raised so it runs long enough to cancel."""
    for path in WORKFLOWS:
        prompt, _ = _workflow_prompt(server, path)
        samplers = [n for n in prompt.values() if "steps" in n["inputs"] and n["class_type"].startswith("FireRed")]
        if samplers:
            for n in samplers:
                n["inputs"]["steps"] = 200
            for n in prompt.values():  # a fresh seed so nothing is cached
                if "seed" in n["inputs"] and isinstance(n["inputs"]["seed"], int):
                    n["inputs"]["seed"] = int(time.time()) % 100000
            return prompt
    pytest.skip("no shipped workflow with a FireRed sampling node yet")


def test_interrupt_stops_a_running_edit(comfy_server):
    prompt = _slow_edit_prompt(comfy_server)
    sent = {}

    def on_message(server, msg):
        # interrupt at the first sampling progress of a FireRed node
        if msg.get("type") == "progress" and "t" not in sent:
            sent["t"] = time.time()
            server.interrupt()

    res = comfy_server.run(prompt, timeout=240, on_message=on_message)
    assert "t" in sent, (
        f"no progress message before the end ({res.describe()}); messages: {[m['type'] for m in res.messages]}"
    )
    assert res.status == "execution_interrupted", res.describe()
    assert time.time() - sent["t"] < 20, "the interrupt took more than 20 s to stop the edit"
    assert comfy_server.alive()


def test_harness_interrupt_self_check(comfy_server):
    """The harness itself: a 30 s node is interrupted within a few seconds."""
    prompt = {
        "1": {"class_type": "FireRedTestSlow", "inputs": {"seconds": 30.0, "size": 16 + int(time.time()) % 97}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    sent = {}

    def on_message(server, msg):
        if msg.get("type") == "executing" and (msg.get("data") or {}).get("node") == "1" and "t" not in sent:
            sent["t"] = time.time()
            time.sleep(0.5)
            server.interrupt()

    res = comfy_server.run(prompt, timeout=60, on_message=on_message)
    assert res.status == "execution_interrupted", res.describe()
    assert res.seconds < 10
