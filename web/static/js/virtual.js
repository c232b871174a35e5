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

// A value that drives widget inputs of other nodes; its widgets_values are kept as they were.
class PrimitiveNode extends LGraphNode {
  constructor(title) {
    super(title || "Primitive");
    this.addOutput("connect to widget input", "*");
    this.values = [];
    this.size = [220, 60];
  }

  onConfigure(info) {
    this.values = info.widgets_values || [];
  }

  onSerialize(o) {
    o.widgets_values = this.values;
  }

  onDrawForeground(ctx) {
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
