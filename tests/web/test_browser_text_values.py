"""Inputs ComfyUI edits with widgets of its own (a box on the picture, a colour picker, a video editor) as text
widgets in Loom's editor: their values queue and the nodes read them."""

from tests.web import test_browser
from tests.web.test_browser import ARTIFACTS

server, browser, page = test_browser.server, test_browser.browser, test_browser.page  # its fixtures

DOC = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0x3366CC},
          "_meta": {"pos": [40, 80]}},
    "2": {"class_type": "ImageCropV2",
          "inputs": {"image": ["1", 0], "crop_region": '{"x": 8, "y": 4, "width": 32, "height": 24}'},
          "_meta": {"pos": [400, 80]}},
    "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}, "_meta": {"pos": [760, 80]}},
    "4": {"class_type": "ColorToRGBInt", "inputs": {"color": "#102030"}, "_meta": {"pos": [400, 360]}},
    "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}, "_meta": {"pos": [760, 360]}},
}


def test_boxes_and_colours_are_text_widgets_that_queue(page, server):
    page.evaluate("doc => loom.editor.load(doc, 'text-values.json')", DOC)
    assert page.evaluate("loom.editor.node(2).widgets.map(w => [w.name, w.type])")[0] == ["crop_region", "text"]
    assert page.evaluate("loom.editor.node(4).widgets.map(w => w.value)")[0] == "#102030"
    page.evaluate("loom.editor.redraw()")
    page.screenshot(path=ARTIFACTS / "text-value-widgets.png")
    page.click("#queue-button")
    page.wait_for_function("(loom.runState.outputs['3'] || {images: []}).images.some(i => i.naturalWidth)",
                           timeout=20000)
    assert page.evaluate("(i => [i.naturalWidth, i.naturalHeight])(loom.runState.outputs['3'].images[0])") == [32, 24]
