"""SkipLayerGuidanceSD3 and SkipLayerGuidanceDiT in workflows on tiny random SD3.5 and Flux files: ComfyUI's
declarations, an SD3 run against diffusers' StableDiffusion3Pipeline(skip_guidance_layers=...), and refusals."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.flux_presets import make_flux_files
from ldm.presets import make_checkpoint
from ldm.sampling import prepare_noise
from ldm.sd3_files import LATENT_SCALE, LATENT_SHIFT
from ldm.sd3_presets import make_sd3_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_sd3_nodes import CFG, HEIGHT, SEED, SEED_FILES, STEPS, TEXTS, WIDTH, reference_pipeline, run
from tests.nodes.test_sd3_nodes import workflow as sd3_workflow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("slg")
    files = make_sd3_files(root / "models", "sd3.5-medium", seed=SEED_FILES, dtype=torch.float32)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    make_flux_files(root / "models", "dev", seed=3, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def with_slg(doc: dict, node: str = "SkipLayerGuidanceSD3", **inputs) -> dict:
    defaults = ({"layers": "1"} if node == "SkipLayerGuidanceSD3"
                else {"double_layers": "1", "single_layers": "", "rescaling_scale": 0.0})
    doc["20"] = {"class_type": node, "inputs": {"model": ["3", 0], "scale": 3.0, "start_percent": 0.2,
                                                "end_percent": 0.8, **defaults, **inputs}}
    doc["7"]["inputs"]["model"] = ["20", 0]
    return doc


def test_declarations_are_comfyuis(engine) -> None:
    info = {name: engine.registry.get(name).object_info() for name in ("SkipLayerGuidanceSD3", "SkipLayerGuidanceDiT")}
    assert {name: i["input_order"]["required"] for name, i in info.items()} == {
        "SkipLayerGuidanceSD3": ["model", "layers", "scale", "start_percent", "end_percent"],
        "SkipLayerGuidanceDiT": ["model", "double_layers", "single_layers", "scale", "start_percent", "end_percent",
                                 "rescaling_scale"]}
    required = info["SkipLayerGuidanceDiT"]["input"]["required"]
    assert required["double_layers"][1]["default"] == "7, 8, 9" and not required["single_layers"][1].get("multiline")
    assert [(required[k][1]["default"], required[k][1]["max"], required[k][1]["step"])
            for k in ("scale", "start_percent", "end_percent", "rescaling_scale")] == [
        (3.0, 10.0, 0.1), (0.01, 1.0, 0.001), (0.15, 1.0, 0.001), (0.0, 10.0, 0.01)]
    assert all(i["category"] == "advanced/guidance" and i["output"] == ["MODEL"] for i in info.values())
    # ComfyUI's newer declarations put the layers and the window among the node's advanced inputs.
    assert {name: [k for k, v in i["input"]["required"].items() if v[1].get("advanced")]
            for name, i in info.items()} == {
        "SkipLayerGuidanceSD3": ["layers", "start_percent", "end_percent"],
        "SkipLayerGuidanceDiT": ["double_layers", "single_layers", "start_percent", "end_percent"]}


def test_sd3_workflow_matches_pipeline_with_skip_guidance_layers(engine, base, tmp_path) -> None:
    """Joint block 1 of 3 skipped at scale 3 over 0.2 to 0.8 of the run: steps 1 to 3 of 4 by ComfyUI's rule (by
    level) and by diffusers' (by index, i > 0.8 and i < 3.2)."""
    latent, image = run(engine, with_slg(sd3_workflow(negative="blurry")))
    plain, _ = run(engine, sd3_workflow(negative="blurry"))
    pipe = reference_pipeline(base[1]["checkpoint"], tmp_path)
    noise = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    with torch.no_grad():
        out = pipe(prompt=TEXTS["clip_l"], prompt_2=TEXTS["clip_g"], prompt_3=TEXTS["t5xxl"],
                   negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                   sigmas=[1 - i / STEPS for i in range(STEPS)], guidance_scale=CFG, latents=noise,
                   max_sequence_length=77, output_type="latent", skip_guidance_layers=[1],
                   skip_layer_guidance_scale=3.0, skip_layer_guidance_start=0.2, skip_layer_guidance_stop=0.8).images
    expected = out / LATENT_SCALE + LATENT_SHIFT
    assert (latent["samples"] - plain["samples"]).abs().mean() > 1e-2
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    # The generic node with the same joint blocks (and no single-stream ones: SD3 has none) is the same guidance.
    same, _ = run(engine, with_slg(sd3_workflow(negative="blurry"), "SkipLayerGuidanceDiT", single_layers="7, 8"))
    assert torch.equal(same["samples"], latent["samples"])
    # No layers named: the model as it was.
    unchanged, _ = run(engine, with_slg(sd3_workflow(negative="blurry"), layers=""))
    assert torch.equal(unchanged["samples"], plain["samples"])


def flux_workflow(**slg) -> dict:
    doc = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-tiny-dev-checkpoint.safetensors"}},
        "3": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                            "width": 64, "height": 48}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 3, "steps": 4, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}},
    }
    return with_slg(doc, "SkipLayerGuidanceDiT", **slg) if slg else doc


def test_flux_double_and_single_blocks_and_rescaling(engine) -> None:
    def samples(doc: dict) -> torch.Tensor:
        result = engine.run(parse_api(doc), keep=["7"])
        assert result.ok, result.error
        return result.values["7"][0]["samples"]

    plain = samples(flux_workflow())
    double = samples(flux_workflow(double_layers="0", single_layers=""))
    single = samples(flux_workflow(double_layers="", single_layers="1"))
    rescaled = samples(flux_workflow(double_layers="", single_layers="1", rescaling_scale=0.5))
    outside = samples(flux_workflow(double_layers="0", single_layers="", start_percent=0.9, end_percent=1.0,
                                    scale=3.0))
    for guided in (double, single, rescaled):
        assert (guided - plain).abs().mean() > 1e-3
    assert (rescaled - single).abs().mean() > 1e-4
    # Step 4 of 4 lies at 0.75 of the run: a window from 0.9 runs no extra prediction on any step (the guider's
    # combination then takes its general path, not the fused one: the same up to rounding).
    torch.testing.assert_close(outside, plain, rtol=1e-5, atol=1e-5)


def test_refusals(engine) -> None:
    sd1 = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "20": {"class_type": "SkipLayerGuidanceSD3", "inputs": {"model": ["1", 0], "layers": "1", "scale": 3.0,
                                                                "start_percent": 0.01, "end_percent": 0.15}},
        "21": {"class_type": "PreviewAny", "inputs": {"source": ["20", 0]}},
    }
    with pytest.raises(WorkflowInvalid, match="SkipLayerGuidanceSD3 is for diffusion transformers .SD3, Flux.; the "
                                              "MODEL linked is SD1, a UNet"):
        engine.run(parse_api(sd1))
    result = engine.run(parse_api(with_slg(sd3_workflow(), layers="2, 3")), keep=["7"])
    assert not result.ok and "SkipLayerGuidanceSD3: joint block 3 is out of range; this model has 3 joint blocks " \
                              "(0 to 2)" in str(result.error)
    result = engine.run(parse_api(flux_workflow(double_layers="0", single_layers="9")), keep=["7"])
    assert not result.ok and "single-stream block 9 is out of range" in str(result.error)
