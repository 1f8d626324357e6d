"""The shipped workflows in ComfyUI's real front end, on each front end of the tier (see
:mod:`frontend_page`; ``COMFYUI_PATH`` tier, skipped like ``test_frontend.py``).

Each workflow is opened the way the template browser opens a custom node's template (the JSON served
at ``/api/workflow_templates/<pack folder>/<name>.json``, loaded under its name) with no missing-node
dialog, no warning from the front end's workflow or widget checks, the loaders' file-info lines
filled and the pack's panels inside their nodes; it is then turned into a prompt by the front end
(``app.graphToPrompt``), queued through the front end's API client and must finish. A workflow saved
on the installed front end (1.27) opens on the newer one and back with its nodes, widget values and
links intact.
"""

from __future__ import annotations

import copy
import json
import time

import frontend_page
import pytest
from comfy_server import PACK_DIR_NAME, REPO, ComfyError
from frontend_page import APP, PageLog, link_native_dit, open_page, shoot
from test_comfyui_server import _fast, _prepare_inputs
from tier_files import substitute_native, uses_native_qwen, write_test_picture

#: the folders ComfyUI 0.3.x serves a pack's templates from: the first one found is served for all
#: the names listed from any of them (app/custom_node_manager.py)
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")

# the fixtures of frontend_page (shared with test_frontend.py)
browser_page = frontend_page.browser_page
playwright = frontend_page.playwright
new_frontend_server = frontend_page.new_frontend_server
screenshots = frontend_page.screenshots

FILE_INFO_TYPES = {
    "FireRedModelLoader",
    "FireRedTextEncoderLoader",
    "FireRedVAELoader",
    "FireRedLoraLoader",
    "FireRedDiffusersLoader",
}
WORKFLOWS = sorted(p for p in (REPO / "workflows").glob("*.json") if "nodes" in json.loads(p.read_text()))
#: words of a front-end message about a workflow it could not open as saved (a missing node type, a
#: widget value that does not fit, the workflow schema check)
WARNING_WORDS = ("missing", "widget", "workflow", "schema", "firered")

OPEN_TEMPLATE = """
async ([module, name]) => {
  const app = %(app)s, api = window.comfyAPI.api.api;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const listed = ((await (await api.fetchApi("/workflow_templates")).json())[module] ?? []).includes(name);
  const res = await fetch(`${api.api_base ?? ""}/api/workflow_templates/${module}/${encodeURIComponent(name)}.json`);
  if (!res.ok) return { listed, status: res.status };
  const wf = await res.json();
  // what the front end tells the user while opening the file: its toasts (1.27: a store's actions;
  // newer: an object of functions, wrapped here while the file opens) and the toasts on screen
  const alerts = [];
  const said = (kind, a) => alerts.push(typeof a === "string" ? `${kind}: ${a}` : `${a?.severity ?? kind}: ${a?.summary ?? ""} ${a?.detail ?? ""}`);
  const toast = app.extensionManager?.toast;
  let stop = toast?.$onAction?.(({ name, args }) => ["add", "addAlert"].includes(name) && said(name, args[0]));
  if (!stop && toast) {
    const kept = {};
    for (const k of ["add", "addAlert", "error", "warning"]) {
      if (typeof toast[k] !== "function") continue;
      kept[k] = toast[k];
      toast[k] = (...args) => (said(k, args[0]), kept[k].apply(toast, args));
    }
    if (Object.keys(kept).length) stop = () => Object.assign(toast, kept);
  }
  await app.loadGraphData(wf, true, true, name);  // as the template browser does
  const nodes = () => app.graph._nodes ?? app.graph.nodes;
  const pending = () => nodes().filter((n) => n.fireredInfo && ["", "…"].includes(n.fireredInfo.root.textContent));
  for (let i = 0; i < 300 && pending().length; i++) await sleep(50);
  await sleep(300);
  const dialogs = [...document.querySelectorAll(".p-dialog, [role=dialog]")].map((d) => d.textContent.trim()).filter(Boolean);
  for (const t of document.querySelectorAll(".p-toast-message")) alerts.push(`on screen: ${t.textContent.trim()}`);
  const out = {
    listed,
    status: res.status,
    unregistered: nodes().filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type),
    infos: nodes().filter((n) => n.fireredInfo).map((n) => [n.type, n.fireredInfo.root.textContent]),
    clipped: nodes().filter((n) => n.type.startsWith("FireRed") && n.computeSize()[1] > n.size[1] + 1).map((n) => n.type),
    saved: Object.fromEntries(nodes().map((n) => [n.id, n.serialize().widgets_values ?? null])),
    alerts,
    dialogs,
    hooked: typeof stop === "function",
  };
  stop?.();
  return out;
}
""" % {"app": APP}

