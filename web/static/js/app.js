// The editor: a litegraph canvas over the node types of /object_info, wired to the queue and the websocket.

import { api, ApiError, clientId, connect } from "./api.js";
import { convertibleWidgetAt, linkToWidget, socketType } from "./convert.js";
import { clearRunState, CONTROL_VALUES, endPlayerFrame, registerNodeTypes, runState, setOutput } from "./nodes.js";
import { buildLibrary, setStatus, showGalleryImage, showGalleryVideo, toast } from "./panels.js";
import { QueuePanel } from "./queue.js";
import { defaultWorkflow, loadAny, loadApi, workflowFromPng } from "./workflow.js";

const STORAGE_KEY = "loom.workflow";

// As in ComfyUI's editor, a link dragged from an output and released over a widget converts that widget to an input
// and links it; and a link whose type does not fit where it is dropped says so. Call it before setCanvas: litegraph
// binds its mouse handlers there.
function handleLinkDrops(canvas) {
  const release = canvas.processMouseUp;
  canvas.processMouseUp = function (event) {
    if (this.connecting_output && event.button === 0 && event.isPrimary !== false) {
      this.adjustMouseEvent(event);
      const node = this.graph.getNodeOnPos(event.canvasX, event.canvasY, this.visible_nodes);
      if (node && node !== this.connecting_node && dropLink(this, node, event.canvasX, event.canvasY)) {
        this.connecting_node = this.connecting_output = this.connecting_pos = null;
        this.connecting_slot = -1;
      }
    }
    return release.call(this, event);
  };
}

// A drop on a widget links it, or says why not (true: handled here). On an input of another type litegraph refuses
// the link; say why there too.
function dropLink(canvas, node, x, y) {
  const type = canvas.connecting_output.type;
  const slot = canvas.isOverNodeInput(node, x, y);
  if (slot !== -1) {
    const input = node.inputs[slot];
    if (!LiteGraph.isValidConnection(type, input.type)) refuse(type, input.name, input.type);
    return false;
  }
  const target = widgetTarget(canvas, node, x, y);
  if (!target) return false;
  if (!target.fits) refuse(type, target.widget.name, socketType(node, target.widget.name));
  else linkToWidget(canvas.connecting_node, canvas.connecting_slot, node, target.widget);
  return true;
}

// The widget of `node` at graph position (x, y) that the link being dragged would be dropped on, and whether its
// type fits; null over an input socket (litegraph's own drop) or anything else.
function widgetTarget(canvas, node, x, y) {
  if (canvas.isOverNodeInput(node, x, y) !== -1) return null;
  const widget = convertibleWidgetAt(node, x, y);
  if (!widget) return null;
  return { widget, fits: LiteGraph.isValidConnection(canvas.connecting_output.type, socketType(node, widget.name)) };
}

// While a link is dragged over a widget, outline the widget: green where dropping converts and links it, red where
// the type does not fit (the drop then says why). Drawn in graph space, above the nodes.
function highlightWidgetTargets(canvas) {
  const previous = canvas.onDrawForeground;
  canvas.onDrawForeground = function (ctx, visibleArea) {
    if (previous) previous.call(this, ctx, visibleArea);
    this.highlighted_widget = null; // what is outlined, for the browser tests
    if (!this.connecting_output) return;
    const [x, y] = this.graph_mouse;
    const node = this.graph.getNodeOnPos(x, y, this.visible_nodes);
    const target = node && node !== this.connecting_node && widgetTarget(this, node, x, y);
    if (!target) return;
    const { widget, fits } = target;
    const height = widget.computeSize ? widget.computeSize(node.size[0])[1] : LiteGraph.NODE_WIDGET_HEIGHT;
    ctx.save();
    ctx.strokeStyle = fits ? "#6c6" : "#e55";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.roundRect(node.pos[0] + 12, node.pos[1] + widget.last_y - 2, node.size[0] - 24, height + 4, 6);
    ctx.stroke();
    ctx.restore();
    this.highlighted_widget = { node: node.id, widget: widget.name, fits };
  };
}

