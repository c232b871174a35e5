"""The editor in real headless Chromium: open, load a graph, edit a widget, queue, see the image; wire by dragging.

The server runs the real SD nodes on a tiny random-weight checkpoint saved as the demo model's name.
"""

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.web.test_restart import ROOT, Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)

WORKFLOW = {
    "1": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a cat"}, "_meta": {"pos": [40, 40]}},
    "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}, "_meta": {"pos": [380, 40]}},
    "3": {"class_type": "SaveTestImage", "inputs": {"value": 200, "filename_prefix": "browser"},
          "_meta": {"pos": [40, 260]}},
    "4": {"class_type": "PrimitiveInt", "inputs": {"value": 3}, "_meta": {"pos": [380, 300]}},
    "5": {"class_type": "SlowPreview", "inputs": {"value": ["4", 0], "steps": 40, "delay": 0.02},
          "_meta": {"pos": [660, 300]}},
    "6": {"class_type": "Sink", "inputs": {"value": ["5", 0]}, "_meta": {"pos": [980, 300]}},
}


DEMO_MODEL = "loom-demo.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ldm.presets import make_checkpoint

    base = tmp_path_factory.mktemp("browser")
    make_checkpoint("tiny-sd1", base / "models" / "checkpoints" / DEMO_MODEL)
    server = Server(base)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 860})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url("/"))
    page.wait_for_selector("body[data-ready=true]", timeout=20000)
    yield page
    page.close()
    assert not errors, errors


def drag(page, start, end, hover=None):
    """Drag from `start` to `end`; `hover(page)` runs while the button is still down over `end`."""
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=5)
    page.mouse.move(*end, steps=5)
    if hover is not None:
        hover(page)
    page.mouse.up()


def outlined_widget(page):
    """The widget the editor outlines under a dragged link, after the next frame: {node, widget, fits} or None."""
    page.evaluate("loom.editor.canvas.draw(true, true)")
    return page.evaluate("loom.editor.canvas.highlighted_widget")


def test_default_graph_edit_queue_and_see_the_image(page, server, tmp_path):
    nodes = page.evaluate("loom.editor.graph._nodes.map(n => n.type)")
    assert nodes, "a default graph is shown on first open"
    page.screenshot(path=ARTIFACTS / "editor-default.png")

    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(WORKFLOW))
    page.set_input_files("#file-input", str(path))
    page.wait_for_function("loom.editor.graph._nodes.length === 6")

    # Edit the multiline text by clicking its widget on the canvas.
    x, y = page.evaluate("loom.editor.screenPos(1, 'widget', 'value')")
    page.mouse.click(x, y)
    page.wait_for_selector("#text-editor[open]")
    page.fill("#text-editor textarea", "a dog on a skateboard")
    page.click("#text-editor button[value=ok]")
    page.wait_for_function("loom.editor.node(1).widgets[0].value === 'a dog on a skateboard'")

    page.click("#queue-button")
    page.wait_for_function("loom.runState.running === '5' && loom.runState.preview", timeout=20000)
    page.screenshot(path=ARTIFACTS / "editor-running.png")
    page.wait_for_selector(".output-image img", timeout=20000)
    page.wait_for_function("document.querySelector('.output-image img').naturalWidth > 0")
    page.wait_for_function("(loom.runState.outputs['2'] || {text: []}).text[0] === 'a dog on a skateboard'",
                           timeout=20000)
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=20000)
    page.wait_for_timeout(300)
    page.screenshot(path=ARTIFACTS / "editor-result.png")
    history = server.call("/history")
    (entry,) = history.values()
    assert entry["prompt"][2]["1"]["inputs"]["value"] == "a dog on a skateboard"
    assert entry["status"]["status_str"] == "success"

    # The same graph again: everything comes from the cache, and every node says so.
    page.click("#queue-button")
    page.wait_for_function("loom.runState.cached.size === 6", timeout=20000)
    assert sorted(page.evaluate("[...loom.runState.cached]")) == sorted(WORKFLOW)
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=20000)
    page.screenshot(path=ARTIFACTS / "editor-cached.png")


