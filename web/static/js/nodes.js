// Node types for the graph editor, built from /object_info, and how a node shows the run's state.

import { api, uploadImage, viewUrl } from "./api.js";
import { conversionMenu, showWidget } from "./convert.js";
import { toast } from "./panels.js";
import { registerVirtualTypes } from "./virtual.js";

const WIDGET_TYPES = new Set(["INT", "FLOAT", "STRING", "BOOLEAN"]);
// Socketless inputs whose value Loom's editor holds as JSON text (the nodes read it back).
const TEXT_VALUE_TYPES = new Set(["VIDEO_EDIT", "BOUNDING_BOX", "BOUNDING_BOXES"]);
const SEED_NAMES = new Set(["seed", "noise_seed"]);
export const CONTROL_VALUES = ["fixed", "increment", "decrement", "randomize"];
const IMAGE_AREA = 220;
const AUDIO_ROW = 40; // the height a node gives each <audio> player, in graph units
const IMAGE_ACCEPT = "image/png,image/jpeg,image/webp,image/gif,image/bmp";
const RECORDING_SUFFIX = { "audio/webm": ".webm", "audio/ogg": ".ogg", "audio/mp4": ".m4a", "audio/wav": ".wav" };

// What the editor knows about the run in progress; nodes read it when they draw.
export const runState = {
  running: null, // node id being executed
  progress: null, // {node, value, max}
  cached: new Set(),
  errors: {}, // node id -> [{message, input}]
  outputs: {}, // node id -> {images: [Image], text: [string], audio: [url], video: [url]}
  preview: null, // {node, image}
};

export function clearRunState() {
  runState.running = null;
  runState.progress = null;
  runState.preview = null;
  runState.cached = new Set();
  runState.errors = {};
}

function decimals(step) {
  const text = String(step);
  return text.includes(".") ? text.split(".")[1].length : 0;
}

function numberWidget(node, name, type, opts) {
  const step = opts.step || (type === "INT" ? 1 : 0.01);
  const min = opts.min ?? -Number.MAX_SAFE_INTEGER;
  const max = Math.min(opts.max ?? Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
  const precision = type === "INT" ? 0 : Math.max(decimals(step), 2);
  const widget = node.addWidget("number", name, opts.default ?? 0, function (value) {
    // litegraph moves a number by step/10 per click: keep values on the input's own grid and range. The grid
    // starts at the minimum, as ComfyUI's does (a video's length, min 1 step 4, takes 1, 5, ..., 81).
    let v = Math.min(max, Math.max(min, Number(value)));
    const origin = Math.abs(min) < 1e9 ? min : 0;
    v = type === "INT" ? origin + Math.round((v - origin) / step) * step : Number(v.toFixed(precision));
    if (!Number.isFinite(v)) v = opts.default ?? 0;
    this.value = v;
  }, { min, max, step: step * 10, precision });
  return widget;
}

function multilineWidget(node, name, value) {
  const widget = {
    type: "multiline",
    name,
    value,
    options: { multiline: true },
    computeSize(width) {
      return [width, 84];
    },
    draw(ctx, _node, width, y) {
      ctx.fillStyle = "#222";
      ctx.strokeStyle = "#555";
      ctx.beginPath();
      ctx.roundRect(15, y, width - 30, 80, 6);
      ctx.fill();
      ctx.stroke();
      ctx.fillStyle = this.value ? "#ddd" : "#777";
      ctx.font = "12px sans-serif";
      ctx.textAlign = "left";
      const lines = wrap(ctx, this.value || name, width - 46).slice(0, 5);
      lines.forEach((line, i) => ctx.fillText(line, 23, y + 16 + i * 14));
    },
    mouse(event, _pos, target) {
      if (event.type === LiteGraph.pointerevents_method + "down") {
        openTextEditor(this.name, this.value, (text) => {
          this.value = text;
          target.setDirtyCanvas(true, true);
        });
      }
      return true;
    },
  };
  node.addCustomWidget(widget);
  return widget;
}

function wrap(ctx, text, width) {
  const lines = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (const word of paragraph.split(" ")) {
      const candidate = line ? `${line} ${word}` : word;
      if (ctx.measureText(candidate).width > width && line) {
        lines.push(line);
        line = word;
      } else {
        line = candidate;
      }
    }
    lines.push(line);
  }
  return lines;
}

