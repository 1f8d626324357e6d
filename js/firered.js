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
//
// One module per widget (compare.js, file_info.js, loss_chart.js) over common.js; this file registers
// the extension. ComfyUI serves every .js file under the pack's WEB_DIRECTORY and the front end imports
// each: the other files only define, so loading them again registers nothing twice.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { COMPARE_NODE, FILE_INFO_NODES, PACK_PREFIX, TRAIN_EVENT, TRAIN_NODE } from "./common.js";
import { setupCompare } from "./compare.js";
import { setupFileInfo } from "./file_info.js";
import { onTrainEvent, setupTrain } from "./loss_chart.js";

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