def test_wire_two_nodes_by_dragging_and_refuse_a_mismatch(page):
    page.click("#clear-button")
    page.fill("#library-search", "Int")
    page.click(".library-item[data-type=PrimitiveInt]")
    page.fill("#library-search", "preview any")
    page.click(".library-item[data-type=PreviewAny]")
    page.fill("#library-search", "string")
    page.click(".library-item[data-type=PrimitiveString]")
    page.fill("#library-search", "scale")
    page.click(".library-item[data-type=Scale]")
    ids = page.evaluate("loom.editor.graph._nodes.map(n => n.id)")
    assert len(ids) == 4
    # Spread them out so that slots do not overlap.
    page.evaluate("""ids => { const g = loom.editor.graph; const at = [[60, 80], [460, 80], [60, 320], [460, 320]];
        ids.forEach((id, i) => { g.getNodeById(id).pos = at[i]; }); loom.editor.fitView(); }""", ids)
    page.wait_for_timeout(100)
    int_node, preview, string_node, scale = ids
    drag(page, page.evaluate(f"loom.editor.screenPos({int_node}, 'output', 0)"),
         page.evaluate(f"loom.editor.screenPos({preview}, 'input', 0)"))
    assert page.evaluate(f"loom.editor.node({preview}).inputs[0].link") is not None
    # STRING into an INT socket is refused.
    drag(page, page.evaluate(f"loom.editor.screenPos({string_node}, 'output', 0)"),
         page.evaluate(f"loom.editor.screenPos({scale}, 'input', 0)"))
    assert page.evaluate(f"loom.editor.node({scale}).inputs[0].link") is None
    assert page.evaluate("Object.keys(loom.editor.graph.links).length") == 1
    page.screenshot(path=ARTIFACTS / "editor-wired.png")

    # Copy, paste and delete with the keyboard.
    x, y = page.evaluate(f"loom.editor.screenPos({scale}, 'widget', 'factor')")
    page.mouse.click(x - 60, y - 50)  # the node's title: selects it
    page.keyboard.press("Control+c")
    page.mouse.move(x + 100, y + 150)
    page.keyboard.press("Control+v")
    page.wait_for_function("loom.editor.graph._nodes.length === 5")
    page.keyboard.press("Delete")
    page.wait_for_function("loom.editor.graph._nodes.length === 4")


def test_validation_errors_are_shown_on_the_node(page):
    page.click("#clear-button")
    page.fill("#library-search", "scale")
    page.click(".library-item[data-type=Scale]")
    page.fill("#library-search", "preview any")
    page.click(".library-item[data-type=PreviewAny]")
    page.evaluate("""() => { const [a, b] = loom.editor.graph._nodes; a.pos = [60, 80]; b.pos = [460, 80];
        a.connect(0, b, 0); loom.editor.fitView(); }""")
    page.click("#queue-button")
    page.wait_for_selector(".toast.error")
    errors = page.evaluate("loom.runState.errors")
    (scale_errors,) = errors.values()
    assert scale_errors[0]["input"] == "value"
    page.screenshot(path=ARTIFACTS / "editor-errors.png")


def test_save_native_format_then_open_it_and_a_png(page, tmp_path):
    with page.expect_download() as download:
        page.click("#save-button")
    saved = tmp_path / "saved.json"
    download.value.save_as(saved)
    doc = json.loads(saved.read_text())
    assert doc and all("class_type" in n and "pos" in n["_meta"] for n in doc.values())
    count = len(doc)

    page.click("#clear-button")
    page.set_input_files("#file-input", str(saved))
    page.wait_for_function(f"loom.editor.graph._nodes.length === {count}")

    # A PNG as SaveImage writes it: the editor's graph in a `workflow` tEXt chunk.
    from PIL import Image, PngImagePlugin

    ui = page.evaluate("JSON.stringify(loom.editor.graph.serialize())")
    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", ui)
    info.add_text("prompt", json.dumps(doc))
    png = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    page.click("#clear-button")
    page.set_input_files("#file-input", str(png))
    page.wait_for_function(f"loom.editor.graph._nodes.length === {count}")
    assert not page.query_selector(".toast.error")