export function openTextEditor(title, value, done) {
  const dialog = document.getElementById("text-editor");
  dialog.querySelector("h3").textContent = title;
  const area = dialog.querySelector("textarea");
  area.value = value || "";
  dialog.onclose = () => {
    if (dialog.returnValue === "ok") done(area.value);
  };
  dialog.returnValue = ""; // Escape keeps the last returnValue: without this it would apply the edit
  dialog.showModal();
  area.focus();
}

// `value` is what the button keeps in widgets_values: ComfyUI's "image" for an image upload.
function uploadWidget(node, combo, folder, accept = IMAGE_ACCEPT, value = "image") {
  const input = document.createElement("input");
  input.type = "file";
  input.accept = accept;
  input.onchange = async () => {
    if (!input.files.length) return;
    const result = await uploadImage(input.files[0], folder);
    const name = result.subfolder ? `${result.subfolder}/${result.name}` : result.name;
    if (!combo.options.values.includes(name)) combo.options.values.push(name);
    combo.value = name;
    combo.callback && combo.callback(name);
    input.value = "";
  };
  // ComfyUI keeps the value "image" for this button in widgets_values; the UI-format import skips it.
  node.addWidget("button", "choose file to upload", value, () => input.click(), { serialize: true });
}

// A "name" or "sub/name" in `folder` (or the folder a " [output]" / " [temp]" suffix names) as /view's fields.
function fileRef(name, folder) {
  const annotated = /^(.*) \[(input|output|temp)\]$/.exec(name);
  if (annotated) [, name, folder] = annotated;
  const [subfolder, filename] = name.includes("/") ? [name.slice(0, name.lastIndexOf("/")), name.split("/").pop()]
    : ["", name];
  return { filename, subfolder, type: folder };
}

// LoadAudio's chosen file, in a player on the node (ComfyUI's audio widget). The URL is new on each choice, so that
// a file uploaded under a name the player failed on before (not there yet) loads.
function showInputAudio(node, name) {
  if (!name) return;
  runState.outputs[node.id] = { images: [], text: [], audio: [`${viewUrl(fileRef(name, "input"))}&t=${Date.now()}`] };
  node.setDirtyCanvas(true, true);
}

// RecordAudio's AUDIO_RECORD input (ComfyUI's "audiorecord" widget): a button that records from the microphone and,
// on stop, uploads the recording to input/audio/ as LoadAudio's upload does. Its value, kept in widgets_values, is
// the uploaded file's name, and a player shows the recording. Drawn by itself: a litegraph button's callback would
// also run when a document sets the value.
function recordWidget(node, name) {
  let recorder = null;
  const upload = async (chunks, type) => {
    const file = new File(chunks, `recording-${Date.now()}${RECORDING_SUFFIX[type] || ".webm"}`, { type });
    const form = new FormData();
    form.append("image", file);
    form.append("subfolder", "audio");
    try {
      const result = await api("/upload/image", { method: "POST", form });
      widget.value = `${result.subfolder}/${result.name}`;
      showInputAudio(node, widget.value);
    } catch (error) {
      toast(`the recording could not be uploaded: ${error.message}`, "error");
    }
  };
  const start = async () => {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (event) => chunks.push(event.data);
    recorder.onstop = () => {
      stream.getTracks().forEach((track) => track.stop());
      const type = recorder.mimeType.split(";")[0];
      recorder = null;
      node.setDirtyCanvas(true, true);
      upload(chunks, type);
    };
    recorder.start();
    node.setDirtyCanvas(true, true);
  };
  const widget = {
    type: "audiorecord",
    name,
    value: "",
    options: {},
    get label() {
      return recorder ? "stop recording" : "record";
    },
    draw(ctx, _node, width, y, height) {
      ctx.fillStyle = "#222";
      ctx.strokeStyle = "#666";
      ctx.beginPath();
      ctx.roundRect(15, y, width - 30, height, height / 2);
      ctx.fill();
      ctx.stroke();
      ctx.fillStyle = recorder ? "#f66" : "#ddd";
      ctx.font = "12px sans-serif";
      ctx.textAlign = "center";
      ctx.fillText(this.label, width / 2, y + height * 0.7);
    },
    mouse(event) {
      if (event.type !== LiteGraph.pointerevents_method + "down") return false;
      if (recorder) recorder.stop();
      else start().catch((error) => toast(`no microphone to record from: ${error.message}`, "error"));
      return true;
    },
  };
  node.addCustomWidget(widget);
  setTimeout(() => showInputAudio(node, widget.value), 0); // a recording named by a loaded workflow
  const removed = node.onRemoved;
  node.onRemoved = function () {
    if (recorder) { // a node removed while it records: free the microphone, upload nothing
      recorder.onstop = null;
      recorder.stream.getTracks().forEach((track) => track.stop());
      recorder = null;
    }
    removed.call(this);
  };
}

