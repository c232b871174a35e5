"""GITSScheduler and OptimalStepsScheduler (nodes/sd/sigmas.py over ldm/sampling/step_schedules.py): the published
schedules, their interpolation and denoise tails, and sampling runs over them (tiny SD1 and Flux files)."""

import numpy as np
import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.flux_presets import make_flux_files
from ldm.presets import make_checkpoint
from ldm.sampling import DiscreteSchedule
from ldm.sampling.step_schedules import (
    GITS_COEFF_STEP,
    gits_noise_levels,
    oss_noise_levels,
    sigmas_gits,
    sigmas_optimal_steps,
)
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

MODULES = ("nodes.builtin.primitives", "nodes.builtin.utils", "nodes.sd.loaders", "nodes.sd.part_loaders",
           "nodes.sd.conditioning", "nodes.sd.latent", "nodes.sd.flux", "nodes.sd.custom_sampling", "nodes.sd.sigmas")

# Rows of the authors' published tables, typed in from the papers' code (zju-pi/diff-sampler gits-main,
# bebebe666/OptimalSteps), to check the data file and the lookup against.
GITS_PUBLISHED = {
    (0.80, 2): [14.61464119, 7.49001646, 0.02916753],
    (1.00, 15): [14.61464119, 11.54541874, 8.75849152, 7.49001646, 5.85520077, 4.65472794, 3.60512662, 2.84484982,
                 2.19988537, 1.61558151, 1.162866, 0.803307, 0.50118381, 0.27464288, 0.09824532, 0.02916753],
    (1.20, 10): [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
                 0.19894916, 0.09824532, 0.02916753],
    (1.50, 20): [14.61464119, 2.45070267, 1.41535246, 0.95350921, 0.72133851, 0.57119018, 0.4783645, 0.43325692,
                 0.38853383, 0.36617002, 0.34370604, 0.32104823, 0.29807833, 0.27464288, 0.25053367, 0.22545385,
                 0.19894916, 0.17026083, 0.13792117, 0.09824532, 0.02916753],
}
OSS_PUBLISHED = {
    "FLUX": [0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001],
    "Wan": [1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96, 0.946, 0.927,
            0.902, 0.864, 0.776, 0.539, 0.208, 0.001],
}
COMFY = {
    "GITSScheduler": ("sampling/schedulers", [
        ("coeff", "FLOAT", 1.20, 0.80, 1.50, 0.05), ("steps", "INT", 10, 2, 1000, 1),
        ("denoise", "FLOAT", 1.0, 0.0, 1.0, 0.01)]),
    "OptimalStepsScheduler": ("sampling/custom_sampling/schedulers", [
        ("model_type", ["FLUX", "Wan", "Chroma"], "FLUX", None, None, None), ("steps", "INT", 20, 3, 1000, 1),
        ("denoise", "FLOAT", 1.0, 0.0, 1.0, 0.01)]),
}


def numpy_loglinear(levels: list[float], count: int) -> np.ndarray:
    """The papers' way to stretch a schedule: np.interp of the rising log-levels at evenly spread positions."""
    rising = np.log(np.asarray(levels[::-1], dtype=np.float64))
    stretched = np.interp(np.linspace(0, 1, count), np.linspace(0, 1, len(levels)), rising)
    return np.exp(stretched)[::-1]