def test_upload_an_image_through_the_widget(page, server, tmp_path):
    from PIL import Image

    picture = tmp_path / "picture.png"
    Image.new("RGB", (24, 16), (30, 160, 220)).save(picture)
    workflow = tmp_path / "upload.json"
    workflow.write_text(json.dumps({
        "1": {"class_type": "LoadTestImage", "inputs": {}, "_meta": {"pos": [60, 60], "size": [260, 260]}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}, "_meta": {"pos": [420, 60]}},
    }))
    page.set_input_files("#file-input", str(workflow))
    page.wait_for_function("loom.editor.graph._nodes.length === 2")
    x, y = page.evaluate("loom.editor.screenPos(1, 'widget', 'choose file to upload')")
    with page.expect_file_chooser() as chooser:
        page.mouse.click(x, y)
    chooser.value.set_files(str(picture))
    page.wait_for_function("loom.editor.node(1).widgets[0].value === 'picture.png'")
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['2'] || {text: []}).text[0] === '24'", timeout=20000)
    page.wait_for_timeout(200)
    page.screenshot(path=ARTIFACTS / "editor-upload.png")


def test_load_image_output_uploads_into_and_shows_from_the_output_folder(page, server, tmp_path):
    """LoadImageOutput's widget reads output/: an upload through it lands there, and its preview is fetched from
    there (the editor used to upload into input/ and look there, where the node does not read)."""
    from PIL import Image

    picture = tmp_path / "made-before.png"
    Image.new("RGB", (40, 16), (220, 60, 30)).save(picture)
    workflow = tmp_path / "output-image.json"
    workflow.write_text(json.dumps({
        "1": {"class_type": "LoadImageOutput", "inputs": {}, "_meta": {"pos": [60, 60], "size": [260, 300]}},
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}, "_meta": {"pos": [420, 60]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}, "_meta": {"pos": [700, 60]}},
    }))
    page.set_input_files("#file-input", str(workflow))
    page.wait_for_function("loom.editor.graph._nodes.length === 3")
    x, y = page.evaluate("loom.editor.screenPos(1, 'widget', 'choose file to upload')")
    with page.expect_file_chooser() as chooser:
        page.mouse.click(x, y)
    chooser.value.set_files(str(picture))
    page.wait_for_function("loom.editor.node(1).widgets[0].value === 'made-before.png'")
    assert (server.base / "output" / "made-before.png").is_file()
    assert not (server.base / "input" / "made-before.png").exists()
    page.wait_for_function("(loom.runState.outputs['1'] || {images: []}).images.some(i => i.naturalWidth === 40)")
    assert "type=output" in page.evaluate("loom.runState.outputs['1'].images[0].src")
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['3'] || {text: []}).text[0] === '40'", timeout=20000)


def set_text(page, node_id, name, text):
    """Edit a multiline widget as a user does: click it, type in the dialog, OK."""
    x, y = page.evaluate(f"loom.editor.screenPos({node_id}, 'widget', '{name}')")
    page.mouse.click(x, y)
    page.wait_for_selector("#text-editor[open]")
    page.fill("#text-editor textarea", text)
    page.click("#text-editor button[value=ok]")
    page.wait_for_function(f"loom.editor.node({node_id}).widgets.find(w => w.name === '{name}').value === {text!r}")


def wait_done(page):
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=60000)


