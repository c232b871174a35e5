"""ComfyUI's smaller latent, batch and conditioning nodes (nodes/sd/latent_extra.py: BatchLatentsNode, BatchMasksNode,
LatentConcat, ReplaceVideoLatentFrames, LTXVFreezeLatent, ConditioningMultiply; LatentOperationBlend in
nodes/sd/latent_operations.py): their declarations against ComfyUI's, their results against index-by-index
transcriptions of ComfyUI's arithmetic, and API prompts that run them through the executor."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from executor.executor import Executor, WorkflowInvalid
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.node import Node
from nodes.registry import builtin_registry
from nodes.sd.latent_extra import (
    BatchLatentsNode,
    BatchMasksNode,
    ConditioningMultiply,
    LatentConcat,
    LTXVFreezeLatent,
    ReplaceVideoLatentFrames,
)
from nodes.sd.latent_operations import LatentOperationBlend
from nodes.spec import Output, String

# Values the test-only source nodes hand to a workflow, by name.
VALUES: dict[str, object] = {}


class LatentSource(Node):
    """A prepared LATENT, by name (the workflows below need latents with chosen numbers in them)."""

    category = "tests"
    cacheable = False
    key = String("")
    outputs = (Output("LATENT"),)

    def execute(self, key: str) -> tuple[object]:
        return (VALUES[key],)


class MaskSource(LatentSource):
    outputs = (Output("MASK"),)


def run(cls, **inputs):
    return cls().execute(**inputs)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def registry():
    registry = builtin_registry()
    registry.register(LatentSource, "tests")
    registry.register(MaskSource, "tests")
    return registry


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The folders of a tiny random-weight SD1 checkpoint, for the nodes that need a CLIP or a model."""
    root = tmp_path_factory.mktemp("latent_extra")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=3)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def outputs(executor, graph, *nodes):
    """The outputs of `nodes`, after running the graph with a PreviewAny on each."""
    graph = {**graph, **{f"show{node}": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}
                         for node in nodes}}
    result = executor.run(parse_api(graph), keep=list(nodes))
    assert result.ok, result.error
    return [result.values[node][0] for node in nodes]


def source(key, value, kind="LatentSource"):
    VALUES[key] = value
    return {"class_type": kind, "inputs": {"key": key}}


def crop_resize(x, height, width):
    """ComfyUI's common_upscale(x, width, height, "bilinear", "center") of [N, C, h, w], written out: as many rows
    (or columns) cut from each side as round((h - h * ratio) / 2), then bilinear resizing without aligned corners."""
    h, w = x.shape[-2:]
    old, new = w / h, width / height
    if old > new:
        cut = round((w - w * new / old) / 2)
        x = x[..., cut:w - cut]
    elif old < new:
        cut = round((h - h * old / new) / 2)
        x = x[..., cut:h - cut, :]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


# --- Declarations ---------------------------------------------------------------------------------


