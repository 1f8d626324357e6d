// FireRed Image Edit -- ComfyUI front-end extension.
//
// - FireRedCompare: a before/after comparison of each image pair the node sends
//   (ui "firered_compare"), with a slider that follows the pointer (or a drag) and a pair selector.
// - The FireRed loaders: a line under the widgets telling what the chosen file is
//   ("MM-DiT · GGUF Q4_K · 60 layers · 10.8 GB"), from the pack's route GET /firered/file_info.
// - FireRedTrainLoRA: a live loss chart, from the "firered.train" server event and the node's
//   ui output "firered_loss".
//
// Every hook is scoped to this pack's own node types (their ids start with "FireRed"); nothing here
// touches other nodes, other widgets or global styles. The panels are DOM widgets that are never
// serialized, so saved workflows hold exactly the widget values of the Python nodes.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// ---------------------------------------------------------------------------------------------
// the node ids and widget names used here (tests/nodes/test_js_static.py checks them against the
// pack's NODE_CLASS_MAPPINGS and INPUT_TYPES)
// ---------------------------------------------------------------------------------------------

const PACK_PREFIX = "FireRed";
const COMPARE_NODE = "FireRedCompare";
const TRAIN_NODE = "FireRedTrainLoRA";
const FILE_INFO_NODES = {
  FireRedModelLoader: { widget: "model_name", folder: "diffusion_models" },
  FireRedTextEncoderLoader: { widget: "text_encoder_name", folder: "text_encoders" },
  FireRedVAELoader: { widget: "vae_name", folder: "vae" },
  FireRedLoraLoader: { widget: "lora_name", folder: "loras" },
  FireRedDiffusersLoader: { widget: "folder_name", folder: "diffusers" },
};
const COMPARE_OUTPUT = "firered_compare";
const LOSS_OUTPUT = "firered_loss";
const TRAIN_EVENT = "firered.train";
const FILE_INFO_ROUTE = "/firered/file_info";
const KIND_WORDS = { mmdit: "an MM-DiT", text_encoder: "a text encoder", vae: "a VAE", lora: "a LoRA" };

// ---------------------------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------------------------

function chain(proto, name, fn) {
  const original = proto[name];
  proto[name] = function (...args) {
    const r = original?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

function el(tag, className, parent) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  parent?.appendChild(e);
  return e;
}

let styleAdded = false;
function addStyle() {
  if (styleAdded) return;
  styleAdded = true;
  const s = document.createElement("style");
  s.dataset.firered = "1";
  s.textContent = `
.firered-panel { box-sizing: border-box; width: 100%; height: 100%; display: flex; flex-direction: column;
  overflow: hidden; font: 11px sans-serif; color: var(--descrip-text, #aaa); }
.firered-panel canvas { flex: 1 1 auto; min-height: 0; width: 100%; display: block; touch-action: none; }
.firered-compare canvas { cursor: ew-resize; }
.firered-bar { flex: 0 0 auto; display: flex; align-items: center; justify-content: center; gap: 6px; padding: 2px 0; }
.firered-bar button { font: 11px sans-serif; padding: 0 6px; cursor: pointer; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); border-radius: 4px; }
.firered-bar button:disabled { opacity: 0.4; cursor: default; }
.firered-info { box-sizing: border-box; width: 100%; height: 100%; padding: 1px 12px; font: 11px sans-serif;
  color: var(--descrip-text, #999); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; line-height: 18px; }
.firered-info.firered-warn { color: #e0a040; }
.firered-info.firered-error { color: #e06060; }
`;
  document.head.appendChild(s);
}

// A DOM widget that is never serialized (neither into the workflow's widgets_values nor the prompt).
function addPanel(node, name, element, { minHeight, maxHeight, margin }) {
  if (typeof node.addDOMWidget !== "function") return null;
  const widget = node.addDOMWidget(name, `firered_${name}`, element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => minHeight,
    ...(margin != null ? { margin } : {}),
    ...(maxHeight ? { getMaxHeight: () => maxHeight } : {}),
  });
  widget.serialize = false;
  if (widget.options) widget.options.serialize = false;
  // a fixed-height line: sized like an ordinary widget (the panels with no maximum grow with the node)
  if (maxHeight) widget.computeSize = (width) => [width ?? node.size[0], maxHeight];
  return widget;
}

