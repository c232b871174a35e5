import json
import os

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from graph.document import parse_api
from graph.validate import validate
from tests.plugins.helpers import load, plugin, write

# Written as ComfyUI node authors write them: no Loom import anywhere.
CLASSIC_PACK = '''
import torch


class ImageInvert:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "invert"
    CATEGORY = "image/postprocessing"
    DESCRIPTION = "1 - pixel"

    def invert(self, image):
        return (1.0 - image,)


class MakeImage:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"width": ("INT", {"default": 4, "min": 1, "max": 64}),
                             "height": ("INT", {"default": 2, "min": 1, "max": 64}),
                             "value": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.05})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    def make(self, width, height, value):
        return (torch.full((1, height, width, 3), value),)


class ImageMean:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT",
                                                              "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True

    def show(self, images, unique_id=None, prompt=None, extra_pnginfo=None):
        assert images.ndim == 4 and images.shape[-1] == 3
        seen = {"node": unique_id, "classes": sorted(n["class_type"] for n in prompt.values()),
                "pnginfo": extra_pnginfo}
        return {"ui": {"text": [round(float(images.mean()), 4)], "seen": [seen]}}


class LatentBlend:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",),
                             "blend_factor": ("FLOAT", {"default": 0.5, "min": 0, "max": 1, "step": 0.01}),
                             "blend_mode": (["normal", "multiply"],)}}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("blended",)
    FUNCTION = "blend"
    CATEGORY = "latent"

    def blend(self, samples1, samples2, blend_factor, blend_mode):
        a, b = samples1["samples"], samples2["samples"]
        other = b if blend_mode == "normal" else a * b
        out = dict(samples1)
        out["samples"] = a * blend_factor + other * (1 - blend_factor)
        return (out,)


class MakeLatent:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"value": ("FLOAT", {"default": 0.0}), "batch_size": ("INT", {"default": 1, "min": 1})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"

    def make(self, value, batch_size):
        return ({"samples": torch.full((batch_size, 4, 8, 8), value)},)


class LatentMean:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "mean"

    def mean(self, samples):
        return (float(samples["samples"].mean()),)


NODE_CLASS_MAPPINGS = {"ClassicImageInvert": ImageInvert, "ClassicMakeImage": MakeImage,
                       "ClassicImageMean": ImageMean, "ClassicLatentBlend": LatentBlend,
                       "ClassicMakeLatent": MakeLatent, "ClassicLatentMean": LatentMean}
NODE_DISPLAY_NAME_MAPPINGS = {"ClassicImageInvert": "Invert Image (classic)"}
'''

LIST_PACK = '''
class SplitWords:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"text": ("STRING", {"default": "", "multiline": True})}}

    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("words", "count")
    OUTPUT_IS_LIST = (True, False)
    FUNCTION = "split"

    def split(self, text):
        words = text.split()
        return (words, len(words))


class Shout:
    CALLS = 0

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"text": ("STRING", {"forceInput": True}), "suffix": ("STRING", {"default": "!"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "shout"

    def shout(self, text, suffix):
        Shout.CALLS += 1
        return (text.upper() + suffix,)


class JoinAll:
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"texts": ("STRING", {"forceInput": True}), "sep": ("STRING", {"default": " "})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "join"
    OUTPUT_NODE = True

    def join(self, texts, sep):
        joined = sep[0].join(texts)
        return {"ui": {"text": [joined]}, "result": (joined,)}


class ShowEach:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"value": ("*",)}}

    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True

    def show(self, value):
        return {"ui": {"text": [str(value)]}}


NODE_CLASS_MAPPINGS = {"SplitWords": SplitWords, "Shout": Shout, "JoinAll": JoinAll, "ShowEach": ShowEach}
'''

