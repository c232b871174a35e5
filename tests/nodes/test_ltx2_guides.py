"""LTX-2 keyframe guides (LTXVAddGuide, LTXVCropGuides given LTX-2's VAE) on a tiny random VAE and tiny random LTX-2
files (`ldm.ltx2_files.make_ltx2_files`): current ComfyUI's semantics (comfy_extras/nodes_lt.py), the guide always
appended, its noise mask 1 - strength, `keyframe_idxs` [B, 3, K, 2] pixel spans checked against values worked out by
hand from ComfyUI's rules, chained first-last-frame guides (Comfy-Org's video_ltx2_3_flf2v template), clips, the
refusals, and the template's graph end to end through the engine with the spans reaching the transformer.

ComfyUI's rules, for a latent of F video frames (earlier guides left out), h x w latent pixels:
- frame_idx < 0 resolves to max((F - 1) * 8 + 1 + frame_idx, 0);
- causal = (resolved frame 0) or (fewer than 9 pictures); a causal guide keeps 8 n + 1 pictures, else the first
  picture is put in front, 8 n + 1 of those encoded, the first latent frame dropped and the frame rounded down to
  8 k + 1;
- token (f, r, c) spans frames [8 f, 8 f + 8) (causal: each end e -> max(e - 7, 0)) + frame_idx, rows
  [32 r, 32 r + 32), columns [32 c, 32 c + 32), in order f, r, c;
- LTXVCropGuides drops as many latent frames as the guide tokens fill (K / (h w), ComfyUI's count given the latent).
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
from nodes.sd.ltxv_guides import LTXVAddGuide, LTXVCropGuides
from nodes.sd.models import Vae

SIZE, LENGTH = 64, 17  # 2 x 2 latent pixels; 1 + 2 latent frames
LATENT = (1, 128, 3, 2, 2)
# Each of the 4 tokens of a one-frame guide on the 2 x 2 grid, in order (r, c) = (0, 0), (0, 1), (1, 0), (1, 1).
ROWS = [[0.0, 32.0], [0.0, 32.0], [32.0, 64.0], [32.0, 64.0]]
COLS = [[0.0, 32.0], [32.0, 64.0], [0.0, 32.0], [32.0, 64.0]]


class _Ctx:
    services = None


def _node(cls):
    node = cls()
    node.ctx = _Ctx()
    return node


@pytest.fixture(scope="module")
def vae() -> Vae:
    return Vae(random_ltxv_vae(TINY_LTXV_VAES["2.0"], seed=1), "tiny-ltx2")


def _prompts() -> tuple[list, list]:
    return [(torch.zeros(1, 4, 8), {"frame_rate": 25.0})], [(torch.ones(1, 4, 8), {"frame_rate": 25.0})]


def _latent() -> dict:
    return {"samples": torch.randn(LATENT, generator=torch.Generator().manual_seed(0))}


def _pictures(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


def _encoded(vae: Vae, pictures: torch.Tensor) -> torch.Tensor:
    """The pictures' raw latent, as VAEEncode gives it: [1, 128, frames, 2, 2]."""
    with torch.no_grad():
        return vae.vae.encode(pictures.movedim(-1, 0).unsqueeze(0) * 2 - 1).mode()


def _add(vae, positive, negative, latent, image, frame_idx, strength=0.7, **kwargs):
    return _node(LTXVAddGuide).execute(positive, negative, vae, latent, image, frame_idx, strength, **kwargs)


def _spans(times: list[list[float]], tokens_per_frame: int = 4) -> torch.Tensor:
    """[1, 3, K, 2] from each guide latent frame's time span, the rows and columns of the 2 x 2 grid."""
    t = [span for span in times for _ in range(tokens_per_frame)]
    return torch.tensor([[t, ROWS * len(times), COLS * len(times)]])


