"""LTX-Video keyframe guides (LTXVAddGuide, LTXVCropGuides) on tiny random files in the real layouts (`main.py
make-ltxv`): the latents, noise masks and guide coordinates the nodes make (a guide at frame 0, in the middle, counted
from the end, a clip, chained guides), and guided workflows end to end: SamplerCustom against an Euler loop over
diffusers' LTXVideoTransformer3DModel given the guide tokens' positions as `video_coords` (LTXConditionPipeline's for
its conditioning frames), and ComfyUI's own shape of the workflow, KSampler then LTXVCropGuides then VAEDecode."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXConditionPipeline

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.ltxv_files import load_ltxv_unet
from ldm.ltxv_presets import make_ltxv_files
from ldm.sampling import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.ltxv_guides import guide_coordinates
from tests.ldm.test_ltxv import _twin
from tests.nodes.test_ltxv_nodes import CFG, FRAME_RATE, LATENT, LENGTH, SEED, SIZE, run, workflow

ROWS, COLS = LATENT[3:]
TOKENS = ROWS * COLS  # guide tokens per latent frame


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltxv_guides")
    files = make_ltxv_files(root / "models", seed=2, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def guided(*guides: tuple[int, float, int], sampler: str = "custom") -> dict:
    """The text-to-video workflow with guides (frame_idx, strength, pictures) chained before sampling: the first a
    plain colour picture, the others alike in other colours; "ksampler" samples with KSampler and crops the guides
    off before decoding, as ComfyUI's keyframe workflows do."""
    doc = workflow()
    prompts, latent = (["5", 0], ["5", 1]), ["6", 0]
    for i, (frame_idx, strength, pictures) in enumerate(guides):
        image, guide = str(30 + 2 * i), str(31 + 2 * i)
        doc[image] = {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": pictures,
                                                             "color": (0x3060C0, 0xC03020, 0x20A040)[i]}}
        doc[guide] = {"class_type": "LTXVAddGuide", "inputs": {
            "positive": prompts[0], "negative": prompts[1], "vae": ["1", 2], "latent": latent, "image": [image, 0],
            "frame_idx": frame_idx, "strength": strength}}
        prompts, latent = ([guide, 0], [guide, 1]), [guide, 2]
    doc["9"]["inputs"].update(positive=prompts[0], negative=prompts[1], latent_image=latent)
    doc["40"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["30", 0], "vae": ["1", 2]}}
    if sampler == "ksampler":
        doc["9"] = {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": SEED, "steps": 4, "cfg": CFG, "sampler_name": "euler", "scheduler": "simple",
            "positive": prompts[0], "negative": prompts[1], "latent_image": latent, "denoise": 1.0}}
    doc["41"] = {"class_type": "LTXVCropGuides", "inputs": {"positive": prompts[0], "negative": prompts[1],
                                                            "latent": ["9", 0]}}
    doc["10"]["inputs"]["samples"] = ["41", 2]
    return doc


def added(engine, *guides: tuple[int, float, int]) -> tuple[list, list, dict, torch.Tensor | None]:
    """The last LTXVAddGuide's outputs, and the first guide's own latent (VAEEncode: a single picture's)."""
    doc = guided(*guides)
    wanted = [str(31 + 2 * (len(guides) - 1))] + (["40"] if guides[0][2] == 1 else [])
    result = engine.run(parse_api(doc), outputs=wanted, keep=wanted)  # no sampling
    assert result.ok, result.error
    return (*result.values[wanted[0]], result.values["40"][0]["samples"] if len(wanted) > 1 else None)


def test_guide_at_frame_0_replaces_the_first_frames(engine) -> None:
    positive, negative, latent, encoded = added(engine, (0, 1.0, 1))
    assert latent["samples"].shape == LATENT and encoded.shape == (1, 128, 1, ROWS, COLS)
    torch.testing.assert_close(latent["samples"][:, :, :1], encoded)
    assert not latent["samples"][:, :, 1:].any()
    assert latent["noise_mask"].flatten().tolist() == [0.0, 1.0, 1.0]
    assert all("keyframe_idxs" not in options for side in (positive, negative) for _, options in side)