// What opening a file with subgraphs or group nodes did: the editor shows them expanded into their nodes.
function expansionNotice(expanded) {
  const kinds = {};
  for (const instance of expanded) (kinds[instance.kind] ??= []).push(instance);
  const parts = Object.entries(kinds).map(([kind, list]) => {
    const names = list.map((i) => `"${i.title}"${i.mode === 2 ? " (muted)" : i.mode === 4 ? " (bypassed)" : ""}`);
    return `${list.length} ${kind}${list.length > 1 ? "s" : ""} (${names.join(", ")})`;
  });
  return `expanded ${parts.join(" and ")} into their nodes, framed and titled after where they came from; `
    + "this editor edits them flat, and Save keeps them so";
}

// The node types this server lacks, sorted as the server's validation sorts them.
function missingNotice(missing) {
  const builtIn = Object.keys(missing).filter((t) => missing[t] === "built-in");
  const custom = Object.keys(missing).filter((t) => missing[t] !== "built-in");
  const parts = [];
  if (builtIn.length) parts.push(`ComfyUI built-in nodes Loom does not provide yet: ${builtIn.join(", ")}`);
  if (custom.length) parts.push(`nodes from custom node packs not installed here: ${custom.join(", ")}`);
  return parts.length ? `missing node types (shown in red): ${parts.join("; ")}` : "";
}

function refuse(type, name, target) {
  toast(`cannot connect ${type} to ${name}: it takes ${target}`, "error");
}

class Editor {
  constructor(objectInfo) {
    this.objectInfo = objectInfo;
    this.graph = new LGraph();
    const element = document.getElementById("graph");
    this.canvas = new LGraphCanvas(null, this.graph); // its <canvas> comes after our mouse handler
    handleLinkDrops(this.canvas);
    highlightWidgetTargets(this.canvas);
    const drawn = this.canvas.onDrawForeground;
    this.canvas.onDrawForeground = function (ctx, visibleArea) { // after the nodes of a frame: see endPlayerFrame
      drawn.call(this, ctx, visibleArea);
      endPlayerFrame();
    };
    this.canvas.setCanvas(element);
    this.canvas.allow_searchbox = true;
    this.canvas.show_info = false;
    this.canvas.render_canvas_border = false;
    this.resize();
    window.addEventListener("resize", () => this.resize());
  }

  resize() {
    const element = this.canvas.canvas;
    element.width = element.parentElement.clientWidth;
    element.height = element.parentElement.clientHeight;
    this.canvas.setDirty(true, true);
  }

  redraw() {
    this.canvas.setDirty(true, true);
  }

  node(id) {
    return this.graph.getNodeById(Number(id)) || this.graph.getNodeById(id);
  }

  addNode(type) {
    const node = LiteGraph.createNode(type);
    const ds = this.canvas.ds;
    const [w, h] = [this.canvas.canvas.width, this.canvas.canvas.height];
    node.pos = [w / 2 / ds.scale - ds.offset[0] - node.size[0] / 2, h / 2 / ds.scale - ds.offset[1] - 60];
    this.graph.add(node);
    this.canvas.selectNode(node);
    return node;
  }

  async load(data, name = "workflow") {
    const { missing, expanded } = await loadAny(this.graph, data);
    clearRunState();
    runState.outputs = {};
    this.fitView();
    if (expanded.length) toast(`${name}: ${expansionNotice(expanded)}`, "info", 12000);
    const notice = missingNotice(missing);
    if (notice) toast(`${name}: ${notice}`, "error", 12000);
    this.save();
  }

  async loadDefault() {
    const doc = await defaultWorkflow(this.objectInfo);
    clearRunState();
    runState.outputs = {};
    loadApi(this.graph, doc);
    for (const node of this.graph._nodes) {
      for (const w of node.widgets || []) if (w.name === "control_after_generate") w.value = "randomize";
    }
    this.fitView();
    this.save();
  }