def test_default_txt2img_graph_runs_on_the_demo_model_and_its_png_restores_the_graph(page, server):
    txt2img = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    types = sorted(page.evaluate("loom.editor.graph._nodes.map(n => n.type)"))
    assert types == sorted(n["class_type"] for n in txt2img.values())
    widget = "([id, name]) => loom.editor.node(id).widgets.find(w => w.name === name).value"
    assert page.evaluate(widget, [4, "ckpt_name"]) == DEMO_MODEL
    assert page.evaluate(widget, [6, "text"]) == txt2img["6"]["inputs"]["text"]
    assert (page.evaluate(widget, [5, "width"]), page.evaluate(widget, [5, "height"])) == (64, 64)
    page.screenshot(path=ARTIFACTS / "txt2img-default.png")

    set_text(page, 6, "text", "a red fox in the snow")
    page.evaluate("loom.editor.node(3).widgets.find(w => w.name === 'steps').value = 3")
    # The executing messages, recorded as they arrive: a busy server can send a node's start and end in
    # one burst, so a poll of runState.running could miss node 3's turn.
    page.evaluate("""() => {
      window.executed = [];
      const onMessage = loom.editor.onMessage.bind(loom.editor);
      loom.editor.onMessage = (type, data) => {
        if (type === "executing" && data.node !== null) window.executed.push(String(data.node));
        onMessage(type, data);
      };
    }""")
    page.click("#queue-button")
    page.wait_for_function("window.executed.includes('3')", timeout=60000)
    page.screenshot(path=ARTIFACTS / "txt2img-sampling.png")
    page.wait_for_function("(loom.runState.outputs['9'] || {images: []}).images.some(i => i.naturalWidth === 64)",
                           timeout=60000)
    wait_done(page)
    page.screenshot(path=ARTIFACTS / "txt2img-result.png")
    history = server.call("/history").values()
    (entry,) = [h for h in history if h["prompt"][2].get("3", {}).get("class_type") == "KSampler"]
    assert entry["status"]["status_str"] == "success"
    assert entry["prompt"][2]["6"]["inputs"]["text"] == "a red fox in the snow"
    assert entry["prompt"][2]["3"]["inputs"]["steps"] == 3
    (png,) = (server.base / "output").glob("txt2img_*.png")

    # Another prompt: the loader, the negative prompt and the empty latent come from the cache, and say so.
    set_text(page, 6, "text", "a grey wolf in the snow")
    page.click("#queue-button")
    page.wait_for_function("loom.runState.cached.size === 3", timeout=60000)
    wait_done(page)
    assert sorted(page.evaluate("[...loom.runState.cached]")) == ["4", "5", "7"]
    page.screenshot(path=ARTIFACTS / "txt2img-cached.png")

    # Opening the saved PNG restores the graph it was made with.
    page.click("#clear-button")
    page.set_input_files("#file-input", str(png))
    page.wait_for_function("loom.editor.graph._nodes.length === 7")
    assert page.evaluate(widget, [6, "text"]) == "a red fox in the snow"


@pytest.fixture
def demo_model_missing(server):
    """The demo checkpoint moved out of models/ while one test's page opens and runs (before `page`)."""
    path = server.base / "models" / "checkpoints" / DEMO_MODEL
    away = server.base / DEMO_MODEL
    path.rename(away)
    yield
    away.rename(path)


def test_default_graph_without_the_demo_model_opens_and_queue_marks_the_loader(demo_model_missing, page):
    assert page.evaluate("loom.editor.graph._nodes.length") == 7
    page.click("#queue-button")
    page.wait_for_selector(".toast.error")
    errors = page.evaluate("loom.runState.errors")
    assert list(errors) == ["4"] and errors["4"][0]["input"] == "ckpt_name"
    assert DEMO_MODEL in errors["4"][0]["text"]
    assert page.text_content("#status") == "not queued"
    page.screenshot(path=ARTIFACTS / "txt2img-missing-model.png")


