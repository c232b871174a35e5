"""The editor opens ComfyUI files of every vintage: subgraphs and group nodes expanded in place, then queued."""

import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from graph.ui_format import ui_to_api
from nodes.registry import builtin_registry
from tests.web import test_browser
from tests.web.test_browser import ARTIFACTS, COMFY_UI_FILE, DEMO_MODEL

server, browser, page = test_browser.server, test_browser.browser, test_browser.page  # its fixtures

SUBGRAPH_ID = "5b0c1e2a-7d3f-4c9e-9a51-0f6d2b8e4c11"

# Shaped like ComfyUI_frontend's subgraph fixtures: an instance whose definition multiplies its input by a promoted
# widget value (the instance's widgets_values, one per widget input of the subgraph: an older editor's way) and
# saves a picture of the product.
SUBGRAPH_FILE = {
    "id": "d1c0e8b2", "revision": 0, "last_node_id": 3, "last_link_id": 2, "version": 0.4,
    "nodes": [
        {"id": 1, "type": "PrimitiveInt", "pos": [40, 80], "size": [280, 80], "mode": 0, "order": 0,
         "outputs": [{"name": "INT", "type": "INT", "links": [1]}], "widgets_values": [6, "fixed"]},
        {"id": 2, "type": SUBGRAPH_ID, "pos": [380, 80], "size": [240, 90], "mode": 0, "order": 1,
         "inputs": [{"name": "a", "type": "INT", "link": 1, "widget": {"name": "a"}},
                    {"name": "b", "type": "INT", "link": None, "widget": {"name": "b"}}],
         "outputs": [{"name": "INT", "type": "INT", "links": [2]}], "properties": {}, "widgets_values": [0, 7]},
        {"id": 3, "type": "PreviewAny", "pos": [680, 80], "size": [280, 90], "mode": 0, "order": 2,
         "inputs": [{"name": "source", "type": "*", "link": 2}], "outputs": []},
    ],
    "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "INT"]],
    "groups": [], "config": {}, "extra": {"frontendVersion": "1.24.1"},
    "definitions": {"subgraphs": [{
        "id": SUBGRAPH_ID, "version": 1, "revision": 0, "name": "Multiply and save",
        "state": {"lastGroupId": 0, "lastNodeId": 11, "lastLinkId": 13, "lastRerouteId": 0},
        "inputNode": {"id": -10, "bounding": [0, 100, 120, 80]},
        "outputNode": {"id": -20, "bounding": [900, 100, 120, 60]},
        "inputs": [{"id": "i-a", "name": "a", "type": "INT", "linkIds": [10]},
                   {"id": "i-b", "name": "b", "type": "INT", "linkIds": [11]}],
        "outputs": [{"id": "o-int", "name": "INT", "type": "INT", "linkIds": [12]}],
        "widgets": [], "groups": [], "config": {}, "extra": {},
        "nodes": [
            {"id": 10, "type": "IntMath", "pos": [200, 100], "size": [280, 110], "mode": 0,
             "inputs": [{"name": "a", "type": "INT", "widget": {"name": "a"}, "link": 10},
                        {"name": "b", "type": "INT", "widget": {"name": "b"}, "link": 11}],
             "outputs": [{"name": "INT", "type": "INT", "links": [12, 13]}], "widgets_values": [0, 0, "multiply"]},
            {"id": 11, "type": "SaveTestImage", "pos": [560, 240], "size": [280, 100], "mode": 0,
             "inputs": [{"name": "value", "type": "INT", "widget": {"name": "value"}, "link": 13}],
             "outputs": [], "widgets_values": [0, "subgraph"]},
        ],
        "links": [{"id": 10, "origin_id": -10, "origin_slot": 0, "target_id": 10, "target_slot": 0, "type": "INT"},
                  {"id": 11, "origin_id": -10, "origin_slot": 1, "target_id": 10, "target_slot": 1, "type": "INT"},
                  {"id": 12, "origin_id": 10, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "INT"},
                  {"id": 13, "origin_id": 10, "origin_slot": 0, "target_id": 11, "target_slot": 0, "type": "INT"}],
    }]},
}

