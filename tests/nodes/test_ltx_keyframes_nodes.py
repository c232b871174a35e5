"""LTX-2 generated keyframes (LTXVAddGeneratedKeyframes, LTXVSeparateGeneratedKeyframes,
LTXVGeneratedKeyframesToGuides: ComfyUI's comfy_extras/nodes_lt_keyframes.py) on a tiny random LTX-2 VAE and tiny
LTX-2 files: placement, spans, attention entries and the block record against values worked out by hand from
ComfyUI's rules, growing the block, separating it, pinning the keyframes on a longer canvas, the refusals, the
declarations, and a graph sampled end to end with the keyframes' spans reaching the transformer.

ComfyUI's rules, for a video of F latent frames ((F - 1) * 8 + 1 pictures), h x w latent pixels:
- auto placement: n = max(1, round((pictures - 1) / interval)) positions round(linspace(0, pictures - 1, n + 1))[1:],
  minus picture 0 and the occupied pictures (frames whose noise mask is below 1, or without a mask not all zero, at
  0 / 8 t / the last picture; guide tokens' start frames; earlier keyframes);
- each keyframe is one appended latent frame (zeros unless given), noise mask 1, its tokens spanning pictures
  [i, i + 1) (the causal first frame's [0, 1) shifted by i), rows [32 r, 32 r + 32), columns [32 c, 32 c + 32);
- one attention entry of strength 1 for the whole block, grown when more keyframes are added to it.
"""

from __future__ import annotations

import pytest
import torch

import ldm.ltx2
from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.ltx2_files import make_ltx2_files
from ldm.ltxv_vae import TINY_LTXV_VAES, random_ltxv_vae
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.ltxv_guides import (
    LTXVAddGeneratedKeyframes,
    LTXVAddGuide,
    LTXVGeneratedKeyframesToGuides,
    LTXVSeparateGeneratedKeyframes,
)
from nodes.sd.models import Vae
from tests.nodes.test_ltx2_guides import COLS, LENGTH, ROWS, SIZE, _node, _prompts


@pytest.fixture(scope="module")
def vae() -> Vae:
    return Vae(random_ltxv_vae(TINY_LTXV_VAES["2.0"], seed=1), "tiny-ltx2")


def _spans(starts: list[float]) -> torch.Tensor:
    """[1, 3, 4 K, 2]: one-picture tokens starting at each of `starts`, over the 2 x 2 grid."""
    t = [[s, s + 1.0] for s in starts for _ in range(4)]
    return torch.tensor([[t, ROWS * len(starts), COLS * len(starts)]])


def _with_first_frame_guide(vae) -> tuple[list, list, dict]:
    """An empty 17-picture video (zeros, as EmptyLTXVLatentVideo makes it) with a strength-1 guide at frame 0."""
    positive, negative = _prompts()
    latent = {"samples": torch.zeros(1, 128, 3, 2, 2)}
    picture = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1))
    return _node(LTXVAddGuide).execute(positive, negative, vae, latent, picture, 0, 1.0)


def _add(vae, positive, negative, latent, **kwargs):
    return _node(LTXVAddGeneratedKeyframes).execute(positive, negative, vae, latent, **kwargs)


GUIDE_ENTRY = {"pre_filter_count": 4, "strength": 1.0, "pixel_mask": None, "latent_shape": [1, 2, 2]}


def test_keyframes_are_placed_every_interval_past_the_occupied_frames(vae) -> None:
    """interval 8 on 17 pictures: round(16 / 8) = 2 positions, linspace(0, 16, 3) -> 8, 16; picture 0 (the guide's)
    is not a candidate. Two zero frames appended after the guide's, noise mask 1, spans [8, 9) and [16, 17)."""
    positive, negative, latent = _with_first_frame_guide(vae)
    positive, negative, out = _add(vae, positive, negative, latent, interval_frames=8)
    assert out["samples"].shape == (1, 128, 6, 2, 2)
    assert torch.equal(out["samples"][:, :, :4], latent["samples"]) and not out["samples"][:, :, 4:].any()
    assert out["noise_mask"].flatten().tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    for side in (positive, negative):
        options = side[0][1]
        assert torch.equal(options["keyframe_idxs"], _spans([0.0, 8.0, 16.0]))
        assert options["guide_attention_entries"] == [
            GUIDE_ENTRY, {"pre_filter_count": 8, "strength": 1.0, "pixel_mask": None, "latent_shape": [2, 2, 2]}]
        assert options["generated_keyframes"] == {
            "first_latent_frame": 4, "num_keyframes": 2, "frame_indices": [8, 16], "num_pixel_frames": 17,
            "guide_entry_index": 1, "tokens_per_frame": 4}
        assert options["frame_rate"] == 25.0


