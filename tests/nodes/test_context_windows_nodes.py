"""ComfyUI's context-window nodes (nodes/sd/context_windows.py) through the executor on tiny random Wan 2.1 files:
ComfyUI's declarations, Wan's video-frame arithmetic, a two-step text-to-video run in windows against the same run
computed by hand (the model called window by window, fused as ComfyUI's execute does, Euler steps on the flow), a
window longer than the latent giving the plain run bit for bit, and the refusals of bad settings."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.sampling import compute_sigmas, prepare_noise
from ldm.wan_presets import make_wan_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_context_windows import ref_execute, ref_standard

WIDTH, HEIGHT, FRAMES, SEED = 64, 48, 25, 11  # 25 video frames: 7 latent frames


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_windows")
    files = make_wan_files(root / "models", seed=4, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def workflow(windows: dict | None, steps: int = 2) -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.1_t2v-tiny.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl-tiny.safetensors", "type": "wan"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a long walk on a beach"}},
        "7": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": WIDTH, "height": HEIGHT, "length": FRAMES, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0] if windows is None else ["3", 0], "seed": SEED, "steps": steps, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0], "negative": ["5", 0],
            "latent_image": ["7", 0], "denoise": 1.0}},
        "20": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}},
    }
    if windows is not None:
        doc["3"] = {"class_type": "WanContextWindowsManual", "inputs": {
            "model": ["1", 0], "context_length": 9, "context_overlap": 4, "context_schedule": "standard_uniform",
            "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid", "freenoise": False,
            "retain_first_frame": False, "split_conds_to_windows": False, **windows}}
    return doc


def run(engine, doc: dict, keep=("8",)):
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def test_declarations_are_comfyuis() -> None:
    registry = builtin_registry()
    manual = registry.get("ContextWindowsManual").object_info()
    assert manual["display_name"] == "Context Windows (Manual)" and manual["category"] == "model_patches"
    assert manual["input_order"]["required"] == [
        "model", "context_length", "context_overlap", "context_schedule", "context_stride", "closed_loop",
        "fuse_method", "dim", "freenoise", "cond_retain_index_list", "split_conds_to_windows",
        "latent_retain_index_list", "causal_window_fix"]
    required = manual["input"]["required"]
    assert required["context_schedule"][0] == ["standard_static", "standard_uniform", "looped_uniform", "batched"]
    assert required["context_schedule"][1]["default"] == "standard_static"
    assert required["fuse_method"][0] == ["pyramid", "relative", "flat", "overlap-linear"]
    assert [required[k][1]["default"] for k in ("context_length", "context_overlap", "dim", "causal_window_fix")] \
        == [16, 4, 0, True]
    assert required["dim"][1]["max"] == 5
    for name, length, overlap, step in (("WanContextWindowsManual", 81, 30, 4), ("LTXVContextWindows", 145, 40, 8)):
        info = registry.get(name).object_info()
        assert info["input_order"]["required"] == [
            "model", "context_length", "context_overlap", "context_schedule", "context_stride", "closed_loop",
            "fuse_method", "freenoise", "retain_first_frame", "split_conds_to_windows"]
        required = info["input"]["required"]
        assert (required["context_length"][1]["default"], required["context_length"][1]["step"]) == (length, step)
        assert required["context_overlap"][1]["default"] == overlap
        assert required["context_schedule"][1]["default"] == "standard_uniform"
        assert required["freenoise"][1] == {"default": True, "tooltip": required["freenoise"][1]["tooltip"],
                                            "advanced": True}
    assert registry.get("WanContextWindowsManual").object_info()["display_name"] == "Wan Context Windows"
    assert registry.get("LTXVContextWindows").object_info()["display_name"] == "LTXV Context Windows"


def test_wan_frame_arithmetic(engine) -> None:
    """81 video frames -> 21 latent frames, overlap 30 -> 7 (Wan); 145 -> 19, 40 -> 5 (LTX-Video)."""
    doc = workflow({"context_length": 81, "context_overlap": 30, "retain_first_frame": True})
    model, = run(engine, doc, keep=("3",))
    settings = model.unet.context_windows
    assert (settings.context_length, settings.context_overlap, settings.dim) == (21, 7, 2)
    assert settings.cond_retain_index_list == (0,) and settings.latent_retain_index_list == ()
    assert settings.causal_window_fix and settings.freenoise is False
    doc["3"]["class_type"] = "LTXVContextWindows"
    doc["3"]["inputs"].update(context_length=145, context_overlap=40)
    model, = run(engine, doc, keep=("3",))
    settings = model.unet.context_windows
    assert (settings.context_length, settings.context_overlap) == (19, 5)
    assert settings.cond_retain_index_list == settings.latent_retain_index_list == (0,)


def test_windowed_wan_run_matches_a_hand_computed_one(engine) -> None:
    """7 latent frames in windows of 3 overlapping by 1 (9 and 4 video frames), standard_uniform: windows
    [0-2], [2-4], [4-6] at step 0 and [4-6], [0-2], [1-3] at step 1, each but the first with the frame before it
    (causal_window_fix), fused by pyramid weights; Euler on the flow, x += (next - sigma) * v."""
    model, conditioning, sampled = run(engine, workflow({}), keep=("1", "5", "8"))
    context = conditioning[0][0]
    schedule, unet = model.schedule, model.unet
    sigmas = compute_sigmas(schedule, "simple", 2, 1.0)
    latent = model.latent_in(torch.zeros(1, 16, 7, HEIGHT // 8, WIDTH // 8))
    x = float(sigmas[0]) * prepare_noise(latent, SEED) + (1 - float(sigmas[0])) * latent
    calls = []
    with torch.no_grad():
        for step in range(2):
            sigma, after = float(sigmas[step]), float(sigmas[step + 1])
            t = torch.tensor([float(schedule.unet_timestep(schedule.sigma_to_t_scalar(sigma)))])
            windows = ref_standard(7, 3, 1, 1, step)
            calls.append(windows)
            v = ref_execute(unet, x, t, context, windows, "pyramid", 1, True, [], [], 16, {})
            x = x + (after - sigma) * v
    assert calls == [[[0, 1, 2], [2, 3, 4], [4, 5, 6]], [[4, 5, 6], [0, 1, 2], [1, 2, 3]]]
    torch.testing.assert_close(sampled["samples"], model.latent_out(x), rtol=1e-4, atol=1e-4)
    plain, = run(engine, workflow(None))
    assert not torch.allclose(plain["samples"], sampled["samples"], atol=1e-3)


def test_a_later_model_sampling_node_keeps_the_window_steps(engine) -> None:
    """ModelSamplingSD3 after the windows node changes the schedule the run samples with (shift 2 in place of Wan's
    8): the windows still shift with the run's steps ([0-2], [2-4], [4-6], then [4-6], [0-2], [1-3]), the run equal
    to the one computed by hand on the new schedule."""
    doc = workflow({})
    doc["30"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["3", 0], "shift": 2.0}}
    doc["8"]["inputs"]["model"] = ["30", 0]
    base, shifted, conditioning, sampled = run(engine, doc, keep=("1", "30", "5", "8"))
    context, schedule = conditioning[0][0], shifted.schedule
    sigmas = compute_sigmas(schedule, "simple", 2, 1.0)
    assert not torch.allclose(sigmas, compute_sigmas(base.schedule, "simple", 2, 1.0))
    latent = base.latent_in(torch.zeros(1, 16, 7, HEIGHT // 8, WIDTH // 8))
    x = float(sigmas[0]) * prepare_noise(latent, SEED) + (1 - float(sigmas[0])) * latent
    with torch.no_grad():
        for step in range(2):
            sigma, after = float(sigmas[step]), float(sigmas[step + 1])
            t = torch.tensor([float(schedule.unet_timestep(schedule.sigma_to_t_scalar(sigma)))])
            v = ref_execute(base.unet, x, t, context, ref_standard(7, 3, 1, 1, step), "pyramid", 1, True, [], [],
                            16, {})
            x = x + (after - sigma) * v
    torch.testing.assert_close(sampled["samples"], base.latent_out(x), rtol=1e-4, atol=1e-4)


def test_image_to_video_retains_the_start_image_in_every_window(engine) -> None:
    """Wan 2.1 image-to-video (the mask and start image as channels after the latent's) with retain_first_frame:
    every window's conditioning channels take frame 0's at their first position (the causal frame where there is
    one), the latent's its own frames; standard_static windows fused by the "relative" running average."""
    from nodes.sd.wan import wan_concat

    doc = workflow({"retain_first_frame": True, "context_schedule": "standard_static", "fuse_method": "relative"},
                   steps=1)
    doc["1"]["inputs"]["unet_name"] = "wan2.1_i2v-tiny.safetensors"
    doc.update({
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae-tiny.safetensors"}},
        "11": {"class_type": "EmptyImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1,
                                                      "color": 0x30A060}},
        "13": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["5", 0], "negative": ["5", 0], "vae": ["4", 0], "width": WIDTH, "height": HEIGHT,
            "length": FRAMES, "batch_size": 1, "start_image": ["11", 0]}},
    })
    doc["8"]["inputs"].update(positive=["13", 0], negative=["13", 1], latent_image=["13", 2])
    result = engine.run(parse_api(doc), keep=["1", "13", "8"])
    assert result.ok, result.error
    (model,), (positive, _, latent), (sampled,) = (result.values[k] for k in ("1", "13", "8"))
    embedding, options = positive[0]
    concat = wan_concat(model, latent["samples"], options)
    sigmas = compute_sigmas(model.schedule, "simple", 1, 1.0)
    sigma = float(sigmas[0])
    start = model.latent_in(latent["samples"].float())
    x = sigma * prepare_noise(start, SEED) + (1 - sigma) * start
    t = torch.tensor([float(model.schedule.unet_timestep(model.schedule.sigma_to_t_scalar(sigma)))])
    with torch.no_grad():
        v = ref_execute(model.unet, torch.cat([x, concat], 1), t, embedding, [[0, 1, 2], [2, 3, 4], [4, 5, 6]],
                        "relative", 1, True, [0], [], 16, {})
    torch.testing.assert_close(sampled["samples"], model.latent_out(x - sigma * v), rtol=1e-4, atol=1e-4)
    doc["3"]["inputs"]["retain_first_frame"] = False
    without, = run(engine, doc)
    assert not torch.allclose(without["samples"], sampled["samples"], atol=1e-3)


