"""TemporalScoreRescaling, TangentialAmplifyingGuidance, FreSca, CFGOverride, DualModelGuider (tiny SD1 files) and
SkipLayerGuidanceDiTSimple (a tiny Flux file) in workflows: ComfyUI's declarations, and one-step runs whose result is
the guided prediction itself, checked against ComfyUI's arithmetic on the plain runs' predictions."""

from __future__ import annotations

import math

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.flux_presets import make_flux_files
from ldm.presets import make_checkpoint, make_controlnet
from ldm.sampling import DiscreteSchedule, compute_sigmas, prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_extra_guidance import comfy_fourier, comfy_tag

SCALE = 0.18215  # SD1's latent scale: a LATENT is the model's latent / SCALE
SEED = 5


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("extra_guidance")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1b.safetensors", seed=2)
    make_controlnet("tiny-sd1", root / "models" / "controlnet" / "tiny_canny.safetensors", seed=5)
    make_flux_files(root / "models", "dev", seed=3, dtype=torch.float32)
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def prompts() -> dict:
    """Loaders "1" and "1b" (another random SD1), prompts "2" (positive) and "3" (negative, zeroed: it guides more
    strongly), a latent "4"."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
            "1b": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1b.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3t": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
            "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3t", 0]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


def ksampler(*patches: dict, cfg: float = 6.0, positive: str = "2", steps: int = 1) -> dict:
    """A KSampler "6" (euler, karras) on the loader's model with `patches` applied in order ("50", "51", ...). At one
    step its result is the guided prediction of the first level's call."""
    nodes = prompts()
    model = ["1", 0]
    for i, patch in enumerate(patches):
        nodes[str(50 + i)] = {"class_type": patch["class_type"], "inputs": {"model": model, **patch["inputs"]}}
        model = [str(50 + i), 0]
    nodes["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": SEED, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "karras",
        "positive": [positive, 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    return nodes


def latent(engine, nodes: dict, node: str = "6") -> torch.Tensor:
    nodes = {**nodes, "99": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}}
    result = engine.run(parse_api(nodes), keep=[node])
    assert result.ok, result.error
    return result.values[node][0]["samples"]


def error(engine, nodes: dict, node: str = "6") -> str:
    nodes = {**nodes, "99": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}}
    result = engine.run(parse_api(nodes), keep=[node])
    assert not result.ok
    return str(result.error)


def predictions(engine) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and negative prompts' predictions at the first level, as LATENTs (cfg 1 runs of one step)."""
    return latent(engine, ksampler(cfg=1.0)), latent(engine, ksampler(cfg=1.0, positive="3"))


def first_level() -> float:
    return float(compute_sigmas(DiscreteSchedule(), "karras", 1)[0])


def start_latent() -> torch.Tensor:
    """The sampler's latent at the first level, as a LATENT: the noise at the variance-preserving scale."""
    sigma = first_level()
    return prepare_noise(torch.zeros(1, 4, 8, 8), SEED) * math.sqrt(1 + sigma**2) / SCALE


