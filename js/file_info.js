// FireRed Image Edit front end -- the FireRed loaders: a line under the widgets telling what the
// chosen file is ("MM-DiT · GGUF Q4_K · 60 layers · 10.8 GB"), from the pack's route
// GET /firered/file_info. Registered by firered.js.

import { api } from "../../scripts/api.js";
import { FILE_INFO_ROUTE, KIND_WORDS, addPanel, addStyle, chain, el, fitNode } from "./common.js";

const infoCache = new Map(); // "folder\nname" -> {time, promise}
const INFO_TTL_MS = 30_000;

function fetchFileInfo(folder, name) {
  const key = `${folder}\n${name}`;
  const hit = infoCache.get(key);
  if (hit && performance.now() - hit.time < INFO_TTL_MS) return hit.promise;
  const promise = api
    .fetchApi(`${FILE_INFO_ROUTE}?${new URLSearchParams({ folder, name })}`)
    .then(async (r) => ({ status: r.status, body: await r.json().catch(() => ({})) }))
    .catch((e) => ({ status: 0, body: { error: `file info unavailable (${e?.message ?? e})` } }));
  infoCache.set(key, { time: performance.now(), promise });
  return promise;
}

class FileInfoPanel {
  constructor(node, spec) {
    this.node = node;
    this.spec = spec;
    this.shown = undefined; // the widget value the text is for
    this.seq = 0;
    this.root = el("div", "firered-info");
    this.root.dataset.fireredInfo = spec.folder;
  }

  widget() {
    return this.node.widgets?.find((w) => w.name === this.spec.widget);
  }

  update() {
    const value = this.widget()?.value;
    if (value === this.shown) return;
    this.shown = value;
    const seq = ++this.seq;
    if (!value || typeof value !== "string") {
      this.show("no file chosen", "firered-warn");
      return;
    }
    this.show("…", "");
    fetchFileInfo(this.spec.folder, value).then(({ status, body }) => {
      if (seq !== this.seq) return; // the user picked another file meanwhile
      if (status === 200) {
        const expected = KIND_WORDS[body.expected_kind] ?? body.expected_kind;
        let text = body.summary;
        if (body.matches === false) text = `⚠ ${body.summary} — not ${expected}`;
        else if (body.loadable === false) text = `⚠ ${body.summary} — the FireRed loader cannot read it`;
        const warn = text !== body.summary;
        const tip = [body.what, body.error, body.path].filter(Boolean).join("\n");
        this.show(text, warn ? "firered-warn" : "", tip);
      } else {
        this.show(`⚠ ${body.error ?? `HTTP ${status}`}`, "firered-error");
      }
    });
  }

  show(text, cls, title) {
    this.root.textContent = text;
    this.root.className = `firered-info ${cls}`.trim();
    this.root.title = title ?? text;
  }
}

export function setupFileInfo(nodeType, spec) {
  chain(nodeType.prototype, "onNodeCreated", function () {
    addStyle();
    const panel = new FileInfoPanel(this, spec);
    this.fireredInfo = panel;
    addPanel(this, "firered_file_info", panel.root, { minHeight: 20, maxHeight: 20, margin: 2 });
    const w = panel.widget();
    if (w) {
      const cb = w.callback;
      w.callback = function (...args) {
        const r = cb?.apply(this, args);
        panel.update();
        return r;
      };
    }
    fitNode(this);
    setTimeout(() => panel.update(), 0);
  });
  chain(nodeType.prototype, "onConfigure", function () {
    fitNode(this);
    setTimeout(() => this.fireredInfo?.update(), 0);
  });
  // values set without a callback (a workflow loaded, the model list refreshed) are caught here
  chain(nodeType.prototype, "onDrawForeground", function () {
    const p = this.fireredInfo;
    if (p && p.widget()?.value !== p.shown) p.update();
  });
}