FILE_PACK = '''
import hashlib
import os


class ReadText:
    CALLS = 0

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"path": ("STRING", {"default": ""}),
                             "mode": (["strict", "lenient"], {"tooltip": "how to read"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "read"

    @classmethod
    def IS_CHANGED(s, path, mode):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(s, path):
        if not os.path.isfile(path):
            return f"Invalid file: {path}"
        return True

    def read(self, path, mode):
        ReadText.CALLS += 1
        with open(path) as f:
            return (f.read(),)


class Noise:
    CALLS = 0

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"seed": ("INT", {"default": 0, "control_after_generate": True})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    @classmethod
    def IS_CHANGED(s, **kwargs):
        return float("NaN")

    def go(self, seed):
        Noise.CALLS += 1
        return (seed,)


NODE_CLASS_MAPPINGS = {"ClassicReadText": ReadText, "ClassicNoise": Noise}
'''


@pytest.fixture
def registry(custom_nodes):
    write(custom_nodes / "classic_pack.py", CLASSIC_PACK)
    write(custom_nodes / "list_pack" / "__init__.py", LIST_PACK)
    write(custom_nodes / "file_pack.py", FILE_PACK)
    registry = load(custom_nodes)
    assert all(p.loaded and not p.error for p in registry.plugins), registry.plugins
    return registry


def test_schema_of_classic_nodes(registry):
    info = registry.object_info("ClassicLatentBlend")["ClassicLatentBlend"]
    assert info["category"] == "latent" and info["python_module"] == "custom_nodes.classic_pack"
    assert info["input"]["required"]["blend_factor"] == ["FLOAT", {"default": 0.5, "min": 0, "max": 1, "step": 0.01}]
    assert info["input"]["required"]["blend_mode"] == [["normal", "multiply"], {"default": "normal"}]
    assert info["output"] == ["LATENT"] and info["output_name"] == ["blended"]
    invert = registry.object_info("ClassicImageInvert")["ClassicImageInvert"]
    assert invert["display_name"] == "Invert Image (classic)" and invert["description"] == "1 - pixel"
    split = registry.object_info("SplitWords")["SplitWords"]
    assert split["output_is_list"] == [True, False] and split["output_name"] == ["words", "count"]
    read = registry.object_info("ClassicReadText")["ClassicReadText"]["input"]["required"]
    assert read["mode"] == [["strict", "lenient"], {"default": "strict", "tooltip": "how to read"}]
    assert registry.object_info("ClassicNoise")["ClassicNoise"]["input"]["required"]["seed"][1][
        "control_after_generate"] is True
    assert registry.object_info("Shout")["Shout"]["input"]["required"]["text"] == ["STRING", {"forceInput": True}]
    assert registry.object_info("ClassicImageMean")["ClassicImageMean"]["input"]["hidden"]["unique_id"][0] == \
        "UNIQUE_ID"


