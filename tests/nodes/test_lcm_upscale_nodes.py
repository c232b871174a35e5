"""SamplerLCMUpscale through the engine on a tiny SD1 checkpoint: txt2img that ends larger, lcm at ratio 1, a
ControlNet whose hint follows the latent, and a noise mask refused with the reason."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint, make_controlnet
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.latent import LATENT_UPSCALE_METHODS, upscale_latent
from nodes.sd.sampling import KSampler
from nodes.sd.solvers import SamplerLCMUpscale


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm_upscale")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    make_controlnet("tiny-sd1", root / "models" / "controlnet" / "canny.safetensors", seed=5)
    (root / "input").mkdir()
    hint = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(hint).rectangle((8, 8, 40, 40), outline="white", width=2)
    hint.save(root / "input" / "edges.png")
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def graph(sampler: dict, steps: int = 4, positive=("2", 0), negative=("3", 0), latent=("4", 0)) -> dict:
    """Prompts, a 64 px batch of 2, and SamplerCustomAdvanced "14" with `sampler` as "12", decoded as "15"."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "11": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": list(positive),
                                                     "negative": list(negative), "cfg": 2.0}},
        "12": sampler,
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "sgm_uniform",
                                                          "steps": steps, "denoise": 1.0}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["10", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": ["13", 0],
            "latent_image": list(latent)}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["1", 2]}},
    }


def upscaler(ratio: float, steps: int = -1, method: str = "bislerp") -> dict:
    return {"class_type": "SamplerLCMUpscale",
            "inputs": {"scale_ratio": ratio, "scale_steps": steps, "upscale_method": method}}


def run(engine, prompt: dict, *nodes: str):
    prompt = {**prompt, **{f"show{n}": {"class_type": "PreviewAny", "inputs": {"source": [n, 0]}} for n in nodes}}
    result = engine.run(parse_api(prompt), keep=list(nodes))
    assert result.ok, result.error
    return [result.values[n] for n in nodes]


def test_txt2img_ends_larger_and_decodes_at_that_size(engine):
    [(output, denoised), (image,)] = run(engine, graph(upscaler(1.5)), "14", "15")
    # 4 steps, scale_steps -1: resized after the first two steps, 8 -> 10 -> 12 latent pixels.
    assert output["samples"].shape == (2, 4, 12, 12) and denoised["samples"].shape == (2, 4, 12, 12)
    assert image.shape == (2, 96, 96, 3) and torch.isfinite(image).all()
    assert image.std() > 0.01  # a picture, not a flat field
    assert not torch.equal(output["samples"][0], output["samples"][1])  # each item its own noise


def test_ratio_one_is_the_lcm_sampler(engine):
    [(lcm, _)] = run(engine, graph({"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}}), "14")
    [(same, _)] = run(engine, graph(upscaler(1.0, 2)), "14")
    assert torch.equal(same["samples"], lcm["samples"])


@pytest.mark.parametrize("method", LATENT_UPSCALE_METHODS)
def test_each_method_resizes_as_upscale_latent(method):
    choice = SamplerLCMUpscale().execute(2.0, 3, method)[0]
    assert choice.name == "lcm_upscale"
    assert (choice.options["total_upscale"], choice.options["upscale_steps"]) == (2.0, 3)
    x = torch.randn(1, 4, 6, 8)
    assert torch.equal(choice.options["resize"](x, 9, 12), upscale_latent(x, 12, 9, method, "disabled"))
    assert SamplerLCMUpscale().execute(2.0, -1, method)[0].options["upscale_steps"] is None


def test_the_ksampler_does_not_list_it():
    """As in ComfyUI: a sampler that changes the latent's size is a SAMPLER node's, not a KSampler choice."""
    assert "lcm_upscale" not in KSampler.inputs["sampler_name"].choices
    assert "lcm" in KSampler.inputs["sampler_name"].choices


def test_a_controlnet_hint_follows_the_latent(engine):
    control = {
        "20": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}},
        "21": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
        "22": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["20", 0], "image": ["21", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
    }
    controlled = {**graph(upscaler(2.0), positive=("22", 0), negative=("22", 1)), **control}
    [(output, _)] = run(engine, controlled, "14")
    [(plain, _)] = run(engine, graph(upscaler(2.0)), "14")
    assert output["samples"].shape == plain["samples"].shape == (2, 4, 16, 16)
    assert not torch.allclose(output["samples"], plain["samples"], atol=1e-3)
    # At ratio 1 the ControlNet run is lcm's with the same ControlNet.
    [(same, _)] = run(engine, {**graph(upscaler(1.0), positive=("22", 0), negative=("22", 1)), **control}, "14")
    lcm = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}}
    [(expected, _)] = run(engine, {**graph(lcm, positive=("22", 0), negative=("22", 1)), **control}, "14")
    assert torch.equal(same["samples"], expected["samples"])


def test_a_noise_mask_is_refused_with_the_reason(engine):
    prompt = {**graph(upscaler(1.5), latent=("31", 0)),
              "30": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
              "31": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["30", 0]}}}
    result = engine.run(parse_api({**prompt, "show": {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}}}))
    assert not result.ok
    assert result.error.node_type == "SamplerCustomAdvanced"
    assert "lcm_upscale resized the latent from (8, 8) to (10, 10)" in result.error.exception_message
    assert "noise mask" in result.error.exception_message


def test_the_schema_is_comfyuis():
    info = SamplerLCMUpscale.object_info()
    assert info["input_order"]["required"] == ["scale_ratio", "scale_steps", "upscale_method"]
    required = info["input"]["required"]
    assert required["scale_ratio"] == ["FLOAT", {"default": 1.0, "min": 0.1, "max": 20.0, "step": 0.01}]
    assert required["scale_steps"] == ["INT", {"default": -1, "min": -1, "max": 1000, "step": 1}]
    assert required["upscale_method"][0] == ["bislerp", "nearest-exact", "bilinear", "area", "bicubic"]
    assert info["output"] == ["SAMPLER"]
