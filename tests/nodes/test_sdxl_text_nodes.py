"""CLIPTextEncodeSDXL: a prompt per SDXL text encoder, and the size numbers the UNet conditions on."""

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_text")
    make_checkpoint("tiny-sdxl", root / "models" / "checkpoints" / "xl.safetensors", seed=1)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    make_checkpoint("tiny-sdxl-refiner", root / "models" / "checkpoints" / "refiner.safetensors", seed=1)
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def encode(engine, node: dict, ckpt: str = "xl.safetensors"):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
             "2": {**node, "inputs": {**node["inputs"], "clip": ["1", 1]}},
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    result = engine.run(parse_api(graph), keep=["2"])
    assert result.ok, result.error
    [(cond, options)] = result.values["2"][0]
    return cond, options


def sdxl(text_g: str, text_l: str, **sizes) -> dict:
    inputs = {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
              "target_height": 1024, "text_g": text_g, "text_l": text_l, **sizes}
    return {"class_type": "CLIPTextEncodeSDXL", "inputs": inputs}


def test_one_prompt_in_both_fields_is_clip_text_encode_plus_the_sizes(engine):
    plain, plain_options = encode(engine, {"class_type": "CLIPTextEncode", "inputs": {"text": "a red (circle:1.2)"}})
    both, options = encode(engine, sdxl("a red (circle:1.2)", "a red (circle:1.2)", width=832, crop_h=16))
    torch.testing.assert_close(both, plain, rtol=0, atol=0)
    torch.testing.assert_close(options["pooled_output"], plain_options["pooled_output"], rtol=0, atol=0)
    assert (options["width"], options["height"], options["crop_h"], options["target_width"]) == (832, 1024, 16, 1024)


def test_text_l_feeds_clip_l_alone_and_text_g_gives_the_pooled_output(engine):
    base, options = encode(engine, sdxl("a red circle", "a red circle"))
    other_l, other_options = encode(engine, sdxl("a red circle", "a blue square"))
    l_width = base.shape[-1] - options["pooled_output"].shape[-1]  # CLIP-L's features come first
    assert not torch.equal(other_l[..., :l_width], base[..., :l_width])
    torch.testing.assert_close(other_l[..., l_width:], base[..., l_width:], rtol=0, atol=0)
    torch.testing.assert_close(other_options["pooled_output"], options["pooled_output"], rtol=0, atol=0)


def test_prompts_of_different_lengths_are_padded_to_the_same_chunks(engine):
    long_g = " ".join(["circle"] * 100)  # two chunks of 75 tokens
    cond, _ = encode(engine, sdxl(long_g, "a square"))
    assert cond.shape[1] == 154


def test_an_sd1_clip_is_refused_with_the_node_to_use(engine):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "2": {**sdxl("a", "b"), "inputs": {**sdxl("a", "b")["inputs"], "clip": ["1", 1]}},
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    with pytest.raises(WorkflowInvalid, match=r"CLIPTextEncodeSDXL needs an SDXL checkpoint's CLIP; the CLIP linked "
                                              r"is SD1 \(use CLIP Text Encode\)"):  # at validation, from the header
        engine.run(parse_api(graph), keep=["2"])


def base_then_refiner(ascore: float = 6.0, refiner_start: int = 3) -> dict:
    """SDXL base for steps 0-3 of 4 with leftover noise, then the refiner for the rest (ComfyUI's example)."""
    def sampler(model, positive, negative, latent, start, end, add_noise, leftover):
        return {"class_type": "KSamplerAdvanced", "inputs": {
            "model": model, "add_noise": add_noise, "noise_seed": 5, "steps": 4, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": positive, "negative": negative, "latent_image": latent,
            "start_at_step": start, "end_at_step": end, "return_with_leftover_noise": leftover}}

    def refiner_prompt(text, score):
        return {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {"ascore": score, "width": 64, "height": 64,
                                                                     "text": text, "clip": ["12", 1]}}

    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "xl.safetensors"}},
        "12": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "refiner.safetensors"}},
        "6": sdxl("a lighthouse", "a lighthouse"), "7": sdxl("", ""),
        "15": refiner_prompt("a lighthouse", ascore), "16": refiner_prompt("", 2.5),
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": sampler(["4", 0], ["6", 0], ["7", 0], ["5", 0], 0, refiner_start, "enable", "enable"),
        "11": sampler(["12", 0], ["15", 0], ["16", 0], ["10", 0], refiner_start, 10000, "disable", "disable"),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def run_refined(engine, graph):
    graph["6"]["inputs"]["clip"] = graph["7"]["inputs"]["clip"] = ["4", 1]
    result = engine.run(parse_api(graph), keep=["10", "11"])
    assert result.ok, result.error
    return result.values["10"][0]["samples"], result.values["11"][0]["samples"]


def test_the_sdxl_refiner_finishes_what_the_base_left_and_hears_its_aesthetic_score(engine):
    base, refined = run_refined(engine, base_then_refiner())
    assert base.shape == refined.shape == (1, 4, 8, 8)
    assert (refined - base).abs().max() > 1e-3  # the refiner's step ran
    _, other_score = run_refined(engine, base_then_refiner(ascore=1.0))
    assert (other_score - refined).abs().max() > 1e-6  # its y carries the aesthetic score


def test_a_prompt_from_another_checkpoints_clip_is_refused_with_the_widths(engine):
    graph = base_then_refiner()
    graph["15"]["inputs"]["clip"] = ["4", 1]  # the base's CLIP feeding the refiner's prompt
    graph["6"]["inputs"]["clip"] = graph["7"]["inputs"]["clip"] = ["4", 1]
    result = engine.run(parse_api(graph), keep=["11"])
    assert not result.ok
    assert ("the positive prompt was encoded 80 wide, and the model refiner.safetensors (SDXL_REFINER) takes 48"
            in str(result.error))


def test_sdxls_target_size_defaults_to_the_prompts_size_as_in_comfyui():
    from ldm.unet import sdxl_adm
    from nodes.sd.models import DiffusionModel
    from nodes.sd.sampling import _with_adm

    class Family:
        name = "sdxl"
        unet_config = type("C", (), {"adm_in_channels": 8 + 6 * 256})()

    model = DiffusionModel(None, Family(), "xl")
    pooled = torch.randn(1, 8)
    [(_, options)] = _with_adm([(torch.zeros(1, 77, 16), {"pooled_output": pooled, "width": 832, "height": 1216})],
                               model, torch.zeros(1, 4, 128, 128))
    torch.testing.assert_close(options["y"], sdxl_adm(pooled, 832, 1216, 0, 0, 832, 1216))