# Shaped like ComfyUI_frontend's group node fixtures (extra.groupNodes, an instance typed "workflow>NAME" holding
# its nodes' widget values one after another), with a node type no server has beside it.
GROUP_FILE = {
    "last_node_id": 7, "last_link_id": 1, "version": 0.4,
    "nodes": [
        {"id": 5, "type": "workflow>Add and save", "pos": [60, 80], "size": [300, 200], "mode": 0, "order": 0,
         "inputs": [], "outputs": [{"name": "INT", "type": "INT", "links": [1]}],
         "properties": {"Node name for S&R": "workflow>Add and save"}, "widgets_values": [5, 3, "add", 0, "group"]},
        {"id": 6, "type": "PreviewAny", "pos": [420, 80], "size": [280, 90], "mode": 0, "order": 1,
         "inputs": [{"name": "source", "type": "*", "link": 1}], "outputs": []},
        {"id": 7, "type": "FancyCustomUpscaler", "pos": [420, 260], "size": [280, 90], "mode": 0, "order": 2,
         "inputs": [], "outputs": [], "widgets_values": [2]},
    ],
    "links": [[1, 5, 0, 6, 0, "INT"]],
    "groups": [], "config": {},
    "extra": {"groupNodes": {"Add and save": {
        "nodes": [
            {"id": -1, "type": "IntMath", "pos": [60, 80], "size": [280, 110], "mode": 0, "index": 0,
             "inputs": [], "outputs": [{"name": "INT", "type": "INT", "links": [], "shape": 3}],
             "widgets_values": [1, 1, "add"]},
            {"id": -1, "type": "SaveTestImage", "pos": [400, 80], "size": [280, 100], "mode": 0, "index": 1,
             "inputs": [{"name": "value", "type": "INT", "link": None, "widget": {"name": "value"}}],
             "outputs": [], "widgets_values": [0, "group"]},
        ],
        "links": [[0, 0, 1, 0, 1, "INT"]],
        "external": [[0, 0, "INT"]],
    }}},
}


def open_file(page, tmp_path, doc, name):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    page.set_input_files("#file-input", str(path))
    page.wait_for_selector(f"text=opened {name}")


def wait_done(page):
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=20000)


def nodes(page):
    return page.evaluate("loom.editor.graph._nodes.map(n => [String(n.id), n.type, n.title, n.mode])")


def test_a_subgraph_is_expanded_where_its_instance_was_and_runs(page, server, tmp_path):
    open_file(page, tmp_path, SUBGRAPH_FILE, "subgraph.json")
    shown = {n[0]: n for n in nodes(page)}
    assert sorted(shown) == ["1", "2:10", "2:11", "3"]
    assert shown["2:10"][2] == "Multiply and save › Int Math"
    assert shown["2:11"][2] == "Multiply and save › SaveTestImage"
    notice = page.text_content(".toast")
    assert 'expanded 1 subgraph ("Multiply and save")' in notice
    # The definition's own layout, at the instance's place; what stood right of it moved aside.
    pos = {i: page.evaluate(f"(n => [n.pos[0], n.pos[1]])(loom.editor.node('{i}'))") for i in shown}
    assert pos["2:10"] == [380, 80] and pos["2:11"] == [740, 220]
    assert pos["3"][0] > 740 + 280
    assert page.evaluate("loom.editor.graph._groups.map(g => g.title)") == ["Multiply and save (subgraph, expanded)"]
    # The promoted value went into the widget it drives.
    assert page.evaluate("loom.editor.node('2:10').widgets.map(w => w.value)") == [0, 7, "multiply"]
    page.screenshot(path=ARTIFACTS / "compat-subgraph-open.png")

    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['3'] || {text: []}).text[0] === '42'", timeout=20000)
    page.wait_for_function("(loom.runState.outputs['2:11'] || {images: []}).images.some(i => i.naturalWidth)",
                           timeout=20000)
    wait_done(page)
    entry = next(h for h in server.call("/history").values() if "2:11" in h["prompt"][2])
    assert entry["prompt"][2]["2:10"]["inputs"] == {"a": ["1", 0], "b": 7, "operation": "multiply"}
    assert entry["prompt"][2]["2:11"]["inputs"]["value"] == ["2:10", 0]
    page.screenshot(path=ARTIFACTS / "compat-subgraph-run.png")

    # A PNG from a newer ComfyUI carries such a workflow in its `workflow` chunk: it opens expanded too.
    info = PngInfo()
    info.add_text("workflow", json.dumps(SUBGRAPH_FILE))
    Image.new("RGB", (8, 8)).save(tmp_path / "newer-comfyui.png", pnginfo=info)
    page.click("#clear-button")
    page.set_input_files("#file-input", str(tmp_path / "newer-comfyui.png"))
    page.wait_for_selector("text=opened newer-comfyui.png")
    assert sorted(n[0] for n in nodes(page)) == ["1", "2:10", "2:11", "3"]


