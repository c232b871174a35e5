"""Subgraphs of the editor's UI format (definitions.subgraphs) expanded into flat API graphs, and run."""

import pytest

from executor.executor import Executor
from graph.document import DocumentError, parse_api
from graph.ui_format import ui_to_api


def node(id_, type_, widgets=(), inputs=(), outputs=(), mode=0, **extra):
    return {"id": id_, "type": type_, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
            "widgets_values": list(widgets), **extra}


def sock(name, link, type_="INT", widget=False):
    out = {"name": name, "type": type_, "link": link}
    if widget:
        out["widget"] = {"name": name}
    return out


def olink(id_, origin, origin_slot, target, target_slot, type_="INT"):
    return {"id": id_, "origin_id": origin, "origin_slot": origin_slot, "target_id": target,
            "target_slot": target_slot, "type": type_}


def scaler(id_="sg-scale", inner_factor=1.0, extra_inputs=(), extra_links=(), nodes=None):
    """A subgraph: its input 0 (an INT) goes through Scale; Scale's FLOAT is its output 0."""
    return {
        "id": id_, "name": "Scaler", "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"id": "i0", "name": "value", "type": "INT", "linkIds": [1]}, *extra_inputs],
        "outputs": [{"id": "o0", "name": "FLOAT", "type": "FLOAT", "linkIds": [2]}],
        "widgets": [],
        "nodes": nodes or [node(1, "Scale", [inner_factor], inputs=[sock("value", 1),
                                                                    sock("factor", 3, "FLOAT", widget=True)])],
        "links": [olink(1, -10, 0, 1, 0), olink(2, 1, 0, -20, 0, "FLOAT"), *extra_links],
    }


def workflow(instance, definitions, links_extra=()):
    """Add(2, 3) -> instance (node 5) -> Sink (node 9)."""
    return {
        "nodes": [node(1, "Add", [2, 3], outputs=[{"name": "sum", "type": "INT", "links": [10]}]), instance,
                  node(9, "Sink", inputs=[sock("value", 11, "*")])],
        "links": [[10, 1, 0, 5, 0, "INT"], [11, 5, 0, 9, 0, "FLOAT"], *links_extra],
        "definitions": {"subgraphs": definitions}, "version": 0.4,
    }


def instance(type_="sg-scale", widgets=(), mode=0, **extra):
    return node(5, type_, widgets, inputs=[sock("value", 10)], outputs=[{"name": "FLOAT", "type": "FLOAT",
                                                                             "links": [11]}], mode=mode, **extra)


def sink_value(registry, api):
    result = Executor(registry).run(parse_api(api))
    assert result.ok, result.error
    return result.outputs["9"]["value"][0]


def test_instance_is_replaced_by_its_nodes_with_execution_ids(registry):
    api = ui_to_api(workflow(instance(), [scaler(inner_factor=2.5)]), registry)
    assert set(api) == {"1", "5:1", "9"}
    assert api["5:1"]["inputs"] == {"factor": 2.5, "value": ["1", 0]}  # wired through the subgraph's input
    assert api["9"]["inputs"] == {"value": ["5:1", 0]}  # and out through its output
    assert sink_value(registry, api) == pytest.approx(12.5)


def test_nested_subgraphs_expand_recursively(registry):
    """Shape of ComfyUI_frontend's browser_tests/assets/execution/nested-subgraph-test.json: a subgraph whose
    node chain ends in an instance of a second subgraph."""
    inner = scaler("sg-inner", inner_factor=3.0)
    outer = {
        "id": "sg-outer", "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"name": "value", "type": "INT"}], "outputs": [{"name": "FLOAT", "type": "FLOAT"}],
        "nodes": [node(2, "Add", [0, 1], inputs=[sock("a", 1, widget=True)],
                       outputs=[{"name": "sum", "type": "INT", "links": [2]}]),
                  node(7, "sg-inner", inputs=[sock("value", 2)], outputs=[{"name": "FLOAT", "links": [3]}])],
        "links": [olink(1, -10, 0, 2, 0), olink(2, 2, 0, 7, 0), olink(3, 7, 0, -20, 0, "FLOAT")],
    }
    api = ui_to_api(workflow(instance("sg-outer"), [outer, inner]), registry)
    assert set(api) == {"1", "5:2", "5:7:1", "9"}
    assert api["5:2"]["inputs"] == {"a": ["1", 0], "b": 1}
    assert api["5:7:1"]["inputs"] == {"factor": 3.0, "value": ["5:2", 0]}
    assert sink_value(registry, api) == pytest.approx((5 + 1) * 3.0)