# The tiny random model's latents are large (|x| ~ 200) and its guidance small (about 1e-4 to 1e-3 of that), so
# results are compared up to float rounding over the steps, up to about 1e-5 of the latent's size (FreSca's FFTs).
def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_declarations_are_comfyuis(engine) -> None:
    info = builtin_registry().object_info()
    expected = {
        "TemporalScoreRescaling": ("TSR - Temporal Score Rescaling", "model/patch/unet",
                                   ["model", "tsr_k", "tsr_sigma"], [], "patched_model"),
        "TangentialAmplifyingGuidance": ("Tangential Amplifying Guidance", "experimental",
                                         ["model", "t_scale", "r_scale", "start_percent", "end_percent"], [], "MODEL"),
        "FreSca": ("FreSca", "_for_testing", ["model", "scale_low", "scale_high", "freq_cutoff"], [], "MODEL"),
        "CFGOverride": ("CFG Override", "model/sampling/guiders", ["model", "cfg", "start_percent", "end_percent"],
                        [], "MODEL"),
        "DualModelGuider": ("Dual Model CFG Guider", "model/sampling/guiders", ["model", "positive", "cfg"],
                            ["model_negative", "negative"], "GUIDER"),
        "SkipLayerGuidanceDiTSimple": ("SkipLayerGuidanceDiTSimple", "advanced/guidance",
                                       ["model", "double_layers", "single_layers", "start_percent", "end_percent"],
                                       [], "MODEL"),
    }
    for name, (display, category, required, optional, output) in expected.items():
        assert info[name]["display_name"] == display, name
        assert info[name]["category"] == category, name
        assert info[name]["input_order"]["required"] == required, name
        assert info[name]["input_order"].get("optional", []) == optional, name
        assert info[name]["output_name"] == [output], name

    def options(node: str, name: str) -> dict:
        inputs = info[node]["input"]
        return (inputs["required"].get(name) or inputs["optional"][name])[1]

    assert options("TemporalScoreRescaling", "tsr_k").items() >= {
        "default": 0.95, "min": 0.01, "max": 100.0, "step": 0.001, "display": "number", "advanced": True}.items()
    assert options("TemporalScoreRescaling", "tsr_sigma").items() >= {"default": 1.0, "min": 0.01, "max": 100.0}.items()
    assert options("TangentialAmplifyingGuidance", "t_scale").items() >= {
        "default": 1.05, "min": 0.0, "max": 10.0, "step": 0.001}.items()
    assert options("TangentialAmplifyingGuidance", "end_percent").items() >= {"default": 1.0, "step": 0.01}.items()
    assert options("FreSca", "scale_high").items() >= {"default": 1.25, "min": 0, "max": 10, "step": 0.01}.items()
    assert options("FreSca", "freq_cutoff").items() >= {"default": 20, "min": 1, "max": 10000, "step": 1}.items()
    assert options("CFGOverride", "cfg").items() >= {
        "default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}.items()
    assert options("CFGOverride", "start_percent").items() >= {"default": 0.0, "max": 1.0, "step": 0.001}.items()
    assert options("DualModelGuider", "cfg").items() >= {"default": 4.0, "max": 100.0, "step": 0.1}.items()
    assert options("SkipLayerGuidanceDiTSimple", "double_layers")["default"] == "7, 8, 9"
    assert options("SkipLayerGuidanceDiTSimple", "start_percent").items() >= {"default": 0.0, "step": 0.001}.items()
    assert options("SkipLayerGuidanceDiTSimple", "end_percent")["default"] == 1.0


def test_temporal_score_rescaling_one_step(engine) -> None:
    plain = latent(engine, ksampler())
    out = latent(engine, ksampler({"class_type": "TemporalScoreRescaling", "inputs": {"tsr_k": 0.7,
                                                                                      "tsr_sigma": 2.0}}))
    snr = first_level() ** -2  # an SD model: alpha 1
    r = (snr * 4.0 + 1) / (snr * 4.0 / 0.7 + 1)
    close(out, torch.lerp(start_latent(), plain, r))
    assert (out - plain).abs().max() > 1e-3 * plain.abs().max()
    same = latent(engine, ksampler({"class_type": "TemporalScoreRescaling", "inputs": {"tsr_k": 1.0,
                                                                                       "tsr_sigma": 2.0}}))
    close(same, plain)  # (the guider's general path, not the fused one: the same up to rounding)


def test_tangential_amplifying_guidance_one_step(engine) -> None:
    plain = latent(engine, ksampler())
    tag = {"class_type": "TangentialAmplifyingGuidance",
           "inputs": {"t_scale": 1.5, "r_scale": 0.8, "start_percent": 0.0, "end_percent": 1.0}}
    out = latent(engine, ksampler(tag))
    close(out, comfy_tag(plain, start_latent(), 1.5, 0.8))  # the same at any common scale of both
    assert (out - plain).abs().max() > 1e-3 * plain.abs().max()
    late = {**tag, "inputs": {**tag["inputs"], "start_percent": 0.5}}  # the first level is before its window
    close(latent(engine, ksampler(late)), plain)


def test_fresca_one_step(engine) -> None:
    cond, uncond = predictions(engine)
    fresca = {"class_type": "FreSca", "inputs": {"scale_low": 0.5, "scale_high": 1.5, "freq_cutoff": 2}}
    out = latent(engine, ksampler(fresca, cfg=6.0))
    close(out, uncond + 6.0 * comfy_fourier(cond - uncond, 0.5, 1.5, 2))
    assert (out - latent(engine, ksampler(cfg=6.0))).abs().max() > 1e-3 * out.abs().max()


def test_cfg_override_one_step(engine) -> None:
    cond, uncond = predictions(engine)
    override = {"class_type": "CFGOverride", "inputs": {"cfg": 4.0, "start_percent": 0.0, "end_percent": 1.0}}
    close(latent(engine, ksampler(override, cfg=1.0)), torch.lerp(uncond, cond, 4.0))
    # The one nearest the sampler wins where both cover the level.
    nearer = {"class_type": "CFGOverride", "inputs": {"cfg": 2.5, "start_percent": 0.0, "end_percent": 0.5}}
    close(latent(engine, ksampler(override, nearer, cfg=1.0)), torch.lerp(uncond, cond, 2.5))
    # A window that starts later leaves the first level at the sampler's cfg.
    later = {"class_type": "CFGOverride", "inputs": {"cfg": 4.0, "start_percent": 0.5, "end_percent": 1.0}}
    assert torch.equal(latent(engine, ksampler(later, cfg=1.0)), cond)


def test_cfg_override_over_part_of_a_run(engine) -> None:
    """Over four steps, an override to cfg 1 after the first half is the same run as two KSamplerAdvanced stages,
    the second at cfg 1."""
    override = {"class_type": "CFGOverride", "inputs": {"cfg": 1.0, "start_percent": 0.5, "end_percent": 1.0}}
    out = latent(engine, ksampler(override, cfg=6.0, steps=4))
    assert (out - latent(engine, ksampler(cfg=6.0, steps=4))).abs().max() > 2e-5 * out.abs().max()
    nodes = prompts()
    stage = {"model": ["1", 0], "add_noise": "enable", "noise_seed": SEED, "steps": 4, "sampler_name": "euler",
             "scheduler": "karras", "positive": ["2", 0], "negative": ["3", 0]}
    schedule = DiscreteSchedule()
    sigmas = compute_sigmas(schedule, "karras", 4).tolist()
    split = sum(s > schedule.sigma_at_percent(0.5) for s in sigmas)  # steps taken at the sampler's cfg
    nodes["6a"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **stage, "cfg": 6.0, "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": split,
        "return_with_leftover_noise": "enable"}}
    nodes["6"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **stage, "add_noise": "disable", "cfg": 1.0, "latent_image": ["6a", 0], "start_at_step": split,
        "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    close(out, latent(engine, nodes))


def custom(guider: dict) -> dict:
    """SamplerCustomAdvanced "6" with `guider` as node "g": euler, one karras step on the first loader's model."""
    nodes = prompts()
    nodes["g"] = guider
    nodes["n"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}}
    nodes["k"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    nodes["s"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 1,
                                                             "denoise": 1.0}}
    nodes["6"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["n", 0], "guider": ["g", 0], "sampler": ["k", 0], "sigmas": ["s", 0], "latent_image": ["4", 0]}}
    return nodes