// Make room for the widgets (ours included): a node made before the panel was added, or saved by a
// workflow without it, would otherwise hide it below its bottom edge.
function fitNode(node) {
  const min = node.computeSize?.();
  if (!min) return;
  if (node.size[0] < min[0] || node.size[1] < min[1]) {
    node.setSize?.([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
}

function redrawGraph() {
  app.graph?.setDirtyCanvas?.(true, true);
}

function viewUrl(ref) {
  const q = new URLSearchParams({ filename: ref.filename, type: ref.type ?? "temp", subfolder: ref.subfolder ?? "" });
  const extra = (app.getPreviewFormatParam?.() ?? "") + (app.getRandParam?.() ?? "");
  return api.apiURL(`/view?${q}${extra}`);
}

// The canvas's backing store follows its size on the screen; true when it changed.
function fitCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
  const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
  if (canvas.width === w && canvas.height === h) return false;
  canvas.width = w;
  canvas.height = h;
  return true;
}

function fitRect(iw, ih, w, h) {
  const s = Math.min(w / iw, h / ih);
  const rw = iw * s;
  const rh = ih * s;
  return { x: (w - rw) / 2, y: (h - rh) / 2, w: rw, h: rh };
}

function label(ctx, text, x, y, alignRight, dpr) {
  ctx.font = `${11 * dpr}px sans-serif`;
  const tw = ctx.measureText(text).width;
  const pad = 4 * dpr;
  const bx = alignRight ? x - tw - 2 * pad : x;
  ctx.fillStyle = "rgba(0,0,0,0.55)";
  ctx.fillRect(bx, y, tw + 2 * pad, 16 * dpr);
  ctx.fillStyle = "#fff";
  ctx.textBaseline = "middle";
  ctx.fillText(text, bx + pad, y + 8 * dpr);
}

// ---------------------------------------------------------------------------------------------
// FireRedCompare: the before / after slider
// ---------------------------------------------------------------------------------------------

class ComparePanel {
  constructor(node) {
    this.node = node;
    this.pairs = []; // [{before: Image, after: Image, names}]
    this.index = 0;
    this.split = 0.5;
    this.drawCount = 0;
    this.root = el("div", "firered-panel firered-compare");
    this.bar = el("div", "firered-bar", this.root);
    this.prev = el("button", "", this.bar);
    this.prev.textContent = "‹";
    this.prev.title = "previous pair";
    this.counter = el("span", "", this.bar);
    this.next = el("button", "", this.bar);
    this.next.textContent = "›";
    this.next.title = "next pair";
    this.canvas = el("canvas", "", this.root);
    this.canvas.dataset.fireredCompare = "";
    this.prev.addEventListener("click", (e) => (e.stopPropagation(), this.select(this.index - 1)));
    this.next.addEventListener("click", (e) => (e.stopPropagation(), this.select(this.index + 1)));
    const follow = (e) => {
      const r = this.rect;
      if (!r) return;
      const box = this.canvas.getBoundingClientRect();
      const dpr = this.canvas.width / Math.max(1, box.width);
      const x = (e.clientX - box.left) * dpr;
      this.split = Math.min(1, Math.max(0, (x - r.x) / r.w));
      this.draw();
    };
    this.canvas.addEventListener("pointermove", follow);
    this.canvas.addEventListener("pointerdown", (e) => {
      e.stopPropagation();
      this.canvas.setPointerCapture?.(e.pointerId);
      follow(e);
    });
    this.canvas.addEventListener("pointerup", (e) => this.canvas.releasePointerCapture?.(e.pointerId));
    this.resizer = typeof ResizeObserver === "function" ? new ResizeObserver(() => this.draw()) : null;
    this.resizer?.observe(this.canvas);
    this.updateBar();
  }

  setPairs(entries) {
    const list = Array.isArray(entries) ? entries.filter((p) => p?.before && p?.after) : [];
    this.pairs = list.map((p) => {
      const pair = { before: new Image(), after: new Image(), names: [p.before.filename, p.after.filename], failed: null };
      for (const role of ["before", "after"]) {
        pair[role].onload = () => this.draw();
        pair[role].onerror = () => {
          pair.failed = p[role].filename;
          this.draw();
        };
        pair[role].src = viewUrl(p[role]);
      }
      return pair;
    });
    this.index = Math.min(this.index, Math.max(0, this.pairs.length - 1));
    this.updateBar();
    this.draw();
  }

  select(i) {
    if (!this.pairs.length) return;
    this.index = (i + this.pairs.length) % this.pairs.length;
    this.updateBar();
    this.draw();
  }

  updateBar() {
    const n = this.pairs.length;
    this.bar.style.display = n > 1 ? "flex" : "none";
    this.counter.textContent = n ? `${this.index + 1} / ${n}` : "";
  }

  draw() {
    const c = this.canvas;
    if (!c.isConnected) return;
    fitCanvas(c);
    const ctx = c.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    ctx.clearRect(0, 0, c.width, c.height);
    this.rect = null;
    const pair = this.pairs[this.index];
    const ready = pair && pair.before.complete && pair.before.naturalWidth && pair.after.complete && pair.after.naturalWidth;
    if (!ready) {
      ctx.fillStyle = "#888";
      ctx.font = `${12 * dpr}px sans-serif`;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      const msg = pair?.failed ? `could not load ${pair.failed}` : pair ? "loading…" : "run the graph to compare";
      ctx.fillText(msg, c.width / 2, c.height / 2);
      ctx.textAlign = "start";
      return;
    }
    const r = fitRect(pair.before.naturalWidth, pair.before.naturalHeight, c.width, c.height);
    this.rect = r;
    const sx = r.x + r.w * this.split;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(pair.after, r.x, r.y, r.w, r.h); // after, shown right of the slider
    ctx.save();
    ctx.beginPath();
    ctx.rect(r.x, r.y, sx - r.x, r.h);
    ctx.clip();
    ctx.drawImage(pair.before, r.x, r.y, r.w, r.h); // before, left of the slider
    ctx.restore();
    ctx.fillStyle = "rgba(0,0,0,0.6)";
    ctx.fillRect(sx - 1.5 * dpr, r.y, 3 * dpr, r.h);
    ctx.fillStyle = "#fff";
    ctx.fillRect(sx - 0.5 * dpr, r.y, 1 * dpr, r.h);
    ctx.beginPath();
    ctx.arc(sx, r.y + r.h / 2, 5 * dpr, 0, 2 * Math.PI);
    ctx.fill();
    if (r.w > 120 * dpr && r.h > 40 * dpr) {
      if (sx - r.x > 50 * dpr) label(ctx, "before", r.x + 4 * dpr, r.y + 4 * dpr, false, dpr);
      if (r.x + r.w - sx > 50 * dpr) label(ctx, "after", r.x + r.w - 4 * dpr, r.y + 4 * dpr, true, dpr);
    }
    this.drawCount += 1;
    c.dataset.fireredCompare = String(this.node.id);
    c.dataset.drawn = String(this.drawCount);
    c.dataset.split = this.split.toFixed(3);
    c.dataset.index = String(this.index);
  }

  remove() {
    this.resizer?.disconnect();
  }
}

function setupCompare(nodeType) {
  chain(nodeType.prototype, "onNodeCreated", function () {
    addStyle();
    this.fireredCompare = new ComparePanel(this);
    addPanel(this, "firered_compare", this.fireredCompare.root, { minHeight: 160 });
    const [w, h] = this.size;
    this.setSize?.([Math.max(w, 320), Math.max(h, 300)]);
  });
  chain(nodeType.prototype, "onConfigure", function () {
    fitNode(this);
  });
  chain(nodeType.prototype, "onExecuted", function (output) {
    const pairs = output?.[COMPARE_OUTPUT];
    if (!pairs || !this.fireredCompare) return;
    this.fireredCompare.setPairs(pairs);
    redrawGraph();
  });
  chain(nodeType.prototype, "onResize", function () {
    this.fireredCompare?.draw();
  });
  chain(nodeType.prototype, "onRemoved", function () {
    this.fireredCompare?.remove();
  });
}

// ---------------------------------------------------------------------------------------------
// loaders: what the chosen file is
// ---------------------------------------------------------------------------------------------

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

function setupFileInfo(nodeType, spec) {
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

// ---------------------------------------------------------------------------------------------
// FireRedTrainLoRA: live loss chart
// ---------------------------------------------------------------------------------------------

class LossPanel {
  constructor(node) {
    this.node = node;
    this.points = []; // [step, loss]
    this.total = null;
    this.root = el("div", "firered-panel firered-loss");
    this.canvas = el("canvas", "", this.root);
    this.canvas.dataset.fireredLoss = "";
    this.resizer = typeof ResizeObserver === "function" ? new ResizeObserver(() => this.draw()) : null;
    this.resizer?.observe(this.canvas);
  }

  add(step, loss, total) {
    step = Number(step);
    loss = Number(loss);
    if (!Number.isFinite(step) || !Number.isFinite(loss)) return;
    const last = this.points[this.points.length - 1];
    if (last && step < last[0]) this.points = []; // a new run
    if (last && step === last[0]) this.points.pop();
    this.points.push([step, loss]);
    if (total != null) this.total = Number(total);
    this.draw();
  }

  setAll(points) {
    const ok = (Array.isArray(points) ? points : []).filter(
      (p) => Array.isArray(p) && Number.isFinite(Number(p[0])) && Number.isFinite(Number(p[1]))
    );
    if (!ok.length) return;
    this.points = ok.map((p) => [Number(p[0]), Number(p[1])]).sort((a, b) => a[0] - b[0]);
    this.draw();
  }

  draw() {
    const c = this.canvas;
    if (!c.isConnected) return;
    fitCanvas(c);
    const ctx = c.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    const W = c.width;
    const H = c.height;
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = "rgba(0,0,0,0.25)";
    ctx.fillRect(0, 0, W, H);
    ctx.font = `${11 * dpr}px sans-serif`;
    ctx.textBaseline = "top";
    ctx.fillStyle = "#bbb";
    const pts = this.points;
    if (!pts.length) {
      ctx.fillText("loss: waiting for the first step", 6 * dpr, 6 * dpr);
      return;
    }
    // an exponential moving average, as training logs smooth it
    const ema = [];
    const a = 2 / (Math.min(50, Math.max(2, pts.length / 10)) + 1);
    for (const [s, l] of pts) ema.push([s, ema.length ? ema[ema.length - 1][1] * (1 - a) + l * a : l]);
    const losses = pts.map((p) => p[1]);
    let lo = Math.min(...losses);
    let hi = Math.max(...losses);
    const log = lo > 0 && hi / lo > 20;
    const fy = log ? Math.log10 : (v) => v;
    if (hi === lo) {
      hi += Math.abs(hi) * 0.05 + 1e-6;
      lo -= Math.abs(lo) * 0.05 + 1e-6;
    }
    const x0 = pts[0][0];
    const x1 = Math.max(this.total ?? 0, pts[pts.length - 1][0], x0 + 1);
    const pad = { l: 6 * dpr, r: 6 * dpr, t: 20 * dpr, b: 6 * dpr };
    const px = (s) => pad.l + ((s - x0) / (x1 - x0)) * (W - pad.l - pad.r);
    const py = (v) => pad.t + (1 - (fy(v) - fy(lo)) / (fy(hi) - fy(lo))) * (H - pad.t - pad.b);
    ctx.strokeStyle = "rgba(255,255,255,0.08)";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 3; i++) {
      const y = pad.t + (i / 3) * (H - pad.t - pad.b);
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(W - pad.r, y);
      ctx.stroke();
    }
    const line = (series, style, width) => {
      ctx.strokeStyle = style;
      ctx.lineWidth = width * dpr;
      ctx.beginPath();
      series.forEach(([s, v], i) => (i ? ctx.lineTo(px(s), py(v)) : ctx.moveTo(px(s), py(v))));
      ctx.stroke();
    };
    line(pts, "rgba(120,170,255,0.35)", 1);
    line(ema, "#ff7043", 1.5);
    const [step, loss] = pts[pts.length - 1];
    const of = this.total ? ` / ${this.total}` : "";
    ctx.fillStyle = "#ddd";
    ctx.fillText(
      `step ${step}${of} · loss ${loss.toPrecision(3)} · avg ${ema[ema.length - 1][1].toPrecision(3)}${log ? " · log" : ""}`,
      6 * dpr,
      4 * dpr
    );
    ctx.fillStyle = "#888";
    ctx.textAlign = "right";
    ctx.fillText(hi.toPrecision(3), W - 6 * dpr, pad.t);
    ctx.textBaseline = "bottom";
    ctx.fillText(lo.toPrecision(3), W - 6 * dpr, H - 2 * dpr);
    ctx.textAlign = "start";
    c.dataset.fireredLoss = String(this.node.id);
    c.dataset.points = String(pts.length);
  }

  remove() {
    this.resizer?.disconnect();
  }
}

function setupTrain(nodeType) {
  chain(nodeType.prototype, "onNodeCreated", function () {
    addStyle();
    this.fireredLoss = new LossPanel(this);
    addPanel(this, "firered_loss", this.fireredLoss.root, { minHeight: 120 });
    const [w, h] = this.size;
    this.setSize?.([Math.max(w, 320), h]);
    fitNode(this);
  });
  chain(nodeType.prototype, "onConfigure", function () {
    fitNode(this);
  });
  chain(nodeType.prototype, "onExecuted", function (output) {
    const pts = output?.[LOSS_OUTPUT];
    if (pts) this.fireredLoss?.setAll(pts);
  });
  chain(nodeType.prototype, "onResize", function () {
    this.fireredLoss?.draw();
  });
  chain(nodeType.prototype, "onRemoved", function () {
    this.fireredLoss?.remove();
  });
}

// The node a server event names: its id in the root graph, in the graph on screen, or the last
// part of a subgraph path ("5:12").
function findNode(id) {
  if (id == null) return null;
  const s = String(id);
  const ids = [s, s.split(":").pop()];
  for (const graph of [app.graph, app.canvas?.graph]) {
    for (const i of ids) {
      const n = graph?.getNodeById?.(Number.isNaN(Number(i)) ? i : Number(i));
      if (n) return n;
    }
  }
  return null;
}

function onTrainEvent(e) {
  const d = e?.detail;
  if (!d) return;
  const node = findNode(d.node);
  if (!node || node.comfyClass !== TRAIN_NODE || !node.fireredLoss) return;
  node.fireredLoss.add(d.step, d.loss, d.total);
}

// ---------------------------------------------------------------------------------------------

app.registerExtension({
  name: "FireRed.ImageEdit",

  async setup() {
    api.addEventListener(TRAIN_EVENT, onTrainEvent);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (typeof name !== "string" || !name.startsWith(PACK_PREFIX)) return;
    if (name === COMPARE_NODE) setupCompare(nodeType);
    if (name === TRAIN_NODE) setupTrain(nodeType);
    if (FILE_INFO_NODES[name]) setupFileInfo(nodeType, FILE_INFO_NODES[name]);
  },
});