def test_first_and_last_frame_guides_are_appended_with_their_spans(vae) -> None:
    """The flf2v template's guides (frame 0, then -1, strength 0.7) on 17 pictures: each guide's latent frame
    appended, its mask 0.3. The first spans frames [0, 1) (causal: [0, 8) -> [max(0-7, 0), 8-7)); -1 resolves to
    (3 - 1) * 8 + 1 - 1 = 16 over the 3 video frames (the first guide, 4 tokens: one frame, left out), one picture:
    causal [0, 1) + 16 = [16, 17)."""
    positive, negative = _prompts()
    latent = _latent()
    first, last = _pictures(1, 1), _pictures(1, 2)
    positive, negative, once = _add(vae, positive, negative, latent, first, 0)
    assert once["samples"].shape == (1, 128, 4, 2, 2)
    assert torch.equal(once["samples"][:, :, :3], latent["samples"])
    torch.testing.assert_close(once["samples"][:, :, 3:], _encoded(vae, first), rtol=0, atol=1e-6)
    torch.testing.assert_close(once["noise_mask"].flatten(), torch.tensor([1.0, 1.0, 1.0, 0.3]))
    assert torch.equal(positive[0][1]["keyframe_idxs"], _spans([[0.0, 1.0]]))

    positive, negative, twice = _add(vae, positive, negative, once, last, -1)
    assert twice["samples"].shape == (1, 128, 5, 2, 2) and twice["noise_mask"].shape == (1, 1, 5, 1, 1)
    assert torch.equal(twice["samples"][:, :, :4], once["samples"])
    torch.testing.assert_close(twice["samples"][:, :, 4:], _encoded(vae, last), rtol=0, atol=1e-6)
    torch.testing.assert_close(twice["noise_mask"].flatten(), torch.tensor([1.0, 1.0, 1.0, 0.3, 0.3]))
    expected = _spans([[0.0, 1.0], [16.0, 17.0]])
    for side in (positive, negative):
        assert torch.equal(side[0][1]["keyframe_idxs"], expected)
        assert side[0][1]["guide_attention_entries"] == [
            {"pre_filter_count": 4, "strength": 0.7, "pixel_mask": None, "latent_shape": [1, 2, 2]}] * 2
        assert side[0][1]["frame_rate"] == 25.0

    positive, negative, cropped = _node(LTXVCropGuides).execute(positive, negative, twice)
    assert torch.equal(cropped["samples"], latent["samples"])  # 8 guide tokens of 4 a frame: 2 frames off
    assert cropped["noise_mask"].flatten().tolist() == [1.0, 1.0, 1.0]
    assert all(k not in options for side in (positive, negative) for _, options in side
               for k in ("keyframe_idxs", "guide_attention_entries"))


def test_two_guides_at_one_frame_are_both_cropped(vae) -> None:
    """Two guides at frame -1 share a start frame: ComfyUI's newer count (the guide tokens over a frame's 4) takes
    both appended frames off, where counting distinct starts left one in the video."""
    positive, negative = _prompts()
    positive, negative, once = _add(vae, positive, negative, _latent(), _pictures(1, 1), -1)
    positive, negative, twice = _add(vae, positive, negative, once, _pictures(1, 2), -1)
    assert torch.equal(positive[0][1]["keyframe_idxs"], _spans([[16.0, 17.0], [16.0, 17.0]]))
    _, _, cropped = _node(LTXVCropGuides).execute(positive, negative, twice)
    assert torch.equal(cropped["samples"], _latent()["samples"])


def test_clip_at_frame_0_is_causal(vae) -> None:
    """10 pictures keep 9 (8 n + 1): 2 latent frames; at frame 0 causal: [0, 8) -> [0, 1), [8, 16) -> [1, 9).
    Cropping takes both off (8 guide tokens, 4 a frame)."""
    positive, negative = _prompts()
    clip = _pictures(10, 3)
    positive, negative, latent = _add(vae, positive, negative, _latent(), clip, 0, strength=1.0)
    assert latent["samples"].shape == (1, 128, 5, 2, 2)
    torch.testing.assert_close(latent["samples"][:, :, 3:], _encoded(vae, clip[:9]), rtol=0, atol=1e-6)
    assert latent["noise_mask"].flatten().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert torch.equal(positive[0][1]["keyframe_idxs"], _spans([[0.0, 1.0], [1.0, 9.0]]))
    _, _, cropped = _node(LTXVCropGuides).execute(positive, negative, latent)
    assert cropped["samples"].shape == LATENT


def test_clip_after_frame_0_starts_on_8k_plus_1(vae) -> None:
    """12 pictures at frame 11 of 33 (5 latent frames): not causal, so the first picture goes in front and
    12 // 8 * 8 + 1 = 9 pictures are encoded (picture 0 twice, then 1..7), their first latent frame dropped: one latent
    frame for pictures 0..7; frame 11 rounds down to (11 - 1) // 8 * 8 + 1 = 9; span [0, 8) + 9 = [9, 17)."""
    positive, negative = _prompts()
    video = {"samples": torch.zeros(1, 128, 5, 2, 2)}
    clip = _pictures(12, 4)
    positive, negative, latent = _add(vae, positive, negative, video, clip, 11, strength=0.5)
    assert latent["samples"].shape == (1, 128, 6, 2, 2)
    expected = _encoded(vae, torch.cat([clip[:1], clip[:8]]))[:, :, 1:]
    torch.testing.assert_close(latent["samples"][:, :, 5:], expected, rtol=0, atol=1e-6)
    assert latent["noise_mask"].flatten().tolist() == [1.0] * 5 + [0.5]
    assert torch.equal(negative[0][1]["keyframe_idxs"], _spans([[9.0, 17.0]]))
    assert negative[0][1]["guide_attention_entries"][0]["latent_shape"] == [1, 2, 2]