def test_a_group_node_is_expanded_and_a_missing_type_says_whose_it_is(page, server, tmp_path):
    open_file(page, tmp_path, GROUP_FILE, "group.json")
    shown = {n[0]: n for n in nodes(page)}
    assert sorted(shown) == ["5:0", "5:1", "6", "7"]
    assert shown["5:1"][2] == "Add and save › SaveTestImage"
    assert page.evaluate("loom.editor.node('5:0').widgets.map(w => w.value)") == [5, 3, "add"]
    toasts = page.eval_on_selector_all(".toast", "els => els.map(e => e.textContent)")
    assert any('1 group node ("Add and save")' in t for t in toasts)
    assert any("custom node packs not installed here: FancyCustomUpscaler" in t for t in toasts)
    assert page.evaluate("loom.editor.node(7).missing") == "custom"
    page.screenshot(path=ARTIFACTS / "compat-group-open.png")

    page.evaluate("loom.editor.graph.remove(loom.editor.node(7))")  # it cannot run here
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['6'] || {text: []}).text[0] === '8'", timeout=20000)
    page.wait_for_function("(loom.runState.outputs['5:1'] || {images: []}).images.some(i => i.naturalWidth)",
                           timeout=20000)
    wait_done(page)
    page.screenshot(path=ARTIFACTS / "compat-group-run.png")


SAMPLER = "9f1f7c3e-2a6b-4d0e-8c55-3b7e1d2a9c40"


def _link(link_id, origin, slot, target, target_slot, kind):
    return {"id": link_id, "origin_id": origin, "origin_slot": slot, "target_id": target, "target_slot": target_slot,
            "type": kind}


def _socket(name, kind, link):
    return {"name": name, "type": kind, "link": link}


# txt2img on the demo model with the sampler and the decoder in a subgraph, its seed and steps promoted onto the
# instance through properties.proxyWidgets (a newer editor's way).
SD_SUBGRAPH_FILE = {
    "id": "6a0d9f4e", "revision": 0, "last_node_id": 20, "last_link_id": 8, "version": 0.4,
    "nodes": [
        {"id": 4, "type": "CheckpointLoaderSimple", "pos": [0, 200], "size": [300, 100], "mode": 0,
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]},
                     {"name": "CLIP", "type": "CLIP", "links": [7, 8]},
                     {"name": "VAE", "type": "VAE", "links": [5]}], "widgets_values": [DEMO_MODEL]},
        {"id": 6, "type": "CLIPTextEncode", "pos": [340, 0], "size": [320, 150], "mode": 0,
         "inputs": [_socket("clip", "CLIP", 7)], "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING",
                                                              "links": [2]}],
         "widgets_values": ["a red circle"], "title": "Positive prompt"},
        {"id": 7, "type": "CLIPTextEncode", "pos": [340, 200], "size": [320, 150], "mode": 0,
         "inputs": [_socket("clip", "CLIP", 8)], "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING",
                                                              "links": [3]}], "widgets_values": [""]},
        {"id": 5, "type": "EmptyLatentImage", "pos": [340, 400], "size": [300, 110], "mode": 0,
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [4]}], "widgets_values": [64, 64, 1]},
        {"id": 20, "type": SAMPLER, "pos": [720, 100], "size": [260, 180], "mode": 0,
         "inputs": [_socket("model", "MODEL", 1), _socket("positive", "CONDITIONING", 2),
                    _socket("negative", "CONDITIONING", 3), _socket("latent_image", "LATENT", 4),
                    _socket("vae", "VAE", 5)],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [6]}],
         "properties": {"proxyWidgets": [["3", "seed"], ["3", "control_after_generate"], ["3", "steps"]]},
         "widgets_values": [1234, "fixed", 2]},
        {"id": 9, "type": "SaveImage", "pos": [1040, 100], "size": [300, 300], "mode": 0,
         "inputs": [_socket("images", "IMAGE", 6)], "widgets_values": ["sd_subgraph"]},
    ],
    "links": [[1, 4, 0, 20, 0, "MODEL"], [2, 6, 0, 20, 1, "CONDITIONING"], [3, 7, 0, 20, 2, "CONDITIONING"],
              [4, 5, 0, 20, 3, "LATENT"], [5, 4, 2, 20, 4, "VAE"], [6, 20, 0, 9, 0, "IMAGE"],
              [7, 4, 1, 6, 0, "CLIP"], [8, 4, 1, 7, 0, "CLIP"]],
    "groups": [], "config": {}, "extra": {},
    "definitions": {"subgraphs": [{
        "id": SAMPLER, "version": 1, "revision": 0, "name": "Sample and decode",
        "inputNode": {"id": -10, "bounding": [0, 0, 120, 160]},
        "outputNode": {"id": -20, "bounding": [900, 0, 120, 60]},
        "inputs": [{"id": "m", "name": "model", "type": "MODEL", "linkIds": [10]},
                   {"id": "p", "name": "positive", "type": "CONDITIONING", "linkIds": [11]},
                   {"id": "n", "name": "negative", "type": "CONDITIONING", "linkIds": [12]},
                   {"id": "l", "name": "latent_image", "type": "LATENT", "linkIds": [13]},
                   {"id": "v", "name": "vae", "type": "VAE", "linkIds": [14]}],
        "outputs": [{"id": "i", "name": "IMAGE", "type": "IMAGE", "linkIds": [16]}],
        "widgets": [], "groups": [], "config": {}, "extra": {},
        "nodes": [
            {"id": 3, "type": "KSampler", "pos": [200, 0], "size": [300, 260], "mode": 0,
             "inputs": [_socket("model", "MODEL", 10), _socket("positive", "CONDITIONING", 11),
                        _socket("negative", "CONDITIONING", 12), _socket("latent_image", "LATENT", 13)],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [15]}],
             "widgets_values": [0, "randomize", 20, 8, "euler", "normal", 1]},
            {"id": 8, "type": "VAEDecode", "pos": [560, 0], "size": [220, 60], "mode": 0,
             "inputs": [_socket("samples", "LATENT", 15), _socket("vae", "VAE", 14)],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [16]}]},
        ],
        "links": [_link(10, -10, 0, 3, 0, "MODEL"), _link(11, -10, 1, 3, 1, "CONDITIONING"),
                  _link(12, -10, 2, 3, 2, "CONDITIONING"), _link(13, -10, 3, 3, 3, "LATENT"),
                  _link(14, -10, 4, 8, 1, "VAE"), _link(15, 3, 0, 8, 0, "LATENT"), _link(16, 8, 0, -20, 0, "IMAGE")],
    }]},
}


