// FireRed Image Edit front end -- FireRedTrainLoRA: a live loss chart, from the "firered.train"
// server event and the node's ui output "firered_loss". Registered by firered.js.

import { app } from "../../scripts/app.js";
import { LOSS_OUTPUT, TRAIN_NODE, addPanel, addStyle, chain, el, fitCanvas, fitNode } from "./common.js";

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

export function setupTrain(nodeType) {
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

export function onTrainEvent(e) {
  const d = e?.detail;
  if (!d) return;
  const node = findNode(d.node);
  if (!node || node.comfyClass !== TRAIN_NODE || !node.fireredLoss) return;
  node.fireredLoss.add(d.step, d.loss, d.total);
}
