import { api, ApiError } from "./api.js";
import { hideWidget } from "./convert.js";

// Workflow documents in the editor: open the native (API) format, ComfyUI's UI format and PNGs; the default graph.

// Shown when the example workflows need node types this server lacks.
const PRIMITIVES_DEMO = {
  1: { class_type: "PrimitiveInt", inputs: { value: 6 }, _meta: { pos: [60, 120] } },
  2: { class_type: "IntMath", inputs: { a: ["1", 0], b: 7, operation: "multiply" }, _meta: { pos: [360, 120] } },
  3: { class_type: "PreviewAny", inputs: { source: ["2", 0] }, _meta: { pos: [700, 120] } },
  4: { class_type: "PrimitiveString", inputs: { value: "Hello" }, _meta: { pos: [60, 360] } },
  5: { class_type: "StringConcatenate", inputs: { string_a: ["4", 0], string_b: "world", delimiter: ", " },
    _meta: { pos: [360, 360] } },
  6: { class_type: "PreviewAny", inputs: { source: ["5", 0] }, _meta: { pos: [700, 360] } },
};

// The first graph a visitor sees: the server's txt2img example (the demo model at 64x64), or, where its
// node types are missing, a small demo of built-in nodes.
export async function defaultWorkflow(objectInfo) {
  try {
    const txt2img = await api("/workflows/txt2img");
    if (Object.values(txt2img).every((n) => objectInfo[n.class_type])) return txt2img;
  } catch {
    // no example workflows on this server
  }
  return PRIMITIVES_DEMO;
}

export function isUiFormat(data) {
  return data && Array.isArray(data.nodes) && "links" in data;
}

function isLink(value) {
  return Array.isArray(value) && value.length === 2 && (typeof value[0] === "string" || typeof value[0] === "number")
    && Number.isInteger(value[1]);
}

// Columns by longest path from a source, for documents that carry no layout.
function autoLayout(doc) {
  const depth = {};
  const visit = (id, seen = new Set()) => {
    if (depth[id] !== undefined) return depth[id];
    if (seen.has(id)) return 0;
    seen.add(id);
    const links = Object.values(doc[id]?.inputs || {}).filter(isLink).map((l) => String(l[0])).filter((l) => doc[l]);
    depth[id] = links.length ? 1 + Math.max(...links.map((l) => visit(l, seen))) : 0;
    return depth[id];
  };
  const rows = {};
  const pos = {};
  for (const id of Object.keys(doc)) {
    const column = visit(id);
    rows[column] = (rows[column] || 0) + 1;
    pos[id] = [40 + column * 340, 40 + (rows[column] - 1) * 260];
  }
  return pos;
}

// Why a node type is missing, as the server's validation says it: "built-in" (ComfyUI's, not in Loom yet) or
// "custom" (a custom node pack's).
const MISSING_WHY = { "built-in": "ComfyUI built-in node, not in Loom yet", custom: "from a custom node pack" };

// A node whose type this server lacks: red, and saying so in its body; the file's data is kept for saving.
function markMissing(node, why) {
  node.color = "#a22";
  node.bgcolor = "#4a1c1c";
  node.missing = why || "custom";
  if (!node.title || node.title === "Unnamed") node.title = node.type;
  node.size = [Math.max(node.size[0], 300), Math.max(node.size[1], 60)];
  node.onDrawForeground = function (ctx) {
    ctx.save();
    ctx.fillStyle = "#f99";
    ctx.font = "12px sans-serif";
    ctx.fillText(`missing: ${MISSING_WHY[this.missing] || this.missing}`, 10, this.size[1] - 12);
    ctx.restore();
  };
}

// Build the graph of a native (API-format) document; returns the class types that are not known here.
export function loadApi(graph, doc, kinds = {}) {
  graph.clear();
  const layout = autoLayout(doc);
  const missing = [];
  const nodes = {};
  for (const [id, raw] of Object.entries(doc)) {
    let node = LiteGraph.createNode(raw.class_type);
    if (!node) {
      missing.push(raw.class_type);
      node = new LGraphNode(`${raw.class_type} (missing)`);
      node.type = raw.class_type;
      node.has_errors = true;
      markMissing(node, kinds[raw.class_type]);
    }
    const numeric = Number(id);
    if (Number.isInteger(numeric) && numeric > 0) node.id = numeric;
    const meta = raw._meta || {};
    if (meta.title) node.title = meta.title;
    node.pos = meta.pos ? [...meta.pos] : layout[id];
    if (meta.size) node.size = [...meta.size];
    for (const [name, value] of Object.entries(raw.inputs || {})) {
      const widget = (node.widgets || []).find((w) => w.name === name);
      if (widget && !isLink(value)) {
        widget.value = value && value.__value__ ? value.__value__ : value;
        if (widget.callback) widget.callback(widget.value);
      }
    }
    // A reloaded document reproduces its run: seeds stay as saved.
    for (const w of node.widgets || []) if (w.name === "control_after_generate") w.value = "fixed";
    graph.add(node);
    nodes[id] = node;
  }
  for (const [id, raw] of Object.entries(doc)) {
    const target = nodes[id];
    for (const [name, value] of Object.entries(raw.inputs || {})) {
      if (!isLink(value) || !nodes[String(value[0])]) continue;
      let slot = target.findInputSlot(name);
      if (slot < 0) {
        // A link into a widget (e.g. a seed driven by another node): give it an input slot.
        const widget = (target.widgets || []).find((w) => w.name === name);
        const source = nodes[String(value[0])];
        const type = source.outputs?.[value[1]]?.type || "*";
        target.addInput(name, type, widget ? { widget: { name } } : undefined);
        if (widget) hideWidget(widget);
        slot = target.findInputSlot(name);
      }
      nodes[String(value[0])].connect(value[1], target, slot);
    }
  }
  return missing;
}