def inputs_of(api):
    return {nid: (node["class_type"], node["inputs"]) for nid, node in api.items()}


def test_a_txt2img_subgraph_runs_the_prompt_main_run_makes_and_its_png_reopens(page, server, tmp_path):
    open_file(page, tmp_path, SD_SUBGRAPH_FILE, "sd-subgraph.json")
    widget = "([id, name]) => loom.editor.node(id).widgets.find(w => w.name === name).value"
    assert page.evaluate(widget, ["20:3", "seed"]) == 1234 and page.evaluate(widget, ["20:3", "steps"]) == 2
    assert page.evaluate(widget, ["20:3", "control_after_generate"]) == "fixed"  # promoted with the seed
    assert page.evaluate("loom.editor.node('20:8').title") == "Sample and decode › VAE Decode"
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['9'] || {images: []}).images.some(i => i.naturalWidth === 64)",
                           timeout=60000)
    wait_done(page)
    page.screenshot(path=ARTIFACTS / "compat-sd-subgraph-run.png")
    entry = next(h for h in server.call("/history").values() if "20:3" in h["prompt"][2])
    # What `main.py run sd-subgraph.json` runs (graph/load.py converts the file so).
    assert inputs_of(entry["prompt"][2]) == inputs_of(ui_to_api(SD_SUBGRAPH_FILE, builtin_registry()))

    # The PNG it saved carries the expanded graph, which opens as it was.
    (png,) = (server.base / "output").glob("sd_subgraph_*.png")
    page.click("#clear-button")
    page.set_input_files("#file-input", str(png))
    page.wait_for_selector(f"text=opened {png.name}")
    assert sorted(page.evaluate("loom.editor.graph._nodes.map(n => String(n.id))")) == [
        "20:3", "20:8", "4", "5", "6", "7", "9"]
    assert page.evaluate(widget, ["20:3", "seed"]) == 1234


