"""Model patch nodes (FreeU, FreeU_V2, RescaleCFG, PAG, SAG, Deep Shrink, ModelSamplingDiscrete, DifferentialDiffusion)
in workflows."""

import dataclasses

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import PRESETS, make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("patch_nodes")
    # Three levels, so that FreeU's two stages (4x and 2x model_channels) both exist, as in SD1.5 and SDXL.
    original = PRESETS["tiny-sd1"]
    family, prediction, unet, vae = original
    PRESETS["tiny-sd1"] = (family, prediction, dataclasses.replace(
        unet, channel_mult=(1, 2, 4), transformer_depth=(1, 1, 1)), vae)
    try:
        make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    finally:
        PRESETS["tiny-sd1"] = original
    make_checkpoint("tiny-sd2", root / "models" / "checkpoints" / "sd2.safetensors", seed=2)
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def graph(patch: dict | None = None, ckpt: str = "sd1.safetensors", sampler: str = "euler",
          scheduler: str = "karras", cfg: float = 6.0, mask: bool = False) -> dict:
    """Loader "1", prompts "2"/"3", a latent "4", the patch "5" (on the loader's model) and a KSampler "6"."""
    nodes = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
             "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    latent = ["4", 0]
    if mask:
        nodes["7"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 64, "height": 64}}
        nodes["8"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["7", 0]}}
        latent = ["8", 0]
    model = ["1", 0]
    if patch is not None:
        nodes["5"] = {"class_type": patch["class_type"], "inputs": {"model": ["1", 0], **patch["inputs"]}}
        model = ["5", 0]
    nodes["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 5, "steps": 4, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": latent, "denoise": 1.0}}
    nodes["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}
    return nodes


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Clearly different: by more than 1% of the latents' spread (the tiny random models' latents are large)."""
    return bool((a - b).abs().max() > 0.01 * b.std())


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float rounding (patches that should change nothing still take other arithmetic paths)."""
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


def latent(engine, nodes: dict) -> torch.Tensor:
    result = engine.run(parse_api(nodes), keep=["6"])
    assert result.ok, result.error
    return result.values["6"][0]["samples"]


def test_freeu_changes_the_image_and_leaves_the_cached_model_alone(engine):
    plain = latent(engine, graph())
    for node in ("FreeU", "FreeU_V2"):
        patched = latent(engine, graph({"class_type": node, "inputs": {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}}))
        assert differ(patched, plain)
    # Neutral knobs: b = s = 1 is the model itself.
    neutral = latent(engine, graph({"class_type": "FreeU", "inputs": {"b1": 1.0, "b2": 1.0, "s1": 1.0, "s2": 1.0}}))
    assert same(neutral, plain)
    engine.free(unload_models=False, free_memory=True)  # the KSampler runs again, on the loader's cached model
    assert torch.equal(latent(engine, graph()), plain)  # the loader's cached model was not patched


def test_rescale_cfg_at_zero_is_plain_cfg_and_above_changes_it(engine):
    plain = latent(engine, graph(ckpt="sd2.safetensors"))
    zero = latent(engine, graph({"class_type": "RescaleCFG", "inputs": {"multiplier": 0.0}}, ckpt="sd2.safetensors"))
    assert same(zero, plain)
    # The tiny random model's prompts hardly change its predictions, so guidance (and rescaling it) moves the
    # latent little: this checks the patch reaches the sampler (tests/ldm/test_model_patches.py checks its
    # arithmetic against diffusers).
    strong = latent(engine, graph(ckpt="sd2.safetensors", cfg=60.0))
    rescaled = latent(engine, graph({"class_type": "RescaleCFG", "inputs": {"multiplier": 1.0}},
                                    ckpt="sd2.safetensors", cfg=60.0))
    assert (rescaled - strong).abs().max() > 20 * (zero - plain).abs().max()


