import pytest

from nodes.node import Node
from nodes.registry import DuplicateNodeError, NodeRegistry, builtin_registry
from nodes.spec import Boolean, Combo, Float, Int, Output, Socket, String


class Example(Node):
    """Does an example thing."""

    category = "tests"
    version = 3
    model = Socket("MODEL", tooltip="the model")
    seed = Int(0, min=0, max=2**64 - 1, control_after_generate=True)
    cfg = Float(8.0, min=0.0, max=100.0, step=0.1)
    text = String("", multiline=True)
    flag = Boolean(True, optional=True)
    sampler_name = Combo(["euler", "dpmpp_2m"])
    outputs = (Output("LATENT"), Output("INT", "count"))


def test_object_info_shape_matches_reference():
    info = Example.object_info()
    assert info["name"] == "Example" and info["display_name"] == "Example"
    assert info["description"] == "Does an example thing."
    assert info["category"] == "tests" and info["output_node"] is False
    required = info["input"]["required"]
    assert required["model"] == ["MODEL", {"tooltip": "the model"}]
    assert required["seed"] == ["INT", {"default": 0, "min": 0, "max": 2**64 - 1, "step": 1,
                                        "control_after_generate": True}]
    assert required["cfg"] == ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}]
    assert required["text"] == ["STRING", {"default": "", "multiline": True}]
    assert required["sampler_name"] == [["euler", "dpmpp_2m"], {"default": "euler"}]
    assert info["input"]["optional"] == {"flag": ["BOOLEAN", {"default": True}]}
    assert info["input_order"] == {"required": ["model", "seed", "cfg", "text", "sampler_name"],
                                   "optional": ["flag"]}
    assert info["output"] == ["LATENT", "INT"]
    assert info["output_name"] == ["LATENT", "count"]
    assert info["output_is_list"] == [False, False]


def test_declared_inputs_are_collected_in_order_and_removed_from_class():
    assert list(Example.inputs) == ["model", "seed", "cfg", "text", "flag", "sampler_name"]
    assert "seed" not in vars(Example)
    assert Example.widget_names() == ["seed", "cfg", "text", "sampler_name", "flag"]


def test_subclass_inherits_and_extends_inputs():
    class Child(Example):
        extra = Int(1)

    assert list(Child.inputs)[-1] == "extra"
    assert "extra" not in Example.inputs


def test_dynamic_combo_lists_choices_each_time():
    choices = ["a"]

    class Files(Node):
        name_ = Combo(lambda: list(choices))

    assert Files.object_info()["input"]["required"]["name_"][0] == ["a"]
    choices.append("b")
    assert Files.object_info()["input"]["required"]["name_"][0] == ["a", "b"]


def test_collision_names_both_sources():
    registry = NodeRegistry()
    registry.register(Example, "pack_one")
    with pytest.raises(DuplicateNodeError) as err:
        registry.register(Example, "pack_two")
    assert "pack_one" in str(err.value) and "pack_two" in str(err.value)


def test_builtin_registry_has_primitives_and_fresh_instances():
    a, b = builtin_registry(), builtin_registry()
    assert "PrimitiveInt" in a and "PreviewAny" in a
    assert a is not b and len(a) == len(b)