def test_schema_1_links_and_a_bypassed_node(page, tmp_path):
    schema1 = {**COMFY_UI_FILE, "version": 1, "state": {"lastNodeId": 14, "lastLinkId": 3},
               "links": [_link(*link) for link in COMFY_UI_FILE["links"]]}
    del schema1["last_node_id"], schema1["last_link_id"]
    open_file(page, tmp_path, schema1, "schema1.json")
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['13'] || {text: []}).text[0] === '35'", timeout=20000)
    wait_done(page)

    bypassed = json.loads(json.dumps(COMFY_UI_FILE))
    bypassed["nodes"][1]["mode"] = 4  # IntMath: its first INT input (the primitive's 7) passes through
    open_file(page, tmp_path, bypassed, "bypassed.json")
    assert page.evaluate("loom.editor.node(11).mode") == 4
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['13'] || {text: []}).text[0] === '7'", timeout=20000)
    page.screenshot(path=ARTIFACTS / "compat-bypassed.png")


def test_number_widgets_keep_values_on_their_grid_from_the_minimum(page):
    """ComfyUI's video lengths (min 1, step 4) take 1, 5, ..., 81: a Wan workflow's 33 frames stay 33."""
    doc = {"1": {"class_type": "EmptyHunyuanLatentVideo",
                 "inputs": {"width": 832, "height": 480, "length": 33, "batch_size": 1}, "_meta": {"pos": [40, 40]}},
           "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 516, "height": 512, "batch_size": 1},
                 "_meta": {"pos": [400, 40]}}}
    page.evaluate("doc => loom.editor.load(doc, 'video.json')", doc)
    values = page.evaluate("loom.editor.graph._nodes.map(n => n.widgets.map(w => w.value))")
    assert [33, 1] == [values[0][2], values[0][3]] and values[0][:2] == [832, 480]
    assert values[1][0] == 520  # off its grid (min 16, step 8): to the nearest point on it


def test_a_switch_runs_the_side_it_is_set_to(page, server):
    """ComfyUI's Switch (ComfySwitchNode): its output takes the type of either side, and flipping its widget in the
    editor runs the other side; the side not taken never runs."""
    doc = {"1": {"class_type": "PrimitiveString", "inputs": {"value": "left"}, "_meta": {"pos": [40, 40]}},
           "2": {"class_type": "PrimitiveString", "inputs": {"value": "right"}, "_meta": {"pos": [40, 200]}},
           "3": {"class_type": "ComfySwitchNode", "inputs": {"switch": True, "on_false": ["1", 0],
                                                            "on_true": ["2", 0]}, "_meta": {"pos": [380, 100]}},
           "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}, "_meta": {"pos": [700, 100]}}}
    page.evaluate("doc => loom.editor.load(doc, 'switch.json')", doc)
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['4'] || {text: []}).text[0] === 'right'", timeout=20000)
    wait_done(page)
    page.evaluate("loom.editor.node(3).widgets.find(w => w.name === 'switch').value = false")
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['4'] || {text: []}).text[0] === 'left'", timeout=20000)
    wait_done(page)
    page.screenshot(path=ARTIFACTS / "compat-switch.png")
    runs = sorted(server.call("/history").values(), key=lambda h: h["status"]["messages"][0][1]["timestamp"])
    done = [dict(h["status"]["messages"])["execution_success"] for h in runs[-2:]]
    assert [d["executed"] for d in done] == [["2", "3", "4"], ["1", "3", "4"]]  # "1" did not run the first time


def test_batch_images_grows_a_socket_per_link_and_runs(page, server):
    """BatchImagesNode's growing input (ComfyUI's autogrow): the editor shows the one required socket and one spare,
    a new spare each time the last one is linked; the prompt batches the linked images in slot order."""
    doc = {**{str(i): {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1,
                                                              "color": i * 0x202020}, "_meta": {"pos": [40, 150 * i]}}
              for i in (1, 2, 3)},
           "4": {"class_type": "BatchImagesNode", "inputs": {"images.image0": ["1", 0]},
                 "_meta": {"pos": [400, 150]}},
           "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}, "_meta": {"pos": [700, 150]}}}
    page.evaluate("doc => loom.editor.load(doc, 'batch.json')", doc)
    names = "loom.editor.node(4).inputs.map(i => i.name)"
    assert page.evaluate(names) == ["images.image0", "images.image1"]
    page.evaluate("loom.editor.node(2).connect(0, loom.editor.node(4), 1)")
    assert page.evaluate(names) == ["images.image0", "images.image1", "images.image2"]
    page.evaluate("loom.editor.node(3).connect(0, loom.editor.node(4), 2)")
    assert page.evaluate(names) == ["images.image0", "images.image1", "images.image2", "images.image3"]
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['5'] || {images: []}).images.length === 3", timeout=20000)
    wait_done(page)
    page.screenshot(path=ARTIFACTS / "compat-batch-images.png")
