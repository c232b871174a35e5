"""LTX-2 IC-LoRA guides and guide attention masks (current ComfyUI's comfy_extras/nodes_lt.py and
comfy/ldm/lightricks/model.py) on a tiny random VAE, tiny random LTX-2 files and tiny LoRA files with metadata:
GetICLoRAParameters reading the LoRA's `reference_downscale_factor` through the LoRA loaders, LTXVAddGuide with a
factor above 1 (the guide encoded small and dilated over the full grid, its holes' noise mask negative, its spans'
ends reaching further), the `attention_mask` per-token weights and the bias they give, LTXVAddLatentGuide, the
transformer leaving the holes out, and a downscaled guide sampled through the engine.

ComfyUI's arithmetic, transcribed independently below:
- factor n: the guide encoded at (w / n, h / n) latent pixels, put at [..., ::n, ::n] of a zero grid, its noise
  mask 1 - min(s, 1) there and -1 - min(s, 1) elsewhere, the earlier mask broadcast to the grid;
- token (f, r, c) of a guide at frame_idx spans frames [8 f, 8 f + 8) (causal: each end e -> max(e - 7, 0)) +
  frame_idx, rows [32 r, 32 r + 32 + 32 (n - 1)), columns alike;
- an attention mask [P, H, W] weighs a token by its area mean over the guide's own latent grid, the first picture
  for the first latent frame and (P - 1) // (F - 1) pictures averaged for each later one, times the strength;
- LTXVAddLatentGuide's frame_idx: 8 latent_idx for latent_idx <= 0, else 1 + 8 (latent_idx - 1).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import ldm.ltx2
from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.ltx2 import LTX2Model, guide_attention_bias, tiny_config
from ldm.ltx2_files import TINY_LTX2, make_ltx2_files
from ldm.ltxv_vae import TINY_LTXV_VAES, random_ltxv_vae
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.ltx2 import _guide_attention
from nodes.sd.ltxv_guides import (
    GetICLoRAParameters,
    LTXVAddGuide,
    LTXVAddLatentGuide,
    LTXVCropGuides,
    pixel_mask_weights,
    reference_downscale_factor,
)
from nodes.sd.models import DiffusionModel, Vae
from tests.nodes.test_ltx2_guides import flf2v

SIZE = 128  # 4 x 4 latent pixels; a factor 2 guide is encoded at 64 x 64 (2 x 2)
LENGTH = 17  # 1 + 2 latent frames
LATENT = (1, 128, 3, 4, 4)


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


def _latent(shape=LATENT) -> dict:
    return {"samples": torch.randn(shape, generator=torch.Generator().manual_seed(0))}


def _pictures(count: int, seed: int, size: int = SIZE // 2) -> torch.Tensor:
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


def _encoded(vae: Vae, pictures: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.vae.encode(pictures.movedim(-1, 0).unsqueeze(0) * 2 - 1).mode()


def _comfy_spans(frames: int, rows: int, cols: int, frame_idx: int, causal: bool, factor: int) -> torch.Tensor:
    """[1, 3, K, 2] written out token by token from ComfyUI's latent_to_pixel_coords and add_keyframe_index."""
    t, r, c = [], [], []
    for f in range(frames):
        for row in range(rows):
            for col in range(cols):
                start, end = 8 * f, 8 * f + 8
                if causal:
                    start, end = max(start - 7, 0), max(end - 7, 0)
                t.append([start + frame_idx, end + frame_idx])
                r.append([32 * row, 32 * row + 32 + 32 * (factor - 1)])
                c.append([32 * col, 32 * col + 32 + 32 * (factor - 1)])
    return torch.tensor([[t, r, c]], dtype=torch.float32)


def _iclora(factor: int | str = 2) -> dict:
    return {"reference_downscale_factor": factor}


# --- GetICLoRAParameters and the LoRA loaders ----------------------------------------------------------------------