def test_examples_menu_opens_an_example_workflow(page):
    names = page.evaluate("[...document.querySelectorAll('#examples-menu option')].map(o => o.value)")
    assert names[0] == "" and "img2img" in names and "txt2img" in names
    page.select_option("#examples-menu", "img2img")
    img2img = json.loads((ROOT / "workflows" / "img2img.json").read_text())
    page.wait_for_function(f"loom.editor.graph._nodes.length === {len(img2img)}")
    assert sorted(page.evaluate("loom.editor.graph._nodes.map(n => n.type)")) == sorted(
        n["class_type"] for n in img2img.values())
    assert page.evaluate("document.querySelector('#examples-menu').value") == ""
    assert not page.query_selector(".toast.error")
    page.screenshot(path=ARTIFACTS / "editor-example-img2img.png")


COMFY_UI_FILE = {
    "last_node_id": 14, "last_link_id": 3, "version": 0.4,
    "nodes": [
        {"id": 10, "type": "PrimitiveNode", "pos": [40, 60], "size": [220, 80], "mode": 0, "flags": {}, "order": 0,
         "outputs": [{"name": "INT", "type": "INT", "links": [1], "widget": {"name": "a"}}],
         "widgets_values": [7, "fixed"], "properties": {"Run widget replace on values": False}},
        {"id": 11, "type": "IntMath", "pos": [320, 60], "size": [280, 120], "mode": 0, "flags": {}, "order": 1,
         "inputs": [{"name": "a", "type": "INT", "link": 1, "widget": {"name": "a"}},
                    {"name": "b", "type": "INT", "link": None, "widget": {"name": "b"}}],
         "outputs": [{"name": "INT", "type": "INT", "links": [2]}],
         "widgets_values": [0, 5, "multiply"], "properties": {}},
        {"id": 12, "type": "Reroute", "pos": [660, 60], "size": [75, 26], "mode": 0, "flags": {}, "order": 2,
         "inputs": [{"name": "", "type": "*", "link": 2}], "outputs": [{"name": "", "type": "INT", "links": [3]}],
         "properties": {}},
        {"id": 13, "type": "PreviewAny", "pos": [800, 60], "size": [280, 80], "mode": 0, "flags": {}, "order": 3,
         "inputs": [{"name": "source", "type": "*", "link": 3}], "properties": {}},
        {"id": 14, "type": "Note", "pos": [320, 260], "size": [300, 80], "mode": 0, "flags": {}, "order": 4,
         "widgets_values": ["made in ComfyUI"], "properties": {}},
    ],
    "links": [[1, 10, 0, 11, 0, "INT"], [2, 11, 0, 12, 0, "INT"], [3, 12, 0, 13, 0, "*"]],
    "groups": [], "config": {}, "extra": {},
}


def test_open_a_comfyui_file_with_virtual_nodes_and_queue_it(page, tmp_path):
    path = tmp_path / "comfy.json"
    path.write_text(json.dumps(COMFY_UI_FILE))
    page.set_input_files("#file-input", str(path))
    page.wait_for_function("loom.editor.graph._nodes.length === 5")
    assert page.evaluate("loom.editor.node(11).inputs.map(i => i.name)") == ["a"]  # the unlinked widget socket goes
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['13'] || {text: []}).text[0] === '35'", timeout=20000)
    assert not page.query_selector(".toast.error")
    page.screenshot(path=ARTIFACTS / "editor-comfyui-file.png")


def slow_workflow(steps):
    return {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 1}, "_meta": {"pos": [40, 40]}},
            "2": {"class_type": "SlowPreview", "inputs": {"value": ["1", 0], "steps": steps, "delay": 0.05},
                  "_meta": {"pos": [340, 40]}},
            "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}, "_meta": {"pos": [680, 40]}}}