// ComfyUI files list widget inputs as sockets too: keep the linked ones (hiding their widget), drop the rest.
function tidyWidgetInputs(node) {
  for (let i = (node.inputs || []).length - 1; i >= 0; i--) {
    const input = node.inputs[i];
    if (!input.widget) continue;
    const widget = (node.widgets || []).find((w) => w.name === input.widget.name);
    if (input.link == null) node.removeInput(i);
    else if (widget) hideWidget(widget);
  }
}

// The server expands what the editor cannot show (subgraphs, group nodes) and says which node types it lacks
// and why; where it cannot read the document, the editor shows what litegraph makes of it.
async function expand(doc) {
  try {
    return await api("/workflow/expand", { method: "POST", body: { workflow: doc } });
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 400) throw error;
    return { workflow: doc, expanded: [], missing: {} };
  }
}

// The server frames each expanded instance by the sizes the file gave its nodes; the editor's nodes can be taller
// (all their widgets drawn): grow each such frame around the nodes that start inside it.
function fitFrames(graph) {
  for (const group of graph._groups) {
    if (!/ expanded\)$/.test(group.title)) continue;
    const [x, y, w, h] = group._bounding;
    const inside = graph._nodes.filter((n) => n.pos[0] >= x && n.pos[0] < x + w && n.pos[1] >= y && n.pos[1] < y + h);
    const right = Math.max(x + w, ...inside.map((n) => n.pos[0] + n.size[0] + 20));
    const bottom = Math.max(y + h, ...inside.map((n) => n.pos[1] + n.size[1] + 20));
    group._bounding.set([x, y, right - x, bottom - y]);
  }
}

// Load any workflow document; resolves to {missing: {type: "built-in" | "custom"}, expanded: [instances]}.
export async function loadAny(graph, data) {
  let doc = data;
  if (data && (typeof data.workflow === "string" || typeof data.prompt === "string")) {
    // A PNG's text chunks saved as JSON (PNG-info tools write them so): read as the PNG itself would be.
    doc = JSON.parse(typeof data.workflow === "string" ? data.workflow : data.prompt);
  }
  if (data && typeof data.prompt === "object" && !data.prompt.class_type && !isUiFormat(data)) doc = data.prompt;
  if (!doc || typeof doc !== "object" || Array.isArray(doc)) {
    throw new Error("this file is not a workflow (expected an API-format or UI-format JSON object)");
  }
  const { workflow, expanded, missing } = await expand(doc);
  if (!isUiFormat(workflow)) {
    for (const type of loadApi(graph, workflow, missing)) missing[type] ??= "custom";
    return { missing, expanded };
  }
  graph.configure(workflow);
  if (expanded.length) fitFrames(graph);
  for (const node of graph._nodes) {
    tidyWidgetInputs(node);
    if (node.has_errors) {
      missing[node.type] ??= "custom";
      markMissing(node, missing[node.type]);
    }
  }
  return { missing, expanded };
}

// The `workflow` and `prompt` tEXt/iTXt chunks of a PNG saved by SaveImage.
export function readPngText(buffer) {
  const bytes = new Uint8Array(buffer);
  const signature = [137, 80, 78, 71, 13, 10, 26, 10];
  if (!signature.every((b, i) => bytes[i] === b)) throw new Error("not a PNG file");
  const view = new DataView(buffer);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  const chunks = {};
  let offset = 8;
  while (offset + 8 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = latin1.decode(bytes.subarray(offset + 4, offset + 8));
    const data = bytes.subarray(offset + 8, offset + 8 + length);
    if (type === "tEXt" || type === "iTXt") {
      const zero = data.indexOf(0);
      const key = latin1.decode(data.subarray(0, zero));
      if (type === "tEXt") {
        chunks[key] = latin1.decode(data.subarray(zero + 1));
      } else if (data[zero + 1] === 0) { // iTXt, uncompressed: skip language and translated keyword
        let rest = zero + 3;
        rest = data.indexOf(0, rest) + 1;
        rest = data.indexOf(0, rest) + 1;
        chunks[key] = utf8.decode(data.subarray(rest));
      }
    }
    if (type === "IEND") break;
    offset += 12 + length;
  }
  return chunks;
}

export function workflowFromPng(buffer) {
  const text = readPngText(buffer);
  for (const key of ["workflow", "prompt"]) {
    if (text[key]) return JSON.parse(text[key]);
  }
  throw new Error("this PNG carries no workflow (no 'workflow' or 'prompt' text chunk)");
}