def test_declarations_match_comfyui(registry):
    info = {name: registry.get(name).object_info() for name in (
        "BatchLatentsNode", "BatchMasksNode", "LatentConcat", "ReplaceVideoLatentFrames", "LTXVFreezeLatent",
        "ConditioningMultiply", "LatentOperationBlend")}
    described = {name: (i["display_name"], i["category"], i["output"], i["output_name"]) for name, i in info.items()}
    assert described == {
        "BatchLatentsNode": ("Batch Latents", "model/latent/batch", ["LATENT"], ["LATENT"]),
        "BatchMasksNode": ("Batch Masks", "image/mask", ["MASK"], ["MASK"]),
        "LatentConcat": ("LatentConcat", "model/latent/advanced", ["LATENT"], ["LATENT"]),
        "ReplaceVideoLatentFrames": ("Replace Video Latent Frames", "model/latent/batch", ["LATENT"], ["LATENT"]),
        "LTXVFreezeLatent": ("LTXV Freeze Latent", "model/latent/ltxv", ["LATENT"], ["latent"]),
        "ConditioningMultiply": ("Conditioning (Multiply)", "model/conditioning/transform", ["CONDITIONING"],
                                 ["CONDITIONING"]),
        "LatentOperationBlend": ("Latent Operation Blend", "model/latent/advanced/operations", ["LATENT_OPERATION"],
                                 ["LATENT_OPERATION"]),
    }
    # The autogrow inputs: fifty sockets, the first required (ComfyUI's template min=1, max=50).
    for name, group, prefix, kind in (("BatchLatentsNode", "latents", "latent", "LATENT"),
                                      ("BatchMasksNode", "masks", "mask", "MASK")):
        order = info[name]["input_order"]
        assert order["required"] == [f"{group}.{prefix}0"]
        assert order["optional"] == [f"{group}.{prefix}{slot}" for slot in range(1, 50)]
        assert info[name]["input"]["required"][f"{group}.{prefix}0"] == [kind, {}]
        assert info[name]["input"]["optional"][f"{group}.{prefix}1"] == [kind, {"autogrow": True}]

    def options(name, key, group="required"):
        spec = info[name]["input"][group][key]
        return spec[0], {k: v for k, v in spec[1].items() if k != "tooltip"}

    assert info["LatentConcat"]["input_order"] == {"required": ["samples1", "samples2", "dim"], "optional": []}
    assert options("LatentConcat", "dim") == (["x", "-x", "y", "-y", "t", "-t"], {"default": "x"})
    # ComfyUI's order is destination, source (optional), index; the editor's widgets are index alone.
    assert info["ReplaceVideoLatentFrames"]["input_order"] == {"required": ["destination", "index"],
                                                               "optional": ["source"]}
    assert options("ReplaceVideoLatentFrames", "index") == ("INT", {"default": 0, "min": -16384, "max": 16384,
                                                                   "step": 1})
    assert registry.get("ReplaceVideoLatentFrames").widget_names() == ["index"]
    assert info["LTXVFreezeLatent"]["input_order"]["required"] == ["latent"]
    assert info["ConditioningMultiply"]["input_order"]["required"] == ["conditioning", "multiplier"]
    assert options("ConditioningMultiply", "multiplier") == ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0,
                                                                      "step": 0.01})
    assert info["LatentOperationBlend"]["input_order"]["required"] == ["reference", "strength"]
    assert options("LatentOperationBlend", "strength") == ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0,
                                                                    "step": 0.0001})


# --- BatchLatentsNode / BatchMasksNode ------------------------------------------------------------


def test_batch_latents_resizes_to_the_first_and_joins_batch_indices():
    first = {"samples": randn(2, 4, 6, 8), "noise_mask": torch.ones(1, 1, 48, 64), "batch_index": [7, 3]}
    wide = {"samples": randn(1, 4, 6, 12, seed=1)}  # another aspect: centre-cropped to 6 x 8, kept at that size
    tall = {"samples": randn(3, 4, 12, 6, seed=2), "batch_index": [5, 5, 1]}
    # Slot 10 after slot 2: numeric order, not the names' text order.
    (out,) = run(BatchLatentsNode, **{"latents.latent0": first, "latents.latent10": tall, "latents.latent2": wide})
    assert out["samples"].shape == (6, 4, 6, 8)
    torch.testing.assert_close(out["samples"][:2], first["samples"])
    torch.testing.assert_close(out["samples"][2:3], wide["samples"][..., 2:10])  # the crop is already 6 x 8
    torch.testing.assert_close(out["samples"][3:], crop_resize(tall["samples"], 6, 8))
    assert out["batch_index"] == [7, 3, 0, 5, 5, 1]  # a latent without indices counts 0, 1, ...
    assert out["noise_mask"] is first["noise_mask"]  # the first latent's other keys, as ComfyUI keeps them


def test_batch_latents_resizes_each_frame_of_a_video_latent():
    first = {"samples": randn(1, 16, 3, 4, 4)}
    other = {"samples": randn(2, 16, 3, 8, 8, seed=1)}
    (out,) = run(BatchLatentsNode, **{"latents.latent0": first, "latents.latent1": other})
    assert out["samples"].shape == (3, 16, 3, 4, 4) and out["batch_index"] == [0, 0, 1]
    for item in range(2):
        for frame in range(3):
            expected = F.interpolate(other["samples"][item:item + 1, :, frame], size=(4, 4), mode="bilinear")
            torch.testing.assert_close(out["samples"][1 + item:2 + item, :, frame], expected)
    (alone,) = run(BatchLatentsNode, **{"latents.latent0": first})  # one is enough (ComfyUI's min=1)
    torch.testing.assert_close(alone["samples"], first["samples"])
    assert alone["batch_index"] == [0]