// The picture a file-choosing widget names, from the node's folder ("input" unless the schema's image_folder says
// otherwise) or the one a ComfyUI-style " [output]" / " [temp]" suffix names.
function showInputImage(node, name, folder = "input") {
  if (!name) return;
  const image = new Image();
  image.onload = () => node.setDirtyCanvas(true, true);
  image.src = viewUrl(fileRef(name, folder));
  runState.outputs[node.id] = { images: [image], text: [] };
}

function addInputs(node, def) {
  const dynamic = dynamicInputs(def);
  const groups = [["required", def.input.required || {}], ["optional", def.input.optional || {}]];
  for (const [group, inputs] of groups) {
    const order = (def.input_order && def.input_order[group]) || Object.keys(inputs);
    for (const name of order) {
      const [type, opts = {}] = inputs[name];
      const made = (node.widgets || []).length;
      const label = dynamic.get(name);
      if (Array.isArray(type)) {
        const combo = node.addWidget("combo", name, opts.default ?? type[0] ?? "", null, { values: [...type] });
        if (opts.dynamic_inputs) {
          combo.choiceInputs = opts.dynamic_inputs;
          combo.callback = () => relayout(node);
        }
        if (opts.image_upload) {
          const folder = opts.image_folder || "input";
          combo.callback = (value) => showInputImage(node, value, folder);
          uploadWidget(node, combo, folder);
          setTimeout(() => showInputImage(node, combo.value, folder), 0);
        }
        if (opts.audio_upload) {
          combo.callback = (value) => showInputAudio(node, value);
          uploadWidget(node, combo, "input", "audio/*,video/*", "audio");
          setTimeout(() => showInputAudio(node, combo.value), 0);
        }
      } else if (WIDGET_TYPES.has(type) && !opts.forceInput) {
        if (type === "INT" || type === "FLOAT") {
          numberWidget(node, name, type, opts);
          if (opts.control_after_generate || (type === "INT" && SEED_NAMES.has(name))) {
            // ComfyUI's newer declarations name the mode to start in ("fixed" for GlobalSeedNode's seed).
            const start = CONTROL_VALUES.includes(opts.control_after_generate) ? opts.control_after_generate : "randomize";
            node.addWidget("combo", "control_after_generate", start, null, { values: CONTROL_VALUES });
          }
        } else if (type === "STRING") {
          if (opts.multiline) multilineWidget(node, name, opts.default ?? "");
          else node.addWidget("text", name, opts.default ?? "", null, {});
        } else {
          node.addWidget("toggle", name, Boolean(opts.default), null, {});
        }
      } else if (type === "AUDIO_RECORD") {
        recordWidget(node, name);
      } else if (opts.socketless && type === "COLOR") {
        // ColorToRGBInt's colour: ComfyUI draws a colour picker; here "#rrggbb" text.
        node.addWidget("text", name, opts.default ?? "#ffffff", null, {});
      } else if (opts.socketless && TEXT_VALUE_TYPES.has(type) && !opts.forceInput) {
        // Values ComfyUI edits with a widget of its own (a video editor, a box on the picture): JSON text here.
        node.addWidget("text", name, JSON.stringify(opts.default ?? {}), null, {});
      } else if (opts.socketless && !opts.forceInput) {
        // A widget without a socket that the node draws itself (ImageCompare's compare_view: see drawCompare).
      } else if (opts.autogrow) {
        // A growing input (BatchImagesNode's images.imageN): its sockets show one at a time, see growInputs.
        (node.growing ||= []).push([name, type]);
      } else {
        const shown = label ?? name;
        const socket = [name, type === "*" ? "*" : type, group === "optional" ? { label: `${shown}?` } : undefined];
        if (label === undefined) node.addInput(...socket);
        else (node.choiceSockets ||= {})[name] = socket;
      }
      if (label !== undefined) {
        const widgets = (node.widgets || []).slice(made);
        widgets.forEach((w) => { w.choiceInput = name; });
        if (widgets.length) widgets[0].label = label;
        (node.choiceWidgets ||= {})[name] = widgets;
      }
    }
  }
  node.declaredWidgets = [...(node.widgets || [])];
  growInputs(node);
  showChoices(node);
}