def test_clip_past_the_end_is_refused(vae) -> None:
    positive, negative = _prompts()
    with pytest.raises(ValueError, match=r"runs past the video's 3 latent frames \(17 pictures\)"):
        _add(vae, positive, negative, _latent(), _pictures(17, 5), 9)  # 17 + 1 -> 17 pictures: 2 frames at 2


def test_an_audio_video_latent_is_refused(vae) -> None:
    positive, negative = _prompts()
    latent = {**_latent(), "audio_samples": torch.zeros(1, 8, 17, 16)}
    with pytest.raises(ValueError, match="add the guides to the video latent before LTXVConcatAVLatent"):
        _add(vae, positive, negative, latent, _pictures(1, 1), 0)


def test_ic_lora_factor_1_is_plain(vae) -> None:
    positive, negative = _prompts()
    plain = _add(vae, positive, negative, _latent(), _pictures(1, 1), 0)
    same = _add(vae, positive, negative, _latent(), _pictures(1, 1), 0, iclora_parameters={
        "reference_downscale_factor": 1})
    assert torch.equal(plain[2]["samples"], same[2]["samples"])
    assert torch.equal(plain[0][0][1]["keyframe_idxs"], same[0][0][1]["keyframe_idxs"])


def test_guides_of_two_models_do_not_mix(vae) -> None:
    positive, negative = _prompts()
    positive, negative, latent = _add(vae, positive, negative, _latent(), _pictures(1, 1), 0)
    old = Vae(random_ltxv_vae(TINY_LTXV_VAES["0.9.0"], seed=1), "tiny-ltxv")
    with pytest.raises(ValueError, match="give every LTXVAddGuide of a video the same VAE"):
        _add(old, positive, negative, latent, _pictures(1, 2), 8)


# --- the first-last-frame graph through the engine --------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx2_guides")
    make_ltx2_files(root / "models", seed=3, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths))
    set_paths(FolderPaths())


def flf2v(strength: float, size: int = SIZE) -> dict:
    """Comfy-Org's video_ltx2_3_flf2v shape on the tiny files: guides at frame 0 and -1 on a `size` square video
    latent, joined with empty audio, 2 Euler steps (CFG 2), parted, the guides cropped, the video decoded."""
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
        "7": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": size, "height": size, "length": LENGTH,
                                                               "batch_size": 1}},
        "20": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                      "color": 0x3060C0}},
        "21": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                      "color": 0xC03020}},
        "22": {"class_type": "LTXVAddGuide", "inputs": {
            "positive": ["6", 0], "negative": ["6", 1], "vae": ["1", 2], "latent": ["7", 0], "image": ["20", 0],
            "frame_idx": 0, "strength": strength}},
        "23": {"class_type": "LTXVAddGuide", "inputs": {
            "positive": ["22", 0], "negative": ["22", 1], "vae": ["1", 2], "latent": ["22", 2], "image": ["21", 0],
            "frame_idx": -1, "strength": strength}},
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
        "16": {"class_type": "LTXVCropGuides", "inputs": {"positive": ["23", 0], "negative": ["23", 1],
                                                          "latent": ["15", 0]}},
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["16", 2], "vae": ["1", 2]}},
        "18": {"class_type": "PreviewImage", "inputs": {"images": ["17", 0]}},
    }


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_first_last_frame_graph_runs_and_decodes_the_requested_length(engine, monkeypatch, strength) -> None:
    """The spans reach the transformer as the last 8 tokens' positions (the model's video_positions); at strength 1
    the guides' frames come out of the sampler as they went in; the cropped video decodes to 17 pictures."""
    seen = []
    positions = ldm.ltx2.video_positions

    def spy(*args, **kwargs):
        seen.append(args[7] if len(args) > 7 else kwargs.get("keyframe_idxs"))
        return positions(*args, **kwargs)

    monkeypatch.setattr(ldm.ltx2, "video_positions", spy)
    keep = ["23", "15", "16", "17"]
    result = engine.run(parse_api(flf2v(strength)), keep=keep)
    assert result.ok, result.error
    added, parted, cropped, decoded = (result.values[k] for k in keep)
    spans = _spans([[0.0, 1.0], [16.0, 17.0]])
    assert torch.equal(added[0][0][1]["keyframe_idxs"], spans)
    assert seen and all(s is not None and s.shape == (2, 3, 8, 2) for s in seen)  # cond and uncond rows
    assert all(torch.equal(s.float().cpu(), spans.expand(2, -1, -1, -1)) for s in seen)
    sampled, before = parted[0]["samples"], added[2]["samples"]
    assert sampled.shape == (1, 128, 5, 2, 2) and sampled[:, :, :3].std() > 0.1
    if strength == 1.0:
        torch.testing.assert_close(sampled[:, :, 3:], before[:, :, 3:], rtol=1e-5, atol=1e-5)
    else:
        assert (sampled[:, :, 3:] - before[:, :, 3:]).abs().max() > 1e-3
    assert cropped[2]["samples"].shape == (1, 128, 3, 2, 2)
    assert torch.equal(cropped[2]["samples"], sampled[:, :, :3])
    assert all("keyframe_idxs" not in options for side in cropped[:2] for _, options in side)
    assert decoded[0].shape == (LENGTH, SIZE, SIZE, 3)