def test_guide_in_the_middle_is_appended_with_its_frame(engine) -> None:
    positive, negative, latent, encoded = added(engine, (8, 0.75, 1))
    assert latent["samples"].shape == (1, 128, 4, ROWS, COLS)
    torch.testing.assert_close(latent["samples"][:, :, 3:], encoded)
    assert not latent["samples"][:, :, :3].any()
    assert latent["noise_mask"].flatten().tolist() == [1.0, 1.0, 1.0, 0.25]
    for side in (positive, negative):
        guides = side[0][1]["keyframe_idxs"]
        assert guides.tolist() == [[[8.0] * 4, [0.0, 0.0, 32.0, 32.0], [0.0, 32.0, 0.0, 32.0]]]


def test_negative_index_counts_from_the_end_and_guides_chain(engine) -> None:
    """-1 is the last picture (16 of 17), counted over the video's own frames, the earlier guide's left out; the
    second guide's coordinates follow the first's, its latent frame after the first's."""
    positive, negative, latent, _ = added(engine, (-1, 1.0, 1), (-9, 1.0, 1))
    assert latent["samples"].shape == (1, 128, 5, ROWS, COLS)
    assert latent["noise_mask"].flatten().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    guides = negative[0][1]["keyframe_idxs"]
    assert guides.shape == (1, 3, 2 * TOKENS) and guides[0, 0].tolist() == [16.0] * TOKENS + [8.0] * TOKENS
    assert torch.equal(positive[0][1]["keyframe_idxs"], guides)
    assert latent["samples"][:, :, 3:].std() > 0 and not torch.equal(latent["samples"][:, :, 3],
                                                                     latent["samples"][:, :, 4])


def test_clip_guide_starts_on_a_multiple_of_8_with_causal_positions(engine) -> None:
    """A 12-picture clip keeps 9 (8 n + 1): two latent frames; frame 11 rounds down to 8; its frames stand at 8 and
    9 (the VAE's causal first frame), as LTXConditionPipeline places its conditioning frames."""
    positive, _, latent, _ = added(engine, (11, 1.0, 12))
    assert latent["samples"].shape == (1, 128, 5, ROWS, COLS)
    guides = positive[0][1]["keyframe_idxs"]
    assert guides[0, 0].tolist() == [8.0] * TOKENS + [9.0] * TOKENS
    ids = LTXConditionPipeline._scale_video_ids(LTXConditionPipeline._prepare_video_ids(1, 2, ROWS, COLS),
                                                scale_factor=32, scale_factor_t=8, frame_index=8).float()
    torch.testing.assert_close(guide_coordinates(2, ROWS, COLS, 8), ids)
    torch.testing.assert_close(guides, ids)


def test_guide_past_the_end_is_refused(engine) -> None:
    result = engine.run(parse_api(guided((16, 1.0, 12))), outputs=["31"])
    assert not result.ok and "runs past the video's 3 latent frames (17 pictures)" in str(result.error)


def test_crop_restores_the_video(engine) -> None:
    doc = guided((8, 1.0, 1), (-1, 1.0, 1))
    cropped, sampled = run(engine, doc, ("41", "9"))
    positive, negative, latent = cropped
    assert sampled[0]["samples"].shape == (1, 128, 5, ROWS, COLS)
    assert latent["samples"].shape == LATENT and latent["noise_mask"].flatten().tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(latent["samples"], sampled[0]["samples"][:, :, :3])
    assert all("keyframe_idxs" not in options for side in (positive, negative) for _, options in side)


def _reference_loop(base, positive, negative, sigmas, guide, frame_idx):
    """Euler over diffusers' transformer with the guide's latent frame appended, kept clean at level 0, its tokens
    at LTXConditionPipeline's coordinates for a conditioning frame at `frame_idx`."""
    unet = load_ltxv_unet(base[1]["checkpoint"])
    twin = _twin(unet.unet)
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1, 1) for v in (unet.family.latent_mean, unet.family.latent_std))
    frames = LATENT[2] + 1
    ids = torch.cat([LTXConditionPipeline._scale_video_ids(LTXConditionPipeline._prepare_video_ids(
        2, n, ROWS, COLS), scale_factor=32, scale_factor_t=8, frame_index=at).float()
        for n, at in ((LATENT[2], 0), (1, frame_idx))], dim=2)
    ids[:, 0] = ids[:, 0] / FRAME_RATE
    context = torch.cat([positive[0][0], negative[0][0]])
    mask = torch.cat([positive[0][1]["attention_mask"], negative[0][1]["attention_mask"]])
    x = prepare_noise(torch.zeros(1, 128, frames, ROWS, COLS), SEED)
    clean = (guide - mean) / std
    for sigma, next_sigma in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        x[:, :, -1:] = clean
        levels = torch.full((2, frames, ROWS, COLS), sigma)
        levels[:, -1] = 0.0
        with torch.no_grad():
            out = twin(LTXPipeline._pack_latents(torch.cat([x, x])), context, levels.flatten(1) * 1000, mask,
                       video_coords=ids, return_dict=False)[0]
        cond, uncond = LTXPipeline._unpack_latents(out, frames, ROWS, COLS).chunk(2)
        x = x + (next_sigma - sigma) * (uncond + CFG * (cond - uncond))
    x[:, :, -1:] = clean
    return x * std + mean