def test_dual_model_guider_one_step(engine) -> None:
    cond = latent(engine, custom({"class_type": "BasicGuider", "inputs": {"model": ["1", 0],
                                                                         "conditioning": ["2", 0]}}))
    uncond_b = latent(engine, custom({"class_type": "BasicGuider", "inputs": {"model": ["1b", 0],
                                                                             "conditioning": ["3", 0]}}))
    dual = {"class_type": "DualModelGuider", "inputs": {"model": ["1", 0], "model_negative": ["1b", 0],
                                                        "positive": ["2", 0], "negative": ["3", 0], "cfg": 4.0}}
    close(latent(engine, custom(dual)), torch.lerp(uncond_b, cond, 4.0))
    # Without a second model it is the CFG Guider; at cfg 1 the positive alone (no negative needed).
    single = {"class_type": "DualModelGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                          "negative": ["3", 0], "cfg": 4.0}}
    cfg_guider = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                        "negative": ["3", 0], "cfg": 4.0}}
    assert torch.equal(latent(engine, custom(single)), latent(engine, custom(cfg_guider)))
    at_one = {"class_type": "DualModelGuider", "inputs": {"model": ["1", 0], "model_negative": ["1b", 0],
                                                          "positive": ["2", 0], "cfg": 1.0}}
    assert torch.equal(latent(engine, custom(at_one)), cond)