@pytest.fixture(scope="module")
def registry():
    return builtin_registry(MODULES)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, registry):
    root = tmp_path_factory.mktemp("step_schedules")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    make_flux_files(root / "models", "dev", seed=3, dtype=torch.float32)
    set_paths(FolderPaths(base=root))
    yield Executor(registry, services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


@pytest.mark.parametrize("name", sorted(COMFY))
def test_declarations_are_comfyuis(registry, name):
    category, inputs = COMFY[name]
    info = registry.get(name).object_info()
    assert info["category"] == category
    assert info["input_order"]["required"] == [entry[0] for entry in inputs] and not info["input"]["optional"]
    for key, kind, default, low, high, step in inputs:
        declared, options = info["input"]["required"][key]
        assert declared == kind, key
        assert (options.get("default"), options.get("min"), options.get("max"), options.get("step")) == \
            (default, low, high, step), key
    assert info["output"] == ["SIGMAS"]


@pytest.mark.parametrize("coeff, steps", sorted(GITS_PUBLISHED))
def test_gits_at_table_step_counts_is_the_published_schedule(coeff, steps):
    published = torch.tensor(GITS_PUBLISHED[(coeff, steps)], dtype=torch.float64)
    assert torch.equal(gits_noise_levels(coeff, steps), published)
    sigmas = sigmas_gits(coeff, steps)
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
    assert torch.equal(sigmas[:-1], published[:-1].float())


def test_gits_tables_cover_every_coefficient_and_step_count():
    """15 coefficients x 2..20 steps, each falling from SD1's sigma_max (the model's own top level) to its min."""
    schedule = DiscreteSchedule()
    for index in range(15):
        coeff = 0.80 + index * GITS_COEFF_STEP
        for steps in range(2, 21):
            levels = gits_noise_levels(coeff, steps)
            assert len(levels) == steps + 1 and bool((levels[1:] < levels[:-1]).all()), (coeff, steps)
            assert levels[0].item() == pytest.approx(schedule.sigma_max, rel=1e-6)
            assert levels[-1].item() == pytest.approx(schedule.sigma_min, rel=1e-5)


@pytest.mark.parametrize("steps", [21, 37, 1000])
def test_gits_above_20_steps_stretches_the_20_step_schedule(steps):
    sigmas = sigmas_gits(1.05, steps)
    assert len(sigmas) == steps + 1 and bool((sigmas[1:] < sigmas[:-1]).all()) and sigmas[-1] == 0
    expected = numpy_loglinear(gits_noise_levels(1.05, 20).tolist(), steps + 1)
    np.testing.assert_allclose(sigmas[:-1].double().numpy(), expected[:-1], rtol=1e-6)


@pytest.mark.parametrize("model_type", sorted(OSS_PUBLISHED))
def test_optimal_steps_at_the_published_count_is_the_published_schedule(model_type):
    published = OSS_PUBLISHED[model_type]
    sigmas = sigmas_optimal_steps(model_type, len(published) - 1)
    assert sigmas[-1] == 0 and torch.equal(sigmas[:-1], torch.tensor(published[:-1], dtype=torch.float32))
    assert len(oss_noise_levels("Chroma", 40)) == 41  # Chroma's schedule is published for 40 steps


@pytest.mark.parametrize("model_type, steps", [("FLUX", 3), ("FLUX", 28), ("Wan", 8), ("Chroma", 26)])
def test_optimal_steps_for_other_counts_are_interpolated_in_log_sigma(model_type, steps):
    sigmas = sigmas_optimal_steps(model_type, steps)
    assert len(sigmas) == steps + 1 and bool((sigmas[1:] < sigmas[:-1]).all()) and sigmas[-1] == 0
    published = OSS_PUBLISHED.get(model_type) or oss_noise_levels(model_type, 40).tolist()
    np.testing.assert_allclose(sigmas[:-1].double().numpy(), numpy_loglinear(published, steps + 1)[:-1], rtol=1e-6)


@pytest.mark.parametrize("steps, denoise, kept", [(10, 0.5, 5), (10, 0.35, 4), (20, 0.99, 20), (7, 0.05, 0)])
def test_denoise_keeps_the_tail_of_the_same_schedule(steps, denoise, kept):
    for full, part in [(sigmas_gits(0.9, steps), sigmas_gits(0.9, steps, denoise)),
                       (sigmas_optimal_steps("Wan", steps), sigmas_optimal_steps("Wan", steps, denoise))]:
        assert len(part) == kept + 1 and part[-1] == 0
        assert torch.equal(part, full[len(full) - (kept + 1):])
    assert len(sigmas_gits(1.2, 10, 0.0)) == 0 and len(sigmas_optimal_steps("FLUX", 10, 0.0)) == 0


def run(engine, graph: dict, *nodes: str) -> list:
    graph = {**graph, **{f"preview{node}": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}
                         for node in nodes}}
    result = engine.run(parse_api(graph), keep=list(nodes))
    assert result.ok, result.error
    return [result.values[node] for node in nodes]


