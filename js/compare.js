// FireRed Image Edit front end -- FireRedCompare: a before/after comparison of each image pair the
// node sends (ui "firered_compare"), with a slider that follows the pointer (or a drag) and a pair
// selector. Registered by firered.js.

import { COMPARE_OUTPUT, addPanel, addStyle, chain, el, fitCanvas, fitNode, redrawGraph, viewUrl } from "./common.js";

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

export function setupCompare(nodeType) {
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
