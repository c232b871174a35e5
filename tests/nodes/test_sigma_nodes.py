"""ComfyUI's extra schedule nodes (nodes/sd/sigmas.py): their declarations, and each run in a workflow."""

import math

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.ui_format import ui_to_api
from ldm.presets import make_checkpoint
from ldm.sampling import DiscreteSchedule, get_sigmas
from ldm.sampling.extra_schedules import sigmas_align_your_steps, sigmas_laplace, sigmas_vp
from ldm.sampling.noise import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

STEPS = 4
# The packs these workflows use, rather than every built-in one: other packs are being edited alongside.
MODULES = ("nodes.builtin.primitives", "nodes.builtin.utils", "nodes.sd.loaders", "nodes.sd.conditioning",
           "nodes.sd.latent", "nodes.sd.sampling", "nodes.sd.custom_sampling", "nodes.sd.sigmas")
SCHEDULE = DiscreteSchedule()


@pytest.fixture(scope="module")
def registry():
    return builtin_registry(MODULES)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, registry):
    root = tmp_path_factory.mktemp("sigma_nodes")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    set_paths(FolderPaths(base=root))
    yield Executor(registry, services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def prompts() -> dict:
    """Loader "1", prompts "2" and "3", an empty latent "4" (64x64 pixels, batch 2)."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}}


def run(engine, graph: dict, *nodes: str) -> list:
    graph = {**graph, **{f"preview{node}": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}
                         for node in nodes}}
    result = engine.run(parse_api(graph), keep=list(nodes))
    assert result.ok, result.error
    return [result.values[node] for node in nodes]


def run_error(engine, graph: dict, node: str) -> str:
    """The run-time error of a workflow that validates (a node failing on a linked value)."""
    graph = {**graph, "preview": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}}
    result = engine.run(parse_api(graph))
    assert not result.ok
    return str(result.error)


def sampler(sigmas: list, noise: dict | None = None, latent=("4", 0), name: str = "euler") -> dict:
    """Nodes "10".."12" (noise, guider, sampler) and SamplerCustomAdvanced "14" over the given sigmas."""
    return {"10": noise or {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
            "11": {"class_type": "CFGGuider", "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 6.0}},
            "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": name}},
            "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["10", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": sigmas,
                "latent_image": list(latent)}}}


# Declarations: ComfyUI's (comfy_extras/nodes_align_your_steps.py and nodes_custom_sampler.py), as its
# /object_info reports them: category, inputs in order as (type or choices, default, min, max, step), outputs.
COMFY = {
    "AlignYourStepsScheduler": ("sampling/schedulers", [
        ("model_type", ["SD1", "SDXL", "SVD"], "SD1", None, None, None),
        ("steps", "INT", 10, 1, 10000, 1), ("denoise", "FLOAT", 1.0, 0.0, 1.0, 0.01)], [("SIGMAS", "SIGMAS")]),
    "LaplaceScheduler": ("sampling/schedulers", [
        ("steps", "INT", 20, 1, 10000, 1), ("sigma_max", "FLOAT", 14.614642, 0.0, 5000.0, 0.01),
        ("sigma_min", "FLOAT", 0.0291675, 0.0, 5000.0, 0.01), ("mu", "FLOAT", 0.0, -10.0, 10.0, 0.1),
        ("beta", "FLOAT", 0.5, 0.0, 10.0, 0.1)], [("SIGMAS", "SIGMAS")]),
    "VPScheduler": ("sampling/schedulers", [
        ("steps", "INT", 20, 1, 10000, 1), ("beta_d", "FLOAT", 19.9, 0.0, 5000.0, 0.01),
        ("beta_min", "FLOAT", 0.1, 0.0, 5000.0, 0.01), ("eps_s", "FLOAT", 0.001, 0.0, 1.0, 0.0001)],
        [("SIGMAS", "SIGMAS")]),
    "SamplingPercentToSigma": ("sampling/sigmas", [
        ("model", "MODEL", None, None, None, None), ("sampling_percent", "FLOAT", 0.0, 0.0, 1.0, 0.0001),
        ("return_actual_sigma", "BOOLEAN", False, None, None, None)], [("FLOAT", "sigma_value")]),
    "ExtendIntermediateSigmas": ("sampling/sigmas", [
        ("sigmas", "SIGMAS", None, None, None, None), ("steps", "INT", 2, 1, 100, 1),
        ("start_at_sigma", "FLOAT", -1.0, -1.0, 20000.0, 0.01), ("end_at_sigma", "FLOAT", 12.0, 0.0, 20000.0, 0.01),
        ("spacing", ["linear", "cosine", "sine"], "linear", None, None, None)], [("SIGMAS", "SIGMAS")]),
    "AddNoise": ("experimental/custom_sampling/noise", [
        ("model", "MODEL", None, None, None, None), ("noise", "NOISE", None, None, None, None),
        ("sigmas", "SIGMAS", None, None, None, None), ("latent_image", "LATENT", None, None, None, None)],
        [("LATENT", "LATENT")]),
}


@pytest.mark.parametrize("name", sorted(COMFY))
def test_declarations_are_comfyuis(registry, name):
    category, inputs, outputs = COMFY[name]
    info = registry.get(name).object_info()
    assert info["category"] == category
    assert info["input_order"]["required"] == [entry[0] for entry in inputs] and not info["input"]["optional"]
    for key, kind, default, low, high, step in inputs:
        declared, options = info["input"]["required"][key]
        assert declared == kind, key
        assert (options.get("default"), options.get("min"), options.get("max"), options.get("step")) == \
            (default, low, high, step), key
    assert list(zip(info["output"], info["output_name"], strict=True)) == outputs


def test_comfyui_editor_files_load_by_widget_position(registry):
    """Widget values in ComfyUI's order; the AYS values are those of the GITS authors' published workflow."""
    def node(node_id: int, kind: str, values: list, inputs: list | None = None) -> dict:
        return {"id": node_id, "type": kind, "widgets_values": values, "inputs": inputs or []}

    ui = {"nodes": [
        node(1, "AlignYourStepsScheduler", ["SD1", 10, 1]),
        node(2, "LaplaceScheduler", [30, 14.6, 0.03, 0.5, 0.7]),
        node(3, "VPScheduler", [12, 19.9, 0.1, 0.002]),
        node(4, "ExtendIntermediateSigmas", [3, 8.0, 1.5, "cosine"], [{"name": "sigmas", "link": 1}]),
        node(5, "SamplingPercentToSigma", [0.25, True], [{"name": "model", "link": None}]),
    ], "links": [[1, 2, 0, 4, 0, "SIGMAS"]]}
    api = ui_to_api(ui, registry)
    assert api["1"]["inputs"] == {"model_type": "SD1", "steps": 10, "denoise": 1}
    assert api["2"]["inputs"] == {"steps": 30, "sigma_max": 14.6, "sigma_min": 0.03, "mu": 0.5, "beta": 0.7}
    assert api["3"]["inputs"] == {"steps": 12, "beta_d": 19.9, "beta_min": 0.1, "eps_s": 0.002}
    assert api["4"]["inputs"] == {"sigmas": ["2", 0], "steps": 3, "start_at_sigma": 8.0, "end_at_sigma": 1.5,
                                  "spacing": "cosine"}
    assert api["5"]["inputs"] == {"sampling_percent": 0.25, "return_actual_sigma": True}


def test_align_your_steps_sigmas_reach_the_sampler_unchanged(engine):
    """The AYS run equals the same run over ManualSigmas typed with the AYS levels (float32 round trip)."""
    expected = sigmas_align_your_steps("SD1", STEPS)
    typed = ", ".join(repr(level) for level in expected.tolist())
    graph = {**prompts(), "13": {"class_type": "AlignYourStepsScheduler",
                                 "inputs": {"model_type": "SD1", "steps": STEPS, "denoise": 1.0}},
             **sampler(["13", 0]), "20": {"class_type": "ManualSigmas", "inputs": {"sigmas": typed}}}
    graph["21"] = {**graph["14"], "inputs": {**graph["14"]["inputs"], "sigmas": ["20", 0]}}
    [(sigmas,), (output, _), (manual, _)] = run(engine, graph, "13", "14", "21")
    assert torch.equal(sigmas, expected) and sigmas.dtype == torch.float32
    assert torch.equal(output["samples"], manual["samples"])
    assert bool(torch.isfinite(output["samples"]).all())


def test_align_your_steps_denoise_runs_the_low_end(engine):
    graph = {**prompts(), "13": {"class_type": "AlignYourStepsScheduler",
                                 "inputs": {"model_type": "SDXL", "steps": 10, "denoise": 0.3}}, **sampler(["13", 0])}
    [(sigmas,), (output, _)] = run(engine, graph, "13", "14")
    full = sigmas_align_your_steps("SDXL", 10)
    assert len(sigmas) == 4 and torch.equal(sigmas[:-1], full[-4:-1]) and sigmas[-1] == 0  # 3 of the 10 steps
    assert bool(torch.isfinite(output["samples"]).all())


def test_laplace_scheduler_ends_at_sigma_min_as_in_comfyui(engine):
    """No final 0: the sampler stops at sigma_min, so its output still differs from the last denoised prediction."""
    inputs = {"steps": STEPS, "sigma_max": 14.614642, "sigma_min": 0.0291675, "mu": 0.0, "beta": 0.5}
    graph = {**prompts(), "13": {"class_type": "LaplaceScheduler", "inputs": inputs}, **sampler(["13", 0])}
    [(sigmas,), (output, denoised)] = run(engine, graph, "13", "14")
    assert torch.equal(sigmas, sigmas_laplace(STEPS, 0.0291675, 14.614642, 0.0, 0.5))
    assert len(sigmas) == STEPS and float(sigmas[-1]) == pytest.approx(0.0291675)
    assert bool(torch.isfinite(output["samples"]).all())
    assert not torch.allclose(output["samples"], denoised["samples"])


def test_vp_scheduler_starts_above_the_models_range(engine):
    inputs = {"steps": STEPS, "beta_d": 19.9, "beta_min": 0.1, "eps_s": 0.001}
    graph = {**prompts(), "13": {"class_type": "VPScheduler", "inputs": inputs}, **sampler(["13", 0])}
    [(sigmas,), (output, denoised)] = run(engine, graph, "13", "14")
    assert torch.equal(sigmas, sigmas_vp(STEPS, 19.9, 0.1, 0.001))
    assert sigmas[0] > SCHEDULE.sigma_max and sigmas[-1] == 0 and len(sigmas) == STEPS + 1
    assert bool(torch.isfinite(output["samples"]).all())
    torch.testing.assert_close(output["samples"], denoised["samples"], rtol=1e-5, atol=1e-5)  # Euler's last step


@pytest.mark.parametrize("percent, actual, expected", [
    (0.0, False, 999999999.9), (0.0, True, SCHEDULE.sigma_max), (1.0, False, 0.0), (1.0, True, SCHEDULE.sigma_min),
    (1 - 500 / 999, False, float(SCHEDULE.sigmas[500])),
    (0.5, True, math.sqrt(float(SCHEDULE.sigmas[499]) * float(SCHEDULE.sigmas[500]))),  # t = 499.5, log-linear
])
def test_sampling_percent_to_sigma(engine, percent, actual, expected):
    graph = {**prompts(), "30": {"class_type": "SamplingPercentToSigma", "inputs": {
        "model": ["1", 0], "sampling_percent": percent, "return_actual_sigma": actual}}}
    [(value,)] = run(engine, graph, "30")
    assert isinstance(value, float) and value == pytest.approx(expected, rel=1e-5)


def test_extend_intermediate_sigmas_below_a_linked_sigma(engine):
    """Steps starting at or below the level halfway through sampling (a linked FLOAT) are split in two."""
    graph = {**prompts(),
             "30": {"class_type": "SamplingPercentToSigma", "inputs": {
                 "model": ["1", 0], "sampling_percent": 0.5, "return_actual_sigma": False}},
             "31": {"class_type": "BasicScheduler", "inputs": {
                 "model": ["1", 0], "scheduler": "karras", "steps": STEPS, "denoise": 1.0}},
             "13": {"class_type": "ExtendIntermediateSigmas", "inputs": {
                 "sigmas": ["31", 0], "steps": 2, "start_at_sigma": ["30", 0], "end_at_sigma": 0.0,
                 "spacing": "linear"}},
             **sampler(["13", 0])}
    [(halfway,), (base,), (extended,), (output, _)] = run(engine, graph, "30", "31", "13", "14")
    levels = base.tolist()
    expected = []
    for level, following in zip(levels, levels[1:], strict=False):
        expected += [level, (level + following) / 2] if level <= halfway else [level]
    assert extended.tolist() == pytest.approx(expected + [0.0])
    assert len(extended) > len(base) and bool(torch.isfinite(output["samples"]).all())


def img2img(engine_graph: dict, denoise: float) -> dict:
    """A first KSampler "5" makes a latent that is not empty; BasicScheduler "13" the second stage's sigmas."""
    return {**engine_graph,
            "5": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "seed": 3, "steps": STEPS, "cfg": 6.0, "sampler_name": "euler",
                "scheduler": "karras", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                "denoise": 1.0}},
            "13": {"class_type": "BasicScheduler", "inputs": {
                "model": ["1", 0], "scheduler": "karras", "steps": STEPS, "denoise": denoise}}}


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_add_noise_then_disable_noise_is_random_noise(engine, name):
    """ComfyUI's sampler adds noise * sigma_0 to a latent (below the top of the schedule); AddNoise adds the same
    noise at |sigma_0 - sigma_last| = sigma_0, so a deterministic sampler given DisableNoise then makes the same
    latent. (Samplers with step noise differ: DisableNoise's seed, 0, seeds their step noise, as in ComfyUI.)"""
    graph = {**img2img(prompts(), 0.5), **sampler(["13", 0], latent=("5", 0), name=name),
             "20": {"class_type": "AddNoise", "inputs": {
                 "model": ["1", 0], "noise": ["10", 0], "sigmas": ["13", 0], "latent_image": ["5", 0]}},
             "21": {"class_type": "DisableNoise", "inputs": {}}}
    graph["22"] = {**graph["14"], "inputs": {**graph["14"]["inputs"], "noise": ["21", 0], "latent_image": ["20", 0]}}
    [(expected, _), (noisy,), (output, _), (first,)] = run(engine, graph, "14", "20", "22", "5")
    assert not torch.allclose(noisy["samples"], first["samples"])
    # To rounding: the noisy latent goes out unscaled (/ 0.18215) and back in.
    torch.testing.assert_close(output["samples"], expected["samples"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split, level", [(None, lambda s: s[0]), (0, lambda s: s[0]), (1, lambda s: s[0] - s[1])])
def test_add_noise_level_for_whole_and_split_schedules(engine, split, level):
    """Noise times sigma_0 (not sqrt(1 + sigma_0^2) as a sampler starting at sigma_max would), and for a part
    split off, |first - last| (one level: that level), in the model's latent scale."""
    graph = {**img2img(prompts(), 1.0), "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
             "20": {"class_type": "AddNoise", "inputs": {
                 "model": ["1", 0], "noise": ["10", 0], "sigmas": ["13", 0], "latent_image": ["5", 0]}}}
    if split is not None:
        graph["15"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["13", 0], "step": split}}
        graph["20"]["inputs"]["sigmas"] = ["15", 0]
    [(model, _, _), (latent,), (sigmas,), (noisy,)] = run(engine, graph, "1", "5", "13", "20")
    scale = model.family.latent_scale_factor
    noise = prepare_noise(latent["samples"], 7)
    expected = latent["samples"] + noise * level(sigmas.tolist()) / scale
    torch.testing.assert_close(noisy["samples"], expected, rtol=1e-5, atol=1e-5)
    assert set(noisy) == set(latent)


def test_add_noise_with_an_empty_schedule_or_disabled_noise_keeps_the_latent(engine):
    graph = {**img2img(prompts(), 0.0), "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
             "20": {"class_type": "AddNoise", "inputs": {
                 "model": ["1", 0], "noise": ["10", 0], "sigmas": ["13", 0], "latent_image": ["5", 0]}},
             "21": {"class_type": "DisableNoise", "inputs": {}},
             "31": {"class_type": "BasicScheduler", "inputs": {
                 "model": ["1", 0], "scheduler": "karras", "steps": STEPS, "denoise": 1.0}}}
    graph["22"] = {"class_type": "AddNoise", "inputs": {**graph["20"]["inputs"], "noise": ["21", 0],
                                                        "sigmas": ["31", 0]}}
    [(latent,), (sigmas,), (empty_noisy,), (quiet,)] = run(engine, graph, "5", "13", "20", "22")
    assert len(sigmas) == 0 and torch.equal(empty_noisy["samples"], latent["samples"])
    torch.testing.assert_close(quiet["samples"], latent["samples"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("node, inputs, message", [
    ("LaplaceScheduler", {"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_min (2.0) must be below sigma_max (1.0)"),
    ("LaplaceScheduler", {"beta": 0.0}, "beta must be above 0"),
    ("LaplaceScheduler", {"steps": 1000}, "Laplace levels repeat"),
    ("LaplaceScheduler", {"mu": 4.0}, "Laplace levels repeat"),
    ("VPScheduler", {"eps_s": 0.0}, "eps_s must be between 0 and 1"),
    ("VPScheduler", {"eps_s": 1.0}, "eps_s must be between 0 and 1"),
    ("VPScheduler", {"beta_d": 0.0, "beta_min": 0.0}, "every level would be 0"),
    ("VPScheduler", {"beta_d": 5000.0}, "overflows"),
    ("AlignYourStepsScheduler", {"steps": 0}, "smaller than min of 1"),
    ("AlignYourStepsScheduler", {"model_type": "SD3"}, "not one of"),
    ("ExtendIntermediateSigmas", {"spacing": "cubic"}, "not one of"),
])
def test_bad_settings_are_refused_before_the_run(engine, node, inputs, message):
    defaults = {"LaplaceScheduler": {"steps": 20, "sigma_max": 14.614642, "sigma_min": 0.0291675, "mu": 0.0,
                                     "beta": 0.5},
                "VPScheduler": {"steps": 20, "beta_d": 19.9, "beta_min": 0.1, "eps_s": 0.001},
                "AlignYourStepsScheduler": {"model_type": "SD1", "steps": 10, "denoise": 1.0},
                "ExtendIntermediateSigmas": {"sigmas": ["31", 0], "steps": 2, "start_at_sigma": -1.0,
                                             "end_at_sigma": 12.0, "spacing": "linear"}}
    graph = {**prompts(), "31": {"class_type": "BasicScheduler", "inputs": {
                 "model": ["1", 0], "scheduler": "karras", "steps": STEPS, "denoise": 1.0}},
             "13": {"class_type": node, "inputs": {**defaults[node], **inputs}},
             "99": {"class_type": "PreviewAny", "inputs": {"source": ["13", 0]}}}
    with pytest.raises(WorkflowInvalid) as err:
        engine.run(parse_api(graph))
    assert message in str(err.value)


def test_a_bad_linked_value_fails_the_node_with_the_same_reason(engine):
    graph = {**prompts(),
             "30": {"class_type": "SamplingPercentToSigma", "inputs": {
                 "model": ["1", 0], "sampling_percent": 0.999, "return_actual_sigma": False}},
             "13": {"class_type": "LaplaceScheduler", "inputs": {
                 "steps": STEPS, "sigma_max": ["30", 0], "sigma_min": 0.5, "mu": 0.0, "beta": 0.5}}}
    assert "must be below sigma_max" in run_error(engine, graph, "13")


def test_the_basic_schedule_is_unchanged_by_an_extension_that_splits_nothing(engine):
    graph = {**prompts(),
             "31": {"class_type": "BasicScheduler", "inputs": {
                 "model": ["1", 0], "scheduler": "normal", "steps": STEPS, "denoise": 1.0}},
             "13": {"class_type": "ExtendIntermediateSigmas", "inputs": {
                 "sigmas": ["31", 0], "steps": 1, "start_at_sigma": -1.0, "end_at_sigma": 0.0, "spacing": "sine"}}}
    [(extended,)] = run(engine, graph, "13")
    torch.testing.assert_close(extended, get_sigmas("normal", SCHEDULE, STEPS))