// ComfyUI's "dynamic combo": a combo whose choice brings inputs of its own; the schema names them (the combo's
// `dynamic_inputs`, choice -> input names). The editor shows only the chosen ones, their widgets right after the
// combo (where ComfyUI's files keep their values in widgets_values); the others' widgets sleep, keeping their values
// for when their choice comes back. Returns each such input's name -> its label (the name less the combo's prefix).
function dynamicInputs(def) {
  const labels = new Map();
  for (const [combo, [, opts = {}]] of Object.entries({ ...def.input.required, ...def.input.optional })) {
    for (const names of Object.values(opts.dynamic_inputs || {})) {
      for (const name of names) labels.set(name, name.startsWith(`${combo}.`) ? name.slice(combo.length + 1) : name);
    }
  }
  return labels;
}

// The inputs the node's dynamic combos have chosen, and the widgets in the order they show (and are saved) in.
function chosen(node) {
  const names = new Set();
  const widgets = [];
  for (const w of node.declaredWidgets || []) {
    if (w.choiceInput) continue;
    widgets.push(w);
    for (const name of (w.choiceInputs && w.choiceInputs[w.value]) || []) {
      names.add(name);
      widgets.push(...((node.choiceWidgets || {})[name] || []));
    }
  }
  return { names, widgets };
}

function sleepWidget(widget) {
  if (widget.asleep) return;
  widget.asleep = { type: widget.type, draw: widget.draw, computeSize: widget.computeSize, mouse: widget.mouse };
  widget.type = "asleep";
  widget.draw = () => {};
  widget.computeSize = () => [0, -4];
  delete widget.mouse;
}

function wakeWidget(widget) {
  if (!widget.asleep) return;
  Object.assign(widget, widget.asleep);
  for (const key of ["draw", "computeSize", "mouse"]) if (!widget[key]) delete widget[key];
  delete widget.asleep;
}

// Lay the node out for its combos' choices: the chosen inputs' widgets and sockets show, the others go (a socket of
// an input no longer chosen is unlinked; a widget converted to a socket turns back into a sleeping widget).
function showChoices(node) {
  if (!node.choiceWidgets && !node.choiceSockets) return;
  const { names, widgets } = chosen(node);
  const dynamic = new Set([...Object.keys(node.choiceWidgets || {}), ...Object.keys(node.choiceSockets || {})]);
  for (let slot = (node.inputs || []).length - 1; slot >= 0; slot--) {
    const input = node.inputs[slot];
    const name = input.widget ? input.widget.name : input.name;
    if (!dynamic.has(name) || names.has(name)) continue;
    if (input.link != null) node.disconnectInput(slot);
    node.removeInput(slot);
    if (input.widget) (node.choiceWidgets[name] || []).forEach(showWidget);
  }
  for (const [name, socket] of Object.entries(node.choiceSockets || {})) {
    if (names.has(name) && node.findInputSlot(name) < 0) node.addInput(...socket);
  }
  const rest = node.declaredWidgets.filter((w) => !widgets.includes(w));
  widgets.forEach(wakeWidget);
  rest.forEach(sleepWidget);
  node.widgets = [...widgets, ...rest];
}