def test_default_interval_and_occupied_frames(vae) -> None:
    """interval 24 on 17 pictures: round(16 / 24) = 0 -> 1 position, the last picture (16). Without a mask a
    non-zero video frame is occupied: a random video leaves no slot, and says so."""
    positive, negative = _prompts()
    _, _, out = _add(vae, positive, negative, {"samples": torch.zeros(1, 128, 3, 2, 2)})
    assert out["samples"].shape[2] == 4
    busy = {"samples": torch.randn(1, 128, 3, 2, 2, generator=torch.Generator().manual_seed(0))}
    with pytest.raises(ValueError, match="LTXVAddGeneratedKeyframes: every candidate"):
        _add(vae, positive, negative, busy, interval_frames=8)
    masked = {"samples": busy["samples"], "noise_mask": torch.ones(1, 1, 3, 1, 1)}  # a mask of 1: nothing occupied
    positive, _, out = _add(vae, positive, negative, masked, interval_frames=8)
    assert positive[0][1]["generated_keyframes"]["frame_indices"] == [8, 16]


def test_more_keyframes_grow_the_block(vae) -> None:
    positive, negative, latent = _with_first_frame_guide(vae)
    positive, negative, latent = _add(vae, positive, negative, latent, interval_frames=8)
    positive, negative, out = _add(vae, positive, negative, latent, frame_indices=" 4, ")
    assert out["samples"].shape == (1, 128, 7, 2, 2) and out["noise_mask"].flatten()[-1] == 1.0
    for side in (positive, negative):
        options = side[0][1]
        assert torch.equal(options["keyframe_idxs"], _spans([0.0, 8.0, 16.0, 4.0]))
        assert options["guide_attention_entries"] == [
            GUIDE_ENTRY, {"pre_filter_count": 12, "strength": 1.0, "pixel_mask": None, "latent_shape": [3, 2, 2]}]
        assert options["generated_keyframes"]["num_keyframes"] == 3
        assert options["generated_keyframes"]["frame_indices"] == [8, 16, 4]
    for text, message in (("8", "reuses pixel frame"), ("0", "between 1 and 16"), ("3, 3", "more than once"),
                          ("5, x", "could not parse 'x'")):
        with pytest.raises(ValueError, match=message):
            _add(vae, positive, negative, out, frame_indices=text)
    appended = _node(LTXVAddGuide).execute(positive, negative, vae, out, torch.rand(1, SIZE, SIZE, 3), -1, 0.5)
    with pytest.raises(ValueError, match="not be contiguous"):
        _add(vae, appended[0], appended[1], appended[2], frame_indices="12")


def test_separate_takes_the_block_off_and_labels_it(vae) -> None:
    positive, negative, latent = _with_first_frame_guide(vae)
    positive, negative, added = _add(vae, positive, negative, latent, interval_frames=8)
    sampled = {**added, "samples": torch.randn(1, 128, 6, 2, 2, generator=torch.Generator().manual_seed(3))}
    separate = _node(LTXVSeparateGeneratedKeyframes)
    pos, neg, video, keyframes = separate.execute(positive, negative, sampled)
    assert torch.equal(video["samples"], sampled["samples"][:, :, :4])
    assert video["noise_mask"].flatten().tolist() == [1.0, 1.0, 1.0, 0.0]
    assert torch.equal(keyframes["samples"], sampled["samples"][:, :, 4:])
    assert keyframes["generated_keyframe_indices"] == [8, 16] and keyframes["generated_keyframe_num_frames"] == 17
    for side in (pos, neg):
        options = side[0][1]
        assert torch.equal(options["keyframe_idxs"], _spans([0.0]))
        assert options["guide_attention_entries"] == [GUIDE_ENTRY] and "generated_keyframes" not in options
    _, _, _, batched = separate.execute(positive, negative, sampled, keyframes_to_batch=True)
    assert batched["samples"].shape == (2, 128, 1, 2, 2)
    assert torch.equal(batched["samples"][1, :, 0], sampled["samples"][0, :, 5])
    with pytest.raises(ValueError, match="has no generated keyframes"):
        separate.execute(pos, neg, video)

    # Either form initialises new keyframes: stacked back per video, padded with zeros to the slots.
    for given in (keyframes, batched):
        _, _, again = _add(vae, pos, neg, video, keyframes=given, frame_indices="4, 8, 12")
        assert torch.equal(again["samples"][:, :, 4:6], sampled["samples"][:, :, 4:])
        assert not again["samples"][:, :, 6].any()
    # A longer video latent with no recorded positions: its frame nearest each keyframe (round(i / 8)).
    source = {"samples": torch.randn(1, 128, 3, 2, 2, generator=torch.Generator().manual_seed(4))}
    _, _, copied = _add(vae, pos, neg, video, keyframes=source, frame_indices="12, 3")
    assert torch.equal(copied["samples"][:, :, 4], source["samples"][:, :, 2])  # 12 / 8 = 1.5 -> 2
    assert torch.equal(copied["samples"][:, :, 5], source["samples"][:, :, 0])  # 3 / 8 -> 0