def open_workflow(page, tmp_path, doc, name="workflow.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    page.set_input_files("#file-input", str(path))
    page.wait_for_function(f"loom.editor.graph._nodes.length === {len(doc)}")


def wait_until_idle(server, page, timeout=30.0):
    """Until the server runs and holds no prompt, and the page's queue panel says so.

    An earlier test's run whose outputs the page already showed may still be finishing, and its history
    entry would land after a clear. And until the panel has drawn the queue, its first drawing can move the
    history's Clear button (below the queue) out from under a click between press and release: the click
    then reaches no button and is lost.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = server.call("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            page.wait_for_selector("#queue-list .empty", timeout=timeout * 1000)
            return
        time.sleep(0.05)
    raise AssertionError(f"the server is still busy: {queue}")


def test_queue_panel_cancel_interrupt_history_thumbnail_and_load_back(page, server, tmp_path):
    wait_until_idle(server, page)
    page.click("#clear-history-button")
    page.wait_for_selector("#history-list .empty")
    assert server.call("/history") == {}

    # A long run, then a second prompt behind it: the first shows as running, the second as pending.
    open_workflow(page, tmp_path, slow_workflow(400))
    page.click("#queue-button")
    page.wait_for_selector("#queue-list .entry.running")
    page.click("#queue-button")
    page.wait_for_selector("#queue-list .entry.pending")
    page.screenshot(path=ARTIFACTS / "queue-panel-pending.png")
    pending = page.get_attribute("#queue-list .entry.pending", "data-prompt-id")
    page.click("#queue-list .entry.pending .entry-action")  # cancel it
    page.wait_for_selector("#queue-list .entry.pending", state="detached")
    page.click("#queue-list .entry.running .entry-action")  # interrupt the running one
    page.wait_for_selector("#history-list .entry.interrupted")
    page.wait_for_selector("#queue-list .empty")
    assert pending not in server.call("/history")

    # A run with an image: its history entry has a thumbnail, and a click loads its graph back.
    open_workflow(page, tmp_path, WORKFLOW)
    set_text(page, 1, "value", "from the history")
    page.click("#queue-button")
    page.wait_for_selector("#history-list .entry.success img.thumb")
    page.wait_for_function("document.querySelector('#history-list .entry.success img.thumb').naturalWidth > 0")
    assert page.text_content("#history-list .entry:first-child .entry-state") == "success"
    page.screenshot(path=ARTIFACTS / "queue-panel-history.png")
    page.click("#clear-button")
    assert page.evaluate("loom.editor.graph._nodes.length") == 0
    page.click("#history-list .entry.success")
    page.wait_for_function(f"loom.editor.graph._nodes.length === {len(WORKFLOW)}")
    assert page.evaluate("loom.editor.node(1).widgets[0].value") == "from the history"
    page.click("#history-list .entry.interrupted")
    page.wait_for_function("loom.editor.graph._nodes.length === 3")
    assert sorted(page.evaluate("loom.editor.graph._nodes.map(n => n.type)")) == ["PrimitiveInt", "Sink",
                                                                                   "SlowPreview"]

    # Delete one entry, then clear the rest.
    page.click("#history-list .entry.interrupted .entry-action")
    page.wait_for_selector("#history-list .entry.interrupted", state="detached")
    assert [h["status"]["status_str"] for h in server.call("/history").values()] == ["success"]
    page.click("#clear-history-button")
    page.wait_for_selector("#history-list .empty")
    assert server.call("/history") == {}


def click_menu(page, x, y, entry):
    """Open a node's context menu at (x, y) and pick an entry by its text."""
    page.mouse.click(x, y, button="right")
    page.click(f".litecontextmenu .litemenu-entry:text-is('{entry}')")


def test_convert_a_widget_to_an_input_and_drive_it_with_a_link(page, tmp_path):
    open_workflow(page, tmp_path, {
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": 4}, "_meta": {"pos": [40, 80]}},
        "2": {"class_type": "IntMath", "inputs": {"a": 6, "b": 7, "operation": "multiply"},
              "_meta": {"pos": [380, 80]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}, "_meta": {"pos": [740, 80]}}})
    x, y = page.evaluate("loom.editor.screenPos(2, 'widget', 'b')")
    click_menu(page, x, y, "Convert b to input")
    assert page.evaluate("loom.editor.node(2).inputs.map(i => [i.name, i.type])") == [["b", "INT"]]
    drag(page, page.evaluate("loom.editor.screenPos(1, 'output', 0)"),
         page.evaluate("loom.editor.screenPos(2, 'input', 0)"))
    assert page.evaluate("loom.editor.node(2).inputs[0].link") is not None
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['3'] || {text: []}).text[0] === '24'", timeout=20000)
    page.screenshot(path=ARTIFACTS / "editor-converted-input.png")

    # Back to a widget: the link goes, the widget's own value counts again.
    x, y = page.evaluate("loom.editor.screenPos(2, 'widget', 'a')")
    click_menu(page, x, y, "Convert b to widget")
    assert page.evaluate("loom.editor.node(2).inputs.length") == 0
    assert page.evaluate("Object.keys(loom.editor.graph.links).length") == 1
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['3'] || {text: []}).text[0] === '42'", timeout=20000)

    # A Primitive linked to a converted widget takes that widget on, with its value, and drives it.
    x, y = page.evaluate("loom.editor.screenPos(2, 'widget', 'a')")
    click_menu(page, x, y, "Convert a to input")
    page.evaluate("""() => { const p = LiteGraph.createNode('PrimitiveNode'); p.pos = [40, 260];
        loom.editor.graph.add(p); p.connect(0, loom.editor.node(2), 0); window.primitive = p; }""")
    assert page.evaluate("[primitive.widgets[0].name, primitive.widgets[0].value, primitive.outputs[0].type]") == [
        "a", 6, "INT"]
    page.evaluate("primitive.widgets[0].value = 5")
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['3'] || {text: []}).text[0] === '35'", timeout=20000)
    page.screenshot(path=ARTIFACTS / "editor-primitive-drives-widget.png")