// A combo's choice changed: show its inputs and fit the node's height to them, keeping its width.
function relayout(node) {
  const width = node.size[0];
  showChoices(node);
  node.setSize(node.computeSize());
  node.size[0] = Math.max(node.size[0], width);
  node.setDirtyCanvas(true, true);
}

// widgets_values as ComfyUI's editor keeps them: each combo's chosen widgets right after it, no sleeping ones.
// A file from Loom's older editor holds every widget in declaration order: it is read as such.
function restoreWidgetValues(node, values) {
  if (Array.isArray(values)) {
    let i = 0;
    for (const w of node.declaredWidgets) {
      if (w.choiceInput || i >= values.length) continue;
      w.value = values[i++];
      for (const name of (w.choiceInputs && w.choiceInputs[w.value]) || []) {
        for (const chosenWidget of node.choiceWidgets[name] || []) {
          if (i < values.length) chosenWidget.value = values[i++];
        }
      }
    }
    const declared = node.declaredWidgets;
    if (values.length !== chosen(node).widgets.length && values.length === declared.length) {
      declared.forEach((w, k) => { w.value = values[k]; });
    }
  }
  showChoices(node);
  node.size[1] = Math.max(node.size[1], node.computeSize()[1]);
}

// Show the next socket of a growing input once every one shown is linked (ComfyUI's "autogrow" inputs).
function growInputs(node) {
  const shown = new Set((node.inputs || []).map((input) => input.name));
  const next = (node.growing || []).find(([name]) => !shown.has(name));
  const growing = new Set((node.growing || []).map(([name]) => name));
  const free = (node.inputs || []).some((input) => growing.has(input.name) && input.link == null);
  if (next && !free) node.addInput(next[0], next[1], { label: `${next[0]}?` });
}

function widgetsBottom(node) {
  let bottom = LiteGraph.NODE_SLOT_HEIGHT * Math.max(node.inputs?.length || 0, node.outputs?.length || 0) + 6;
  for (const w of node.widgets || []) {
    const height = w.computeSize ? w.computeSize(node.size[0])[1] : LiteGraph.NODE_WIDGET_HEIGHT;
    if (w.last_y !== undefined) bottom = Math.max(bottom, w.last_y + height + 4);
  }
  return bottom;
}

// Make room for images or text below the widgets; the frame just drawn is stale, so draw again.
function grow(node, height) {
  if (node.size[1] >= height) return;
  node.size[1] = height;
  node.setDirtyCanvas(true, true);
}

function drawImages(node, ctx, images) {
  const top = widgetsBottom(node);
  grow(node, top + IMAGE_AREA);
  const ready = images.filter((img) => img.complete && img.naturalWidth);
  if (!ready.length) return;
  const area = [node.size[0] - 20, node.size[1] - top - 10];
  const cell = area[0] / ready.length;
  ready.forEach((img, i) => {
    const scale = Math.min(cell / img.naturalWidth, area[1] / img.naturalHeight);
    const w = img.naturalWidth * scale;
    const h = img.naturalHeight * scale;
    ctx.drawImage(img, 10 + i * cell + (cell - w) / 2, top + (area[1] - h) / 2, w, h);
  });
}

// Audio and video players are <audio controls> / <video controls> elements over the canvas (a canvas cannot hold
// one), one per file a node shows, placed each frame where the node draws them; a player whose node was not drawn in a
// frame (scrolled away, collapsed) hides at the frame's end (endPlayerFrame), and goes with its node when that is
// removed.
const players = new Map(); // node id -> {audio: [HTMLAudioElement], video: [HTMLVideoElement]}
let frame = 0;

