"""Video in the editor, in real headless Chromium: EmptyImage (9 frames) -> CreateVideo (8 fps) -> SaveVideo queued from
the editor shows a <video> player in the SaveVideo node whose MP4 loads (9/8 s) and plays, a small player in the
gallery strip and a video thumbnail in the History panel, and no <img> of the MP4 anywhere; SaveWEBM's WebM plays in
its node too, and an animated WEBP saved by the same run stays a picture."""

from urllib.parse import parse_qs, urlsplit

from tests.web import test_browser
from tests.web.test_browser import ARTIFACTS, wait_done

server, browser, page = test_browser.server, test_browser.browser, test_browser.page  # its fixtures

FRAMES, FPS, WIDTH, HEIGHT = 9, 8, 64, 48
DOC = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": FRAMES,
                                                 "color": 0x2A7FD4}, "_meta": {"pos": [40, 80]}},
    "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": FPS}, "_meta": {"pos": [400, 80]}},
    "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "video/browser",
                                                "format": "mp4", "codec": "h264"}, "_meta": {"pos": [740, 80]}},
    "4": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "browser_anim",
                                                       "fps": 6.0, "lossless": True, "quality": 80,
                                                       "method": "default"}, "_meta": {"pos": [400, 300]}},
    "5": {"class_type": "SaveWEBM", "inputs": {"images": ["1", 0], "filename_prefix": "browser_webm", "codec": "vp9",
                                               "fps": FPS, "crf": 32.0}, "_meta": {"pos": [740, 440]}},
}
PLAYER = "document.querySelector('video.node-video[data-node=\"{node}\"]')"


def player_state(page, node):
    """The node's player: whether it shows and plays, what it loaded, and where it sits."""
    return page.evaluate(f"""(p => p && {{shown: p.style.display !== 'none', ready: p.readyState, paused: p.paused,
        duration: p.duration, size: [p.videoWidth, p.videoHeight], muted: p.muted, loop: p.loop,
        controls: p.controls, src: p.src, box: (r => [r.left, r.top, r.width, r.height])(p.getBoundingClientRect())}})
        ({PLAYER.format(node=node)})""")


def node_box(page, node):
    """The node's body on the screen (below its title): [left, top, right, bottom] in CSS pixels."""
    return page.evaluate(f"""(() => {{ const n = loom.editor.node({node}); const c = loom.editor.canvas;
        const [x, y] = c.ds.convertOffsetToCanvas(n.pos); const [r, b] = c.ds.convertOffsetToCanvas(
        [n.pos[0] + n.size[0], n.pos[1] + n.size[1]]); const o = c.canvas.getBoundingClientRect();
        return [o.left + x, o.top + y, o.left + r, o.top + b]; }})()""")


def test_save_video_plays_in_the_node_the_gallery_and_the_history(page, server):
    page.click("#clear-history-button")
    page.wait_for_selector("#history-list .empty")
    page.evaluate("doc => loom.editor.load(doc, 'video.json')", DOC)
    page.click("#queue-button")
    wait_done(page)
    page.evaluate("loom.editor.redraw()")
    page.wait_for_function(f"({PLAYER.format(node=3)} || {{}}).readyState >= 1", timeout=20000)

    saved = sorted((server.base / "output" / "video").glob("browser*.mp4"))
    assert len(saved) == 1
    played = player_state(page, 3)
    url = urlsplit(played["src"])
    assert url.path == "/view"
    assert parse_qs(url.query) == {"filename": [saved[0].name], "subfolder": ["video"], "type": ["output"]}
    assert played["shown"] and played["muted"] and played["loop"] and played["controls"]
    assert abs(played["duration"] - FRAMES / FPS) < 0.02
    assert played["size"] == [WIDTH, HEIGHT]
    page.wait_for_function(f"{PLAYER.format(node=3)}.currentTime > 0", timeout=10000)  # it plays by itself
    assert not player_state(page, 3)["paused"]

    # The player sits inside its node on the screen, below the node's widgets, and takes the node's width.
    box = node_box(page, 3)
    left, top, width, height = played["box"]
    assert box[0] <= left and left + width <= box[2] + 1
    assert box[1] <= top and top + height <= box[3] + 1
    widgets_end = page.evaluate("""(() => { const n = loom.editor.node(3); const c = loom.editor.canvas;
        const w = n.widgets[n.widgets.length - 1]; const [, y] = c.ds.convertOffsetToCanvas(
        [0, n.pos[1] + w.last_y + LiteGraph.NODE_WIDGET_HEIGHT]); return c.canvas.getBoundingClientRect().top + y;
        })()""")
    assert top >= widgets_end and width > (box[2] - box[0]) * 0.8 and height > 100

    # The gallery shows a small player of the file and the history entry a video thumbnail (the first output's, in
    # node id order: SaveVideo's); no <img> shows the MP4.
    gallery = "[...document.querySelectorAll('#gallery video')].find(v => v.src === src)"
    page.wait_for_function(f"src => ({gallery} || {{}}).readyState >= 1", arg=played["src"], timeout=10000)
    page.wait_for_selector("#history-list .entry.success video.thumb", timeout=10000)
    page.wait_for_function("document.querySelector('#history-list .entry.success video.thumb').readyState >= 1",
                           timeout=10000)
    assert page.evaluate("document.querySelector('#history-list video.thumb').src") == played["src"]
    assert page.evaluate("[...document.images].filter(i => /\\.(mp4|webm)/.test(i.src)).length") == 0

    # SaveWEBM's file plays in its node as well.
    page.wait_for_function(f"({PLAYER.format(node=5)} || {{}}).readyState >= 1", timeout=20000)
    webm = player_state(page, 5)
    assert webm["shown"] and "filename=browser_webm" in webm["src"] and webm["src"].endswith("type=output")
    assert ".webm" in webm["src"] and abs(webm["duration"] - FRAMES / FPS) < 0.02 and webm["size"] == [WIDTH, HEIGHT]

    # The animated WEBP of the same run is a picture in its node and in the gallery, as before.
    page.wait_for_function("(loom.runState.outputs['4'] || {images: []}).images.some(i => i.naturalWidth === 64)")
    assert page.evaluate(f"{PLAYER.format(node=4)}") is None
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].some(i => i.src.includes('.webp')"
                           " && i.naturalWidth === 64)")
    page.wait_for_timeout(300)
    page.screenshot(path=ARTIFACTS / "video-output.png")

    # Scrolled out of sight, the node is not drawn and its player hides; back in sight, it shows again.
    page.evaluate("loom.editor.canvas.ds.offset[0] -= 5000; loom.editor.redraw(); loom.editor.canvas.draw(true, true)")
    assert not player_state(page, 3)["shown"]
    page.evaluate("loom.editor.canvas.ds.offset[0] += 5000; loom.editor.redraw(); loom.editor.canvas.draw(true, true)")
    assert player_state(page, 3)["shown"]

    # A removed node takes its player with it.
    page.evaluate("loom.editor.graph.remove(loom.editor.node(3))")
    assert page.evaluate(f"{PLAYER.format(node=3)}") is None
