// Editor-only node types of ComfyUI files (Note, Reroute, PrimitiveNode): drawn here, resolved by the server.

function noteType(name) {
  class Note extends LGraphNode {
    constructor(title) {
      super(title || name);
      this.addWidget("text", "text", "", null, { multiline: true });
      this.color = "#432";
      this.bgcolor = "#653";
      this.size = [300, 80];
    }
  }
  Note.title = name;
  return Note;
}

class Reroute extends LGraphNode {
  constructor(title) {
    super(title || "Reroute");
    this.addInput("", "*");
    this.addOutput("", "*");
    this.size = [75, 26];
  }
}

// A value that drives widget inputs of other nodes. Linked to a converted widget, it takes on that widget (type,
// choices, value) so the value is edited here; the server reads it from widgets_values.
class PrimitiveNode extends LGraphNode {
  constructor(title) {
    super(title || "Primitive");
    this.addOutput("connect to widget input", "*");
    this.values = [];
    this.size = [220, 60];
  }

  onConfigure(info) {
    this.values = info.widgets_values || [];
    setTimeout(() => this.adoptTarget(), 0); // the nodes it links to are configured after it
  }

  onConnectionsChange(type, _slot, connected) {
    if (type === LiteGraph.OUTPUT && connected) this.adoptTarget();
  }

  // The widget behind the first linked input, if that input was converted from a widget.
  targetWidget() {
    for (const id of this.outputs[0].links || []) {
      const link = this.graph && this.graph.links[id];
      const node = link && this.graph.getNodeById(link.target_id);
      const input = node && node.inputs[link.target_slot];
      const widget = input && input.widget && (node.widgets || []).find((w) => w.name === input.widget.name);
      if (widget) return { input, widget };
    }
    return null;
  }

  adoptTarget() {
    const target = this.targetWidget();
    if (!target || this.widgets?.length) return;
    const { input, widget } = target;
    const kind = (widget.shown || widget).type;
    const value = this.values.length ? this.values[0] : widget.value;
    this.addWidget(kind === "multiline" ? "text" : kind, input.name, value, null, { ...widget.options });
    this.outputs[0].type = input.type;
    this.outputs[0].name = input.type;
    this.size = [Math.max(this.size[0], 220), this.computeSize()[1]];
    this.setDirtyCanvas(true, true);
  }

  onSerialize(o) {
    o.widgets_values = this.widgets?.length ? [this.widgets[0].value, ...this.values.slice(1)] : this.values;
  }

  onDrawForeground(ctx) {
    if (this.widgets?.length) return;
    ctx.fillStyle = "#ccc";
    ctx.font = "13px sans-serif";
    ctx.fillText(`value: ${JSON.stringify(this.values[0]).slice(0, 40)}`, 10, 46);
  }
}

export function registerVirtualTypes() {
  for (const [name, ctor] of [["Note", noteType("Note")], ["MarkdownNote", noteType("MarkdownNote")],
    ["Reroute", Reroute], ["PrimitiveNode", PrimitiveNode]]) {
    LiteGraph.registerNodeType(name, ctor);
    ctor.category = "utils";
  }
}
