"""Opening a workflow from an audio file in the editor, in real headless Chromium: a FLAC that SaveAudio wrote, chosen
through the Open button's file chooser, goes to POST /workflow/from_file and its graph appears; a FLAC without a
workflow leaves the graph as it was and shows the server's message in the error toast."""

import pytest

from nodes.folders import FolderPaths, set_paths
from tests.graph.test_load_media import WORKFLOW, saved_audio
from tests.web import test_browser
from tests.web.test_browser import ARTIFACTS

server, browser, page = test_browser.server, test_browser.browser, test_browser.page  # its fixtures


@pytest.fixture
def made(tmp_path):
    """An output folder the save nodes write the test's files to (this process's; the server has its own)."""
    folders = FolderPaths(base=tmp_path / "made", bundled_models=None)
    set_paths(folders)
    yield folders.output
    set_paths(FolderPaths())


def open_through_the_chooser(page, path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click("#open-button")
    chooser.value.set_files(str(path))


def test_open_a_saved_flac_shows_its_graph(page, made):
    open_through_the_chooser(page, saved_audio(made, "flac"))
    page.wait_for_function("loom.editor.graph._nodes.map(n => n.type).sort().join() === 'EmptyAudio,SaveAudio'")
    nodes = page.evaluate("""loom.editor.graph._nodes.map(n => ({id: n.id, type: n.type, pos: [n.pos[0], n.pos[1]],
        values: (n.widgets || []).filter(w => w.name !== 'control_after_generate').map(w => w.value)}))""")
    assert sorted(nodes, key=lambda n: n["id"]) == [
        {"id": node["id"], "type": node["type"], "pos": node["pos"], "values": node["widgets_values"]}
        for node in WORKFLOW["nodes"]]
    assert page.evaluate("loom.editor.node(2).inputs[0].link !== null")  # the link came too
    page.wait_for_selector(".toast:not(.error)")
    assert not page.query_selector(".toast.error")
    page.screenshot(path=ARTIFACTS / "open-flac.png")


def test_a_flac_without_a_workflow_shows_the_servers_message(page, made):
    before = page.evaluate("loom.editor.graph._nodes.map(n => n.type)")
    path = saved_audio(made, "flac", prefix="bare", workflow=False)
    open_through_the_chooser(page, path)
    page.wait_for_selector(".toast.error")
    assert page.text_content(".toast.error") == (
        f"{path.name}: this FLAC carries no workflow (no 'prompt' or 'workflow' entry)")
    assert page.evaluate("loom.editor.graph._nodes.map(n => n.type)") == before