def test_reference_downscale_factor_is_read_as_comfyui_reads_it() -> None:
    assert reference_downscale_factor({"reference_downscale_factor": "2"}) == 2
    assert reference_downscale_factor({"ss_reference_downscale_factor": "2.6", "other": "x"}) == 3  # suffix, rounded
    assert reference_downscale_factor({"a_reference_downscale_factor": "4", "b_reference_downscale_factor": "2"}) == 4
    assert reference_downscale_factor({"reference_downscale_factor": "0"}) == 1  # at least 1
    assert reference_downscale_factor({"reference_downscale_factor": "two"}) == 1
    assert reference_downscale_factor({"reference_downscale_factor": "inf"}) == 1
    assert reference_downscale_factor({"modelspec.title": "x"}) == 1 and reference_downscale_factor(None) == 1
    model = DiffusionModel(torch.nn.Linear(1, 1), None, "m", lora_metadata={"reference_downscale_factor": "3"})
    assert _node(GetICLoRAParameters).execute(model) == ({"reference_downscale_factor": 3},)
    assert _node(GetICLoRAParameters).execute(DiffusionModel(torch.nn.Linear(1, 1), None, "m")) == (
        {"reference_downscale_factor": 1},)


def _write_lora(path, metadata: dict | None, seed: int) -> None:
    """A tiny LTX-2 LoRA (one rank-2 pair on the first block's attn1.to_q, 64 x 64) in Lightricks' layout."""
    g = torch.Generator().manual_seed(seed)
    key = "diffusion_model.transformer_blocks.0.attn1.to_q"
    width = TINY_LTX2.inner_dim
    save_file({f"{key}.lora_A.weight": torch.randn(2, width, generator=g) * 0.1,
               f"{key}.lora_B.weight": torch.randn(width, 2, generator=g) * 0.1}, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx2_iclora")
    make_ltx2_files(root / "models", seed=3, dtype=torch.float32)
    loras = root / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    _write_lora(loras / "ic-lora-x2.safetensors", {"reference_downscale_factor": "2", "format": "pt"}, 1)
    _write_lora(loras / "ic-lora-x3.safetensors", {"reference_downscale_factor": "3"}, 2)
    _write_lora(loras / "plain.safetensors", None, 3)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths))
    set_paths(FolderPaths())


CKPT = "ltx-2-19b-dev-tiny.safetensors"


def _parameters_graph(loras: list[tuple[str, str]]) -> dict:
    """The checkpoint's model through LoRA loaders (kind, file) in order, then GetICLoRAParameters."""
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
             "4": {"class_type": "LTXAVTextEncoderLoader", "inputs": {
                 "text_encoder": "gemma_3_12B_it-tiny.safetensors", "ckpt_name": CKPT, "device": "default"}}}
    model, clip = ["1", 0], ["4", 0]
    for i, (kind, name) in enumerate(loras):
        node = str(10 + i)
        if kind == "model_only":
            graph[node] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": model, "lora_name": name, "strength_model": 1.0}}
        else:
            graph[node] = {"class_type": "LoraLoader", "inputs": {
                "model": model, "clip": clip, "lora_name": name, "strength_model": 1.0, "strength_clip": 0.0}}
            clip = [node, 1]
        model = [node, 0]
    graph["2"] = {"class_type": "GetICLoRAParameters", "inputs": {"iclora_model": model}}
    graph["3"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}
    return graph


@pytest.mark.parametrize(("loras", "factor"), [
    ([("model_only", "ic-lora-x2.safetensors")], 2),
    ([("full", "ic-lora-x2.safetensors")], 2),
    ([], 1),
    ([("model_only", "plain.safetensors")], 1),
    # chained, as ComfyUI's load_lora_for_models sets the attachment: a file with metadata replaces the earlier
    # LoRA's, one without any keeps it
    ([("model_only", "ic-lora-x2.safetensors"), ("model_only", "plain.safetensors")], 2),
    ([("model_only", "ic-lora-x2.safetensors"), ("full", "ic-lora-x3.safetensors")], 3),
])
def test_get_iclora_parameters_reads_the_lora_files_metadata(engine, loras, factor) -> None:
    result = engine.run(parse_api(_parameters_graph(loras)), keep=["2"])
    assert result.ok, result.error
    assert result.values["2"][0] == {"reference_downscale_factor": factor}