TO_PROMPT = (
    f"async () => {{ const p = await {APP}.graphToPrompt(); return {{ output: p.output, workflow: p.workflow }}; }}"
)

QUEUE = """
async ([output, workflow]) => {
  const api = window.comfyAPI.api.api;
  const r = await api.queuePrompt(0, { output, workflow });  // the queue button's call
  return r?.prompt_id ?? null;
}
"""


def _benign(text: str, url: str) -> bool:
    """A request the browser logs as failed: the pack's own are in ``PageLog.from_pack``; the others are
    the front end asking for user files a fresh user folder lacks, or (newer front end on ComfyUI
    0.3.64) for server routes this ComfyUI does not have yet (``/api/jobs``, ``/api/global_subgraphs``)."""
    return text.startswith("Failed to load resource")


def _open_template(page, log, path):
    before = len(log.console)
    got = page.evaluate(OPEN_TEMPLATE, [PACK_DIR_NAME, path.stem])
    assert got["listed"] and got["status"] == 200, f"{path.name} is not offered as a template of the pack: {got}"
    assert got["hooked"], "could not watch the front end's alerts"
    warnings = [
        f"{kind}: {text} ({url})"
        for kind, text, url in log.console[before:]
        if kind in ("warning", "error") and any(w in text.lower() for w in WARNING_WORDS) and not _benign(text, url)
    ]
    return got, warnings


def write_pictures(server, wf: dict) -> None:
    """The pictures the workflow opens, as a user has them in input/."""
    for n in wf["nodes"]:
        if n["type"] == "LoadImage" and n.get("widgets_values"):
            picture = server.input_dir / str(n["widgets_values"][0]).split(" [")[0]
            if not picture.exists():
                write_test_picture(picture)