def test_weaker_guides_are_attended_to_less_end_to_end(engine, monkeypatch) -> None:
    """At strength 0.7 each guide's token count and strength reach the transformer (cond and uncond rows alike) and
    weaken the video's attention to the guides: the sampled video frames next to them (latent frames 0 and 2, the
    guides standing for pictures 0 and 16) differ from the same graph with the bias left out, and from strength 1,
    where nothing reaches the transformer."""
    seen = []
    forward = ldm.ltx2.LTX2Model.forward

    def spy(self, *args, guide_attention=None, **kwargs):
        seen.append(guide_attention)
        return forward(self, *args, guide_attention=guide_attention, **kwargs)

    monkeypatch.setattr(ldm.ltx2.LTX2Model, "forward", spy)

    def sample(strength: float) -> torch.Tensor:
        seen.clear()
        engine.free(unload_models=False, free_memory=True)  # the same graph again: run it, not its cached outputs
        result = engine.run(parse_api(flf2v(strength)), keep=["15"])
        assert result.ok, result.error
        return result.values["15"][0]["samples"]

    weak = sample(0.7)
    expected = torch.tensor([[0.0, 0.7]] * 4 + [[1.0, 0.7]] * 4)  # 4 tokens (2 x 2) per one-frame guide
    assert seen and all(s is not None and s.shape[1:] == (8, 2) and torch.allclose(s.cpu(), expected.expand_as(s))
                        for s in seen)
    full = sample(1.0)
    assert seen and all(s is None for s in seen)
    monkeypatch.setattr(ldm.ltx2, "guide_attention_bias", lambda *args: None)
    unbiased = sample(0.7)
    assert torch.isfinite(weak).all()
    for other in (unbiased, full):
        assert (weak[:, :, [0, 2]] - other[:, :, [0, 2]]).abs().max() > 1e-3


def test_guide_attention_option_from_the_entries() -> None:
    """`ltx2_conditioning`'s reading of the entries: [1, K, 2] (guide, weight) per guide token where a weight is not
    1, nothing at strength 1 or without the guides' coordinates; entries that do not cover the guide tokens are
    refused."""
    from nodes.sd.ltx2 import _guide_attention

    spans = _spans([[0.0, 1.0], [16.0, 17.0]])
    weak = {"pre_filter_count": 4, "strength": 0.7, "pixel_mask": None, "latent_shape": [1, 2, 2]}
    full = {**weak, "strength": 1.0}
    assert torch.equal(_guide_attention([weak, full], spans),
                       torch.tensor([[[0.0, 0.7]] * 4 + [[1.0, 1.0]] * 4]))
    assert torch.equal(_guide_attention([full, {**full, "strength": 2.0}], spans)[0, :, 1],
                       torch.tensor([1.0] * 4 + [2.0] * 4))  # above 1 draws attention (ComfyUI's newer rule)
    assert _guide_attention([full, full], spans) is None
    assert _guide_attention([weak, weak], None) is None and _guide_attention([], spans) is None
    with pytest.raises(ValueError, match="count 4 tokens, the prompt's keyframe_idxs 8"):
        _guide_attention([weak], spans)
