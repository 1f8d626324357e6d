// FireRed Image Edit front end -- what the widget modules share: the node ids, ui keys, events and
// routes named on the Python side (tests/nodes/test_js_static.py checks them against the pack's
// NODE_CLASS_MAPPINGS, INPUT_TYPES and routes), the pack's style sheet and the DOM-widget helpers.
// The extension itself is registered in firered.js.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// ---------------------------------------------------------------------------------------------
// the node ids and widget names used here (tests/nodes/test_js_static.py checks them against the
// pack's NODE_CLASS_MAPPINGS and INPUT_TYPES)
// ---------------------------------------------------------------------------------------------

export const PACK_PREFIX = "FireRed";
export const COMPARE_NODE = "FireRedCompare";
export const TRAIN_NODE = "FireRedTrainLoRA";
export const FILE_INFO_NODES = {
  FireRedModelLoader: { widget: "model_name", folder: "diffusion_models" },
  FireRedTextEncoderLoader: { widget: "text_encoder_name", folder: "text_encoders" },
  FireRedVAELoader: { widget: "vae_name", folder: "vae" },
  FireRedLoraLoader: { widget: "lora_name", folder: "loras" },
  FireRedDiffusersLoader: { widget: "folder_name", folder: "diffusers" },
};
export const COMPARE_OUTPUT = "firered_compare";
export const LOSS_OUTPUT = "firered_loss";
export const TRAIN_EVENT = "firered.train";
export const FILE_INFO_ROUTE = "/firered/file_info";
export const KIND_WORDS = { mmdit: "an MM-DiT", text_encoder: "a text encoder", vae: "a VAE", lora: "a LoRA" };

// ---------------------------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------------------------

export function chain(proto, name, fn) {
  const original = proto[name];
  proto[name] = function (...args) {
    const r = original?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

export function el(tag, className, parent) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  parent?.appendChild(e);
  return e;
}

let styleAdded = false;
export function addStyle() {
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
export function addPanel(node, name, element, { minHeight, maxHeight, margin }) {
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
export function fitNode(node) {
  const min = node.computeSize?.();
  if (!min) return;
  if (node.size[0] < min[0] || node.size[1] < min[1]) {
    node.setSize?.([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
}

export function redrawGraph() {
  app.graph?.setDirtyCanvas?.(true, true);
}

export function viewUrl(ref) {
  const q = new URLSearchParams({ filename: ref.filename, type: ref.type ?? "temp", subfolder: ref.subfolder ?? "" });
  const extra = (app.getPreviewFormatParam?.() ?? "") + (app.getRandParam?.() ?? "");
  return api.apiURL(`/view?${q}${extra}`);
}

// The canvas's backing store follows its size on the screen; true when it changed.
export function fitCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
  const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
  if (canvas.width === w && canvas.height === h) return false;
  canvas.width = w;
  canvas.height = h;
  return true;
}
