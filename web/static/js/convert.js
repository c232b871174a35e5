// ComfyUI's "convert to input": a widget becomes an input socket, so that a link (a primitive, any node's output)
// drives the value; and back. The widget keeps its place in widgets_values while it is hidden. A link dropped on
// a widget converts it too.

const CONVERTIBLE = new Set(["number", "combo", "text", "toggle", "multiline"]);

function convertible(widget) {
  return CONVERTIBLE.has(widget.type) && widget.name !== "control_after_generate";
}

// A widget driven by a link (ComfyUI's "converted widget"): it keeps its place in widgets_values but is not drawn.
export function hideWidget(widget) {
  if (widget.type === "converted-widget") return;
  widget.shown = { type: widget.type, draw: widget.draw, computeSize: widget.computeSize, mouse: widget.mouse };
  widget.type = "converted-widget";
  widget.draw = () => {};
  widget.computeSize = () => [0, -4];
  delete widget.mouse;
}

export function showWidget(widget) {
  if (!widget.shown) return;
  Object.assign(widget, widget.shown);
  for (const key of ["draw", "computeSize", "mouse"]) if (!widget[key]) delete widget[key];
  delete widget.shown;
}

// The type of the socket: the input's own type, or COMBO for a list of choices (as ComfyUI names it).
export function socketType(node, name) {
  const def = node.constructor.nodeData;
  const spec = def && { ...def.input.required, ...def.input.optional }[name];
  if (!spec) return "*";
  return Array.isArray(spec[0]) ? "COMBO" : spec[0];
}

// litegraph resizes a node to its minimum whenever a socket comes or goes: keep the width the user had.
function keepingWidth(node, change) {
  const width = node.size[0];
  change();
  node.setSize(node.computeSize());
  node.size[0] = Math.max(node.size[0], width);
  node.setDirtyCanvas(true, true);
}

export function convertToInput(node, widget) {
  keepingWidth(node, () => {
    hideWidget(widget);
    node.addInput(widget.name, socketType(node, widget.name), { widget: { name: widget.name } });
  });
}

export function convertToWidget(node, slot) {
  const input = node.inputs[slot];
  const widget = (node.widgets || []).find((w) => w.name === input.widget.name);
  keepingWidth(node, () => {
    if (input.link != null) node.disconnectInput(slot);
    node.removeInput(slot);
    if (widget) showWidget(widget);
  });
}

// The widget drawn at graph position (x, y) of the node, if it can become an input (only the server's node types
// have widgets that are inputs: not a Note, nor a Primitive).
export function convertibleWidgetAt(node, x, y) {
  if (!node.constructor.nodeData) return undefined;
  const top = y - node.pos[1];
  return (node.widgets || []).find((w) => {
    if (!convertible(w) || w.last_y === undefined) return false;
    const height = w.computeSize ? w.computeSize(node.size[0])[1] : LiteGraph.NODE_WIDGET_HEIGHT;
    return top >= w.last_y && top < w.last_y + height;
  });
}

// A link dropped on a widget: the widget becomes an input, which output `slot` of `origin` then drives.
// (The caller checks that the types fit: socketType.)
export function linkToWidget(origin, slot, node, widget) {
  convertToInput(node, widget);
  return origin.connect(slot, node, widget.name);
}

// The node's context-menu entries: one per widget that can become an input, one per input that was a widget.
// (null when there are none)
export function conversionMenu(node) {
  const entries = [];
  for (const widget of node.widgets || []) {
    if (!convertible(widget)) continue;
    entries.push({ content: `Convert ${widget.name} to input`, callback: () => convertToInput(node, widget) });
  }
  (node.inputs || []).forEach((input, slot) => {
    if (!input.widget) return;
    entries.push({ content: `Convert ${input.name} to widget`, callback: () => convertToWidget(node, slot) });
  });
  return entries.length ? entries : null; // litegraph adds a separator after any list it gets
}