def test_freenoise_reschedules_the_initial_noise(engine) -> None:
    """freenoise: the run starts from ComfyUI's FreeNoise shuffle of the seed's noise (frames 3-4 from 0-1, 5-6
    from 2-3, windows of 3 latent frames overlapping by 1), one Euler step over static windows."""
    from ldm.sampling.context_windows import freenoise

    doc = workflow({"freenoise": True, "context_schedule": "standard_static"}, steps=1)
    model, conditioning, sampled = run(engine, doc, keep=("1", "5", "8"))
    sigma = float(compute_sigmas(model.schedule, "simple", 1, 1.0)[0])
    latent = model.latent_in(torch.zeros(1, 16, 7, HEIGHT // 8, WIDTH // 8))
    x = sigma * freenoise(prepare_noise(latent, SEED), 2, 3, 1, SEED) + (1 - sigma) * latent
    t = torch.tensor([float(model.schedule.unet_timestep(model.schedule.sigma_to_t_scalar(sigma)))])
    with torch.no_grad():
        v = ref_execute(model.unet, x, t, conditioning[0][0], [[0, 1, 2], [2, 3, 4], [4, 5, 6]], "pyramid", 1,
                        True, [], [], 16, {})
    torch.testing.assert_close(sampled["samples"], model.latent_out(x - sigma * v), rtol=1e-4, atol=1e-4)


def test_a_window_longer_than_the_latent_is_the_plain_run_bit_for_bit(engine) -> None:
    plain, = run(engine, workflow(None))
    windowed, = run(engine, workflow({"context_length": 81, "context_overlap": 30}))
    assert torch.equal(plain["samples"], windowed["samples"])


@pytest.mark.parametrize("inputs,message", [
    ({"split_conds_to_windows": True}, "split_conds_to_windows"),
    ({"context_length": 9, "context_overlap": 12}, "context_overlap"),
])
def test_bad_settings_are_refused(engine, inputs: dict, message: str) -> None:
    result = engine.run(parse_api(workflow(inputs)), keep=["8"])
    assert not result.ok
    assert "WanContextWindowsManual" in str(result.error) and message in str(result.error)


def test_bad_index_lists_are_refused(engine) -> None:
    doc = workflow({})
    doc["3"] = {"class_type": "ContextWindowsManual", "inputs": {
        "model": ["1", 0], "context_length": 3, "context_overlap": 1, "context_schedule": "standard_static",
        "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid", "dim": 2, "freenoise": False,
        "cond_retain_index_list": "0, x", "split_conds_to_windows": False, "latent_retain_index_list": "",
        "causal_window_fix": True}}
    result = engine.run(parse_api(doc), keep=["8"])
    assert not result.ok and "ContextWindowsManual" in str(result.error) and "'0, x'" in str(result.error)