def test_guided_video_matches_an_euler_loop_over_diffusers(engine, base) -> None:
    doc = guided((8, 1.0, 1))
    sampled, added_, positive, negative, sigmas, video = run(engine, doc, ("9", "31", "3", "4", "7", "10"))
    guide = added_[2]["samples"][:, :, -1:]
    expected = _reference_loop(base, positive[0], negative[0], sigmas[0], guide, 8)
    assert expected.std() > 0.1
    torch.testing.assert_close(sampled[0]["samples"], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sampled[0]["samples"][:, :, -1:], guide, rtol=1e-5, atol=1e-5)
    assert video[0].shape == (LENGTH, SIZE, SIZE, 3)


def test_ksampler_workflow_keeps_the_guides_and_decodes_the_video(engine) -> None:
    """EmptyLTXVLatentVideo -> LTXVAddGuide (first and last picture) -> KSampler -> LTXVCropGuides -> VAEDecode: at
    strength 1 the guides' frames come out of the sampler as they went in, and the cropped video decodes whole."""
    doc = guided((0, 1.0, 1), (-1, 1.0, 1), sampler="ksampler")
    sampled, prepared, video = run(engine, doc, ("9", "33", "10"))
    samples, before = sampled[0]["samples"], prepared[2]["samples"]
    assert samples.shape == (1, 128, 4, ROWS, COLS) and samples[:, :, 1:3].std() > 0.1
    torch.testing.assert_close(samples[:, :, :1], before[:, :, :1], rtol=1e-5, atol=1e-5)  # frame 0, in place
    torch.testing.assert_close(samples[:, :, 3:], before[:, :, 3:], rtol=1e-5, atol=1e-5)  # the last, appended
    assert video[0].shape == (LENGTH, SIZE, SIZE, 3) and 0.0 <= float(video[0].min()) <= float(video[0].max()) <= 1.0


def test_declarations_are_comfyuis(engine) -> None:
    add, crop = (engine.registry.get(name).object_info() for name in ("LTXVAddGuide", "LTXVCropGuides"))
    assert add["input_order"]["required"] == ["positive", "negative", "vae", "latent", "image", "frame_idx",
                                              "strength"]
    assert crop["input_order"]["required"] == ["positive", "negative", "latent"]
    assert add["output"] == crop["output"] == ["CONDITIONING", "CONDITIONING", "LATENT"]
    assert add["output_name"] == ["positive", "negative", "latent"]
    frame_idx = add["input"]["required"]["frame_idx"][1]
    assert (frame_idx["default"], frame_idx["min"], frame_idx["max"]) == (0, -9999, 9999)
    assert add["input"]["required"]["strength"][1]["default"] == 1.0


def test_a_batch_of_videos_shares_the_guide(engine) -> None:
    doc = guided((8, 1.0, 1), sampler="ksampler")
    doc["6"]["inputs"]["batch_size"] = 2
    sampled, prepared = run(engine, doc, ("9", "31"))
    samples, before = sampled[0]["samples"], prepared[2]["samples"]
    assert samples.shape == (2, 128, 4, ROWS, COLS) and torch.equal(before[0, :, 3], before[1, :, 3])
    torch.testing.assert_close(samples[:, :, 3:], before[:, :, 3:], rtol=1e-5, atol=1e-5)
    assert (samples[0, :, :3] - samples[1, :, :3]).abs().max() > 0.1  # each video its own noise