def test_dual_model_guider_keeps_the_runs_controlnets_on_the_device(engine) -> None:
    """The negative model is placed keeping what the run keeps: the UNet and the prompts' ControlNets (each once),
    so that loading it never offloads a ControlNet the run is using."""
    from nodes.sd.custom_sampling import _run_modules

    nodes = prompts()
    nodes["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "tiny_canny.safetensors"}}
    nodes["11"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}
    nodes["12"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["2", 0], "negative": ["3", 0], "control_net": ["10", 0], "image": ["11", 0], "strength": 1.0,
        "start_percent": 0.0, "end_percent": 1.0}}
    nodes["99"] = {"class_type": "PreviewAny", "inputs": {"source": ["12", 0]}}
    result = engine.run(parse_api(nodes), keep=["1", "12"])
    assert result.ok, result.error
    model, (positive, negative) = result.values["1"][0], result.values["12"]
    control = positive[0][1]["control"]
    assert [id(m) for m in _run_modules(model, positive, negative)] == [id(model.unet), id(control.model)]
    plain = [(positive[0][0], {})]
    assert [id(m) for m in _run_modules(model, plain, plain)] == [id(model.unet)]


def test_dual_model_guider_refusals(engine) -> None:
    text_free = {"class_type": "DualModelGuider", "inputs": {"model": ["1", 0], "model_negative": ["1b", 0],
                                                             "positive": ["2", 0], "cfg": 4.0}}
    assert "text-free negative pass" in error(engine, custom(text_free))
    nodes = custom({"class_type": "DualModelGuider", "inputs": {"model": ["1", 0], "model_negative": ["v", 0],
                                                                "positive": ["2", 0], "negative": ["3", 0],
                                                                "cfg": 4.0}})
    nodes["v"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1b", 0], "sampling": "v_prediction",
                                                                    "zsnr": False}}
    assert "model_negative predicts v and model eps" in error(engine, nodes)


def flux(*, cfg: float, **slg) -> dict:
    """A one-step Flux run "7" (euler, simple), with SkipLayerGuidanceDiTSimple "20" when `slg` names its inputs."""
    doc = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-tiny-dev-checkpoint.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 1, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
    }
    if slg:
        doc["20"] = {"class_type": "SkipLayerGuidanceDiTSimple", "inputs": {
            "model": ["1", 0], "double_layers": "0", "single_layers": "1", "start_percent": 0.0, "end_percent": 1.0,
            **slg}}
        doc["7"]["inputs"]["model"] = ["20", 0]
    return doc


def test_skip_layer_guidance_dit_simple_changes_only_the_negative(engine) -> None:
    """At one step the result is `lerp(negative, positive, cfg)` (a LATENT is affine in the model's latent), so two
    cfgs give both predictions: the positive is the plain one, the negative is another."""
    out2, out3 = latent(engine, flux(cfg=2.0, double_layers="0"), "7"), latent(engine, flux(cfg=3.0, double_layers="0"),
                                                                              "7")
    plain1, plain2 = latent(engine, flux(cfg=1.0), "7"), latent(engine, flux(cfg=2.0), "7")
    cond = 2 * out2 - out3
    close(cond, plain1)
    uncond, plain_uncond = 2 * cond - out2, 2 * plain1 - plain2
    assert (uncond - plain_uncond).abs().mean() > 1e-3 * plain_uncond.abs().mean()
    # At cfg 1 there is no negative pass to change; a window after the only level, or no layers, change nothing.
    assert torch.equal(latent(engine, flux(cfg=1.0, double_layers="0"), "7"), plain1)
    close(latent(engine, flux(cfg=2.0, start_percent=0.5), "7"), plain2)
    assert torch.equal(latent(engine, flux(cfg=2.0, double_layers="", single_layers=""), "7"), plain2)


def test_skip_layer_guidance_dit_simple_refuses_a_unet(engine) -> None:
    nodes = ksampler({"class_type": "SkipLayerGuidanceDiTSimple", "inputs": {
        "double_layers": "1", "single_layers": "", "start_percent": 0.0, "end_percent": 1.0}})
    with pytest.raises(WorkflowInvalid, match=r"diffusion transformers \(SD3, Flux\); the MODEL linked is SD1"):
        latent(engine, nodes)
