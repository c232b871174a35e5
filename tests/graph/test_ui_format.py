import json

import pytest

from graph.document import DocumentError
from graph.load import graph_from_data, load_workflow
from graph.ui_format import ui_to_api


def ui_node(id_, type_, widgets=None, inputs=(), outputs=(), mode=0, **extra):
    return {"id": id_, "type": type_, "pos": [10 * id_, 20], "size": [200, 80], "mode": mode,
            "inputs": list(inputs), "outputs": list(outputs), "widgets_values": widgets or [], **extra}


def link_in(name, link, type_="INT", widget=False):
    out = {"name": name, "type": type_, "link": link}
    if widget:
        out["widget"] = {"name": name}
    return out


UI = {
    "last_node_id": 9,
    "nodes": [
        ui_node(1, "Add", [5, 7]),
        ui_node(2, "Reroute", inputs=[link_in("", 1, "*")]),
        ui_node(3, "Scale", [2.5], inputs=[link_in("value", 2)]),
        ui_node(4, "Sink", inputs=[link_in("value", 3, "FLOAT")]),
        ui_node(5, "Note", ["just a note"]),
        ui_node(6, "PrimitiveNode", [9, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [4]}]),
        ui_node(7, "Add", [0, 1], inputs=[link_in("a", 4, widget=True)], title="Driven by primitive"),
        ui_node(8, "Add", [1, 1], inputs=[link_in("a", 5)], mode=4),  # bypassed: passes node 7 through
        ui_node(9, "Sink", inputs=[link_in("value", 6)]),
        ui_node(10, "Sink", inputs=[link_in("value", 7)], mode=2),  # muted
        ui_node(11, "KSamplerLike", [42, "randomize", 20]),
    ],
    "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "INT"], [3, 3, 0, 4, 0, "FLOAT"], [4, 6, 0, 7, 0, "INT"],
              [5, 7, 0, 8, 0, "INT"], [6, 8, 0, 9, 0, "INT"], [7, 1, 0, 10, 0, "INT"]],
}


def test_ui_format_converts_to_api(registry):
    from nodes.node import Node
    from nodes.spec import Int

    class KSamplerLike(Node):
        output_node = True
        seed = Int(0)
        steps = Int(20)

    registry.register(KSamplerLike, "tests")
    api = ui_to_api(UI, registry)
    assert set(api) == {"1", "3", "4", "7", "9", "11"}  # no Reroute, Note, Primitive, muted, bypassed
    assert api["1"]["inputs"] == {"a": 5, "b": 7}
    assert api["3"]["inputs"] == {"factor": 2.5, "value": ["1", 0]}  # through the reroute
    assert api["7"]["inputs"] == {"a": 9, "b": 1}  # primitive's value pushed in
    assert api["9"]["inputs"] == {"value": ["7", 0]}  # bypassed node 8 passes its input through
    assert api["11"]["inputs"] == {"seed": 42, "steps": 20}  # the "randomize" control value is skipped
    assert api["7"]["_meta"] == {"title": "Driven by primitive", "pos": [70.0, 20.0], "size": [200.0, 80.0]}
    assert api["1"]["_meta"]["title"] == "Add"


def test_a_bypassed_node_passes_each_output_the_input_at_its_index_first(registry):
    """As ComfyUI's editor: LTXVAddGuide bypassed (inputs positive, negative, ...; outputs positive, negative, ...)
    passes its negative output the negative input, not the first CONDITIONING input (the LTX-Video 0.9.5 example's
    negative prompt became its positive one). With no input at the output's index of its type, the first input of
    that type decides, even unconnected."""
    def io(name, link):
        return {"name": name, "type": "INT", "link": link}

    ui = {"nodes": [ui_node(1, "Add", [1, 0]), ui_node(2, "Add", [2, 0]),
                    ui_node(3, "Add", [0, 0], inputs=[io("a", 1), io("b", 2)], mode=4,
                            outputs=[{"name": "x", "type": "INT", "links": [3]},
                                     {"name": "y", "type": "INT", "links": [4]},
                                     {"name": "z", "type": "INT", "links": [5]}]),
                    ui_node(4, "Sink", inputs=[link_in("value", 3)]), ui_node(5, "Sink", inputs=[link_in("value", 4)]),
                    ui_node(6, "Sink", inputs=[link_in("value", 5)]),
                    ui_node(7, "Add", [0, 0], inputs=[io("a", None), io("b", 7)], mode=4,
                            outputs=[{"name": "x", "type": "INT", "links": [6]}]),
                    ui_node(8, "Sink", inputs=[link_in("value", 6)])],
          "links": [[1, 1, 0, 3, 0, "INT"], [2, 2, 0, 3, 1, "INT"], [3, 3, 0, 4, 0, "INT"], [4, 3, 1, 5, 0, "INT"],
                    [5, 3, 2, 6, 0, "INT"], [6, 7, 0, 8, 0, "INT"], [7, 2, 0, 7, 1, "INT"]]}
    api = ui_to_api(ui, registry)
    assert api["4"]["inputs"] == {"value": ["1", 0]} and api["5"]["inputs"] == {"value": ["2", 0]}
    assert api["6"]["inputs"] == {"value": ["1", 0]}  # no third input: the first INT input
    assert api["8"]["inputs"] == {}  # its matching input at index 0 is unconnected: nothing passes


