// Editor extension of the example pack, served at /extensions/loom_example_pack/swatch.js and
// listed by GET /extensions. It adds a stylesheet, then colours SWATCH links when the editor
// offers ComfyUI's extension hook (app.registerExtension); without it, it does nothing more.
const style = document.createElement("link");
style.rel = "stylesheet";
style.href = new URL("./swatch.css", import.meta.url).href;
document.head.appendChild(style);

const app = window.loom?.app ?? window.app;
app?.registerExtension?.({
  name: "loom_example_pack.swatch",
  // Socket colours by type name, as ComfyUI's `app.canvas.default_connection_color_byType`.
  async setup(editor) {
    const colours = editor?.canvas?.default_connection_color_byType;
    if (colours) colours.SWATCH = "#ff8800";
  },
  async nodeCreated(node) {
    if (node.comfyClass === "ExampleSwatch") node.color = "#5a3a10";
  },
});