def _wait_finished(server, prompt_id: str, timeout: float = 300.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not server.alive():
            raise ComfyError(f"ComfyUI died while running the prompt:\n{server.log_tail()}")
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and (entry.get("status") or {}).get("completed") is not None:
            return entry
        time.sleep(0.5)
    raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def test_one_template_folder():
    """Runs without ComfyUI: a second folder of one of these names (``examples/`` with a picture once)
    hides ``workflows/`` from the template browser: it lists the workflows and then gets 404 for each."""
    present = [name for name in TEMPLATE_FOLDERS if (REPO / name).is_dir()]
    assert present == ["workflows"], f"template folders at the pack root: {present} (keep only workflows/)"


@pytest.mark.comfyui
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflow_opens_as_a_template_and_runs(browser_page, screenshots, path):
    page, log, server, fe = browser_page
    wf = json.loads(path.read_text())
    write_pictures(server, wf)
    got, warnings = _open_template(page, log, path)
    shoot(page, screenshots, fe, f"workflow-{path.stem}")
    assert not got["unregistered"], f"{path.name}: missing node types {got['unregistered']}"
    assert not [d for d in got["dialogs"] if "missing" in d.lower()], f"{path.name}: {got['dialogs']}"
    assert not [a for a in got["alerts"] if any(w in a.lower() for w in WARNING_WORDS)], f"{path.name}: {got['alerts']}"
    assert not warnings, f"{path.name}: the front end warned while opening it: {warnings}"
    loaders = [n for n in wf["nodes"] if n["type"] in FILE_INFO_TYPES]
    assert len(got["infos"]) == len(loaders), got["infos"]
    for node_type, text in got["infos"]:
        assert text and not text.startswith("⚠"), f"{path.name}: {node_type} says {text!r}"
    assert not got["clipped"], f"{path.name}: panels cut off in {got['clipped']}"
    for n in wf["nodes"]:
        if n["type"] not in ("MarkdownNote", "Note") and "widgets_values" in n:
            # (the newer front end leaves out the widget values of a node that has none)
            saved = got["saved"][str(n["id"])] or []
            assert saved == n["widgets_values"], f"{path.name}: node {n['id']} ({n['type']})"

    # queued from the front end's own prompt (fewer steps, smaller pictures; the native nodes on test files)
    made = page.evaluate(TO_PROMPT)
    prompt = _fast(copy.deepcopy(made["output"]))
    _prepare_inputs(server, prompt)
    if uses_native_qwen(prompt):
        link_native_dit(server)
        prompt = substitute_native(prompt, server)
    prompt_id = page.evaluate(QUEUE, [prompt, made["workflow"]])
    assert prompt_id, f"{path.name}: the front end could not queue the prompt"
    entry = _wait_finished(server, prompt_id)
    status = entry.get("status") or {}
    assert status.get("status_str") == "success", f"{path.name}: {json.dumps(status.get('messages'))[-3000:]}"
    assert any(o.get("images") for o in (entry.get("outputs") or {}).values()), f"{path.name}: no image"
    assert not log.from_pack(), log.from_pack()


SAVE = f"""
async ([wf, name]) => {{
  const app = {APP};
  await app.loadGraphData(wf, true, true, name);
  await new Promise((r) => setTimeout(r, 300));
  return JSON.parse(JSON.stringify(app.graph.serialize()));  // what saving the workflow writes
}}
"""


def _links(wf: dict) -> set[tuple]:
    out = set()
    for link in wf.get("links") or []:
        if isinstance(link, dict):
            out.add((link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"]))
        else:
            out.add(tuple(link[1:6]))
    return out


def _shape(wf: dict) -> dict:
    """What must survive a save on another front end: node types, widget values, links."""
    nodes = {str(n["id"]): (n["type"], n.get("widgets_values") or []) for n in wf["nodes"]}
    return {"nodes": nodes, "links": _links(wf)}


@pytest.mark.comfyui
def test_workflow_saved_on_the_installed_front_end_opens_on_the_new_one_and_back(request, playwright, screenshots):
    old_server = request.getfixturevalue("comfy_server")
    new_server = request.getfixturevalue("new_frontend_server")
    old_log, new_log = PageLog(), PageLog()
    with open_page(playwright, old_server, old_log) as old, open_page(playwright, new_server, new_log) as new:
        for path in WORKFLOWS:
            wf = json.loads(path.read_text())
            write_pictures(old_server, wf)
            write_pictures(new_server, wf)
            on_old = old.evaluate(SAVE, [wf, path.stem])
            on_new = new.evaluate(SAVE, [on_old, path.stem])
            shoot(new, screenshots, "new", f"roundtrip-{path.stem}")
            back = old.evaluate(SAVE, [on_new, path.stem])
            shoot(old, screenshots, "installed", f"roundtrip-{path.stem}")
            want = _shape(wf)
            for label, saved in (
                ("saved on 1.27", on_old),
                ("saved on the new front end", on_new),
                ("back on 1.27", back),
            ):
                got = _shape(saved)
                assert got["nodes"] == want["nodes"], f"{path.name} {label}: nodes / widget values changed"
                assert got["links"] == want["links"], f"{path.name} {label}: links changed"
    assert not old_log.from_pack() and not new_log.from_pack(), old_log.from_pack() + new_log.from_pack()
