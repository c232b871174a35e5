"""Guidance patch nodes (CFGZeroStar, CFGNorm, APG, Mahiro, Epsilon Scaling, TCFG) and PerpNegGuider in workflows."""

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance_nodes")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def prompts() -> dict:
    """Loader "1", prompts "2" (positive), "3" (negative) and "7" (empty), a latent "4"."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


def graph(*patches: dict, cfg: float = 6.0, negative: str = "3") -> dict:
    """A KSampler "6" on the loader's model with `patches` applied in order (nodes "50", "51", ...); the negative
    prompt "3", the empty one "7", or "8", the negative zeroed (which guides more strongly)."""
    nodes = prompts()
    nodes["8"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}}
    model = ["1", 0]
    for i, patch in enumerate(patches):
        nodes[str(50 + i)] = {"class_type": patch["class_type"], "inputs": {"model": model, **patch["inputs"]}}
        model = [str(50 + i), 0]
    nodes["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 5, "steps": 4, "cfg": cfg, "sampler_name": "euler", "scheduler": "karras",
        "positive": ["2", 0], "negative": [negative, 0], "latent_image": ["4", 0], "denoise": 1.0}}
    return nodes


def latent(engine, nodes: dict, node: str = "6") -> torch.Tensor:
    nodes = {**nodes, "99": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}}
    result = engine.run(parse_api(nodes), keep=[node])
    assert result.ok, result.error
    return result.values[node][0]["samples"]


# The tiny random model's latents are large (|x| ~ 200) and its guidance small: cfg 6 against cfg 1 moves them by
# about 1e-4 of that with a text negative, 5e-3 with a zeroed one. Arithmetic that should change nothing moves them
# by up to 1e-6 (float rounding over the steps), so differences are judged against that.
def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 5e-6 * b.abs().max())


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 2e-6 * b.abs().max())


def test_the_nodes_declare_comfyuis_names_inputs_and_categories(engine):
    info = builtin_registry().object_info()
    expected = {"CFGZeroStar": ("advanced/guidance", ["model"], "patched_model"),
                "CFGNorm": ("advanced/guidance", ["model", "strength"], "patched_model"),
                "APG": ("sampling/custom_sampling", ["model", "eta", "norm_threshold", "momentum"], "MODEL"),
                "Mahiro": ("_for_testing", ["model"], "patched_model"),
                "Epsilon Scaling": ("model/patch/unet", ["model", "scaling_factor"], "MODEL"),
                "TCFG": ("advanced/guidance", ["model"], "patched_model"),
                "PerpNegGuider": ("_for_testing", ["model", "positive", "negative", "empty_conditioning", "cfg",
                                                   "neg_scale"], "GUIDER")}
    for name, (category, inputs, output) in expected.items():
        assert info[name]["category"] == category
        assert info[name]["input_order"]["required"] == inputs
        assert info[name]["output_name"] == [output]
    assert info["APG"]["display_name"] == "Adaptive Projected Guidance"
    assert info["TCFG"]["display_name"] == "Tangential Damping CFG"
    apg = info["APG"]["input"]["required"]
    assert apg["eta"][1].items() >= {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}.items()
    assert apg["norm_threshold"][1].items() >= {"default": 5.0, "min": 0.0, "max": 50.0, "step": 0.1}.items()
    assert apg["momentum"][1].items() >= {"default": 0.0, "min": -5.0, "max": 1.0, "step": 0.01}.items()
    eps = info["Epsilon Scaling"]["input"]["required"]["scaling_factor"][1]
    assert eps.items() >= {"default": 1.005, "min": 0.5, "max": 1.5, "step": 0.001}.items()
    strength = info["CFGNorm"]["input"]["required"]["strength"][1]
    assert strength.items() >= {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}.items()
    perp = info["PerpNegGuider"]["input"]["required"]
    assert perp["cfg"][1].items() >= {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}.items()
    assert perp["neg_scale"][1].items() >= {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}.items()


@pytest.mark.parametrize("patch", [
    {"class_type": "CFGZeroStar", "inputs": {}},
    {"class_type": "CFGNorm", "inputs": {"strength": 0.9}},
    {"class_type": "APG", "inputs": {"eta": 0.0, "norm_threshold": 2.0, "momentum": -0.5}},
    {"class_type": "Mahiro", "inputs": {}},
    {"class_type": "Epsilon Scaling", "inputs": {"scaling_factor": 1.05}},
    {"class_type": "TCFG", "inputs": {}},
], ids=lambda p: p["class_type"])
def test_each_patch_changes_the_image_and_leaves_the_cached_model_alone(engine, patch):
    plain = latent(engine, graph(negative="8"))
    patched = latent(engine, graph(patch, negative="8"))
    assert torch.isfinite(patched).all()
    assert differ(patched, plain)
    assert torch.equal(latent(engine, graph(negative="8")), plain)  # the loader's model, cached, is unpatched


def test_neutral_settings_give_the_plain_image(engine):
    assert same(latent(engine, graph({"class_type": "Epsilon Scaling", "inputs": {"scaling_factor": 1.0}})),
                latent(engine, graph()))
    at_one = latent(engine, graph(cfg=1.0))
    for patch in ("CFGZeroStar", "Mahiro", "TCFG", "APG"):  # each needs a negative pass, which cfg 1 skips
        inputs = {"eta": 0.0, "norm_threshold": 1.0, "momentum": 0.5} if patch == "APG" else {}
        assert same(latent(engine, graph({"class_type": patch, "inputs": inputs}, cfg=1.0)), at_one), patch
    # APG at eta 1 with neither threshold nor momentum is plain cfg at cfg + 1, as in ComfyUI.
    apg = {"class_type": "APG", "inputs": {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0}}
    assert same(latent(engine, graph(apg, cfg=5.0)), latent(engine, graph(cfg=6.0)))


def test_patches_chain_pre_then_cfg_then_post(engine):
    chained = latent(engine, graph({"class_type": "TCFG", "inputs": {}}, {"class_type": "CFGZeroStar", "inputs": {}},
                                   {"class_type": "RescaleCFG", "inputs": {"multiplier": 0.7}}))
    rescale_only = latent(engine, graph({"class_type": "RescaleCFG", "inputs": {"multiplier": 0.7}}))
    assert torch.isfinite(chained).all() and differ(chained, rescale_only)


def perp_neg_graph(neg_scale: float, cfg: float = 6.0) -> dict:
    return {**prompts(),
            "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
            "11": {"class_type": "PerpNegGuider", "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "empty_conditioning": ["7", 0],
                "cfg": cfg, "neg_scale": neg_scale}},
            "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "13": {"class_type": "BasicScheduler", "inputs": {
                "model": ["1", 0], "scheduler": "karras", "steps": 4, "denoise": 1.0}},
            "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["10", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": ["13", 0],
                "latent_image": ["4", 0]}}}


def test_perp_neg_guider(engine):
    # neg_scale 0: guidance from the empty prompt alone, i.e. the KSampler with the empty prompt as its negative.
    against_empty = latent(engine, graph(negative="7"))
    assert same(latent(engine, perp_neg_graph(0.0), "14"), against_empty)
    perp = latent(engine, perp_neg_graph(1.0), "14")
    assert torch.isfinite(perp).all() and differ(perp, against_empty)
    assert differ(perp, latent(engine, graph()))  # nor is it plain cfg against the negative


def test_the_older_perp_neg_model_patch_guides_as_perp_neg_guider(engine):
    """ComfyUI's deprecated PerpNeg node patches the MODEL: a KSampler with it guides as PerpNegGuider does with the
    same prompts (the same seed, sampler and sigmas), and the loader's model is left unpatched."""
    for neg_scale in (0.0, 1.0):
        nodes = graph({"class_type": "PerpNeg", "inputs": {"empty_conditioning": ["7", 0], "neg_scale": neg_scale}})
        assert same(latent(engine, nodes), latent(engine, perp_neg_graph(neg_scale), "14")), neg_scale
    assert differ(latent(engine, graph()), latent(engine, perp_neg_graph(1.0), "14"))
    info = builtin_registry().object_info()
    assert info["PerpNeg"]["input_order"]["required"] == ["model", "empty_conditioning", "neg_scale"]
    assert info["PerpNeg"]["category"] == "_for_testing"
