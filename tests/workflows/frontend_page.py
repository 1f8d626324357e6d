"""The browser side of the front-end tests: ComfyUI's UI in headless Chromium through Playwright, on
each front end the tier has (the one installed in ComfyUI's venv, and a newer one named by
``$FIRERED_FRONTEND_ROOT``, served with ``--front-end-root``), and where the screenshots go.

Front ends:

* ``installed``: the ``comfyui_frontend_package`` of ComfyUI's venv (1.27.10 with ComfyUI 0.3.64), served by
  the session's server (conftest ``comfy_server``);
* ``new``: the ``static`` folder of a newer ``comfyui-frontend-package`` (``tests/workflows/setup_frontend_tier.sh``
  installs the pinned 1.58.1 and prints the path), served by a second server started with
  ``--front-end-root``; skipped when ``$FIRERED_FRONTEND_ROOT`` is unset.

Screenshots: ``$FIRERED_SCREENSHOTS`` (kept after the run) or a pytest temp folder, one PNG per check
named ``<front end>-<check>.png``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
from comfy_server import PACK_DIR_NAME, comfyui_path, start_server
from tier_files import NATIVE_DIT, cached, write_native_dit

APP = "window.comfyAPI.app.app"
API = "window.comfyAPI.api.api"
#: the page has loaded the node definitions (the pack's included) and the extensions
READY = (
    "() => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.FireRedCompare"
    " && window.comfyAPI.app.app.canvas && window.comfyAPI.app.app.extensions?.length"
)
#: a model name the file-info test asks for on purpose; the browser logs its 404, which is expected
EXPECTED_MISSING = "firered_fe_expected_missing.safetensors"
FRONTEND_ROOT_ENV = "FIRERED_FRONTEND_ROOT"
#: the front ends (and renderers) the browser tests run on
FRONT_ENDS = ("installed", "new", "new-vue")
#: user settings written before the page opens: no first-run template dialog over the canvas, and the
#: node renderer (the newer front end's Vue nodes, or the LiteGraph canvas)
SETTINGS = {"Comfy.TutorialCompleted": True}
VUE_NODES = "Comfy.VueNodes.Enabled"


def chromium_executable() -> str | None:
    env = os.environ.get("FIRERED_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def new_frontend_root() -> Path | None:
    """The newer front end's static folder (``$FIRERED_FRONTEND_ROOT``), checked; None when unset."""
    p = os.environ.get(FRONTEND_ROOT_ENV)
    if not p:
        return None
    root = Path(p)
    if not (root / "index.html").is_file():
        raise RuntimeError(
            f"${FRONTEND_ROOT_ENV}={p!r} is not a front end's static folder (no index.html): expected "
            ".../comfyui_frontend_package/static (tests/workflows/setup_frontend_tier.sh prints it)"
        )
    return root


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


def write_user_settings(server, *, vue_nodes: bool = False) -> None:
    path = server.root / "user" / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **SETTINGS, VUE_NODES: vue_nodes}))


@contextlib.contextmanager
def open_page(pw, server, log: PageLog, *, vue_nodes: bool = False):
    """A page of ``server``'s UI in a fresh headless Chromium, loaded and ready (``READY``); nodes drawn
    by the Vue renderer when ``vue_nodes`` (a setting of the newer front end)."""
    exe = chromium_executable()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set FIRERED_CHROMIUM to a Chrome/Chromium binary)")
    write_user_settings(server, vue_nodes=vue_nodes)
    browser = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: log.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: log.exceptions.append(f"{e}\n{getattr(e, 'stack', '') or ''}"))
        page.on("requestfailed", lambda r: log.failed.append(f"{r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and log.failed.append(f"{r.url} HTTP {r.status}"))
        page.goto(server.url)
        page.wait_for_function(READY, timeout=90_000)
        if vue_nodes:
            on = page.evaluate(f"() => {APP}.ui.settings.getSettingValue('{VUE_NODES}')")
            assert on is True, f"the front end did not switch to Vue nodes ({VUE_NODES} = {on!r})"
        yield page
    finally:
        browser.close()


_DRIVER: dict = {}


@pytest.fixture(scope="session")
def playwright():
    """One Playwright driver for the whole session, whichever test module asks first (its sync API
    allows one at a time); stopped when the interpreter exits."""
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set (the real-ComfyUI tier)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install playwright) in this interpreter"
    )
    if "pw" not in _DRIVER:
        _DRIVER["pw"] = sync_api.sync_playwright().start()
        atexit.register(_DRIVER["pw"].stop)
    return _DRIVER["pw"]


