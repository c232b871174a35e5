"""Flux Redux as ComfyUI users wire it, on tiny Flux files: CLIPVisionLoader (a SigLIP file) -> CLIPVisionEncode ->
StyleModelLoader (a Redux file) -> StyleModelApply -> KSampler; the tokens checked against transformers' SigLIP and
diffusers' ReduxImageEncoder, and a Redux model on an SD model refused."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from PIL import Image, ImageDraw

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.clip_vision import preprocess
from ldm.flux_presets import make_flux_files
from ldm.presets import make_checkpoint
from ldm.siglip import SIGLIP_MEAN, SIGLIP_STD
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_flux_redux import SIZE, redux_reference, siglip_file_state, siglip_reference


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("redux")
    models = root / "models"
    make_flux_files(models, "dev", seed=3, dtype=torch.float32)
    make_checkpoint("tiny-sdxl", models / "checkpoints" / "tiny-sdxl.safetensors", seed=2)
    (models / "clip_vision").mkdir()
    safetensors.torch.save_file(siglip_file_state(siglip_reference(seed=1)),
                                models / "clip_vision" / "sigclip_vision_tiny.safetensors")
    (models / "style_models").mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in redux_reference(seed=2).state_dict().items()},
                                models / "style_models" / "flux1-redux-tiny.safetensors")
    (root / "input").mkdir()
    picture = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(picture).ellipse((4, 4, 40, 30), fill="red")
    picture.save(root / "input" / "red.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def redux_workflow(strength: float = 1.0, strength_type: str = "multiply") -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-tiny-dev.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl-tiny.safetensors",
                                                         "clip_name2": "clip_l-tiny.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae-tiny.safetensors"}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "a circle",
                                                              "t5xxl": "a red circle", "guidance": 3.5}},
        "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
        "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "sigclip_vision_tiny.safetensors"}},
        "12": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["11", 0], "image": ["10", 0],
                                                            "crop": "center"}},
        "13": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": "flux1-redux-tiny.safetensors"}},
        "14": {"class_type": "StyleModelApply", "inputs": {
            "conditioning": ["6", 0], "style_model": ["13", 0], "clip_vision_output": ["12", 0],
            "strength": strength, "strength_type": strength_type}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 4, "steps": 3, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["14", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def test_redux_tokens_follow_the_t5_prompt_and_steer_sampling(engine):
    result = engine.run(parse_api(redux_workflow()), keep=["6", "8", "10", "14"])
    assert result.ok, result.error
    [(prompt, _)] = result.values["6"][0]
    [(styled, options)] = result.values["14"][0]
    assert "pooled_output" in options and options.get("guidance") == 3.5  # the prompt's options kept
    image = result.values["10"][0]
    with torch.no_grad():  # the chain of FluxPriorReduxPipeline on ComfyUI's SigLIP preprocessing
        hidden = siglip_reference(seed=1)(pixel_values=preprocess(image, SIZE, True, SIGLIP_MEAN, SIGLIP_STD))
        tokens = redux_reference(seed=2)(hidden.last_hidden_state).image_embeds
    assert styled.shape == (1, prompt.shape[1] + 16, 32)
    assert torch.equal(styled[:, :prompt.shape[1]], prompt)
    torch.testing.assert_close(styled[:, prompt.shape[1]:], tokens, rtol=1e-5, atol=1e-5)
    samples = result.values["8"][0]["samples"]
    plain = redux_workflow()
    plain["8"]["inputs"]["positive"] = ["6", 0]
    without = engine.run(parse_api(plain), keep=["8"]).values["8"][0]["samples"]
    assert torch.isfinite(samples).all() and (samples - without).abs().mean() > 1e-3
    half = engine.run(parse_api(redux_workflow(strength=0.5)), keep=["14"]).values["14"][0][0][0]
    torch.testing.assert_close(half[:, prompt.shape[1]:], tokens * 0.5, rtol=1e-5, atol=1e-5)


def test_redux_on_an_sd_prompt_is_refused(engine):
    graph = redux_workflow()
    graph["4"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}}
    graph["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}}
    graph["8"]["inputs"]["model"] = ["4", 0]
    graph["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    for key in ("1", "2", "3"):
        del graph[key]
    graph["9"]["inputs"]["vae"] = ["4", 2]
    result = engine.run(parse_api(graph))
    assert not result.ok
    assert "makes 32-wide tokens and the prompt is 80 wide" in str(result.error)
    assert "Flux Redux is Flux.1's" in str(result.error)