  fitView() {
    const nodes = this.graph._nodes;
    if (!nodes.length) return;
    const xs = nodes.map((n) => [n.pos[0], n.pos[0] + n.size[0]]).flat();
    const ys = nodes.map((n) => [n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.pos[1] + n.size[1]]).flat();
    const [minX, maxX, minY, maxY] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    // The free area: right of the node library, left of the menu, above the gallery.
    const el = this.canvas.canvas;
    const library = document.getElementById("library");
    const left = library.classList.contains("hidden") ? 20 : library.getBoundingClientRect().right + 20;
    const [width, height] = [el.width - left - 250, el.height - 130];
    // Below 0.6 litegraph drops slot labels and widget text, so prefer panning to an unreadable overview.
    const scale = Math.min(1.1, Math.max(0.6, Math.min(width / (maxX - minX), height / (maxY - minY + 60))));
    this.canvas.ds.scale = scale;
    this.canvas.ds.offset = [(left + (width - (maxX - minX) * scale) / 2) / scale - minX,
      (20 + (height - (maxY - minY) * scale) / 2) / scale - minY];
    this.redraw();
  }

  // New model files or uploads since the page opened: refresh the choices of every combo.
  async refreshChoices() {
    this.objectInfo = await api("/object_info");
    for (const node of this.graph._nodes) {
      const def = this.objectInfo[node.type];
      if (!def) continue;
      const inputs = { ...def.input.required, ...def.input.optional };
      for (const widget of node.widgets || []) {
        const spec = inputs[widget.name];
        if (widget.type === "combo" && spec && Array.isArray(spec[0])) widget.options.values = [...spec[0]];
      }
    }
    this.redraw();
    toast("node choices refreshed");
  }

