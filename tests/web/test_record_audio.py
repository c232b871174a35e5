"""RecordAudio in the editor, in headless Chromium with its fake microphone (a beep): the record button records about
a second, the recording is uploaded to input/audio/ and named by the widget, a player shows it; RecordAudio ->
PreviewAudio queued from the editor shows the preview's player."""

import re

import pytest

from nodes.sd.audio import read_audio
from tests.web.test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, sync_api
from tests.web.test_browser_audio import PLAYER, player_state
from tests.web.test_restart import Server

FAKE_MICROPHONE = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
DOC = {
    "1": {"class_type": "RecordAudio", "inputs": {"audio": ""}, "_meta": {"pos": [40, 80]}},
    "2": {"class_type": "PreviewAudio", "inputs": {"audio": ["1", 0]}, "_meta": {"pos": [420, 80]}},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("record"))
    yield server
    server.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + FAKE_MICROPHONE)
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


def test_record_a_second_then_preview_it(page, server):
    page.evaluate("doc => loom.editor.load(doc, 'record.json')", DOC)
    widget = "loom.editor.node(1).widgets.find(w => w.name === 'audio')"
    assert page.evaluate(f"{widget}.type") == "audiorecord" and page.evaluate(f"{widget}.label") == "record"

    page.mouse.click(*page.evaluate("loom.editor.screenPos(1, 'widget', 'audio')"))
    page.wait_for_function(f"{widget}.label === 'stop recording'", timeout=10000)
    page.wait_for_timeout(1000)
    page.mouse.click(*page.evaluate("loom.editor.screenPos(1, 'widget', 'audio')"))
    page.wait_for_function(f"{widget}.value !== ''", timeout=10000)
    assert page.evaluate(f"{widget}.label") == "record"

    name = page.evaluate(f"{widget}.value")
    assert re.fullmatch(r"audio/recording-\d+\.webm", name)
    recording = read_audio(server.base / "input" / name)
    seconds = recording["waveform"].shape[-1] / recording["sample_rate"]
    assert 0.6 < seconds < 3.0 and recording["waveform"].abs().max() > 0.01  # the fake microphone's beep
    page.evaluate("loom.editor.redraw()")
    page.wait_for_function(f"({PLAYER.format(node=1)} || {{}}).readyState >= 1", timeout=20000)
    chosen = player_state(page, 1)
    assert chosen["shown"] and f"filename={name.split('/')[1]}" in chosen["src"] and "subfolder=audio" in chosen["src"]

    page.click("#queue-button")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=20000)
    page.evaluate("loom.editor.redraw()")
    page.wait_for_function(f"({PLAYER.format(node=2)} || {{}}).readyState >= 1", timeout=20000)
    played = player_state(page, 2)
    assert played["shown"] and "type=temp" in played["src"] and ".flac" in played["src"]
    assert abs(played["duration"] - seconds) < 0.05
    page.screenshot(path=ARTIFACTS / "record-audio.png")

    # The name is the node's widget value in the saved workflow, and comes back with it.
    saved = page.evaluate("loom.editor.graph.serialize()")
    assert [n["widgets_values"] for n in saved["nodes"] if n["type"] == "RecordAudio"] == [[name]]


def test_a_node_removed_while_recording_frees_the_microphone_and_uploads_nothing(page, server):
    page.evaluate("doc => loom.editor.load(doc, 'record.json')", DOC)
    page.mouse.click(*page.evaluate("loom.editor.screenPos(1, 'widget', 'audio')"))
    page.wait_for_function("loom.editor.node(1).widgets[0].label === 'stop recording'", timeout=10000)
    before = sorted((server.base / "input").rglob("recording-*"))
    page.evaluate("window.recorded = loom.editor.node(1); loom.editor.graph.remove(loom.editor.node(1))")
    page.wait_for_timeout(500)
    assert sorted((server.base / "input").rglob("recording-*")) == before
    assert page.evaluate("recorded.widgets[0].label") == "record"  # the removal let its recorder go