def test_proxy_widget_of_a_nested_instance_reaches_the_inner_node(registry):
    """Shape of the frontend's subgraphs/subgraph-nested-promotion.json: the outer instance promotes a widget
    of a nested instance ([nested node id, its subgraph input's name])."""
    factor_input = {"id": "i1", "name": "factor", "type": "FLOAT", "linkIds": [3]}
    inner = scaler("sg-inner", inner_factor=1.0, extra_inputs=[factor_input],
                   extra_links=[olink(3, -10, 1, 1, 1, "FLOAT")])
    outer = {
        "id": "sg-outer", "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"name": "value", "type": "INT"}], "outputs": [{"name": "FLOAT", "type": "FLOAT"}],
        "nodes": [node(7, "sg-inner", inputs=[sock("value", 1), sock("factor", None, "FLOAT", widget=True)],
                       outputs=[{"name": "FLOAT", "links": [2]}])],
        "links": [olink(1, -10, 0, 7, 0), olink(2, 7, 0, -20, 0, "FLOAT")],
    }
    promoted = instance("sg-outer", widgets=[6.0], properties={"proxyWidgets": [["7", "factor"]]})
    api = ui_to_api(workflow(promoted, [outer, inner]), registry)
    assert api["5:7:1"]["inputs"] == {"factor": 6.0, "value": ["1", 0]}


def test_two_instances_of_one_definition_chain(registry):
    """An instance's output feeds another instance of the same definition: each gets its own node ids."""
    data = workflow(instance(), [scaler(inner_factor=2.0)])
    data["nodes"][2] = node(9, "Sink", inputs=[sock("value", 13, "*")])
    data["nodes"].insert(2, node(6, "Add", [0, 4], inputs=[sock("a", 12, widget=True)],
                                 outputs=[{"name": "sum", "type": "INT", "links": [14]}]))
    data["nodes"].insert(3, node(8, "sg-scale", inputs=[sock("value", 14)], outputs=[{"name": "FLOAT",
                                                                                         "links": [13]}]))
    data["links"] = [[10, 1, 0, 5, 0, "INT"], [12, 5, 0, 6, 0, "FLOAT"], [14, 6, 0, 8, 0, "INT"],
                     [13, 8, 0, 9, 0, "FLOAT"]]
    api = ui_to_api(data, registry)
    assert api["6"]["inputs"]["a"] == ["5:1", 0]
    assert api["8:1"]["inputs"]["value"] == ["6", 0]
    assert api["9"]["inputs"] == {"value": ["8:1", 0]}


def test_promoted_widget_value_of_an_unlinked_subgraph_input(registry):
    """Shape of the frontend's subgraph-with-promoted-text-widget.json (frontend 1.24): a widget input of an
    inner node is a subgraph input; the instance holds its value in its own widgets_values. As in that file,
    the inner link's target_slot disagrees with the input's place in the node's list: the link id decides."""
    factor_input = {"id": "i1", "name": "factor", "type": "FLOAT", "linkIds": [3]}
    definition = scaler(inner_factor=1.0, extra_inputs=[factor_input], extra_links=[olink(3, -10, 1, 1, 0, "FLOAT")])
    api = ui_to_api(workflow(instance(widgets=[4.0]), [definition]), registry)
    assert api["5:1"]["inputs"]["factor"] == 4.0
    assert sink_value(registry, api) == pytest.approx(20.0)


def test_proxy_widgets_override_inner_widget_values(registry):
    """Shape of the frontend's subgraphs/proxy-seed.json (frontend 1.40): properties.proxyWidgets names
    [inner node id, widget] per value of the instance's widgets_values; an empty list keeps the inner values."""
    promoted = instance(widgets=[0.5], properties={"proxyWidgets": [["1", "factor"]]})
    api = ui_to_api(workflow(promoted, [scaler(inner_factor=2.0)]), registry)
    assert api["5:1"]["inputs"]["factor"] == 0.5
    kept = instance(widgets=[], properties={"proxyWidgets": [["1", "factor"]]})
    assert ui_to_api(workflow(kept, [scaler(inner_factor=2.0)]), registry)["5:1"]["inputs"]["factor"] == 2.0
    # Comfy-Org's image_z_image_turbo.json stores null for a proxied seed whose value is the inner KSampler's: the
    # converter gave the KSampler `seed: None`, which validation refused as a missing input.
    nulled = instance(widgets=[None], properties={"proxyWidgets": [["1", "factor"]]})
    assert ui_to_api(workflow(nulled, [scaler(inner_factor=2.0)]), registry)["5:1"]["inputs"]["factor"] == 2.0