  save() {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(this.graph.serialize()));
  }

  async queue() {
    const workflow = this.graph.serialize();
    clearRunState();
    this.redraw();
    setStatus("queueing…");
    try {
      const answer = await api("/prompt", {
        method: "POST",
        body: { prompt: workflow, client_id: clientId, extra_data: { extra_pnginfo: { workflow } } },
      });
      // A quick run may already have reported its end over the websocket.
      if (document.getElementById("status").textContent === "queueing…") setStatus(`queued #${answer.number}`);
      this.afterQueued();
    } catch (error) {
      this.showErrors(error);
    }
    this.save();
  }

  // ComfyUI's "control after generate": change seeds once the prompt is queued.
  afterQueued() {
    for (const node of this.graph._nodes) {
      const widgets = node.widgets || [];
      widgets.forEach((w, i) => {
        if (w.name !== "control_after_generate" || i === 0) return;
        const target = widgets[i - 1];
        const { min = 0, max = 2 ** 50 } = target.options;
        const top = Math.min(max, 2 ** 50);
        if (w.value === "increment") target.value = Math.min(top, target.value + 1);
        if (w.value === "decrement") target.value = Math.max(min, target.value - 1);
        if (w.value === "randomize") target.value = min + Math.floor(Math.random() * (top - min));
      });
    }
    this.redraw();
  }

  showErrors(error) {
    setStatus("not queued");
    if (!(error instanceof ApiError) || !error.body) {
      toast(`could not queue: ${error.message}`, "error");
      return;
    }
    const nodeErrors = error.body.node_errors || {};
    for (const [id, entry] of Object.entries(nodeErrors)) {
      runState.errors[id] = entry.errors.map((e) => {
        const input = e.extra_info && e.extra_info.input_name;
        const details = e.details && e.details !== input ? ` (${e.details})` : "";
        return { input, text: `${input ? `${input}: ` : ""}${e.message}${details}` };
      });
    }
    const count = Object.keys(nodeErrors).length;
    toast(count ? `${error.body.error.message}: ${count} node(s) have errors` : error.body.error.message, "error");
    this.redraw();
  }

  onMessage(type, data) {
    if (type === "status") {
      const remaining = data.status.exec_info.queue_remaining;
      document.getElementById("queue-size").textContent = `Queue size: ${remaining}`;
      return;
    }
    if (type === "execution_start") {
      clearRunState();
      setStatus("running");
    } else if (type === "execution_cached") {
      runState.cached = new Set(data.nodes.map(String));
    } else if (type === "executing") {
      runState.running = data.node === null ? null : String(data.node);
      runState.progress = null;
      if (data.node === null) runState.preview = null;
    } else if (type === "progress") {
      runState.progress = { node: String(data.node), value: data.value, max: data.max };
    } else if (type === "executed") {
      runState.preview = null;
      const { images, video } = setOutput(data.node, data.output || {});
      const node = this.node(data.node);
      for (const image of images) {
        image.onload = () => this.redraw();
        showGalleryImage(image.src, `${node ? node.title : data.node}: ${image.src}`);
      }
      for (const url of video) showGalleryVideo(url, `${node ? node.title : data.node}: ${url}`);
    } else if (type === "execution_success") {
      setStatus(`done in ${data.duration_s.toFixed(2)} s`);
    } else if (type === "execution_error") {
      runState.errors[String(data.node_id)] = [{ text: `${data.exception_type}: ${data.exception_message}` }];
      toast(`${data.node_type || "prompt"} failed: ${data.exception_message}`, "error", 0);
      setStatus("error");
    } else if (type === "execution_interrupted") {
      setStatus("interrupted");
    }
    this.redraw();
  }

  onPreview(blob) {
    if (!runState.running) return;
    const image = new Image();
    const node = runState.running;
    image.onload = () => {
      if (runState.running !== node) return; // the node finished while the frame was decoding
      if (runState.preview) URL.revokeObjectURL(runState.preview.image.src);
      runState.preview = { node, image };
      this.redraw();
    };
    image.src = URL.createObjectURL(blob);
  }

  // Screen position (CSS pixels) of a slot or widget, used by the browser tests to drag and click.
  screenPos(nodeId, kind, which) {
    this.canvas.draw(true, true); // lays out widgets (last_y) of nodes added since the last frame
    const node = this.node(nodeId);
    let pos;
    if (kind === "widget") {
      const widget = node.widgets.find((w) => w.name === which);
      pos = [node.pos[0] + node.size[0] / 2, node.pos[1] + widget.last_y + 10];
    } else {
      pos = node.getConnectionPos(kind === "input", which);
    }
    const [x, y] = this.canvas.ds.convertOffsetToCanvas(pos);
    const rect = this.canvas.canvas.getBoundingClientRect();
    return [rect.left + x, rect.top + y];
  }
}

// Files whose workflow the server reads (graph/load.py, with PyAV or Pillow), by type or suffix: as in ComfyUI's
// editor, a WEBP, video or audio file that Loom (or ComfyUI) saved opens the workflow that made it.
const MEDIA_SUFFIXES = [".webp", ".mp4", ".webm", ".flac", ".mp3", ".opus", ".ogg"];
const MEDIA_TYPE = /^(audio|video)\/|^image\/webp$/;

// PNG and JSON are read here; a media file goes to the server as the request body and its answer is the workflow.
async function workflowOfFile(file) {
  const name = file.name.toLowerCase();
  if (file.type === "image/png" || name.endsWith(".png")) return workflowFromPng(await file.arrayBuffer());
  if (MEDIA_TYPE.test(file.type) || MEDIA_SUFFIXES.some((suffix) => name.endsWith(suffix))) {
    return api("/workflow/from_file", { method: "POST", form: file }); // `form` is sent as the body as it is
  }
  return JSON.parse(await file.text());
}

async function openFile(editor, file) {
  try {
    await editor.load(await workflowOfFile(file), file.name);
    toast(`opened ${file.name}`);
  } catch (error) {
    toast(`${file.name}: ${error.message}`, "error");
  }
}