def test_model_sampling_discrete(engine):
    sd1, sd2 = latent(engine, graph()), latent(engine, graph(ckpt="sd2.safetensors"))
    same = {"class_type": "ModelSamplingDiscrete", "inputs": {"sampling": "eps", "zsnr": False}}
    assert torch.equal(latent(engine, graph(same)), sd1)  # what the model already is: nothing changes
    v = {"class_type": "ModelSamplingDiscrete", "inputs": {"sampling": "v_prediction", "zsnr": False}}
    assert torch.equal(latent(engine, graph(v, ckpt="sd2.safetensors")), sd2)
    assert differ(latent(engine, graph(v)), sd1)
    results = {}
    for sampling, zsnr in (("eps", False), ("eps", True), ("x0", False), ("lcm", False), ("lcm", True)):
        patch = {"class_type": "ModelSamplingDiscrete", "inputs": {"sampling": sampling, "zsnr": zsnr}}
        nodes = graph(patch, sampler="lcm", scheduler="sgm_uniform", cfg=1.0)
        nodes["12"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
        result = engine.run(parse_api(nodes), keep=["5", "6"])
        assert result.ok, result.error
        [model], [(out,)] = result.values["5"], [result.values["6"]]
        assert torch.isfinite(out["samples"]).all()
        results[sampling, zsnr] = out["samples"]
        assert model.prediction == {"eps": "eps", "x0": "x0", "lcm": "lcm"}[sampling]
        assert model.schedule.timestep_stride == (20 if sampling == "lcm" else 1)
        assert model.schedule.zero_snr == zsnr
    plain = results["eps", False]
    for key in (("eps", True), ("x0", False), ("lcm", False)):
        assert differ(results[key], plain), key  # each setting changes the run
    assert differ(results["lcm", True], results["lcm", False])


def test_model_sampling_discrete_refuses_img_to_img(engine):
    with pytest.raises(WorkflowInvalid, match="img_to_img"):
        engine.run(parse_api(graph({"class_type": "ModelSamplingDiscrete",
                                    "inputs": {"sampling": "img_to_img", "zsnr": False}})))


def test_differential_diffusion_with_a_soft_mask(engine):
    plain = latent(engine, graph(mask=True))
    dd = latent(engine, graph({"class_type": "DifferentialDiffusion", "inputs": {}}, mask=True))
    assert differ(dd, plain)
    # Strength 0 is full Differential Diffusion, as in ComfyUI (which reads 0 as unset); between 0 and 1 the
    # soft mask is mixed back in.
    zero = latent(engine, graph({"class_type": "DifferentialDiffusion", "inputs": {"strength": 0.0}}, mask=True))
    assert torch.equal(zero, dd)
    half = latent(engine, graph({"class_type": "DifferentialDiffusion", "inputs": {"strength": 0.5}}, mask=True))
    assert differ(half, dd) and differ(half, plain)


def test_perturbed_attention_guidance(engine):
    plain = latent(engine, graph())
    off = latent(engine, graph({"class_type": "PerturbedAttentionGuidance", "inputs": {"scale": 0.0}}))
    assert same(off, plain)
    pag = latent(engine, graph({"class_type": "PerturbedAttentionGuidance", "inputs": {"scale": 3.0}}))
    assert differ(pag, plain)
    # Stacked with FreeU (a patched UNet copy), the perturbed pass runs FreeU's UNet too: another result.
    nodes = graph({"class_type": "PerturbedAttentionGuidance", "inputs": {"scale": 3.0}})
    nodes["10"] = {"class_type": "FreeU", "inputs": {"model": ["5", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}}
    nodes["6"]["inputs"]["model"] = ["10", 0]
    assert differ(latent(engine, nodes), pag)


def test_self_attention_guidance(engine):
    plain = latent(engine, graph())
    assert same(latent(engine, graph({"class_type": "SelfAttentionGuidance", "inputs": {"scale": 0.0,
                                                                                      "blur_sigma": 2.0}})), plain)
    sag = latent(engine, graph({"class_type": "SelfAttentionGuidance", "inputs": {"scale": 0.5, "blur_sigma": 2.0}}))
    assert differ(sag, plain)
    # Behind Deep Shrink the middle block's grid is smaller than the latent says; SAG reads it off the map.
    nodes = graph({"class_type": "SelfAttentionGuidance", "inputs": {"scale": 0.5, "blur_sigma": 2.0}})
    nodes["10"] = {"class_type": "PatchModelAddDownscale", "inputs": {
        "model": ["5", 0], "block_number": 1, "downscale_factor": 2.0, "start_percent": 0.0, "end_percent": 1.0,
        "downscale_after_skip": True, "downscale_method": "bicubic", "upscale_method": "bicubic"}}
    nodes["6"]["inputs"]["model"] = ["10", 0]
    assert differ(latent(engine, nodes), sag)


def test_hypertile(engine):
    plain = latent(engine, graph())
    settings = {"tile_size": 2048, "swap_size": 2, "max_depth": 0, "scale_depth": False}
    assert same(latent(engine, graph({"class_type": "HyperTile", "inputs": settings})), plain)  # one tile
    small = {**settings, "tile_size": 32}  # 4 x 4 token tiles on the 8 x 8 latent
    tiled = latent(engine, graph({"class_type": "HyperTile", "inputs": small}))
    assert not same(tiled, plain)  # (by little: the tiny model's self-attention adds little to its latents)
    engine.cache.clear()
    assert torch.equal(latent(engine, graph({"class_type": "HyperTile", "inputs": small})), tiled)  # reproducible


def test_attention_multiply_nodes(engine):
    plain = latent(engine, graph())
    neutral = {"q": 1.0, "k": 1.0, "v": 1.0, "out": 1.0}
    for node in ("UNetSelfAttentionMultiply", "UNetCrossAttentionMultiply"):
        assert same(latent(engine, graph({"class_type": node, "inputs": neutral})), plain)
        assert differ(latent(engine, graph({"class_type": node, "inputs": {**neutral, "v": 3.0, "out": 2.0}})),
                      plain)
    def encoding(clip_patch: dict | None) -> torch.Tensor:
        nodes = graph()
        if clip_patch is not None:
            nodes["5"] = {"class_type": "CLIPAttentionMultiply", "inputs": {"clip": ["1", 1], **clip_patch}}
            nodes["2"]["inputs"]["clip"] = ["5", 0]
        result = engine.run(parse_api(nodes), keep=["2"])
        assert result.ok, result.error
        return result.values["2"][0][0][0]

    assert torch.equal(encoding(neutral), encoding(None))
    assert differ(encoding({**neutral, "q": 2.0, "v": 0.5}), encoding(None))


def test_deep_shrink(engine):
    plain = latent(engine, graph())
    settings = {"block_number": 2, "downscale_factor": 2.0, "start_percent": 0.0, "end_percent": 0.5,
                "downscale_after_skip": True, "downscale_method": "bicubic", "upscale_method": "bislerp"}
    shrunk = latent(engine, graph({"class_type": "PatchModelAddDownscale", "inputs": settings}))
    assert shrunk.shape == plain.shape and differ(shrunk, plain)
    never = latent(engine, graph({"class_type": "PatchModelAddDownscale",
                                  "inputs": {**settings, "start_percent": 0.9, "end_percent": 0.95}}))
    assert same(never, plain)  # its window holds no step of this run: the model as it was
    result = engine.run(parse_api(graph({"class_type": "PatchModelAddDownscale",
                                         "inputs": {**settings, "block_number": 20}})), keep=["6"])
    assert not result.ok and "block_number 20" in str(result.error) and "input blocks 0 to" in str(result.error)


def test_model_sampling_continuous_edm(engine):
    from ldm.sampling.schedules import ContinuousSchedule

    plain = latent(engine, graph())
    results = {}
    for sampling in ("v_prediction", "edm", "eps"):
        patch = {"class_type": "ModelSamplingContinuousEDM",
                 "inputs": {"sampling": sampling, "sigma_max": 120.0, "sigma_min": 0.002}}
        results[sampling] = latent(engine, graph(patch))
        assert torch.isfinite(results[sampling]).all() and differ(results[sampling], plain)
    assert differ(results["edm"], results["v_prediction"])
    continuous_v = {"class_type": "ModelSamplingContinuousV",
                    "inputs": {"sampling": "v_prediction", "sigma_max": 500.0, "sigma_min": 0.03}}
    assert differ(latent(engine, graph(continuous_v)), results["v_prediction"])
    node = builtin_registry().get("ModelSamplingContinuousEDM")
    assert "cosmap" in node.check_inputs({"sampling": "cosmap", "sigma_min": 0.002, "sigma_max": 120.0})
    assert "sigma_min" in node.check_inputs({"sampling": "edm", "sigma_min": 5.0, "sigma_max": 1.0})
    with pytest.raises(WorkflowInvalid, match="cosmap"):
        engine.run(parse_api(graph({"class_type": "ModelSamplingContinuousEDM",
                                    "inputs": {"sampling": "cosmap", "sigma_max": 120.0, "sigma_min": 0.002}})))
    model = node().execute(_model(engine), "edm_playground_v2.5", 80.0, 0.002)[0]
    assert isinstance(model.schedule, ContinuousSchedule) and model.schedule.sigma_data == 0.5
    samples = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(model.latent_out(model.latent_in(samples)), samples)
    # Playground's latents are normalised per channel: (z - mean) * 0.5 / std
    assert torch.allclose(model.latent_in(torch.zeros(1, 4, 1, 1)).flatten(),
                          torch.tensor([1.6574 * 0.5 / 8.4927, -1.886 * 0.5 / 5.9022, 1.383 * 0.5 / 6.5498,
                                        -2.5155 * 0.5 / 5.2299]), atol=1e-6)


def _model(engine):
    loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    preview = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
    result = engine.run(parse_api({"1": loader, "2": preview}), keep=["1"])
    assert result.ok, result.error
    return result.values["1"][0]


def test_a_checkpoint_marked_as_edm_samples_on_its_continuous_schedule(engine):
    """CosXL's `edm_vpred.sigma_max`/`sigma_min` entries: the loader gives the model its continuous schedule."""
    import safetensors.torch

    from ldm.checkpoint import load_state_dict, read_metadata
    from ldm.sampling.schedules import ContinuousSchedule
    from nodes.folders import get_paths

    folder = get_paths().model_dirs("checkpoints")[0]
    sd = {**load_state_dict(folder / "sd2.safetensors"), "edm_vpred.sigma_max": torch.tensor(120.0),
          "edm_vpred.sigma_min": torch.tensor(0.002)}
    safetensors.torch.save_file(sd, folder / "cosxl.safetensors", metadata=read_metadata(folder / "sd2.safetensors"))
    loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "cosxl.safetensors"}}
    result = engine.run(parse_api({"1": loader, "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}),
                        keep=["1"])
    model = result.values["1"][0]
    assert isinstance(model.schedule, ContinuousSchedule) and model.schedule.range == pytest.approx((0.002, 120.0))
    assert model.prediction == "v"
    edm, plain = latent(engine, graph(ckpt="cosxl.safetensors")), latent(engine, graph(ckpt="sd2.safetensors"))
    assert torch.isfinite(edm).all() and differ(edm, plain)


def test_model_sampling_discrete_keeps_the_x4_upscalers_own_betas():
    """ModelSamplingDiscrete starts from the model's own discrete table, as ComfyUI's starts from the model's
    sampling settings: the x4 upscaler's linear betas, not SD's scaled-linear ones."""
    from types import SimpleNamespace

    from ldm.upscaler_x4 import schedule as x4_schedule
    from nodes.sd.models import DEFAULT_SCHEDULE, DiffusionModel
    from nodes.sd.patches import ModelSamplingDiscrete

    x4 = DiffusionModel(None, SimpleNamespace(name="sd_x4_upscaler", edm=None, zero_snr=False), "x4.safetensors",
                        schedule=x4_schedule())
    (patched,) = ModelSamplingDiscrete().execute(x4, "v_prediction", False)
    assert torch.equal(patched.schedule.sigmas, x4_schedule().sigmas)
    assert not torch.allclose(patched.schedule.sigmas, DEFAULT_SCHEDULE.sigmas)
    (rescaled,) = ModelSamplingDiscrete().execute(x4, "v_prediction", True)
    assert torch.equal(rescaled.schedule.sigmas, x4_schedule().zero_terminal_snr().sigmas)
