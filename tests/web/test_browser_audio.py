"""Audio in the editor, in real headless Chromium: LoadAudio's upload button sends a WAV and a player shows the chosen
file; LoadAudio -> PreviewAudio queued from the editor shows an <audio> player whose FLAC loads and plays."""

import math

import av
import numpy as np

from tests.web import test_browser
from tests.web.test_browser import ARTIFACTS

server, browser, page = test_browser.server, test_browser.browser, test_browser.page  # its fixtures

RATE = 22050
DOC = {
    "1": {"class_type": "LoadAudio", "inputs": {"audio": "tone.wav"}, "_meta": {"pos": [40, 80]}},
    "2": {"class_type": "PreviewAudio", "inputs": {"audio": ["1", 0]}, "_meta": {"pos": [420, 80]}},
}
PLAYER = "document.querySelector('audio.node-audio[data-node=\"{node}\"]')"


def write_wav(path, seconds: float = 0.5) -> None:
    t = np.arange(round(seconds * RATE)) / RATE
    pcm = np.round(0.4 * np.sin(2 * math.pi * 440 * t) * 32767).astype(np.int16)[None]
    with av.open(str(path), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16p", layout="mono")
        frame.sample_rate, frame.pts = RATE, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def player_state(page, node):
    """The node's player: whether it shows, its duration once loaded, and where it sits."""
    return page.evaluate(f"""(p => p && {{shown: p.style.display !== 'none', ready: p.readyState,
        duration: p.duration, src: p.src, box: (r => [r.left, r.top, r.width, r.height])(p.getBoundingClientRect())}})
        ({PLAYER.format(node=node)})""")


def test_upload_a_wav_then_preview_it_in_a_player(page, server, tmp_path):
    path = tmp_path / "tone.wav"
    write_wav(path)
    page.evaluate("doc => loom.editor.load(doc, 'audio.json')", DOC)

    x, y = page.evaluate("loom.editor.screenPos(1, 'widget', 'choose file to upload')")
    with page.expect_file_chooser() as chooser:
        page.mouse.click(x, y)
    chooser.value.set_files(str(path))
    page.wait_for_function("loom.editor.node(1).widgets[0].options.values.includes('tone.wav')")
    assert page.evaluate("loom.editor.node(1).widgets[0].value") == "tone.wav"
    assert (server.base / "input" / "tone.wav").read_bytes() == path.read_bytes()
    page.evaluate("loom.editor.redraw()")
    page.wait_for_function(f"({PLAYER.format(node=1)} || {{}}).readyState >= 1", timeout=20000)
    chosen = player_state(page, 1)
    assert chosen["shown"] and "filename=tone.wav" in chosen["src"] and "type=input" in chosen["src"]
    assert abs(chosen["duration"] - 0.5) < 0.01

    page.click("#queue-button")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=20000)
    page.evaluate("loom.editor.redraw()")
    page.wait_for_function(f"({PLAYER.format(node=2)} || {{}}).readyState >= 1", timeout=20000)
    played = player_state(page, 2)
    assert played["shown"] and "type=temp" in played["src"] and ".flac" in played["src"]
    assert abs(played["duration"] - 0.5) < 0.01
    response = page.evaluate("src => fetch(src).then(r => [r.status, r.headers.get('content-type')])", played["src"])
    assert response == [200, "audio/flac"]

    # The player sits inside its node on the screen, below the node's widgets.
    node_box = page.evaluate("""(() => { const n = loom.editor.node(2); const c = loom.editor.canvas;
        const [x, y] = c.ds.convertOffsetToCanvas(n.pos); const [r, b] = c.ds.convertOffsetToCanvas(
        [n.pos[0] + n.size[0], n.pos[1] + n.size[1]]); const o = c.canvas.getBoundingClientRect();
        return [o.left + x, o.top + y, o.left + r, o.top + b]; })()""")
    left, top, width, height = played["box"]
    assert node_box[0] <= left and left + width <= node_box[2] + 1
    assert node_box[1] <= top and top + height <= node_box[3] + 1
    page.wait_for_timeout(200)
    page.screenshot(path=ARTIFACTS / "audio-preview.png")

    # Scrolled out of sight, the node is not drawn and its player hides.
    page.evaluate("loom.editor.canvas.ds.offset[0] -= 5000; loom.editor.redraw(); loom.editor.canvas.draw(true, true)")
    assert not player_state(page, 2)["shown"]

    # A removed node takes its player with it.
    page.evaluate("loom.editor.graph.remove(loom.editor.node(2))")
    assert page.evaluate(f"{PLAYER.format(node=2)}") is None
