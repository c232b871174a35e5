"""Widgets that change with the node: a dynamic combo's chosen inputs (ResizeImageMaskNode) and ImageCompare's
slider over two pictures, in real headless Chromium."""

import io
import json

from PIL import Image

from tests.web import test_browser
from tests.web.test_browser import ARTIFACTS

server, browser, page = test_browser.server, test_browser.browser, test_browser.page  # its fixtures

RESIZE_DOC = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0x3366CC},
          "_meta": {"pos": [40, 80]}},
    "2": {"class_type": "ResizeImageMaskNode",
          "inputs": {"input": ["1", 0], "resize_type": "scale dimensions", "resize_type.width": 40,
                     "resize_type.height": 30, "resize_type.crop": "disabled", "scale_method": "area"},
          "_meta": {"pos": [400, 80]}},
    "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}, "_meta": {"pos": [760, 80]}},
}

RED, BLUE = 0xFF0000, 0x0000FF
COMPARE_DOC = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": RED},
          "_meta": {"pos": [40, 40]}},
    "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": BLUE},
          "_meta": {"pos": [40, 300]}},
    "3": {"class_type": "ImageCompare", "inputs": {"image_a": ["1", 0], "image_b": ["2", 0]},
          "_meta": {"pos": [400, 40], "size": [320, 300]}},
}

SHOWN = "loom.editor.node(2).widgets.filter(w => !w.asleep).map(w => w.name)"
INPUTS = "loom.editor.node(2).inputs.map(i => i.name)"
SAVED = "loom.editor.node(2).serialize().widgets_values"


def wait_done(page):
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=20000)


def choose(page, node, widget, entry):
    """Pick `entry` of a combo widget through its menu on the canvas, as a user does."""
    x, y = page.evaluate(f"loom.editor.screenPos({node}, 'widget', '{widget}')")
    page.mouse.click(x, y)
    page.click(f".litecontextmenu .litemenu-entry:text-is('{entry}')")
    page.evaluate("loom.editor.canvas.draw(true, true)")


def last_prompt(server, node):
    runs = sorted(server.call("/history").values(), key=lambda h: h["status"]["messages"][0][1]["timestamp"])
    return runs[-1]["prompt"][2][node]["inputs"]


def test_a_dynamic_combo_shows_its_choice_inputs_and_queues_them(page, server):
    page.evaluate("doc => loom.editor.load(doc, 'resize.json')", RESIZE_DOC)
    assert page.evaluate(SHOWN) == ["resize_type", "resize_type.width", "resize_type.height", "resize_type.crop",
                                    "scale_method"]
    assert page.evaluate(INPUTS) == ["input"]
    assert page.evaluate("loom.editor.node(2).widgets[1].label") == "width"
    tall = page.evaluate("loom.editor.node(2).size[1]")

    choose(page, 2, "resize_type", "scale by multiplier")
    assert page.evaluate(SHOWN) == ["resize_type", "resize_type.multiplier", "scale_method"]
    assert page.evaluate("loom.editor.node(2).size[1]") < tall
    page.evaluate("loom.editor.node(2).widgets.find(w => w.name === 'resize_type.multiplier').value = 0.5")
    # Saved as ComfyUI's editor saves it: the choice's values right after the combo.
    assert page.evaluate(SAVED) == ["scale by multiplier", 0.5, "area"]
    page.evaluate("loom.editor.redraw()")
    page.screenshot(path=ARTIFACTS / "dynamic-combo-multiplier.png")

    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['3'] || {images: []}).images.some(i => i.naturalWidth)",
                           timeout=20000)
    wait_done(page)
    inputs = last_prompt(server, "2")
    assert (inputs["resize_type"], inputs["resize_type.multiplier"], inputs["scale_method"]) == (
        "scale by multiplier", 0.5, "area")
    assert page.evaluate("(i => [i.naturalWidth, i.naturalHeight])(loom.runState.outputs['3'].images[0])") == [32, 24]

    # A choice bringing a socket: it shows, and goes again with its choice.
    choose(page, 2, "resize_type", "match size")
    assert page.evaluate(SHOWN) == ["resize_type", "resize_type.crop", "scale_method"]
    assert page.evaluate(INPUTS) == ["input", "resize_type.match"]
    assert page.evaluate("loom.editor.node(2).inputs[1].label") == "match?"
    page.screenshot(path=ARTIFACTS / "dynamic-combo-match.png")
    page.evaluate("loom.editor.node(1).connect(0, loom.editor.node(2), 1)")
    choose(page, 2, "resize_type", "scale dimensions")
    assert page.evaluate(INPUTS) == ["input"]
    assert page.evaluate("Object.keys(loom.editor.graph.links).length") == 2  # the match link went with its socket
    # The hidden widgets kept their values.
    assert page.evaluate(SAVED) == ["scale dimensions", 40, 30, "disabled", "area"]
    page.screenshot(path=ARTIFACTS / "dynamic-combo-dimensions.png")