function newPlayer(node, kind) {
  const player = document.createElement(kind);
  player.controls = true;
  player.className = `node-${kind}`;
  player.dataset.node = String(node.id);
  if (kind === "video") { // as ComfyUI shows a saved video: playing, silent, round and round
    Object.assign(player, { muted: true, loop: true, autoplay: true, playsInline: true, preload: "auto" });
  } else {
    player.preload = "metadata";
  }
  return player;
}

// Place the node's `kind` players, one per url, the i-th over the node's box `place(i)` ([x, y, w, h], graph units).
function placePlayers(node, ctx, kind, urls, place) {
  const canvas = ctx.canvas;
  const kinds = players.get(node.id) || { audio: [], video: [] };
  const shown = kinds[kind];
  shown.splice(urls.length).forEach((player) => player.remove());
  // Graph units to CSS pixels of the canvas' parent: the context's transform, then the canvas' own scaling.
  const t = ctx.getTransform();
  const ratio = canvas.clientWidth / canvas.width;
  urls.forEach((url, i) => {
    let player = shown[i];
    if (!player) {
      player = newPlayer(node, kind);
      canvas.parentElement.appendChild(player);
      shown[i] = player;
    }
    if (player.dataset.url !== url) {
      player.src = url;
      player.dataset.url = url;
    }
    const [x, y, w, h] = place(i);
    Object.assign(player.style, {
      display: "",
      left: `${canvas.offsetLeft + (t.a * x + t.c * y + t.e) * ratio}px`,
      top: `${canvas.offsetTop + (t.b * x + t.d * y + t.f) * ratio}px`,
      width: `${t.a * w * ratio}px`,
      height: `${t.d * h * ratio}px`,
    });
    player.frame = frame;
  });
  players.set(node.id, kinds);
}

function drawAudio(node, ctx, urls, top) {
  grow(node, top + AUDIO_ROW * urls.length + 6);
  placePlayers(node, ctx, "audio", urls, (i) => [10, top + AUDIO_ROW * i, node.size[0] - 20, AUDIO_ROW - 8]);
}

// Videos side by side below the widgets, in the space images take; audio players (none that Loom's nodes make
// together with a video) go below them. Returns where the space below the videos starts.
function drawVideos(node, ctx, urls, audioRows) {
  const top = widgetsBottom(node);
  const below = audioRows ? AUDIO_ROW * audioRows + 6 : 0;
  grow(node, top + IMAGE_AREA + below);
  const height = node.size[1] - top - 10 - below;
  const cell = (node.size[0] - 20) / urls.length;
  placePlayers(node, ctx, "video", urls, (i) => [10 + i * cell, top, cell - (i < urls.length - 1 ? 4 : 0), height]);
  return top + height + 10;
}

// Called after every frame the canvas draws: hide the players no node drew.
export function endPlayerFrame() {
  for (const kinds of players.values()) {
    for (const player of [...kinds.audio, ...kinds.video]) if (player.frame !== frame) player.style.display = "none";
  }
  frame += 1;
}

function removePlayers(node) {
  const kinds = players.get(node.id);
  for (const player of kinds ? [...kinds.audio, ...kinds.video] : []) {
    player.pause();
    player.remove();
  }
  players.delete(node.id);
}

// Where `image` shows, fitted into `area` ({x, y, w, h}) and centred: [x, y, w, h].
function fit(image, area) {
  const scale = Math.min(area.w / image.naturalWidth, area.h / image.naturalHeight);
  const [w, h] = [image.naturalWidth * scale, image.naturalHeight * scale];
  return [area.x + (area.w - w) / 2, area.y + (area.h - h) / 2, w, h];
}

function drawClipped(ctx, image, area, left, right) {
  ctx.save();
  ctx.beginPath();
  ctx.rect(left, area.y, right - left, area.h);
  ctx.clip();
  ctx.drawImage(image, ...fit(image, area));
  ctx.restore();
}