def test_ksampler_inside_a_subgraph_keeps_its_widgets_and_outer_links(registry):
    """proxy-seed.json's real shape: KSampler (seed followed by "increment") inside, fed by outer nodes."""
    definition = {
        "id": "5526b801-03ef-4797-9052-cbc171512972", "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"name": n, "type": t} for n, t in (("model", "MODEL"), ("positive", "CONDITIONING"),
                                                      ("negative", "CONDITIONING"), ("latent_image", "LATENT"))],
        "outputs": [{"name": "LATENT", "type": "LATENT"}],
        "nodes": [node(3, "KSampler", [1, "increment", 20, 8, "euler", "normal", 1],
                       inputs=[sock(n, i, t) for i, (n, t) in enumerate(
                           (("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                            ("latent_image", "LATENT")), start=1)])],
        "links": [olink(i, -10, i - 1, 3, i - 1, "X") for i in range(1, 5)] + [olink(7, 3, 0, -20, 0, "LATENT")],
    }
    data = {
        "nodes": [node(4, "CheckpointLoaderSimple", ["x.safetensors"]), node(6, "CLIPTextEncode", ["a"]),
                  node(7, "CLIPTextEncode", ["b"]), node(2, "EmptyLatentImage", [64, 64, 1]),
                  node(10, definition["id"], inputs=[sock("model", 10, "MODEL"), sock("positive", 11, "C"),
                                                     sock("negative", 12, "C"), sock("latent_image", 13, "L")],
                       properties={"proxyWidgets": [["3", "seed"]]}),
                  node(8, "VAEDecode", inputs=[sock("samples", 14, "LATENT"), sock("vae", 15, "VAE")])],
        "links": [[10, 4, 0, 10, 0, "MODEL"], [11, 6, 0, 10, 1, "C"], [12, 7, 0, 10, 2, "C"],
                  [13, 2, 0, 10, 3, "LATENT"], [14, 10, 0, 8, 0, "LATENT"], [15, 4, 2, 8, 1, "VAE"]],
        "definitions": {"subgraphs": [definition]},
    }
    api = ui_to_api(data, registry)
    promoted = ui_to_api({**data, "nodes": [{**n, "widgets_values": [77, "fixed", 3], "properties": {"proxyWidgets": [
        ["3", "seed"], ["3", "control_after_generate"], ["3", "steps"]]}} if n["id"] == 10 else n
        for n in data["nodes"]]}, registry)
    # Workflow templates (Comfy-Org/workflow_templates, 01_get_started_text_to_image.json) promote a seed's
    # control_after_generate as an entry of its own, so the values line up with the entries one for one.
    assert (promoted["10:3"]["inputs"]["seed"], promoted["10:3"]["inputs"]["steps"]) == (77, 3)
    assert api["10:3"]["inputs"] == {"seed": 1, "steps": 20, "cfg": 8, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0],
                                     "negative": ["7", 0], "latent_image": ["2", 0]}
    assert api["8"]["inputs"]["samples"] == ["10:3", 0]


def test_bypassed_instance_passes_its_input_through_and_muted_drops_it(registry):
    definition = scaler()
    definition["inputs"][0]["type"] = "FLOAT"  # so that the bypass finds an input of the output's type
    bypassed = ui_to_api(workflow(instance(mode=4), [definition]), registry)
    assert set(bypassed) == {"1", "9"}
    assert bypassed["9"]["inputs"] == {"value": ["1", 0]}
    muted = ui_to_api(workflow(instance(mode=2), [definition]), registry)
    assert set(muted) == {"1", "9"} and muted["9"]["inputs"] == {}


def test_output_follows_the_link_the_subgraph_output_names(registry):
    """ComfyUI_frontend's subgraphs/subgraph-nested-promotion.json keeps stale links into the subgraph's output
    node beside the live one; the output's own linkIds says which link is live."""
    definition = scaler(inner_factor=2.0)
    definition["nodes"].append(node(2, "Scale", [9.0], inputs=[sock("value", 4)],
                                    outputs=[{"name": "FLOAT", "links": [5]}]))
    definition["links"] += [olink(4, -10, 0, 2, 0), olink(5, 2, 0, -20, 0, "FLOAT")]  # stale, listed last
    api = ui_to_api(workflow(instance(), [definition]), registry)
    assert api["9"]["inputs"] == {"value": ["5:1", 0]}


def test_subgraph_that_contains_itself_is_a_document_error(registry):
    looping = scaler("sg-loop", nodes=[node(1, "sg-loop", inputs=[sock("value", 1)],
                                            outputs=[{"name": "FLOAT", "links": [2]}])])
    with pytest.raises(DocumentError, match="nested too deeply"):
        ui_to_api(workflow(instance("sg-loop"), [looping]), registry)