def test_image_invert_and_latent_blend_run_beside_builtin_nodes(registry):
    doc = {"1": {"class_type": "ClassicMakeImage", "inputs": {"width": 4, "height": 2, "value": 0.25}},
           "2": {"class_type": "ClassicImageInvert", "inputs": {"image": ["1", 0]}},
           "3": {"class_type": "ClassicImageMean", "inputs": {"images": ["2", 0]}},
           "4": {"class_type": "ClassicMakeLatent", "inputs": {"value": 1.0, "batch_size": 2}},
           "5": {"class_type": "ClassicMakeLatent", "inputs": {"value": 3.0, "batch_size": 2}},
           "6": {"class_type": "ClassicLatentBlend",
                 "inputs": {"samples1": ["4", 0], "samples2": ["5", 0], "blend_factor": 0.25, "blend_mode": "normal"}},
           "7": {"class_type": "ClassicLatentMean", "inputs": {"samples": ["6", 0]}},
           "8": {"class_type": "FloatMath", "inputs": {"a": ["7", 0], "b": 2.0, "operation": "multiply"}},
           "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}}}
    result = Executor(registry).run(parse_api(doc), extra={"extra_pnginfo": {"workflow": {"nodes": []}}},
                                    keep=["2", "6"])
    assert result.ok, result.error
    image = result.values["2"][0]
    assert image.shape == (1, 2, 4, 3) and image.dtype == torch.float32 and torch.allclose(image, torch.tensor(0.75))
    assert result.values["6"][0]["samples"].shape == (2, 4, 8, 8)
    assert result.outputs["9"] == {"text": ["5.0"]}  # (1 * 0.25 + 3 * 0.75) * 2
    text, seen = result.outputs["3"]["text"], result.outputs["3"]["seen"][0]
    assert text == [0.75] and seen["node"] == "3" and seen["pnginfo"] == {"workflow": {"nodes": []}}
    assert "ClassicLatentBlend" in seen["classes"] and "PreviewAny" in seen["classes"]


def test_classic_values_are_validated(registry):
    doc = {"1": {"class_type": "ClassicMakeLatent", "inputs": {"value": 1.0, "batch_size": 1}},
           "2": {"class_type": "ClassicLatentBlend",
                 "inputs": {"samples1": ["1", 0], "samples2": ["1", 0], "blend_factor": 2, "blend_mode": "screen"}},
           "3": {"class_type": "ClassicImageMean", "inputs": {"images": ["2", 0]}}}
    checked = validate(parse_api(doc), registry)
    assert sorted(p.type for p in checked.problems) == ["return_type_mismatch", "value_bigger_than_max",
                                                        "value_not_in_list"]


def test_list_output_feeds_a_node_once_per_item(registry):
    doc = {"1": {"class_type": "SplitWords", "inputs": {"text": "a bb ccc"}},
           "2": {"class_type": "Shout", "inputs": {"text": ["1", 0], "suffix": "!"}},
           "3": {"class_type": "ShowEach", "inputs": {"value": ["2", 0]}},
           "4": {"class_type": "JoinAll", "inputs": {"texts": ["2", 0], "sep": "-"}},
           "5": {"class_type": "ShowEach", "inputs": {"value": ["1", 1]}}}
    executor = Executor(registry)
    result = executor.run(parse_api(doc), keep=["2"])
    assert result.ok, result.error
    assert registry.get("Shout").classic.CALLS == 3
    assert result.values["2"][0] == ["A!", "BB!", "CCC!"]
    assert result.outputs["3"] == {"text": ["A!", "BB!", "CCC!"]}  # one call per item, UI joined
    assert result.outputs["4"] == {"text": ["A!-BB!-CCC!"]}  # INPUT_IS_LIST: one call with the list
    assert result.outputs["5"] == {"text": ["3"]}  # a plain output beside a list one
    again = executor.run(parse_api(doc))
    assert again.executed == [] and again.outputs["3"] == {"text": ["A!", "BB!", "CCC!"]}


def test_is_changed_reruns_when_the_file_changes(registry, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("one")
    doc = {"1": {"class_type": "ClassicReadText", "inputs": {"path": str(path), "mode": "strict"}},
           "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    executor = Executor(registry)
    cls = registry.get("ClassicReadText").classic
    assert executor.run(parse_api(doc)).outputs["2"] == {"text": ["one"]}
    assert executor.run(parse_api(doc)).executed == [] and cls.CALLS == 1
    path.write_text("two")
    os.utime(path, (1, 1))  # same size, old mtime: only the content hash tells the change
    result = executor.run(parse_api(doc))
    assert result.executed == ["1", "2"] and result.outputs["2"] == {"text": ["two"]} and cls.CALLS == 2


def test_validate_inputs_refuses_and_nan_always_reruns(registry, tmp_path):
    doc = {"1": {"class_type": "ClassicReadText", "inputs": {"path": str(tmp_path / "nope.txt"), "mode": "strict"}},
           "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    with pytest.raises(WorkflowInvalid) as caught:
        Executor(registry).run(parse_api(doc))
    (problem,) = caught.value.problems
    assert problem.type == "custom_validation_failed" and "Invalid file" in problem.details
    noise = {"1": {"class_type": "ClassicNoise", "inputs": {"seed": 5}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    executor = Executor(registry)
    executor.run(parse_api(noise))
    assert executor.run(parse_api(noise)).executed == ["1", "2"]
    assert registry.get("ClassicNoise").classic.CALLS == 2


def test_object_info_is_json(registry):
    json.dumps(registry.object_info())


@pytest.mark.parametrize("source, module", [
    ("import comfy.model_management\n", "comfy.model_management"),
    ("from comfy.utils import common_upscale\n", "comfy.utils"),
    ("import folder_paths\n", "folder_paths"),
    ("from server import PromptServer\n", "server"),
    ("import latent_preview\n", "latent_preview"),
    ("from nodes import MAX_RESOLUTION\n", "nodes.MAX_RESOLUTION"),
    ("import nodes\nX = nodes.MAX_RESOLUTION\n", "nodes.MAX_RESOLUTION"),
])
def test_comfy_internals_are_named(custom_nodes, source, module):
    write(custom_nodes / "needs_comfy" / "__init__.py", "from .impl import NODE_CLASS_MAPPINGS\n")
    write(custom_nodes / "needs_comfy" / "impl.py", source + "NODE_CLASS_MAPPINGS = {}\n")
    info = plugin(load(custom_nodes), "needs_comfy")
    assert not info.loaded
    assert info.error == f"this plugin imports ComfyUI internals (`{module}`), which Loom does not provide"


def test_a_bad_classic_class_is_refused_alone(custom_nodes):
    write(custom_nodes / "half_bad.py", CLASSIC_PACK.replace(
        'NODE_CLASS_MAPPINGS = {', 'class NoFunction:\n    @classmethod\n    def INPUT_TYPES(s):\n'
        '        return {}\n    RETURN_TYPES = ()\n\n\nNODE_CLASS_MAPPINGS = {"NoFunction": NoFunction, '))
    info = plugin(load(custom_nodes), "half_bad")
    assert info.loaded and "ClassicImageInvert" in info.node_names and "NoFunction" not in info.node_names
    assert "NoFunction" in info.error and "FUNCTION" in info.error


COMBO_PACK = '''
import os

FOLDER = os.environ["LOOM_TEST_COMBO_FOLDER"]


class PickFile:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"name": (sorted(os.listdir(FOLDER)),)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "pick"

    def pick(self, name):
        return (name,)


class PickModel:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"model": (["a", "b"],), "scale": ("INT", {"default": 1, "max": 4}),
                             "mode": ("COMBO", {"options": sorted(os.listdir(FOLDER)), "default": "one.txt"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "pick"

    @classmethod
    def VALIDATE_INPUTS(s, model):
        return True if model in ("a", "b") or model.startswith("remote:") else f"unknown model {model}"

    def pick(self, model, scale, mode):
        return (model * scale,)


NODE_CLASS_MAPPINGS = {"PickFile": PickFile, "PickModel": PickModel}
'''


def test_combo_choices_are_listed_afresh_and_validate_inputs_replaces_builtin_checks(custom_nodes, tmp_path,
                                                                                      monkeypatch):
    files = tmp_path / "files"
    files.mkdir()
    (files / "one.txt").write_text("")
    monkeypatch.setenv("LOOM_TEST_COMBO_FOLDER", str(files))
    write(custom_nodes / "combo_pack.py", COMBO_PACK)
    registry = load(custom_nodes)

    def problems(class_type, **inputs):
        doc = {"1": {"class_type": class_type, "inputs": inputs},
               "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
        return [(p.type, p.input_name) for p in validate(parse_api(doc), registry).problems]

    assert problems("PickFile", name="two.txt") == [("value_not_in_list", "name")]
    (files / "two.txt").write_text("")
    assert problems("PickFile", name="two.txt") == []
    assert registry.object_info("PickFile")["PickFile"]["input"]["required"]["name"][0] == ["one.txt", "two.txt"]
    assert problems("PickModel", model="remote:x", scale=2, mode="two.txt") == []  # VALIDATE_INPUTS names `model`
    assert problems("PickModel", model="c", scale=9, mode="one.txt") == [("value_bigger_than_max", "scale")]
    assert problems("PickModel", model="c", scale=1, mode="one.txt") == [("custom_validation_failed", None)]
    (files / "three.txt").write_text("")
    assert problems("PickModel", model="a", scale=1, mode="three.txt") == []  # new-style COMBO, listed afresh
    assert registry.object_info("PickModel")["PickModel"]["input"]["required"]["mode"] == [
        ["one.txt", "three.txt", "two.txt"], {"default": "one.txt"}]


def test_node_expansion_fails_with_a_clear_message(custom_nodes):
    write(custom_nodes / "expanding.py", '''
class Expand:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    def go(self):
        return {"result": (1,), "expand": {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 1}}}}


NODE_CLASS_MAPPINGS = {"Expand": Expand}
''')
    doc = {"1": {"class_type": "Expand", "inputs": {}},
           "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    result = Executor(load(custom_nodes)).run(parse_api(doc))
    assert result.status == "error" and "node expansion" in result.error.exception_message


def test_comfy_internals_reached_late_are_named_too(custom_nodes):
    write(custom_nodes / "late_comfy.py", '''
import nodes


class Sized:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"width": ("INT", {"default": 512, "max": nodes.MAX_RESOLUTION})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    def go(self, width):
        return (width,)


class Lazy:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    def go(self):
        import comfy.model_management
        return (comfy.model_management.get_torch_device(),)


NODE_CLASS_MAPPINGS = {"Sized": Sized, "LateComfy": Lazy}
''')
    registry = load(custom_nodes)
    info = plugin(registry, "late_comfy")
    assert info.node_names == ["LateComfy"]
    assert "imports ComfyUI internals (`nodes.MAX_RESOLUTION`)" in info.error and "'Sized'" in info.error
    doc = {"1": {"class_type": "LateComfy", "inputs": {}},
           "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    result = Executor(registry).run(parse_api(doc))
    assert result.error.exception_type == "ComfyInternalsError"
    assert "`comfy.model_management`" in result.error.exception_message


def test_editor_files_with_classic_nodes_convert_and_run(registry):
    from graph.load import graph_from_data

    ui = {"nodes": [
        {"id": 1, "type": "ClassicNoise", "mode": 0, "inputs": [], "outputs": [{"name": "INT", "type": "INT"}],
         "widgets_values": [7, "randomize"]},
        {"id": 2, "type": "ClassicLatentBlend", "mode": 0, "widgets_values": [0.5, "multiply"],
         "inputs": [{"name": "samples1", "type": "LATENT", "link": 2},
                    {"name": "samples2", "type": "LATENT", "link": 5}]},
        {"id": 3, "type": "ClassicMakeLatent", "mode": 0, "inputs": [], "widgets_values": [2.0, 1]},
        {"id": 4, "type": "ClassicLatentMean", "mode": 0, "inputs": [{"name": "samples", "type": "LATENT", "link": 3}]},
        {"id": 5, "type": "PreviewAny", "mode": 0, "inputs": [{"name": "source", "type": "*", "link": 1}]},
        {"id": 6, "type": "PreviewAny", "mode": 0, "inputs": [{"name": "source", "type": "*", "link": 4}]}],
        "links": [[1, 1, 0, 5, 0, "INT"], [2, 3, 0, 2, 0, "LATENT"], [3, 2, 0, 4, 0, "LATENT"],
                  [4, 4, 0, 6, 0, "FLOAT"], [5, 3, 0, 2, 1, "LATENT"]]}
    graph = graph_from_data(ui, registry)
    assert graph.nodes["1"].inputs == {"seed": 7}
    assert graph.nodes["2"].inputs["blend_factor"] == 0.5 and graph.nodes["2"].inputs["blend_mode"] == "multiply"
    result = Executor(registry).run(graph)
    assert result.ok, result.error
    assert result.outputs["5"] == {"text": ["7"]} and result.outputs["6"] == {"text": ["3.0"]}  # 2*.5 + 4*.5