// The server's example workflows (workflows/*.json), offered in the Examples menu.
async function fillExamples(editor) {
  const menu = document.getElementById("examples-menu");
  for (const name of await api("/workflows")) menu.add(new Option(name, name));
  menu.addEventListener("change", async () => {
    const name = menu.value;
    menu.value = "";
    if (!name) return;
    try {
      await editor.load(await api(`/workflows/${encodeURIComponent(name)}`), name);
      toast(`opened the example ${name}`);
    } catch (error) {
      toast(`${name}: ${error.message}`, "error");
    }
  });
}

async function saveFile(editor) {
  try {
    const doc = await api("/workflow/api", { method: "POST", body: { workflow: editor.graph.serialize() } });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([JSON.stringify(doc, null, 2)], { type: "application/json" }));
    link.download = "workflow.json";
    link.click();
    URL.revokeObjectURL(link.href);
  } catch (error) {
    toast(`could not save: ${error.message}`, "error");
  }
}

function bindControls(editor) {
  const on = (id, fn) => document.getElementById(id).addEventListener("click", fn);
  on("queue-button", () => editor.queue());
  on("interrupt-button", () => api("/interrupt", { method: "POST", body: {} }));
  on("clear-queue-button", () => api("/queue", { method: "POST", body: { clear: true } }));
  on("save-button", () => saveFile(editor));
  on("open-button", () => document.getElementById("file-input").click());
  on("default-button", () => editor.loadDefault());
  on("refresh-button", () => editor.refreshChoices());
  on("clear-button", () => {
    editor.graph.clear();
    editor.save();
  });
  on("library-toggle", () => document.getElementById("library").classList.toggle("hidden"));
  const input = document.getElementById("file-input");
  input.addEventListener("change", () => {
    if (input.files.length) openFile(editor, input.files[0]);
    input.value = "";
  });
  const area = document.getElementById("canvas-area");
  area.addEventListener("dragover", (event) => event.preventDefault());
  area.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) openFile(editor, event.dataTransfer.files[0]);
  });
  window.addEventListener("keydown", (event) => {
    if (!(event.ctrlKey || event.metaKey) || event.target.closest("input, textarea, dialog")) return;
    if (event.key === "Enter") editor.queue();
    // ComfyUI's shortcuts: Ctrl+M mutes the selected nodes (mode 2), Ctrl+B bypasses them (mode 4).
    const mode = { m: 2, b: 4 }[event.key.toLowerCase()];
    if (mode) {
      event.preventDefault();
      for (const node of Object.values(editor.canvas.selected_nodes || {})) node.mode = node.mode === mode ? 0 : mode;
      editor.redraw();
    }
  });
  setInterval(() => editor.save(), 5000);
  window.addEventListener("beforeunload", () => editor.save());
}

async function main() {
  const objectInfo = await api("/object_info");
  registerNodeTypes(objectInfo);
  const editor = new Editor(objectInfo);
  window.loom = { editor, runState, CONTROL_VALUES };
  buildLibrary(objectInfo, (type) => editor.addNode(type));
  bindControls(editor);
  try {
    const saved = JSON.parse(localStorage.getItem(STORAGE_KEY));
    if (!saved?.nodes?.length) throw new Error("no saved session");
    await editor.load(saved, "last session");
  } catch {
    await editor.loadDefault(); // a first visit, or a session that no longer opens
  }
  await fillExamples(editor);
  const queuePanel = new QueuePanel((doc, name) => editor.load(doc, name).catch((error) => toast(
    `${name}: ${error.message}`, "error")), (message) => toast(message, "error"));
  window.loom.queuePanel = queuePanel;
  connect({
    open: () => {
      setStatus("connected");
      queuePanel.refresh(); // what happened while the page was away
    },
    close: () => setStatus("reconnecting…"),
    message: (type, data) => {
      editor.onMessage(type, data);
      queuePanel.onMessage(type, data);
    },
    preview: (blob) => editor.onPreview(blob),
  });
  for (const url of await api("/extensions")) import(url).catch((e) => toast(`extension ${url}: ${e}`, "error"));
  document.body.dataset.ready = "true";
}

main().catch((error) => {
  toast(`the editor could not start: ${error.message}`, "error", 0);
});