def test_keyframes_become_frozen_guides_on_a_longer_canvas(vae) -> None:
    """Keyframes at 8 and 16 of 17 pictures, pinned on a 5-frame (33-picture) canvas: scaled by 32 / 16 to 16 and 32,
    appended as one-picture causal guides, noise mask 0 at strength 1."""
    positive, negative = _prompts()
    content = torch.randn(1, 128, 2, 2, 2, generator=torch.Generator().manual_seed(5))
    keyframes = {"samples": content, "generated_keyframe_indices": [8, 16], "generated_keyframe_num_frames": 17}
    target = {"samples": torch.zeros(1, 128, 5, 2, 2)}
    to_guides = _node(LTXVGeneratedKeyframesToGuides)
    pos, neg, out = to_guides.execute(positive, negative, vae, target, keyframes, 1.0)
    assert out["samples"].shape == (1, 128, 7, 2, 2)
    assert torch.equal(out["samples"][:, :, 5:], content)
    assert out["noise_mask"].flatten().tolist() == [1.0] * 5 + [0.0, 0.0]
    for side in (pos, neg):
        assert torch.equal(side[0][1]["keyframe_idxs"], _spans([16.0, 32.0]))
        assert side[0][1]["guide_attention_entries"] == [GUIDE_ENTRY, GUIDE_ENTRY]
    pos, _, _ = to_guides.execute(positive, negative, vae, target, keyframes, 0.5, override_frame_indices="30, 2")
    assert torch.equal(pos[0][1]["keyframe_idxs"], _spans([30.0, 2.0]))
    with pytest.raises(ValueError, match="lists 1 index/indices but the keyframes latent carries 2"):
        to_guides.execute(positive, negative, vae, target, keyframes, 1.0, override_frame_indices="4")
    with pytest.raises(ValueError, match="does not carry generated keyframe positions"):
        to_guides.execute(positive, negative, vae, target, {"samples": content}, 1.0)
    still = [(positive[0][0], {**positive[0][1], "generated_keyframes": {"num_keyframes": 2}})]
    with pytest.raises(ValueError, match="still carries generated keyframes"):
        to_guides.execute(still, negative, vae, target, keyframes, 1.0)

    # Keyframes of another size are decoded one picture each and encoded again at this canvas's size.
    larger = {**keyframes, "samples": torch.randn(1, 128, 2, 4, 4, generator=torch.Generator().manual_seed(6))}
    pos, _, resized = to_guides.execute(positive, negative, vae, target, larger, 1.0)
    assert resized["samples"].shape == (1, 128, 7, 2, 2)
    assert torch.equal(pos[0][1]["keyframe_idxs"], _spans([16.0, 32.0]))


def test_refusals(vae) -> None:
    positive, negative = _prompts()
    with pytest.raises(ValueError, match="plain video latent"):
        _add(vae, positive, negative, {"samples": torch.zeros(1, 128, 2, 2)})
    image_vae = Vae(torch.nn.Identity(), "sd-vae")
    with pytest.raises(ValueError, match="not LTX-2's video VAE"):
        _add(image_vae, positive, negative, {"samples": torch.zeros(1, 128, 3, 2, 2)})


# --- a graph through the engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx_keyframes")
    make_ltx2_files(root / "models", seed=3, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths))
    set_paths(FolderPaths())


def graph() -> dict:
    """A first-frame guide, keyframes every 8 pictures, empty audio, 2 Euler steps; then the audio, the keyframes
    and the guide taken off and the video decoded."""
    ckpt = "ltx-2-19b-dev-tiny.safetensors"
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LTXAVTextEncoderLoader", "inputs": {
            "text_encoder": "gemma_3_12B_it-tiny.safetensors", "ckpt_name": ckpt, "device": "default"}},
        "3": {"class_type": "LTXVAudioVAELoader", "inputs": {"ckpt_name": ckpt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red car drives downhill"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry"}},
        "6": {"class_type": "LTXVConditioning", "inputs": {"positive": ["4", 0], "negative": ["5", 0],
                                                           "frame_rate": 25.0}},
        "7": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": SIZE, "height": SIZE, "length": LENGTH,
                                                               "batch_size": 1}},
        "20": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1,
                                                      "color": 0x3060C0}},
        "22": {"class_type": "LTXVAddGuide", "inputs": {
            "positive": ["6", 0], "negative": ["6", 1], "vae": ["1", 2], "latent": ["7", 0], "image": ["20", 0],
            "frame_idx": 0, "strength": 1.0}},
        "23": {"class_type": "LTXVAddGeneratedKeyframes", "inputs": {
            "positive": ["22", 0], "negative": ["22", 1], "vae": ["1", 2], "latent": ["22", 2],
            "interval_frames": 8, "frame_indices": ""}},
        "8": {"class_type": "LTXVEmptyLatentAudio", "inputs": {"frames_number": LENGTH, "frame_rate": 25,
                                                               "batch_size": 1, "audio_vae": ["3", 0]}},
        "9": {"class_type": "LTXVConcatAVLatent", "inputs": {"video_latent": ["23", 2], "audio_latent": ["8", 0]}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "11": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["23", 0],
                                                     "negative": ["23", 1], "cfg": 2.0}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "ManualSigmas", "inputs": {"sigmas": "1., 0.5, 0.0"}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["10", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": ["13", 0],
            "latent_image": ["9", 0]}},
        "15": {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": ["14", 0]}},
        "16": {"class_type": "LTXVSeparateGeneratedKeyframes", "inputs": {
            "positive": ["23", 0], "negative": ["23", 1], "latent": ["15", 0], "keyframes_to_batch": False}},
        "17": {"class_type": "LTXVCropGuides", "inputs": {"positive": ["16", 0], "negative": ["16", 1],
                                                          "latent": ["16", 2]}},
        "18": {"class_type": "VAEDecode", "inputs": {"samples": ["17", 2], "vae": ["1", 2]}},
        "19": {"class_type": "PreviewImage", "inputs": {"images": ["18", 0]}},
    }


