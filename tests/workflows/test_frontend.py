"""The front-end extension (js/firered.js) in ComfyUI's real front end, in headless Chromium
(``COMFYUI_PATH`` tier; skipped when it is unset, or when Playwright or a Chromium is missing).

The page is ComfyUI's own UI served by the session's server (conftest ``comfy_server``, the pack
installed, the tiny model in its models folder). The tests build graphs in the page the way a user
does (nodes created, linked, widgets set, the queue button's ``app.queuePrompt``) and read what the
pack's widgets drew: the comparison canvas's pixels, the loaders' file-info lines, the loss chart.
Console errors and uncaught exceptions that come from the pack fail the last test.

Browser: Playwright (``pip install playwright``) driving a system Chromium (Debian: ``apt-get install
chromium``; or ``$FIRERED_CHROMIUM``): Playwright's own browser download is not needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from comfy_server import PACK_DIR_NAME, REPO, comfyui_path, write_test_picture

pytestmark = pytest.mark.comfyui

EXTENSION = "FireRed.ImageEdit"
APP = "window.comfyAPI.app.app"
API = "window.comfyAPI.api.api"
#: the page has loaded the node definitions (the pack's included) and the extensions
READY = f"() => {APP}?.graph && window.LiteGraph?.registered_node_types?.FireRedCompare && {APP}.extensions?.length"
#: a model name the file-info test asks for on purpose; the browser logs its 404, which is expected
EXPECTED_MISSING = "firered_fe_expected_missing.safetensors"


def chromium_executable() -> str | None:
    env = os.environ.get("FIRERED_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class PageLog:
    """Console messages, uncaught exceptions and failed requests of the page."""

    def __init__(self):
        self.console: list[tuple[str, str, str]] = []
        self.exceptions: list[str] = []
        self.failed: list[str] = []

    def from_pack(self) -> list[str]:
        def ours(*parts: str | None) -> bool:
            s = " ".join(p for p in parts if p).lower()
            return "firered" in s or PACK_DIR_NAME.lower() in s

        def expected(*parts: str | None) -> bool:
            return any(EXPECTED_MISSING in (p or "") for p in parts)

        out = [
            f"console.{kind}: {text} ({url})"
            for kind, text, url in self.console
            if kind == "error" and ours(text, url) and not expected(text, url)
        ]
        out += [f"exception: {e}" for e in self.exceptions if ours(e)]
        out += [f"request: {r}" for r in self.failed if ours(r) and not expected(r)]
        return out


@pytest.fixture(scope="module")
def browser_page(request):
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set (the real-ComfyUI tier)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install playwright) in this interpreter"
    )
    exe = chromium_executable()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set FIRERED_CHROMIUM to a Chrome/Chromium binary)")
    server = request.getfixturevalue("comfy_server")
    log = PageLog()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: log.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: log.exceptions.append(f"{e}\n{getattr(e, 'stack', '') or ''}"))
        page.on("requestfailed", lambda r: log.failed.append(f"{r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and log.failed.append(f"{r.url} HTTP {r.status}"))
        page.goto(server.url)
        page.wait_for_function(READY, timeout=90_000)
        yield page, log, server
        browser.close()


def wait_for(page, js: str, timeout: float = 60_000):
    page.wait_for_function(js, timeout=timeout)


def test_extension_is_served_and_registered(browser_page):
    page, log, server = browser_page
    assert f"/extensions/{PACK_DIR_NAME}/firered.js" in server.get("/extensions")
    names = page.evaluate(f"() => {APP}.extensions.map((e) => e.name)")
    assert EXTENSION in names, "the FireRed extension did not register (see the browser console)"
    assert not log.from_pack(), log.from_pack()


UPLOAD_AND_BUILD = """
async ([colours, cmpSize]) => {
  const app = %(app)s, api = %(api)s;
  async function upload(name, colour) {
    const c = new OffscreenCanvas(64, 48);
    const x = c.getContext("2d");
    x.fillStyle = colour;
    x.fillRect(0, 0, 64, 48);
    const fd = new FormData();
    fd.append("image", new File([await c.convertToBlob({ type: "image/png" })], name, { type: "image/png" }));
    fd.append("overwrite", "true");
    const r = await api.fetchApi("/upload/image", { method: "POST", body: fd });
    return (await r.json()).name;
  }
  const g = app.graph;
  g.clear();
  const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; g.add(n); return n; };
  const loads = [];
  for (const [i, [name, colour]] of colours.entries()) {
    const n = add("LoadImage", [20, 20 + 60 * i]);
    n.widgets.find((w) => w.name === "image").value = await upload(name, colour);
    n.collapse?.();
    loads.push(n);
  }
  const before = add("ImageBatch", [260, 20]);
  const after = add("ImageBatch", [260, 160]);
  loads[0].connect(0, before, 0); loads[1].connect(0, before, 1);
  loads[2].connect(0, after, 0); loads[3].connect(0, after, 1);
  const cmp = add("FireRedCompare", [520, 20]);
  cmp.setSize(cmpSize);
  before.connect(0, cmp, 0);
  after.connect(0, cmp, 1);
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  g.setDirtyCanvas(true, true);
  await app.queuePrompt(0, 1);
  return cmp.id;
}
""" % {"app": APP, "api": API}

PIXELS = """
([fx]) => {
  const c = document.querySelector("canvas[data-firered-compare]");
  const x = c.getContext("2d", { willReadFrequently: true });
  return Array.from(x.getImageData(Math.round(c.width * fx), Math.round(c.height / 2), 1, 1).data).slice(0, 3);
}
"""


def near(rgb, want, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(rgb, want))


def test_comparison_widget_draws_pairs_with_a_slider(browser_page):
    page, log, server = browser_page
    colours = [
        ("firered_fe_before0.png", "rgb(255,0,0)"),
        ("firered_fe_before1.png", "rgb(0,255,0)"),
        ("firered_fe_after0.png", "rgb(0,0,255)"),
        ("firered_fe_after1.png", "rgb(255,255,0)"),
    ]
    node_id = page.evaluate(UPLOAD_AND_BUILD, [colours, [420, 420]])
    wait_for(page, f"() => document.querySelector('canvas[data-firered-compare=\"{node_id}\"]')?.dataset.drawn > 0")
    state = page.evaluate(
        "() => { const c = document.querySelector('canvas[data-firered-compare]');"
        " return {w: c.width, h: c.height, split: c.dataset.split, index: c.dataset.index,"
        " bar: c.parentElement.querySelector('.firered-bar').textContent,"
        " barShown: getComputedStyle(c.parentElement.querySelector('.firered-bar')).display !== 'none'} }"
    )
    assert state["w"] > 100 and state["h"] > 100, state  # sized with the node
    assert state["split"] == "0.500" and state["index"] == "0"
    assert state["barShown"] and "1 / 2" in state["bar"], state  # two pairs: the selector shows
    # before left of the slider, after right of it
    assert near(page.evaluate(PIXELS, [0.25]), (255, 0, 0))
    assert near(page.evaluate(PIXELS, [0.75]), (0, 0, 255))

    # the slider follows the pointer: at 20 %, the point at 40 % shows the result
    page.evaluate(
        "() => { const c = document.querySelector('canvas[data-firered-compare]'); const b = c.getBoundingClientRect();"
        " c.dispatchEvent(new PointerEvent('pointermove', {clientX: b.left + b.width * 0.2, clientY: b.top + b.height / 2, bubbles: true})); }"
    )
    assert float(page.evaluate("() => document.querySelector('canvas[data-firered-compare]').dataset.split")) < 0.3
    assert near(page.evaluate(PIXELS, [0.4]), (0, 0, 255))
    assert near(page.evaluate(PIXELS, [0.1]), (255, 0, 0))

    # the second pair through the selector
    page.evaluate("() => document.querySelector('.firered-compare .firered-bar button:last-of-type').click()")
    wait_for(page, "() => document.querySelector('canvas[data-firered-compare]').dataset.index === '1'")
    assert near(page.evaluate(PIXELS, [0.1]), (0, 255, 0))
    assert near(page.evaluate(PIXELS, [0.9]), (255, 255, 0))

    # resizing the node resizes the drawing
    page.evaluate(
        f"() => {{ const n = {APP}.graph.getNodeById({node_id}); n.setSize([620, 560]); {APP}.graph.setDirtyCanvas(true, true); }}"
    )
    wait_for(page, f"() => document.querySelector('canvas[data-firered-compare]').width > {state['w']}")

    # the panel is not a saved widget value nor a prompt input
    saved = page.evaluate(
        f"async () => {{ const n = {APP}.graph.getNodeById({node_id}); const s = n.serialize();"
        f" const p = await {APP}.graphToPrompt(); return [s.widgets_values ?? [], Object.keys(p.output[{node_id}].inputs)]; }}"
    )
    assert saved[0] == [] and sorted(saved[1]) == ["after", "before"], saved
    assert not log.from_pack(), log.from_pack()


FILE_INFO = """
async ([type, widget, value, folder]) => {
  const app = %(app)s;
  const n = LiteGraph.createNode(type);
  n.pos = [1000, 40];
  app.graph.add(n);
  const w = n.widgets.find((w) => w.name === widget);
  w.value = value;
  w.callback?.(value);  // as the combo does when the user picks a file
  app.graph.setDirtyCanvas(true, true);
  const el = () => n.widgets.find((x) => x.name === "firered_file_info").element;
  for (let i = 0; i < 200 && (el().textContent === "…" || el().textContent === ""); i++) await new Promise((r) => setTimeout(r, 50));
  const s = n.serialize();
  const out = { text: el().textContent, cls: el().className, values: s.widgets_values.length, widgets: n.widgets.length };
  app.graph.remove(n);
  return out;
}
""" % {"app": APP}


def test_loaders_show_what_the_file_is(browser_page):
    from firered_core.tiny import COMFYUI_FILES

    page, log, server = browser_page
    name = {k: Path(v).name for k, v in COMFYUI_FILES.items()}
    got = page.evaluate(FILE_INFO, ["FireRedModelLoader", "model_name", name["transformer_gguf"], "diffusion_models"])
    assert got["text"].startswith("MM-DiT · GGUF Q8_0 · 2 layers · "), got
    assert got["values"] == got["widgets"] - 1  # the line is not saved with the workflow
    got = page.evaluate(FILE_INFO, ["FireRedModelLoader", "model_name", name["transformer_fp8"], "diffusion_models"])
    assert "safetensors fp8 scaled" in got["text"], got
    got = page.evaluate(FILE_INFO, ["FireRedLoraLoader", "lora_name", name["lora"], "loras"])
    assert got["text"].startswith("LoRA · ComfyUI · rank 4"), got
    got = page.evaluate(FILE_INFO, ["FireRedVAELoader", "vae_name", name["vae"], "vae"])
    assert got["text"].startswith("VAE · safetensors"), got
    release = sorted(p.name for p in (server.models / "diffusers").iterdir() if p.is_dir())[0]
    got = page.evaluate(FILE_INFO, ["FireRedDiffusersLoader", "folder_name", release, "diffusers"])
    assert got["text"].startswith("MM-DiT · diffusers folder"), got
    # a file that is not there (deleted since the list was made): said so, in the error colour
    got = page.evaluate(FILE_INFO, ["FireRedModelLoader", "model_name", EXPECTED_MISSING, "diffusion_models"])
    assert got["text"].startswith("⚠") and "not in the diffusion_models folder" in got["text"], got
    assert "firered-error" in got["cls"], got

    # how the line warns, for answers the tiny models folder does not give (the route's answer mocked)
    answers = {
        "firered_fe_mock_lora.safetensors": {
            "summary": "LoRA · kohya · rank 8 · 1 MB",
            "kind": "lora",
            "matches": False,
        },
        "firered_fe_mock_nvfp4.safetensors": {
            "summary": "MM-DiT · safetensors mixed · 60 layers",
            "matches": True,
            "loadable": False,
        },
    }

    def fulfill(route):
        q = route.request.url.split("name=")[-1]
        route.fulfill(json={"expected_kind": "mmdit", **answers[q]})

    page.route("**/firered/file_info?*name=firered_fe_mock_*", fulfill)
    try:
        got = page.evaluate(
            FILE_INFO, ["FireRedModelLoader", "model_name", "firered_fe_mock_lora.safetensors", "diffusion_models"]
        )
        assert got["text"] == "⚠ LoRA · kohya · rank 8 · 1 MB — not an MM-DiT" and "firered-warn" in got["cls"], got
        got = page.evaluate(
            FILE_INFO, ["FireRedModelLoader", "model_name", "firered_fe_mock_nvfp4.safetensors", "diffusion_models"]
        )
        assert got["text"].endswith("— the FireRed loader cannot read it") and "firered-warn" in got["cls"], got
    finally:
        page.unroute("**/firered/file_info?*name=firered_fe_mock_*")
    assert not log.from_pack(), log.from_pack()


LOSS = """
async () => {
  const app = %(app)s, api = %(api)s;
  let standIn = false;
  if (!LiteGraph.registered_node_types["FireRedTrainLoRA"]) {
    // the training node is not in this pack version: a stand-in definition goes through the same
    // beforeRegisterNodeDef hook the real one does
    standIn = true;
    await app.registerNodeDef("FireRedTrainLoRA", {
      name: "FireRedTrainLoRA", display_name: "FireRed Train LoRA (stand-in)", category: "FireRed/testing",
      input: { required: {} }, output: [], output_is_list: [], output_name: [], output_node: true,
      python_module: "custom_nodes.firered_test", description: "" });
  }
  const n = LiteGraph.createNode("FireRedTrainLoRA");
  n.pos = [1000, 20];
  app.graph.add(n);
  n.setSize([360, Math.max(n.size[1], 240)]);
  app.graph.setDirtyCanvas(true, true);
  for (let i = 1; i <= 40; i++) api.dispatchCustomEvent("firered.train", { node: String(n.id), step: i, total: 100, loss: 1 / i });
  await new Promise((r) => setTimeout(r, 300));
  const c = () => n.widgets.find((w) => w.name === "firered_loss").element.querySelector("canvas");
  const live = { points: c().dataset.points, w: c().width, h: c().height };
  n.onExecuted?.({ firered_loss: [[1, 0.5], [2, 0.4], [3, 0.3]] });  // the node's ui output at the end
  await new Promise((r) => setTimeout(r, 100));
  const executed = c().dataset.points;
  // a run that starts again from step 1 clears the chart
  api.dispatchCustomEvent("firered.train", { node: String(n.id), step: 1, total: 100, loss: 0.9 });
  await new Promise((r) => setTimeout(r, 100));
  const out = { standIn, live, executed, restarted: c().dataset.points, size: [...n.size] };
  return out;
}
""" % {"app": APP, "api": API}


def test_training_node_draws_a_live_loss_chart(browser_page):
    page, log, _ = browser_page
    got = page.evaluate(LOSS)
    assert got["live"]["points"] == "40" and got["live"]["w"] > 100 and got["live"]["h"] > 50, got
    assert got["executed"] == "3" and got["restarted"] == "1", got
    assert not log.from_pack(), log.from_pack()


FILE_INFO_TYPES = {
    "FireRedModelLoader",
    "FireRedTextEncoderLoader",
    "FireRedVAELoader",
    "FireRedLoraLoader",
    "FireRedDiffusersLoader",
}
WORKFLOWS = sorted(p for p in (REPO / "workflows").glob("*.json") if "nodes" in json.loads(p.read_text()))

LOAD_WORKFLOW = """
async ([wf]) => {
  const app = %(app)s;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const alerts = [];  // what the front end tells the user while opening the file (its toast store's actions)
  const stop = app.extensionManager?.toast?.$onAction?.(({ name, args }) => {
    if (name === "addAlert") alerts.push(String(args[0]));
    if (name === "add") alerts.push(`${args[0]?.severity}: ${args[0]?.summary} ${args[0]?.detail ?? ""}`);
  });
  await app.loadGraphData(wf);
  const nodes = () => app.graph._nodes;
  const pending = () => nodes().filter((n) => n.fireredInfo && ["", "…"].includes(n.fireredInfo.root.textContent));
  for (let i = 0; i < 300 && pending().length; i++) await sleep(50);
  const out = {
    infos: nodes().filter((n) => n.fireredInfo).map((n) => [n.type, n.fireredInfo.root.textContent]),
    compares: nodes().filter((n) => n.fireredCompare).length,
    clipped: nodes().filter((n) => n.type.startsWith("FireRed") && n.computeSize()[1] > n.size[1] + 1).map((n) => n.type),
    saved: Object.fromEntries(nodes().map((n) => [n.id, n.serialize().widgets_values ?? null])),
    alerts,
    hooked: typeof stop === "function",
  };
  stop?.();
  return out;
}
""" % {"app": APP}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shared_workflows_load_with_the_extension(browser_page, path):
    """Each shipped workflow opens with the extension active: the loaders say what their files are,
    the panels fit in their nodes, and saving gives back exactly the workflow's widget values."""
    page, log, server = browser_page
    wf = json.loads(path.read_text())
    for n in wf["nodes"]:  # the pictures the workflow opens, as a user has them in input/
        if n["type"] == "LoadImage" and n.get("widgets_values"):
            picture = server.input_dir / str(n["widgets_values"][0]).split(" [")[0]
            if not picture.exists():
                write_test_picture(picture)
    got = page.evaluate(LOAD_WORKFLOW, [wf])
    # the front end's own check of the file (its workflow schema) raises no alert
    assert got["hooked"], "could not watch the front end's alerts"
    assert not [a for a in got["alerts"] if "workflow" in a.lower()], f"{path.name}: {got['alerts']}"
    loaders = [n for n in wf["nodes"] if n["type"] in FILE_INFO_TYPES]
    assert len(got["infos"]) == len(loaders), got["infos"]
    for node_type, text in got["infos"]:
        assert text and not text.startswith("⚠"), f"{path.name}: {node_type} says {text!r}"
    assert not got["clipped"], f"{path.name}: panels cut off in {got['clipped']}"
    for n in wf["nodes"]:
        if n["type"].startswith("FireRed") and "widgets_values" in n:
            assert got["saved"][str(n["id"])] == n["widgets_values"], f"{path.name}: node {n['id']} ({n['type']})"
    assert not log.from_pack(), log.from_pack()


def test_no_console_errors_from_the_pack(browser_page):
    page, log, _ = browser_page
    page.reload()
    page.wait_for_function(READY, timeout=90_000)
    page.wait_for_timeout(1000)
    assert not log.from_pack(), "\n".join(log.from_pack())