def test_drop_a_link_on_a_widget_converts_it_or_says_why_not(page, server, tmp_path):
    # The default graph: a Primitive's INT dropped on KSampler's seed widget becomes the seed input.
    page.fill("#library-search", "Int")
    page.click(".library-item[data-type=PrimitiveInt]")
    primitive = page.evaluate("""() => { const p = loom.editor.graph._nodes.at(-1); p.pos = [330, 620];
        loom.editor.fitView(); return p.id; }""")
    seen = {}

    def over_seed(page):  # while the link hangs over the widget it is outlined, green: the type fits
        seen["outline"] = outlined_widget(page)
        page.screenshot(path=ARTIFACTS / "editor-link-over-widget.png")

    drag(page, page.evaluate(f"loom.editor.screenPos({primitive}, 'output', 0)"),
         page.evaluate("loom.editor.screenPos(3, 'widget', 'seed')"), hover=over_seed)
    assert seen["outline"] == {"node": 3, "widget": "seed", "fits": True}
    assert outlined_widget(page) is None  # gone once the link is dropped
    seed = page.evaluate("""() => { const k = loom.editor.node(3); const i = k.inputs.find(i => i.name === 'seed');
        return [i.type, i.widget.name, loom.editor.graph.links[i.link].origin_id,
                k.widgets.find(w => w.name === 'seed').type]; }""")
    assert seed == ["INT", "seed", primitive, "converted-widget"]
    page.screenshot(path=ARTIFACTS / "editor-link-on-widget.png")

    open_workflow(page, tmp_path, {
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": 4}, "_meta": {"pos": [40, 80]}},
        "2": {"class_type": "IntMath", "inputs": {"a": 6, "b": 7, "operation": "multiply"},
              "_meta": {"pos": [380, 80]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}, "_meta": {"pos": [740, 80]}},
        "4": {"class_type": "PrimitiveString", "inputs": {"value": "seven"}, "_meta": {"pos": [40, 260]}}})
    # A STRING on an INT widget is refused, and the editor says why.
    def over_a(page):
        seen["outline"] = outlined_widget(page)
        page.screenshot(path=ARTIFACTS / "editor-link-over-widget-refused.png")

    drag(page, page.evaluate("loom.editor.screenPos(4, 'output', 0)"),
         page.evaluate("loom.editor.screenPos(2, 'widget', 'a')"), hover=over_a)
    assert seen["outline"] == {"node": 2, "widget": "a", "fits": False}
    page.wait_for_selector(".toast.error:has-text('cannot connect STRING to a: it takes INT')")
    assert page.evaluate("loom.editor.node(2).inputs.length") == 0
    assert page.evaluate("Object.keys(loom.editor.graph.links).length") == 1
    page.screenshot(path=ARTIFACTS / "editor-link-on-widget-refused.png")
    # A Note's text is not an input of anything.
    note = page.evaluate("""() => { const n = LiteGraph.createNode('Note'); n.pos = [380, 420];
        loom.editor.graph.add(n); return n.id; }""")
    drag(page, page.evaluate("loom.editor.screenPos(1, 'output', 0)"),
         page.evaluate(f"loom.editor.screenPos({note}, 'widget', 'text')"))
    assert page.evaluate(f"loom.editor.node({note}).inputs.length") == 0

    drag(page, page.evaluate("loom.editor.screenPos(1, 'output', 0)"),
         page.evaluate("loom.editor.screenPos(2, 'widget', 'b')"))
    assert page.evaluate("loom.editor.node(2).inputs.map(i => [i.name, i.link !== null])") == [["b", True]]
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['3'] || {text: []}).text[0] === '24'", timeout=20000)
    page.wait_for_selector("#history-list .entry.success")
    page.screenshot(path=ARTIFACTS / "editor-link-on-widget-run.png")
    (entry,) = server.call("/history?max_items=1").values()
    assert entry["prompt"][2]["2"]["inputs"] == {"a": 6, "b": ["1", 0], "operation": "multiply"}