def test_the_graph_samples_the_keyframes_with_the_video(engine, monkeypatch) -> None:
    """The guide's and keyframes' spans reach the transformer as the last 12 tokens' positions; the keyframes are
    denoised (they leave the sampler changed, the guide does not); separating and cropping leave the 3 video frames,
    which decode to 17 pictures."""
    seen = []
    positions = ldm.ltx2.video_positions

    def spy(*args, **kwargs):
        seen.append(args[7] if len(args) > 7 else kwargs.get("keyframe_idxs"))
        return positions(*args, **kwargs)

    monkeypatch.setattr(ldm.ltx2, "video_positions", spy)
    keep = ["23", "15", "16", "17", "18"]
    result = engine.run(parse_api(graph()), keep=keep)
    assert result.ok, result.error
    added, parted, separated, cropped, decoded = (result.values[k] for k in keep)
    spans = _spans([0.0, 8.0, 16.0])
    assert torch.equal(added[0][0][1]["keyframe_idxs"], spans)
    assert seen and all(torch.equal(s.float().cpu(), spans.expand(2, -1, -1, -1)) for s in seen)
    sampled, before = parted[0]["samples"], added[2]["samples"]
    assert sampled.shape == (1, 128, 6, 2, 2)
    torch.testing.assert_close(sampled[:, :, 3], before[:, :, 3], rtol=1e-5, atol=1e-5)  # the guide, pinned
    assert sampled[:, :, 4:].std() > 0.1  # the keyframes, denoised from zeros
    assert torch.equal(separated[3]["samples"], sampled[:, :, 4:])
    assert separated[3]["generated_keyframe_indices"] == [8, 16]
    assert torch.equal(cropped[2]["samples"], sampled[:, :, :3])
    assert decoded[0].shape == (LENGTH, SIZE, SIZE, 3)


def test_declarations_are_comfyuis(engine) -> None:
    info = engine.registry.object_info()
    add = info["LTXVAddGeneratedKeyframes"]
    assert (add["display_name"], add["category"]) == ("LTXV Add Generated Keyframes", "model/conditioning/ltxv")
    assert list(add["input"]["required"]) == ["positive", "negative", "vae", "latent"]
    assert list(add["input"]["optional"]) == ["interval_frames", "keyframes", "frame_indices"]
    interval = add["input"]["optional"]["interval_frames"][1]
    assert (interval["default"], interval["min"], interval["max"]) == (24, 1, 1024)
    assert add["output_name"] == ["positive", "negative", "latent"]
    separate = info["LTXVSeparateGeneratedKeyframes"]
    assert list(separate["input"]["required"]) == ["positive", "negative", "latent", "keyframes_to_batch"]
    assert separate["input"]["required"]["keyframes_to_batch"][1]["default"] is False
    assert separate["output"] == ["CONDITIONING", "CONDITIONING", "LATENT", "LATENT"]
    assert separate["output_name"] == ["positive", "negative", "latent", "keyframes"]
    guides = info["LTXVGeneratedKeyframesToGuides"]
    assert guides["display_name"] == "LTXV Generated Keyframes to Guides"
    assert list(guides["input"]["required"]) == ["positive", "negative", "vae", "latent", "keyframes", "strength"]
    assert list(guides["input"]["optional"]) == ["override_frame_indices"]
    strength = guides["input"]["required"]["strength"][1]
    assert (strength["default"], strength["min"], strength["max"], strength["step"]) == (1.0, 0.0, 10.0, 0.01)