// ImageCompare's pictures, as ComfyUI's compare widget shows them: A left of a vertical line, B right of it; the
// line follows the pointer over the pictures (followPointer) and stays where it was left. One alone shows whole.
function drawCompare(node, ctx, compare) {
  const top = widgetsBottom(node);
  grow(node, top + IMAGE_AREA);
  const area = { x: 10, y: top, w: node.size[0] - 20, h: node.size[1] - top - 10 };
  node.compareArea = area;
  const [a, b] = [compare.a, compare.b].map((image) => (image && image.complete && image.naturalWidth ? image : null));
  if (!a || !b) {
    if (a || b) ctx.drawImage(a || b, ...fit(a || b, area));
    return;
  }
  const split = area.x + area.w * (node.compareSplit ?? 0.5);
  drawClipped(ctx, a, area, area.x, split);
  drawClipped(ctx, b, area, split, area.x + area.w);
  const [, y, , h] = fit(a, area);
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 2;
  ctx.beginPath();
  ctx.moveTo(split, y);
  ctx.lineTo(split, y + h);
  ctx.stroke();
}

// The pointer at node position `pos` moves the compare line when it is over the pictures.
function followPointer(node, pos) {
  const area = node.compareArea;
  const output = runState.outputs[String(node.id)];
  if (!area || !output || !output.compare) return;
  const [x, y] = pos;
  if (x < area.x || x > area.x + area.w || y < area.y || y > area.y + area.h) return;
  node.compareSplit = (x - area.x) / area.w;
  node.setDirtyCanvas(true, false);
}

function drawState(node, ctx) {
  const id = String(node.id);
  const [w, h] = node.size;
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  ctx.save();
  if (runState.cached.has(id)) {
    ctx.fillStyle = "#2a4a7a";
    ctx.fillRect(w - 58, -title + 6, 52, 16);
    ctx.fillStyle = "#cde";
    ctx.font = "11px sans-serif";
    ctx.textAlign = "center";
    ctx.fillText("cached", w - 32, -title + 18);
  }
  if (runState.running === id) {
    ctx.strokeStyle = "#3f3";
    ctx.lineWidth = 3;
    ctx.strokeRect(-3, -title - 3, w + 6, h + title + 6);
    const p = runState.progress;
    if (p && p.node === id && p.max) {
      ctx.fillStyle = "#3f3";
      ctx.fillRect(0, -title - 1, (w * p.value) / p.max, 5);
    }
  }
  if (node.mode === 2 || node.mode === 4) { // muted or bypassed: left out of the run
    ctx.fillStyle = node.mode === 4 ? "#a040c055" : "#00000088";
    ctx.fillRect(0, -title, w, h + title);
  }
  const errors = runState.errors[id];
  if (errors) {
    ctx.strokeStyle = "#f33";
    ctx.lineWidth = 3;
    ctx.strokeRect(-3, -title - 3, w + 6, h + title + 6);
    for (const error of errors) {
      const slot = node.inputs ? node.inputs.findIndex((i) => i.name === error.input) : -1;
      if (slot >= 0) {
        ctx.beginPath();
        ctx.arc(0, 0 + (slot + 0.7) * LiteGraph.NODE_SLOT_HEIGHT, 8, 0, Math.PI * 2);
        ctx.stroke();
      }
      const widget = (node.widgets || []).find((x) => x.name === error.input);
      if (widget && widget.last_y !== undefined) ctx.strokeRect(12, widget.last_y - 1, w - 24, 22);
    }
    ctx.fillStyle = "#f66";
    ctx.font = "12px sans-serif";
    ctx.textAlign = "left";
    errors.slice(0, 6).forEach((e, i) => ctx.fillText(e.text, 0, h + 16 + i * 15));
  }
  const preview = runState.preview;
  const output = runState.outputs[id];
  const audio = (output && output.audio) || [];
  let audioTop = null; // below the widgets, or below the node's videos
  if (preview && preview.node === id) drawImages(node, ctx, [preview.image]);
  else if (output && output.images.length) drawImages(node, ctx, output.images);
  else if (output && output.video && output.video.length) audioTop = drawVideos(node, ctx, output.video, audio.length);
  else if (output && output.compare) drawCompare(node, ctx, output.compare);
  if (audio.length) drawAudio(node, ctx, audio, audioTop ?? widgetsBottom(node));
  if (output && output.text.length) {
    ctx.fillStyle = "#ccc";
    ctx.font = "13px monospace";
    ctx.textAlign = "left";
    const top = widgetsBottom(node) + 14;
    const lines = output.text.join("\n").split("\n").slice(0, 8);
    grow(node, top + lines.length * 16);
    lines.forEach((line, i) => ctx.fillText(line.slice(0, 60), 10, top + i * 16));
  }
  ctx.restore();
}