def test_batch_latents_refuses_latents_of_another_family():
    with pytest.raises(ValueError, match=r"BatchLatentsNode: latent 1 has shape \(1, 16, 4, 4\) and latent 0 "
                                         r"\(1, 4, 4, 4\); batch latents of one model family"):
        run(BatchLatentsNode, **{"latents.latent0": {"samples": torch.zeros(1, 4, 4, 4)},
                                 "latents.latent1": {"samples": torch.zeros(1, 16, 4, 4)}})
    with pytest.raises(ValueError, match="same frames for videos"):
        run(BatchLatentsNode, **{"latents.latent0": {"samples": torch.zeros(1, 16, 3, 4, 4)},
                                 "latents.latent1": {"samples": torch.zeros(1, 16, 5, 4, 4)}})
    with pytest.raises(ValueError, match="BatchLatentsNode: latent 0 is a joined audio-video latent"):
        run(BatchLatentsNode, **{"latents.latent0": {"samples": torch.zeros(1, 128, 2, 4, 4),
                                                     "audio_samples": torch.zeros(1, 8, 9, 16)}})


def test_batch_masks_resizes_to_the_first():
    first = torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(0))
    bigger = torch.rand(1, 8, 12, generator=torch.Generator().manual_seed(1))
    single = torch.rand(4, 6, generator=torch.Generator().manual_seed(2))  # one [H, W] mask: a batch of one
    (out,) = run(BatchMasksNode, **{"masks.mask0": first, "masks.mask1": bigger, "masks.mask2": single})
    assert out.shape == (4, 4, 6)
    torch.testing.assert_close(out[:2], first)
    torch.testing.assert_close(out[2], crop_resize(bigger[:, None], 4, 6)[0, 0])
    torch.testing.assert_close(out[3], single)
    with pytest.raises(ValueError, match=r"BatchMasksNode: mask 1 has shape \(1, 4, 6, 3\); a MASK is"):
        run(BatchMasksNode, **{"masks.mask0": first, "masks.mask1": torch.zeros(1, 4, 6, 3)})


def test_batch_nodes_run_in_a_prompt(registry):
    video = randn(1, 16, 2, 4, 6, seed=4)
    graph = {
        "1": source("batch-a", {"samples": video, "batch_index": [2]}),
        "2": source("batch-b", {"samples": randn(2, 16, 2, 4, 6, seed=5)}),
        "3": {"class_type": "BatchLatentsNode", "inputs": {"latents.latent0": ["1", 0], "latents.latent1": ["2", 0]}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 0.25, "width": 8, "height": 4}},
        "5": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 8}},
        "6": {"class_type": "BatchMasksNode", "inputs": {"masks.mask0": ["4", 0], "masks.mask1": ["5", 0]}},
    }
    latent, masks = outputs(Executor(registry), graph, "3", "6")
    assert latent["samples"].shape == (3, 16, 2, 4, 6) and latent["batch_index"] == [2, 0, 1]
    torch.testing.assert_close(latent["samples"][:1], video)
    torch.testing.assert_close(masks, torch.tensor([0.25, 1.0]).view(2, 1, 1).expand(2, 4, 8))
    graph["3"]["inputs"]["latents.image2"] = ["1", 0]  # a socket the node does not have: refused before the run
    graph["7"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}
    with pytest.raises(WorkflowInvalid, match=r"BatchLatentsNode has no input latents\.image2"):
        Executor(registry).run(parse_api(graph))


# --- LatentConcat ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "axis"), [("x", 4), ("-x", 4), ("y", 3), ("-y", 3), ("t", 2), ("-t", 2)])
def test_latent_concat_joins_along_width_height_or_frames(dim, axis):
    first = randn(2, 4, 3, 5, 6)
    second = randn(1, 4, 3, 5, 6, seed=1)  # one batch item: repeated for both of the first's
    second = second.narrow(axis, 0, 2)  # shorter along the joined axis
    mask = torch.ones(2, 1, 3, 40, 48)
    (out,) = run(LatentConcat, samples1={"samples": first, "noise_mask": mask, "batch_index": [4, 5]},
                 samples2={"samples": second, "batch_index": [9]}, dim=dim)
    shape = list(first.shape)
    shape[axis] += 2
    assert list(out["samples"].shape) == shape
    size = first.shape[axis]
    ahead, behind = (2, 0) if dim.startswith("-") else (0, size)
    for item in range(2):
        torch.testing.assert_close(out["samples"][item].narrow(axis - 1, ahead, size), first[item])
        torch.testing.assert_close(out["samples"][item].narrow(axis - 1, behind, 2), second[0])
    assert out["noise_mask"] is mask and out["batch_index"] == [4, 5]  # samples1's other keys


