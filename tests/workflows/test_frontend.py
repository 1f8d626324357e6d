"""The front-end extension (js/firered.js) in ComfyUI's real front end, in headless Chromium, on each
front end of the tier (``COMFYUI_PATH`` tier; skipped when it is unset, or when Playwright or a
Chromium is missing; the newer front end when ``$FIRERED_FRONTEND_ROOT`` is unset: see
:mod:`frontend_page`).

The page is ComfyUI's own UI served by a server of the tier (the pack installed, the tiny model in its
models folder). The tests build graphs in the page the way a user does (nodes created, linked,
widgets set, the queue button's ``app.queuePrompt``) and read what the pack's widgets drew: the
comparison canvas's pixels, the loaders' file-info lines, the loss chart. Each check saves a
screenshot. Console errors and uncaught exceptions that come from the pack fail the tests.
(The shipped workflows and the 1.27 <-> newer round trip: ``test_frontend_workflows.py``.)

Browser: Playwright (``pip install playwright``) driving a system Chromium (Debian: ``apt-get install
chromium``; or ``$FIRERED_CHROMIUM``): Playwright's own browser download is not needed.
"""

from __future__ import annotations

from pathlib import Path

import frontend_page
import pytest
from comfy_server import PACK_DIR_NAME
from frontend_page import API, APP, EXPECTED_MISSING, READY, frontend_version, shoot, shoot_node

pytestmark = pytest.mark.comfyui

# the fixtures of frontend_page (shared with test_frontend_workflows.py)
browser_page = frontend_page.browser_page
playwright = frontend_page.playwright
new_frontend_server = frontend_page.new_frontend_server
screenshots = frontend_page.screenshots

EXTENSION = "FireRed.ImageEdit"


def wait_for(page, js: str, timeout: float = 60_000):
    page.wait_for_function(js, timeout=timeout)


def test_extension_is_served_and_registered(browser_page, screenshots):
    page, log, server, fe = browser_page
    assert f"/extensions/{PACK_DIR_NAME}/firered.js" in server.get("/extensions")
    names = page.evaluate(f"() => {APP}.extensions.map((e) => e.name)")
    assert EXTENSION in names, "the FireRed extension did not register (see the browser console)"
    version = frontend_version(page)
    if fe == "new":
        assert version and version != "1.27.10", f"the newer front end's server serves {version!r}"
    shoot(page, screenshots, fe, "page")
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


def test_comparison_widget_draws_pairs_with_a_slider(browser_page, screenshots):
    page, log, server, fe = browser_page
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
    # (the real mouse: the pointer reaches the panel through whatever the front end lays over the canvas)
    shoot_node(page, screenshots, fe, "compare-drawn", node_id)
    box = page.locator("canvas[data-firered-compare]").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] / 2)
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] / 2, steps=5)
    split = float(page.evaluate("() => document.querySelector('canvas[data-firered-compare]').dataset.split"))
    assert split < 0.3, f"the slider did not follow the mouse (split {split})"
    shoot_node(page, screenshots, fe, "compare-slider-moved", node_id)
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


def test_loaders_show_what_the_file_is(browser_page, screenshots):
    from firered_core.tiny import COMFYUI_FILES

    page, log, server, fe = browser_page
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

    # every loader with its line, as a user sees them
    shown = page.evaluate(
        SHOWCASE,
        [
            [
                ["FireRedModelLoader", "model_name", name["transformer_gguf"]],
                ["FireRedTextEncoderLoader", "text_encoder_name", name["text_encoder"]],
                ["FireRedVAELoader", "vae_name", name["vae"]],
                ["FireRedLoraLoader", "lora_name", name["lora"]],
                ["FireRedDiffusersLoader", "folder_name", release],
            ]
        ],
    )
    for node_type, node_id, text, visible in shown:
        assert text and not text.startswith(("⚠", "…")), (node_type, text)
        assert visible, f"{node_type}: the file-info line is not on screen"
        shoot_node(page, screenshots, fe, f"file-info-{node_type}", node_id)
    page.evaluate(f"() => {APP}.graph.clear()")
    assert not log.from_pack(), log.from_pack()