export function registerNodeTypes(objectInfo) {
  LiteGraph.clearRegisteredTypes();
  registerVirtualTypes();
  for (const [name, def] of Object.entries(objectInfo)) {
    class LoomNode extends LGraphNode {
      constructor(title) {
        super(title || def.display_name || name);
        this.serialize_widgets = true;
        addInputs(this, def);
        def.output.forEach((type, i) => {
          this.addOutput(def.output_name[i] || type, type === "*" ? "*" : type);
        });
        this.size = this.computeSize();
        this.size[0] = Math.max(this.size[0], 280);
      }

      // A node with dynamic combos reads its widgets_values itself: litegraph's would put them by position into
      // the default choice's layout.
      configure(info) {
        if (!this.choiceWidgets && !this.choiceSockets) return super.configure(info);
        super.configure({ ...info, widgets_values: undefined });
        restoreWidgetValues(this, info.widgets_values);
      }

      onSerialize(o) {
        if (o.widgets_values) o.widgets_values = o.widgets_values.filter((_, i) => !this.widgets[i].asleep);
      }

      onDrawForeground(ctx) {
        drawState(this, ctx);
      }

      onMouseMove(_event, pos) {
        followPointer(this, pos);
      }

      onRemoved() {
        removePlayers(this);
      }

      onConnectionsChange(kind, slot, connected) {
        if (kind === LiteGraph.INPUT && connected) growInputs(this);
      }

      getExtraMenuOptions() {
        return conversionMenu(this);
      }
    }
    LoomNode.title = def.display_name || name;
    LoomNode.comfyClass = name;
    LoomNode.nodeData = def;
    LiteGraph.registerNodeType(name, LoomNode);
    LoomNode.category = def.category;
  }
}

function loadImage(item) {
  const image = new Image();
  image.src = viewUrl(item);
  image.dataset.url = image.src;
  return image;
}

// A file of a UI output's `images` that is a video (SaveVideo's MP4, SaveWEBM's WebM: ComfyUI lists them there, with
// `animated`), told by its suffix; animated WEBP and PNG files are pictures.
const VIDEO_SUFFIX = /\.(mp4|webm)$/i; // the videos /view serves to play inline (web/files.py)

export function isVideo(item) {
  return VIDEO_SUFFIX.test(item.filename || "");
}

// A node's UI output: SaveImage's `images` (the videos among them play in players), text, ImageCompare's `a_images`
// and `b_images` (the first of each is compared), or SaveAudio's `audio` (a player each). Returns every image it
// loads and the URL of every video.
export function setOutput(nodeId, output) {
  const items = output.images || [];
  const images = items.filter((item) => !isVideo(item)).map(loadImage);
  const video = items.filter(isVideo).map(viewUrl);
  const text = (output.text || output.value || []).map((t) => String(t));
  const [a, b] = [output.a_images, output.b_images].map((list) => (list && list.length ? loadImage(list[0]) : null));
  const compare = a || b ? { a, b } : null;
  const audio = (output.audio || []).map(viewUrl);
  runState.outputs[String(nodeId)] = { images, text, compare, audio, video };
  return { images: [...images, ...[a, b].filter(Boolean)], video };
}