def test_latent_concat_of_image_latents_and_bad_pairs():
    first, second = randn(1, 4, 2, 3), randn(3, 4, 2, 5, seed=1)
    (out,) = run(LatentConcat, samples1={"samples": first}, samples2={"samples": second}, dim="-x")
    torch.testing.assert_close(out["samples"], torch.cat([second[:1], first], dim=-1))  # the batch cut to one
    with pytest.raises(ValueError, match="LatentConcat: dim 't' joins the frames of video latents"):
        run(LatentConcat, samples1={"samples": first}, samples2={"samples": first}, dim="t")
    with pytest.raises(ValueError, match=r"LatentConcat: samples1 has shape \(1, 4, 2, 3\) and samples2 "
                                         r"\(3, 4, 2, 5\); along 'y' all their other sizes"):
        run(LatentConcat, samples1={"samples": first}, samples2={"samples": second}, dim="y")


# --- ReplaceVideoLatentFrames ---------------------------------------------------------------------


@pytest.mark.parametrize(("index", "start"), [(0, 0), (2, 2), (3, 3), (-2, 3), (-5, 0)])
def test_replace_video_latent_frames(index, start):
    destination = {"samples": randn(2, 4, 5, 3, 3), "noise_mask": torch.zeros(2, 1, 5, 3, 3), "batch_index": [0, 1]}
    frames = randn(1, 4, 2, 3, 3, seed=1)
    src_mask = torch.ones(1, 1, 2, 3, 3)
    (out,) = run(ReplaceVideoLatentFrames, destination=destination, index=index,
                 source={"samples": frames, "noise_mask": src_mask})
    expected = destination["samples"].clone()
    for t in range(2):
        for item in range(2):
            expected[item, :, start + t] = frames[0, :, t]
    torch.testing.assert_close(out["samples"], expected)
    assert not torch.equal(destination["samples"], out["samples"])  # the destination itself is left alone
    # ComfyUI's result is a copy of the source's dict: its noise mask, not the destination's, and no batch index.
    assert out["noise_mask"] is src_mask and "batch_index" not in out


@pytest.mark.parametrize("index", [4, 5, 6, -1, -6])
def test_replace_video_latent_frames_passes_destination_through_when_the_source_does_not_fit(index, caplog):
    destination = {"samples": randn(1, 4, 5, 2, 2)}
    with caplog.at_level(logging.WARNING, logger="nodes.sd.latent_extra"):
        (out,) = run(ReplaceVideoLatentFrames, destination=destination, index=index,
                     source={"samples": randn(1, 4, 2, 2, 2, seed=1)})
    assert out is destination
    assert "ReplaceVideoLatentFrames" in caplog.text
    assert run(ReplaceVideoLatentFrames, destination=destination, index=0)[0] is destination  # no source


def test_replace_video_latent_frames_refuses_a_source_of_another_shape():
    with pytest.raises(ValueError, match=r"ReplaceVideoLatentFrames: source has shape \(1, 4, 2, 4, 4\) and "
                                         r"destination \(1, 4, 5, 2, 2\); the source needs the destination's"):
        run(ReplaceVideoLatentFrames, destination={"samples": torch.zeros(1, 4, 5, 2, 2)}, index=0,
            source={"samples": torch.zeros(1, 4, 2, 4, 4)})


# --- LatentOperationBlend -------------------------------------------------------------------------