def with_manual_twin(graph: dict, schedule: torch.Tensor) -> dict:
    """Adds SamplerCustom "21": sampler "14" over ManualSigmas "20" typed with the schedule's levels."""
    typed = ", ".join(repr(level) for level in schedule.tolist())
    graph["20"] = {"class_type": "ManualSigmas", "inputs": {"sigmas": typed}}
    graph["21"] = {**graph["14"], "inputs": {**graph["14"]["inputs"], "sigmas": ["20", 0]}}
    return graph


def test_gits_schedule_drives_sampler_custom(engine):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
             "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
             "13": {"class_type": "GITSScheduler", "inputs": {"coeff": 1.2, "steps": 4, "denoise": 1.0}},
             "14": {"class_type": "SamplerCustom", "inputs": {
                 "model": ["1", 0], "add_noise": True, "noise_seed": 7, "cfg": 6.0, "positive": ["2", 0],
                 "negative": ["3", 0], "sampler": ["12", 0], "sigmas": ["13", 0], "latent_image": ["4", 0]}}}
    graph = with_manual_twin(graph, sigmas_gits(1.2, 4))
    [(sigmas,), (output, _), (manual, _)] = run(engine, graph, "13", "14", "21")
    assert torch.equal(sigmas, sigmas_gits(1.2, 4))
    assert output["samples"].shape == (1, 4, 8, 8) and bool(torch.isfinite(output["samples"]).all())
    assert torch.equal(output["samples"], manual["samples"])


def test_optimal_steps_schedule_drives_a_flux_sampler_custom_run(engine):
    graph = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-tiny-dev.safetensors",
                                                          "weight_dtype": "default"}},
             "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl-tiny.safetensors",
                                                              "clip_name2": "clip_l-tiny.safetensors", "type": "flux"}},
             "3": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "a house",
                                                                   "t5xxl": "a house at dusk", "guidance": 3.5}},
             "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
             "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
             "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
             "13": {"class_type": "OptimalStepsScheduler", "inputs": {"model_type": "FLUX", "steps": 4,
                                                                       "denoise": 0.75}},
             "14": {"class_type": "SamplerCustom", "inputs": {
                 "model": ["1", 0], "add_noise": True, "noise_seed": 7, "cfg": 1.0, "positive": ["3", 0],
                 "negative": ["5", 0], "sampler": ["12", 0], "sigmas": ["13", 0], "latent_image": ["4", 0]}}}
    graph = with_manual_twin(graph, sigmas_optimal_steps("FLUX", 4, 0.75))
    [(sigmas,), (output, _), (manual, _)] = run(engine, graph, "13", "14", "21")
    assert len(sigmas) == 4 and sigmas[0] < OSS_PUBLISHED["FLUX"][0]  # 3 of the 4 steps, the first one skipped
    assert output["samples"].shape == (1, 16, 4, 4) and bool(torch.isfinite(output["samples"]).all())
    assert torch.equal(output["samples"], manual["samples"])


def test_an_unpublished_gits_coefficient_is_refused(engine):
    graph = {"13": {"class_type": "GITSScheduler", "inputs": {"coeff": 0.83, "steps": 10, "denoise": 1.0}},
             "99": {"class_type": "PreviewAny", "inputs": {"source": ["13", 0]}}}
    with pytest.raises(WorkflowInvalid) as err:
        engine.run(parse_api(graph))
    assert "coeff 0.83 has no GITS schedule" in str(err.value)
    graph["30"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 1.23}}
    graph["13"]["inputs"]["coeff"] = ["30", 0]
    result = engine.run(parse_api(graph))
    assert not result.ok and "coeff 1.23 has no GITS schedule" in str(result.error)