def test_history_pages_through_older_and_newer_runs(page, server):
    def run(value):
        prompt = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": value}},
                  "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
        return server.call("/prompt/wait", {"prompt": prompt})["prompt_id"]

    server.call("/history", {"clear": True})
    ids = [run(i) for i in range(55)]
    shown = "[...document.querySelectorAll('#history-list .entry')].map(e => e.dataset.promptId)"
    page.wait_for_function("document.querySelector('#history-range').textContent === '6–55 of 55'")
    assert page.evaluate(shown) == ids[:4:-1]  # the newest 50, newest first
    assert page.is_disabled("#history-newer")

    page.click("#history-older")
    page.wait_for_function("document.querySelector('#history-range').textContent === '1–5 of 55'")
    assert page.evaluate(shown) == ids[4::-1]
    assert page.is_disabled("#history-older")
    # A new run leaves an older page where it is.
    ids.append(run(55))
    page.wait_for_function("document.querySelector('#history-range').textContent === '1–5 of 56'")
    assert page.evaluate(shown) == ids[4::-1]
    page.screenshot(path=ARTIFACTS / "queue-panel-older-page.png")

    page.click("#history-newer")
    page.wait_for_function("document.querySelector('#history-range').textContent === '6–55 of 56'")
    assert page.evaluate(shown) == ids[54:4:-1]
    page.click("#history-newer")
    page.wait_for_function("document.querySelector('#history-range').textContent === '7–56 of 56'")
    assert page.evaluate(shown) == ids[:5:-1]
    assert page.is_disabled("#history-newer")
    page.screenshot(path=ARTIFACTS / "queue-panel-newest-page.png")