def test_widgets_without_stored_values_get_their_defaults(registry):
    # ComfyUI's editor gives a loaded node its widgets' defaults; a file may leave widgets_values out.
    ui = {"nodes": [ui_node(1, "Add"), ui_node(2, "Scale", inputs=[link_in("value", 1)]),
                    ui_node(3, "Sink", inputs=[link_in("value", 2, "FLOAT")])],
          "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "FLOAT"]]}
    del ui["nodes"][1]["widgets_values"]
    api = ui_to_api(ui, registry)
    assert api["1"]["inputs"] == {"a": 0, "b": 0}
    assert api["2"]["inputs"] == {"factor": 1.0, "value": ["1", 0]}


def test_a_link_from_a_node_the_file_lacks(registry):
    # Kept on a required input (validation then names node 99); dropped on an optional one, as ComfyUI's
    # editor does, so that a stale link does not stop a workflow ComfyUI would run.
    ui = {"nodes": [ui_node(1, "Add", [5], inputs=[link_in("b", 1)]),
                    ui_node(2, "Scale", [2.0], inputs=[link_in("value", 2)])],
          "links": [[1, 99, 0, 1, 1, "INT"], [2, 99, 0, 2, 0, "INT"]]}
    api = ui_to_api(ui, registry)
    assert api["1"]["inputs"] == {"a": 5}
    assert api["2"]["inputs"] == {"factor": 2.0, "value": ["99", 0]}


def test_format_is_detected_when_loading(registry, tmp_path):
    path = tmp_path / "ui.json"
    path.write_text(json.dumps({"nodes": [ui_node(1, "Add", [1, 2]), ui_node(2, "Sink", inputs=[link_in("value", 1)])],
                                "links": [[1, 1, 0, 2, 0, "INT"]]}))
    graph = load_workflow(path, registry)
    assert graph.nodes["2"].inputs["value"].node == "1"
    assert graph_from_data({"prompt": {"1": {"class_type": "Add", "inputs": {"a": 1}}}}, registry).nodes["1"]


def test_schema_1_links_as_objects(registry):
    data = {"nodes": [ui_node(1, "Add", [1, 2]), ui_node(2, "Sink", inputs=[link_in("value", 1)])],
            "links": [{"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "INT"}]}
    assert ui_to_api(data, registry)["2"]["inputs"] == {"value": ["1", 0]}


@pytest.mark.parametrize("data", [{"nodes": [{"id": 1}], "links": []}, {"nodes": [], "links": [[1, 2]]},
                                  {"nodes": "x", "links": []}])
def test_malformed_ui_documents(registry, data):
    with pytest.raises(DocumentError):
        graph_from_data(data, registry)


def test_a_missing_node_the_file_tags_comfy_core_is_named_a_built_in(registry):
    """ComfyUI's editor tags each node with the pack it came from (properties.cnr_id); a type Loom lacks that the
    file says is comfy-core is reported as one of ComfyUI's built-ins, another pack's as a custom node."""
    from graph.document import parse_api
    from graph.validate import validate

    def problem(pack: str) -> str:
        node = ui_node(1, "SomeNewCoreNode", [1], outputs=[{"name": "INT", "type": "INT", "links": [1]}])
        node["properties"] = {"cnr_id": pack, "ver": "0.3.73"}
        ui = {"nodes": [node, ui_node(2, "Sink", inputs=[link_in("value", 1)])], "links": [[1, 1, 0, 2, 0, "INT"]]}
        api = ui_to_api(ui, registry)
        assert api["1"]["_meta"]["cnr_id"] == pack
        [found] = validate(parse_api(api), registry).problems
        return found.details

    assert "one of ComfyUI's built-in nodes, which Loom does not provide yet" in problem("comfy-core")
    assert "a custom node pack in custom_nodes/ may provide it" in problem("comfyui-kjnodes")