def link_native_dit(server) -> None:
    """The ComfyUI-loadable test DiT in ``server``'s models folder (see conftest ``native_files``)."""
    dit = server.models / "diffusion_models" / NATIVE_DIT
    if not dit.exists():
        dit.symlink_to(cached(NATIVE_DIT, write_native_dit))


@pytest.fixture(scope="session")
def new_frontend_server(tmp_path_factory):
    """A second ComfyUI server serving the newer front end (``--front-end-root $FIRERED_FRONTEND_ROOT``)."""
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set (the real-ComfyUI tier)")
    root = new_frontend_root()
    if root is None:
        pytest.skip(
            f"${FRONTEND_ROOT_ENV} is not set (tests/workflows/setup_frontend_tier.sh installs the newer front end)"
        )
    server = start_server(tmp_path_factory.mktemp("comfyui_new_frontend"), extra_args=("--front-end-root", str(root)))
    yield server
    server.stop()


def frontend_server(request, front_end: str):
    """The server that serves ``front_end`` ("installed" or "new")."""
    name = "comfy_server" if front_end == "installed" else "new_frontend_server"  # "new", "new-vue"
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    env = os.environ.get("FIRERED_SCREENSHOTS")
    folder = Path(env) if env else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shoot(page, folder: Path, front_end: str, check: str, *, clip_to: str | None = None) -> Path:
    """A screenshot of the page (or of the element ``clip_to`` selects) as ``<front end>-<check>.png``."""
    path = folder / f"{front_end}-{check}.png"
    target = page.locator(clip_to).first if clip_to else None
    if target is not None and target.count():
        target.screenshot(path=str(path))
    else:
        page.screenshot(path=str(path))
    assert path.stat().st_size > 0, path
    return path


@pytest.fixture(scope="module", params=FRONT_ENDS)
def browser_page(request, playwright):
    """(page, log, server, front end) for each front end: one browser per front end and module."""
    front_end = request.param
    server = frontend_server(request, front_end)
    log = PageLog()
    with open_page(playwright, server, log, vue_nodes=front_end.endswith("-vue")) as page:
        yield page, log, server, front_end


def frontend_version(page) -> str:
    return page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? ''")


NODE_BOX = """
async ([id, margin]) => {
  const app = %(app)s;
  const n = app.graph.getNodeById(id);
  const ds = app.canvas.ds;
  const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const kept = [ds.offset[0], ds.offset[1]];
  // the node's corner 80 px right of and 140 px below the canvas's: clear of the newer front end's
  // floating tab and run bars
  ds.offset = [80 / ds.scale - n.pos[0], 140 / ds.scale - (n.pos[1] - title)];
  app.graph.setDirtyCanvas(true, true);
  for (let i = 0; i < 3; i++) await new Promise((r) => requestAnimationFrame(r));
  await new Promise((r) => setTimeout(r, 150));  // the DOM widgets (and Vue nodes) follow the canvas
  const r = app.canvas.canvas.getBoundingClientRect();
  const vue = document.querySelector(`[data-node-id="${id}"]`);  // a node the Vue renderer drew
  let b;
  if (vue) {
    const v = vue.getBoundingClientRect();
    b = { x: v.left, y: v.top, w: v.width, h: v.height };
  } else {
    const s = ds.scale;
    b = { x: r.left + (n.pos[0] + ds.offset[0]) * s, y: r.top + (n.pos[1] - title + ds.offset[1]) * s, w: n.size[0] * s, h: (n.size[1] + title) * s };
  }
  const x = Math.max(0, b.x - margin), y = Math.max(0, b.y - margin);
  const box = { x, y, width: Math.min(window.innerWidth - x, b.w + 2 * margin), height: Math.min(window.innerHeight - y, b.h + 2 * margin) };
  return { box, kept };
}
""" % {"app": APP}

RESTORE_VIEW = """
async ([x, y]) => {
  const app = %(app)s;
  app.canvas.ds.offset = [x, y];
  app.graph.setDirtyCanvas(true, true);
  for (let i = 0; i < 3; i++) await new Promise((r) => requestAnimationFrame(r));
  await new Promise((r) => setTimeout(r, 150));
}
""" % {"app": APP}


def shoot_node(page, folder: Path, front_end: str, check: str, node_id, margin: int = 12) -> Path:
    """A screenshot of one node (its box on the canvas, or the Vue renderer's element, and the panels
    over it), moved into view for the shot; the view is put back afterwards."""
    got = page.evaluate(NODE_BOX, [node_id, margin])
    path = folder / f"{front_end}-{check}.png"
    try:
        page.screenshot(path=str(path), clip=got["box"])
    finally:
        page.evaluate(RESTORE_VIEW, got["kept"])
    assert path.stat().st_size > 0, path
    return path