SHOWCASE = """
async ([loaders]) => {
  const app = %(app)s;
  app.clean?.();  // as the front end does before opening a workflow: no outputs of earlier nodes (a
  app.graph.clear();  // Vue node would show the picture of a cleared node whose id it reuses)
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  const nodes = loaders.map(([type, widget, value], i) => {
    const n = LiteGraph.createNode(type);
    n.pos = [40 + 420 * (i %% 3), 60 + 260 * Math.floor(i / 3)];
    app.graph.add(n);
    const w = n.widgets.find((w) => w.name === widget);
    w.value = value;
    w.callback?.(value);
    return n;
  });
  app.graph.setDirtyCanvas(true, true);
  const el = (n) => n.widgets.find((x) => x.name === "firered_file_info").element;
  for (let i = 0; i < 200 && nodes.some((n) => ["", "…"].includes(el(n).textContent)); i++) await new Promise((r) => setTimeout(r, 50));
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  return nodes.map((n) => {
    const e = el(n), b = e.getBoundingClientRect();
    const seen = b.width > 20 && b.height > 8 && getComputedStyle(e).visibility !== "hidden" && e.offsetParent !== null;
    return [n.type, n.id, e.textContent, seen];
  });
}
""" % {"app": APP}


LOSS_LIVE = """
async () => {
  const app = %(app)s, api = %(api)s;
  const n = LiteGraph.createNode("FireRedTrainLoRA");
  n.pos = [1000, 60];
  app.graph.add(n);
  n.setSize([360, Math.max(n.size[1], 240)]);
  app.graph.setDirtyCanvas(true, true);
  for (let i = 1; i <= 40; i++) api.dispatchCustomEvent("firered.train", { node: String(n.id), step: i, total: 100, loss: 1 / i });
  await new Promise((r) => setTimeout(r, 300));
  const c = n.widgets.find((w) => w.name === "firered_loss").element.querySelector("canvas");
  // the smoothed curve's colour (#ff7043) on the canvas: the points are drawn, not only counted
  const px = c.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, c.width, c.height).data;
  let curve = 0;
  for (let i = 0; i < px.length; i += 4) if (px[i] > 200 && px[i + 1] > 80 && px[i + 1] < 150 && px[i + 2] < 110) curve++;
  return { id: n.id, points: c.dataset.points, w: c.width, h: c.height, curve };
}
""" % {"app": APP, "api": API}

LOSS_END = """
async ([id]) => {
  const app = %(app)s, api = %(api)s;
  const n = app.graph.getNodeById(id);
  const c = () => n.widgets.find((w) => w.name === "firered_loss").element.querySelector("canvas");
  n.onExecuted?.({ firered_loss: [[1, 0.5], [2, 0.4], [3, 0.3]] });  // the node's ui output at the end
  await new Promise((r) => setTimeout(r, 100));
  const executed = c().dataset.points;
  // a run that starts again from step 1 clears the chart
  api.dispatchCustomEvent("firered.train", { node: String(n.id), step: 1, total: 100, loss: 0.9 });
  await new Promise((r) => setTimeout(r, 100));
  const out = { executed, restarted: c().dataset.points };
  app.graph.remove(n);
  return out;
}
""" % {"app": APP, "api": API}


def test_training_node_draws_a_live_loss_chart(browser_page, screenshots):
    page, log, _, fe = browser_page
    live = page.evaluate(LOSS_LIVE)
    assert live["points"] == "40" and live["w"] > 100 and live["h"] > 50, live
    assert live["curve"] > 50, f"no loss curve on the chart: {live}"
    shoot_node(page, screenshots, fe, "loss-chart", live["id"])
    got = page.evaluate(LOSS_END, [live["id"]])
    assert got["executed"] == "3" and got["restarted"] == "1", got
    assert not log.from_pack(), log.from_pack()


def test_no_console_errors_from_the_pack(browser_page):
    page, log, _, fe = browser_page
    page.reload()
    page.wait_for_function(READY, timeout=90_000)
    page.wait_for_timeout(1000)
    assert not log.from_pack(), "\n".join(log.from_pack())