def test_saved_layouts_reopen_with_their_choice(page, server):
    page.evaluate("doc => loom.editor.load(doc, 'resize.json')", RESIZE_DOC)
    choose(page, 2, "resize_type", "scale longer dimension")
    page.evaluate("loom.editor.node(2).widgets.find(w => w.name === 'resize_type.longer_size').value = 24")
    saved = page.evaluate("loom.editor.graph.serialize()")
    assert next(n for n in saved["nodes"] if n["id"] == 2)["widgets_values"] == ["scale longer dimension", 24, "area"]

    # A copy (litegraph's clone, as copy and paste makes) keeps the choice too.
    assert page.evaluate("loom.editor.node(2).clone().serialize().widgets_values") == ["scale longer dimension", 24,
                                                                                       "area"]

    page.evaluate("doc => loom.editor.load(doc, 'saved.json')", saved)
    assert page.evaluate(SHOWN) == ["resize_type", "resize_type.longer_size", "scale_method"]
    assert page.evaluate(SAVED) == ["scale longer dimension", 24, "area"]
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['3'] || {images: []}).images.some(i => i.naturalWidth)",
                           timeout=20000)
    wait_done(page)
    assert last_prompt(server, "2")["resize_type.longer_size"] == 24
    assert page.evaluate("(i => [i.naturalWidth, i.naturalHeight])(loom.runState.outputs['3'].images[0])") == [24, 18]

    # Loom's older editor saved every widget in declaration order.
    legacy = json.loads(json.dumps(saved))
    node = next(n for n in legacy["nodes"] if n["id"] == 2)
    node["widgets_values"] = ["scale width", "bilinear", 20, 512, "center", 1.0, 512, 512, 1.0, 8]
    page.evaluate("doc => loom.editor.load(doc, 'legacy.json')", legacy)
    assert page.evaluate(SHOWN) == ["resize_type", "resize_type.width", "scale_method"]
    assert page.evaluate(SAVED) == ["scale width", 20, "bilinear"]


def screen_point(page, node, x, y):
    """Screen position (CSS pixels) of the point (x, y) in `node`'s own coordinates."""
    return page.evaluate("""([id, x, y]) => {
        const editor = loom.editor, node = editor.node(id);
        const [cx, cy] = editor.canvas.ds.convertOffsetToCanvas([node.pos[0] + x, node.pos[1] + y]);
        const rect = editor.canvas.canvas.getBoundingClientRect();
        return [rect.left + cx, rect.top + cy];
    }""", [node, x, y])


def colour_at(shot, point):
    r, g, b = shot.getpixel((round(point[0]), round(point[1])))[:3]
    return "red" if r > 200 and b < 60 else "blue" if b > 200 and r < 60 else f"other {(r, g, b)}"


def test_image_compare_splits_its_pictures_at_the_pointer(page, server):
    page.evaluate("doc => loom.editor.load(doc, 'compare.json')", COMPARE_DOC)
    assert page.evaluate("loom.editor.node(3).inputs.map(i => i.name)") == ["image_a", "image_b"]  # no compare_view
    page.click("#queue-button")
    page.wait_for_function("(c => c && c.a && c.b && c.a.naturalWidth && c.b.naturalWidth)"
                           "((loom.runState.outputs['3'] || {}).compare)", timeout=20000)
    wait_done(page)
    page.evaluate("loom.editor.canvas.draw(true, true)")
    area = page.evaluate("loom.editor.node(3).compareArea")
    middle = area["y"] + area["h"] / 2

    def look_at(fraction, name):
        page.mouse.move(*screen_point(page, 3, area["x"] + area["w"] * fraction, middle), steps=4)
        page.evaluate("loom.editor.canvas.draw(true, true)")
        assert abs(page.evaluate("loom.editor.node(3).compareSplit") - fraction) < 0.02
        page.screenshot(path=ARTIFACTS / name)
        return Image.open(io.BytesIO(page.screenshot()))

    for fraction, name in ((0.35, "image-compare-left.png"), (0.65, "image-compare-right.png")):
        shot = look_at(fraction, name)
        split = area["x"] + area["w"] * fraction
        assert colour_at(shot, screen_point(page, 3, split - 10, middle)) == "red"  # A, left of the line
        assert colour_at(shot, screen_point(page, 3, split + 10, middle)) == "blue"  # B, right of it
    assert colour_at(shot, screen_point(page, 3, area["x"] + area["w"] * 0.5, middle)) == "red"

    # Only one side: it shows whole.
    item = page.evaluate("(u => Object.fromEntries(['filename', 'subfolder', 'type'].map(k => [k, u.searchParams.get(k)"
                         " || ''])))(new URL(loom.runState.outputs['3'].compare.a.src))")
    page.evaluate("item => loom.editor.onMessage('executed', {node: '3', output: {a_images: [item], b_images: []}})",
                  item)
    page.wait_for_function("(loom.runState.outputs['3'].compare.a || {}).naturalWidth > 0")
    page.evaluate("loom.editor.canvas.draw(true, true)")
    shot = Image.open(io.BytesIO(page.screenshot(path=ARTIFACTS / "image-compare-one-side.png")))
    for fraction in (0.4, 0.6):
        assert colour_at(shot, screen_point(page, 3, area["x"] + area["w"] * fraction, middle)) == "red"