def test_latent_operation_blend_lerps_toward_the_nearest_resized_reference():
    latent = randn(3, 4, 4, 6).double()
    reference = randn(2, 4, 2, 3, seed=1)
    (blend,) = run(LatentOperationBlend, reference={"samples": reference}, strength=0.25)
    out = blend(latent)
    assert out.dtype == torch.float64
    for b in range(3):
        for i in range(4):
            for j in range(6):
                # nearest: source index floor(i * in / out); the reference's batch cycled: 0, 1, 0
                target = reference[b % 2, :, i * 2 // 4, j * 3 // 6].double()
                torch.testing.assert_close(out[b, :, i, j], latent[b, :, i, j] + 0.25 * (target - latent[b, :, i, j]))
    (unchanged,) = run(LatentOperationBlend, reference={"samples": reference}, strength=0.0)
    assert unchanged(latent) is latent
    (same_size,) = run(LatentOperationBlend, reference={"samples": latent[:1]}, strength=1.0)
    torch.testing.assert_close(same_size(latent), latent[:1].expand(3, -1, -1, -1))
    with pytest.raises(ValueError, match=r"LatentOperationBlend: the reference latent has shape \(2, 4, 2, 3\) "
                                         r"and the latent it blends \(1, 16, 4, 4\)"):
        blend(torch.zeros(1, 16, 4, 4))


def test_latent_operation_blend_in_a_prompt(registry):
    latent, reference = randn(2, 4, 2, 2), randn(1, 4, 2, 2, seed=1)
    graph = {"1": source("blend-latent", {"samples": latent, "batch_index": [3, 4]}),
             "2": source("blend-reference", {"samples": reference}),
             "3": {"class_type": "LatentOperationBlend", "inputs": {"reference": ["2", 0], "strength": 0.5}},
             "4": {"class_type": "LatentApplyOperation", "inputs": {"samples": ["1", 0], "operation": ["3", 0]}}}
    (out,) = outputs(Executor(registry), graph, "4")
    torch.testing.assert_close(out["samples"], (latent + reference) / 2)
    assert out["batch_index"] == [3, 4]


# --- LTXVFreezeLatent -----------------------------------------------------------------------------


def test_freeze_latent_masks_every_frame_with_zeros():
    video = {"samples": randn(2, 128, 3, 4, 5), "batch_index": [1, 2]}
    (out,) = run(LTXVFreezeLatent, latent=video)
    assert out["noise_mask"].shape == (2, 1, 3, 1, 1) and out["noise_mask"].dtype == torch.float32
    assert not out["noise_mask"].any() and out["samples"] is video["samples"] and out["batch_index"] == [1, 2]
    (audio,) = run(LTXVFreezeLatent, latent={"samples": randn(1, 8, 7, 16), "type": "audio"})
    assert audio["noise_mask"].shape == (1, 1, 7, 1) and not audio["noise_mask"].any() and audio["type"] == "audio"
    with pytest.raises(ValueError, match="LTXVFreezeLatent takes a video or an audio latent, not a joined"):
        run(LTXVFreezeLatent, latent={"samples": randn(1, 128, 2, 2, 2), "audio_samples": randn(1, 8, 7, 16)})
    with pytest.raises(ValueError, match=r"LTXVFreezeLatent takes .*; got shape \(1, 64, 10\)"):
        run(LTXVFreezeLatent, latent={"samples": randn(1, 64, 10)})


def test_a_frozen_latent_comes_out_of_a_sampler_unchanged(registry, sd1):
    latent = randn(1, 4, 8, 8) * 0.5
    sampler = {"model": ["1", 0], "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
               "positive": ["2", 0], "negative": ["2", 0], "denoise": 1.0}
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
             "3": source("frozen", {"samples": latent}),
             "4": {"class_type": "LTXVFreezeLatent", "inputs": {"latent": ["3", 0]}},
             "5": {"class_type": "KSampler", "inputs": {**sampler, "latent_image": ["4", 0]}},
             "6": {"class_type": "KSampler", "inputs": {**sampler, "latent_image": ["3", 0]}}}
    frozen, free = outputs(Executor(registry), graph, "5", "6")
    torch.testing.assert_close(frozen["samples"], latent)
    assert (free["samples"] - latent).abs().max() > 0.1  # without the mask the sampler changes it


# --- ConditioningMultiply -------------------------------------------------------------------------


def test_conditioning_multiply_scales_embeddings_and_pooled_outputs():
    embedding, pooled, area = randn(1, 77, 8), randn(1, 8, seed=1), (8, 8, 0, 0)
    conditioning = [(embedding, {"pooled_output": pooled, "area": area}), (embedding * 2, {"strength": 0.5})]
    (out,) = run(ConditioningMultiply, conditioning=conditioning, multiplier=-1.5)
    torch.testing.assert_close(out[0][0], embedding * -1.5)
    torch.testing.assert_close(out[0][1]["pooled_output"], pooled * -1.5)
    assert out[0][1]["area"] == area and out[1][1] == {"strength": 0.5}
    torch.testing.assert_close(out[1][0], embedding * -3.0)
    assert conditioning[0][1]["pooled_output"] is pooled  # the input is left as it was


def test_conditioning_multiply_in_a_prompt(registry, sd1):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
             "3": {"class_type": "ConditioningMultiply", "inputs": {"conditioning": ["2", 0], "multiplier": 0.5}}}
    encoded, scaled = outputs(Executor(registry), graph, "2", "3")
    assert len(scaled) == len(encoded) == 1
    torch.testing.assert_close(scaled[0][0], encoded[0][0] * 0.5)
    assert scaled[0][1].keys() == encoded[0][1].keys()