# --- LTXVAddGuide with a reference downscale factor ------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_downscaled_guide_is_dilated_with_comfyuis_layout(vae, strength) -> None:
    """Factor 2 at frame 0 on a 4 x 4 grid: the picture encoded at 64 x 64 (2 x 2), each of its latent pixels (r, c)
    at (2 r, 2 c) of the appended frame, zeros between; the noise mask broadcast to the grid, 1 - s at the kept
    pixels and -1 - s at the holes; the spans' row and column ends 32 further; the entry counts all 16 tokens."""
    positive, negative = _prompts()
    picture = _pictures(1, 1)
    positive, negative, out = _node(LTXVAddGuide).execute(positive, negative, vae, _latent(), picture, 0, strength,
                                                          iclora_parameters=_iclora("2"))
    small = _encoded(vae, picture)
    assert small.shape == (1, 128, 1, 2, 2)
    assert out["samples"].shape == (1, 128, 4, 4, 4)
    assert torch.equal(out["samples"][:, :, :3], _latent()["samples"])
    guide = out["samples"][:, :, 3]
    for r in range(4):
        for c in range(4):
            if r % 2 == 0 and c % 2 == 0:
                torch.testing.assert_close(guide[..., r, c], small[:, :, 0, r // 2, c // 2], rtol=0, atol=1e-6)
            else:
                assert torch.equal(guide[..., r, c], torch.zeros(1, 128))
    mask = out["noise_mask"]
    assert mask.shape == (1, 1, 4, 4, 4) and torch.equal(mask[:, :, :3], torch.ones(1, 1, 3, 4, 4))
    lattice = torch.tensor([[1.0 if r % 2 == 0 and c % 2 == 0 else -1.0 for c in range(4)] for r in range(4)])
    torch.testing.assert_close(mask[0, 0, 3], lattice - strength, rtol=0, atol=1e-7)
    for side in (positive, negative):
        options = side[0][1]
        assert torch.equal(options["keyframe_idxs"], _comfy_spans(1, 4, 4, 0, True, 2))
        assert options["guide_attention_entries"] == [
            {"pre_filter_count": 16, "strength": strength, "pixel_mask": None, "latent_shape": [1, 2, 2]}]
    _, _, cropped = _node(LTXVCropGuides).execute(positive, negative, out)
    assert torch.equal(cropped["samples"], _latent()["samples"]) and cropped["noise_mask"].shape == (1, 1, 3, 4, 4)


def test_downscaled_clip_after_frame_0_and_a_plain_guide_after_it(vae) -> None:
    """A 10-picture clip at frame 11 of 33 pictures (5 latent frames) with factor 2: not causal, the first picture
    in front, 9 encoded at 64 x 64 and the first latent frame dropped; frame 11 -> 9; spans [9, 17), rows and
    columns ending 32 further. A later plain guide's mask follows the grid-wide mask (0.5 everywhere)."""
    positive, negative = _prompts()
    video = {"samples": torch.zeros(1, 128, 5, 4, 4)}
    clip = _pictures(10, 4)
    positive, negative, out = _node(LTXVAddGuide).execute(positive, negative, vae, video, clip, 11, 0.5,
                                                          iclora_parameters=_iclora(2))
    expected = _encoded(vae, torch.cat([clip[:1], clip[:8]]))[:, :, 1:]
    torch.testing.assert_close(out["samples"][:, :, 5, ::2, ::2], expected[:, :, 0], rtol=0, atol=1e-6)
    assert torch.equal(positive[0][1]["keyframe_idxs"], _comfy_spans(1, 4, 4, 9, False, 2))
    positive, negative, twice = _node(LTXVAddGuide).execute(positive, negative, vae, out, _pictures(1, 5, SIZE), -1,
                                                            0.5)
    assert twice["noise_mask"].shape == (1, 1, 7, 4, 4)
    assert torch.equal(twice["noise_mask"][0, 0, 6], torch.full((4, 4), 0.5))
    spans = positive[0][1]["keyframe_idxs"]
    assert spans.shape == (1, 3, 32, 2)
    # -1 over the 5 video frames (the guide's 16 tokens fill one frame, left out): (5 - 1) * 8 + 1 - 1 = 32
    assert torch.equal(spans[:, :, 16:], _comfy_spans(1, 4, 4, 32, True, 1))
    assert [e["pre_filter_count"] for e in positive[0][1]["guide_attention_entries"]] == [16, 16]
    _, _, cropped = _node(LTXVCropGuides).execute(positive, negative, twice)
    assert cropped["samples"].shape == (1, 128, 5, 4, 4)


def test_factor_1_and_strength_above_1(vae) -> None:
    """Factor 1 (or none, or unreadable parameters) is the plain guide bit for bit; strength 2 keeps a noise mask of
    0 (ComfyUI clamps: above 1 a guide only draws attention) and is recorded on the entry."""
    positive, negative = _prompts()
    picture = _pictures(1, 1, SIZE)
    plain = _node(LTXVAddGuide).execute(positive, negative, vae, _latent(), picture, 0, 0.7)
    for parameters in (_iclora(1), _iclora("1.2"), _iclora("x"), {}):
        same = _node(LTXVAddGuide).execute(positive, negative, vae, _latent(), picture, 0, 0.7,
                                           iclora_parameters=parameters)
        assert torch.equal(plain[2]["samples"], same[2]["samples"])
        assert torch.equal(plain[2]["noise_mask"], same[2]["noise_mask"])
        assert torch.equal(plain[0][0][1]["keyframe_idxs"], same[0][0][1]["keyframe_idxs"])
        assert plain[0][0][1]["guide_attention_entries"] == same[0][0][1]["guide_attention_entries"]
    assert plain[2]["noise_mask"].shape == (1, 1, 4, 1, 1)
    strong = _node(LTXVAddGuide).execute(positive, negative, vae, _latent(), picture, 0, 2.0)
    assert strong[2]["noise_mask"].flatten().tolist() == [1.0, 1.0, 1.0, 0.0]
    assert strong[0][0][1]["guide_attention_entries"][0]["strength"] == 2.0


def test_bad_inputs_are_refused_clearly(vae) -> None:
    positive, negative = _prompts()
    add = _node(LTXVAddGuide).execute
    with pytest.raises(ValueError, match=r"LTXVAddGuide: the latent's 3 x 3 latent pixels do not divide by the "
                                         r"IC-LoRA's reference downscale factor 2: .* multiples of 64"):
        add(positive, negative, vae, _latent((1, 128, 3, 3, 3)), _pictures(1, 1), 0, 1.0, iclora_parameters=_iclora())
    old = Vae(random_ltxv_vae(TINY_LTXV_VAES["0.9.0"], seed=1), "tiny-ltxv")
    with pytest.raises(ValueError, match=r"IC-LoRA guides .* are for LTX-2; .* leave iclora_parameters unconnected"):
        add(positive, negative, old, _latent(), _pictures(1, 1), 0, 1.0, iclora_parameters=_iclora())
    with pytest.raises(ValueError, match="leave attention_mask unconnected"):
        add(positive, negative, old, _latent(), _pictures(1, 1), 0, 1.0, attention_mask=torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match=r"LTXVAddGuide: the attention_mask \[1, 1, 64, 64\] is no MASK"):
        add(positive, negative, vae, _latent(), _pictures(1, 1), 0, 1.0, attention_mask=torch.ones(1, 1, 64, 64))
    pixel_mask = {**_latent(), "noise_mask": torch.ones(1, 1, 3, 2, 2)}
    with pytest.raises(ValueError, match="neither per frame nor per latent pixel"):
        add(positive, negative, vae, pixel_mask, _pictures(1, 1), 0, 1.0, iclora_parameters=_iclora())


# --- attention masks ---------------------------------------------------------------------------------------------


def _block_means(picture: torch.Tensor, rows: int, cols: int) -> list[float]:
    """Each latent pixel's mean of its block of a [H, W] picture, row by row (area interpolation by hand)."""
    h, w = picture.shape[0] // rows, picture.shape[1] // cols
    return [picture[r * h:(r + 1) * h, c * w:(c + 1) * w].double().mean().item()
            for r in range(rows) for c in range(cols)]


def test_pixel_mask_weights_follow_comfyuis_temporal_grouping() -> None:
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(17, 64, 64, generator=g)
    weights = pixel_mask_weights(masks[None, None], 3, 2, 2)
    assert weights.shape == (1, 12)
    means = torch.tensor([_block_means(m, 2, 2) for m in masks], dtype=torch.float64)  # [17, 4]
    expected = torch.cat([means[0], means[1:9].mean(0), means[9:17].mean(0)])  # (17 - 1) // (3 - 1) = 8 a frame
    torch.testing.assert_close(weights[0].double(), expected, rtol=0, atol=1e-6)
    six = pixel_mask_weights(masks[:6, None].movedim(0, 1)[None], 3, 2, 2)  # 5 // 2 = 2: pictures 1-2, 3-4; 5 unused
    torch.testing.assert_close(six[0].double(), torch.cat([means[0], means[1:3].mean(0), means[3:5].mean(0)]),
                               rtol=0, atol=1e-6)
    two = pixel_mask_weights(masks[:2][None, None], 3, 2, 2)  # fewer pictures than frames: the second repeated
    torch.testing.assert_close(two[0].double(), torch.cat([means[0], means[1], means[1]]), rtol=0, atol=1e-6)
    one = pixel_mask_weights(masks[:1][None, None], 3, 2, 2)  # one picture for every frame
    torch.testing.assert_close(one[0].double(), means[0].repeat(3), rtol=0, atol=1e-6)
    first = pixel_mask_weights(masks[:5][None, None], 1, 2, 2)  # one latent frame: the first picture alone
    torch.testing.assert_close(first[0].double(), means[0], rtol=0, atol=1e-6)


def test_attention_mask_weights_and_bias(vae) -> None:
    """A downscaled guide (factor 2, strength 0.8) with a 64 x 64 attention mask: its entry keeps the mask [1, 1, 1,
    64, 64]; `ltx2_conditioning`'s table gives its 16 tokens (guide 0) the mask's 32 x 32 block means (over the
    guide's own 2 x 2 grid) times 0.8, in order, then 1 past them; the transformer's bias puts those 4 weights' logs
    on the 4 kept guide tokens (the lattice), between them and the video, both ways."""
    positive, negative = _prompts()
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :32], mask[:, :32, 32:], mask[:, 32:, :16] = 1.0, 0.5, 1.0  # block means 1, 0.5, 0.5, 0
    positive, _, out = _node(LTXVAddGuide).execute(positive, negative, vae, _latent(), _pictures(1, 1), 0, 0.8,
                                                   attention_mask=mask, iclora_parameters=_iclora())
    entry = positive[0][1]["guide_attention_entries"][0]
    assert entry["pixel_mask"].shape == (1, 1, 1, 64, 64) and torch.equal(entry["pixel_mask"][0, 0], mask)
    table = _guide_attention(positive[0][1]["guide_attention_entries"], positive[0][1]["keyframe_idxs"])
    assert table.shape == (1, 16, 2) and torch.equal(table[0, :, 0], torch.zeros(16))
    weights = [w * 0.8 for w in (1.0, 0.5, 0.5, 0.0)]
    torch.testing.assert_close(table[0, :, 1], torch.tensor(weights + [1.0] * 12), rtol=0, atol=1e-7)

    kept_grid = (out["noise_mask"][0, 0] >= 0).flatten()  # the model's grid mask
    tokens = int(kept_grid.sum())
    assert tokens == 3 * 16 + 4
    bias = guide_attention_bias(table, tokens, 16, torch.float32, kept_grid[-16:])
    assert bias.shape == (1, 1, tokens, tokens)
    start = tokens - 4
    for k, w in enumerate(weights):
        value = math.log(w) if w > 0 else torch.finfo(torch.float32).min
        assert torch.allclose(bias[0, 0, :start, start + k].double(), torch.tensor(value, dtype=torch.float64))
        assert torch.allclose(bias[0, 0, start + k, :start].double(), torch.tensor(value, dtype=torch.float64))
    assert torch.equal(bias[0, 0, :start, :start], torch.zeros(start, start))
    assert torch.equal(bias[0, 0, start:, start:], torch.zeros(4, 4))
    assert bias[0, 0, 0, start + 3].item() == torch.finfo(torch.float32).min  # mask 0: that token masked out

    plain = _guide_attention([{**entry, "strength": 1.0, "pixel_mask": torch.ones(1, 1, 1, 64, 64)}],
                             positive[0][1]["keyframe_idxs"])
    assert plain is None  # a mask of ones at strength 1 weighs nothing: no bias at all, as ComfyUI


# --- LTXVAddLatentGuide ------------------------------------------------------------------------------------------


def test_latent_guide_of_half_size_is_an_iclora_guide(vae) -> None:
    """LTXVAddLatentGuide given LTXVAddGuide's small latent at latent_idx 0 appends exactly what LTXVAddGuide with
    factor 2 appends: the same latent, noise mask, spans and entry."""
    positive, negative = _prompts()
    picture = _pictures(1, 1)
    by_image = _node(LTXVAddGuide).execute(positive, negative, vae, _latent(), picture, 0, 0.6,
                                           iclora_parameters=_iclora())
    by_latent = _node(LTXVAddLatentGuide).execute(positive, negative, vae, _latent(),
                                                  {"samples": _encoded(vae, picture)}, 0, 0.6)
    for a, b in zip(by_image, by_latent, strict=True):
        if isinstance(a, dict):
            assert torch.equal(a["samples"], b["samples"]) and torch.equal(a["noise_mask"], b["noise_mask"])
        else:
            assert torch.equal(a[0][1]["keyframe_idxs"], b[0][1]["keyframe_idxs"])
            assert a[0][1]["guide_attention_entries"] == b[0][1]["guide_attention_entries"]


@pytest.mark.parametrize(("latent_idx", "frames", "frame_idx", "causal"), [
    (2, 1, 9, True), (1, 2, 1, False), (-1, 1, -8, True), (0, 2, 0, True)])
def test_latent_guide_frame_index(vae, latent_idx, frames, frame_idx, causal) -> None:
    """latent_idx -> frame_idx 8 latent_idx (<= 0) or 1 + 8 (latent_idx - 1); causal at frame 0 or for one frame;
    a same-size guide is appended as it is, mask 1 - s."""
    positive, negative = _prompts()
    guide = torch.randn(1, 128, frames, 4, 4, generator=torch.Generator().manual_seed(3))
    positive, _, out = _node(LTXVAddLatentGuide).execute(positive, negative, vae, _latent(), {"samples": guide},
                                                         latent_idx, 0.25)
    assert torch.equal(out["samples"][:, :, 3:], guide)
    assert out["noise_mask"].flatten().tolist() == [1.0] * 3 + [0.75] * frames
    assert torch.equal(positive[0][1]["keyframe_idxs"], _comfy_spans(frames, 4, 4, frame_idx, causal, 1))


def test_latent_guide_refusals(vae) -> None:
    positive, negative = _prompts()
    add = _node(LTXVAddLatentGuide).execute

    def latent(*shape):
        return {"samples": torch.zeros(*shape)}

    with pytest.raises(ValueError, match=r"runs past the end of the 3-frame latent"):
        add(positive, negative, vae, _latent(), latent(1, 128, 2, 4, 4), 2, 1.0)
    with pytest.raises(ValueError, match=r"3 x 3 latent pixels do not divide the latent's 4 x 4"):
        add(positive, negative, vae, _latent(), latent(1, 128, 1, 3, 3), 0, 1.0)
    with pytest.raises(ValueError, match="2 times smaller in height and 4 times in width"):
        add(positive, negative, vae, _latent(), latent(1, 128, 1, 2, 1), 0, 1.0)
    with pytest.raises(ValueError, match=r"guiding_latent \(1, 128, 4, 4\) is not a video latent"):
        add(positive, negative, vae, _latent(), latent(1, 128, 4, 4), 0, 1.0)
    with pytest.raises(ValueError, match="the same channels"):
        add(positive, negative, vae, _latent(), latent(1, 16, 1, 4, 4), 0, 1.0)
    old = Vae(random_ltxv_vae(TINY_LTXV_VAES["0.9.0"], seed=1), "tiny-ltxv")
    with pytest.raises(ValueError, match="is not LTX-2's video VAE"):
        add(positive, negative, old, _latent(), latent(1, 128, 1, 4, 4), 0, 1.0)


# --- the transformer leaves the holes out --------------------------------------------------------------------------


@torch.no_grad()
def test_model_leaves_out_the_tokens_not_kept() -> None:
    """Tokens not kept move nowhere (velocity 0), and nothing about them (their latents, levels) reaches the others;
    leaving out a whole guide frame gives the video exactly what it gets without that frame."""
    torch.manual_seed(0)
    c = tiny_config()
    model = LTX2Model(c).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    video, audio = torch.randn(1, c.in_channels, 3, 2, 2, generator=g), torch.randn(1, 8, 5, 16, generator=g)
    v_ctx, a_ctx = torch.randn(1, 6, c.connector_dim, generator=g), torch.randn(1, 6, c.audio_connector_dim,
                                                                                 generator=g)
    levels = torch.rand(1, 12, generator=g)
    keyframes = torch.tensor([[[[0.0, 1.0]] * 4, [[0.0, 32.0]] * 2 + [[32.0, 64.0]] * 2,
                               [[0.0, 32.0], [32.0, 64.0]] * 2]])  # the last frame: a guide at frame 0
    kept = torch.tensor([True] * 8 + [True, False, False, False])  # the guide's (0, 0) kept, as a factor 2 lattice
    out_v, out_a = model(video, audio, levels, torch.tensor([0.4]), v_ctx, a_ctx, None, 25.0, keyframes,
                         kept_tokens=kept)
    assert torch.equal(out_v.flatten(2)[..., ~kept], torch.zeros(1, c.out_channels, 3))
    other = video.clone()
    other.flatten(2)[..., ~kept] = 100.0
    other_levels = levels.clone()
    other_levels[:, ~kept] = -3.0
    again_v, again_a = model(other, audio, other_levels, torch.tensor([0.4]), v_ctx, a_ctx, None, 25.0, keyframes,
                             kept_tokens=kept)
    assert torch.equal(again_v, out_v) and torch.equal(again_a, out_a)
    full_v, _ = model(video, audio, levels, torch.tensor([0.4]), v_ctx, a_ctx, None, 25.0, keyframes)
    assert (full_v - out_v).flatten(2)[..., kept].abs().max() > 1e-4  # the holes would have mattered

    whole = torch.tensor([True] * 8 + [False] * 4)
    cut_v, cut_a = model(video, audio, levels, torch.tensor([0.4]), v_ctx, a_ctx, None, 25.0, keyframes,
                         kept_tokens=whole)
    short_v, short_a = model(video[:, :, :2], audio, levels[:, :8], torch.tensor([0.4]), v_ctx, a_ctx, None, 25.0)
    torch.testing.assert_close(cut_v[:, :, :2], short_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cut_a, short_a, rtol=1e-5, atol=1e-6)
    assert torch.equal(cut_v[:, :, 2], torch.zeros_like(cut_v[:, :, 2]))


# --- a downscaled guide through the engine -------------------------------------------------------------------------


def iclora_graph(strength: float) -> dict:
    """An IC-LoRA workflow on the tiny files (the first-last-frame graph with one guide): the x2 IC-LoRA on the
    model, its parameters into LTXVAddGuide (a 64 x 64 reference over a 128 x 128 video, with an attention mask),
    empty audio joined, 2 Euler steps (CFG 2), parted, the guide cropped, the video decoded."""
    graph = flf2v(strength, SIZE)
    del graph["23"]
    graph["30"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": "ic-lora-x2.safetensors", "strength_model": 1.0}}
    graph["31"] = {"class_type": "GetICLoRAParameters", "inputs": {"iclora_model": ["30", 0]}}
    graph["20"]["inputs"].update(width=SIZE // 2, height=SIZE // 2)
    graph["21"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 64, "height": 64}}
    graph["22"]["inputs"].update(attention_mask=["21", 0], iclora_parameters=["31", 0])
    graph["9"]["inputs"]["video_latent"] = ["22", 2]
    graph["11"]["inputs"].update(model=["30", 0], positive=["22", 0], negative=["22", 1])
    graph["16"]["inputs"].update(positive=["22", 0], negative=["22", 1])
    return graph


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_downscaled_guide_samples_end_to_end(engine, monkeypatch, strength) -> None:
    """The guide reaches the transformer as 16 spans (ends 64 apart) of which the 4 on the lattice are kept (52 of
    64 tokens run), with each kept guide token's weight 0.5 x strength; at strength 1 the kept guide pixels come out
    of the sampler as they went in; the cropped video decodes to 17 pictures."""
    seen = []
    forward = ldm.ltx2.LTX2Model.forward

    def spy(self, *args, kept_tokens=None, guide_attention=None, **kwargs):
        seen.append((args[8] if len(args) > 8 else kwargs.get("keyframe_idxs"), kept_tokens, guide_attention))
        return forward(self, *args, kept_tokens=kept_tokens, guide_attention=guide_attention, **kwargs)

    monkeypatch.setattr(ldm.ltx2.LTX2Model, "forward", spy)
    keep = ["22", "15", "16", "17"]
    result = engine.run(parse_api(iclora_graph(strength)), keep=keep)
    assert result.ok, result.error
    added, parted, cropped, decoded = (result.values[k] for k in keep)
    spans = _comfy_spans(1, 4, 4, 0, True, 2)
    assert torch.equal(added[0][0][1]["keyframe_idxs"], spans)
    lattice = torch.tensor([r % 2 == 0 and c % 2 == 0 for r in range(4) for c in range(4)])
    assert seen
    for keyframes, kept, table in seen:
        assert torch.equal(keyframes.float().cpu(), spans.expand(keyframes.shape[0], -1, -1, -1))
        assert kept is not None and torch.equal(kept.cpu(), torch.cat([torch.ones(48, dtype=torch.bool), lattice]))
        assert table is not None and table.shape[1:] == (16, 2)
        torch.testing.assert_close(table[:, :4, 1].cpu(), torch.full((table.shape[0], 4), 0.5 * strength))
    sampled, before = parted[0]["samples"], added[2]["samples"]
    assert sampled.shape == (1, 128, 4, 4, 4) and torch.isfinite(sampled[:, :, :3]).all()
    assert sampled[:, :, :3].std() > 0.1
    if strength == 1.0:
        torch.testing.assert_close(sampled[:, :, 3, ::2, ::2], before[:, :, 3, ::2, ::2], rtol=1e-5, atol=1e-5)
    assert cropped[2]["samples"].shape == (1, 128, 3, 4, 4)
    assert torch.equal(cropped[2]["samples"], sampled[:, :, :3])
    assert decoded[0].shape == (LENGTH, SIZE, SIZE, 3)


def test_the_declarations_are_comfyuis() -> None:
    """Input names, order, types and ranges, and outputs, as nodes_lt.py's define_schema declares them."""
    from tests.nodes.test_ltx2_guidance_nodes import declaration as declared

    prompts = [("required", name, kind, None, None, None, None)
               for name, kind in (("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                                  ("latent", "LATENT"))]
    strength = ("required", "strength", "FLOAT", 1.0, 0.0, 10.0, 0.01)
    mask = ("optional", "attention_mask", "MASK", None, None, None, None)
    assert declared(GetICLoRAParameters) == [("required", "iclora_model", "MODEL", None, None, None, None)]
    assert GetICLoRAParameters.object_info()["output"] == ["IC_LORA_PARAMETERS"]
    assert GetICLoRAParameters.object_info()["output_name"] == ["iclora_parameters"]
    assert declared(LTXVAddGuide) == [
        *prompts, ("required", "image", "IMAGE", None, None, None, None),
        ("required", "frame_idx", "INT", 0, -9999, 9999, 1), strength, mask,
        ("optional", "iclora_parameters", "IC_LORA_PARAMETERS", None, None, None, None)]
    assert declared(LTXVAddLatentGuide) == [
        *prompts, ("required", "guiding_latent", "LATENT", None, None, None, None),
        ("required", "latent_idx", "INT", 0, -9999, 9999, 1), strength, mask]
    for node in (LTXVAddGuide, LTXVAddLatentGuide):
        assert node.object_info()["output_name"] == ["positive", "negative", "latent"]
    assert LTXVAddLatentGuide.object_info()["display_name"] == "LTXV Add Latent Guide"
