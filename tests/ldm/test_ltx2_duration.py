"""LTX 2.4's duration head (`ldm.ltx2_duration`) against a transcription of its arithmetic written with plain
matmuls and softmax in float64; the seconds -> frames table of ComfyUI's seconds_to_num_frames; reading heads from
files in each released key layout."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.ltx2_duration import (
    PREFIXES,
    DurationHead,
    DurationHeadConfig,
    duration_head_config,
    is_duration_head,
    load_duration_head,
    normalize_state_dict,
    random_duration_head,
    seconds_to_num_frames,
    write_tiny_duration_head,
)

CONFIG = DurationHeadConfig(video_dim=24, audio_dim=12, hidden=16, queries=3, mlp_hidden=8)


def transcribed(w: dict[str, torch.Tensor], video: torch.Tensor | None, audio: torch.Tensor | None,
                heads: int = 4) -> torch.Tensor:
    """The head's seconds [B], from its weights `w`, by hand."""
    groups = []
    if video is not None:
        groups.append(video @ w["video_input_proj.weight"].T + w["video_input_proj.bias"] + w["video_modality_emb"])
    if audio is not None:
        groups.append(audio @ w["audio_input_proj.weight"].T + w["audio_input_proj.bias"] + w["audio_modality_emb"])
    tokens = torch.cat(groups, dim=1)  # [B, T, H]
    hidden = tokens.shape[-1]
    wq, wk, wv = w["attention_pooler.cross_attn.in_proj_weight"].chunk(3)
    bq, bk, bv = w["attention_pooler.cross_attn.in_proj_bias"].chunk(3)
    q = w["attention_pooler.query_tokens"] @ wq.T + bq  # [Q, H]: the same queries for every item
    k, v = tokens @ wk.T + bk, tokens @ wv.T + bv
    d = hidden // heads
    pooled = []
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        scores = q[:, part] @ k[..., part].transpose(1, 2) / math.sqrt(d)  # [B, Q, T]
        pooled.append(torch.softmax(scores, dim=-1) @ v[..., part])
    pooled = torch.cat(pooled, dim=-1) @ w["attention_pooler.cross_attn.out_proj.weight"].T
    pooled = (pooled + w["attention_pooler.cross_attn.out_proj.bias"]).reshape(tokens.shape[0], -1)
    x = pooled @ w["mlp_hidden.weight"].T + w["mlp_hidden.bias"]
    x = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return (x @ w["mlp_out.weight"].T + w["mlp_out.bias"]).squeeze(-1).exp()


@pytest.mark.parametrize("streams", ["both", "video", "audio"])
def test_the_head_matches_a_transcription_in_float64(streams: str) -> None:
    head = random_duration_head(CONFIG, seed=3).double()
    weights = {k: v.double() for k, v in head.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 7, CONFIG.video_dim, generator=g, dtype=torch.float64) if streams != "audio" else None
    audio = torch.randn(2, 5, CONFIG.audio_dim, generator=g, dtype=torch.float64) if streams != "video" else None
    with torch.no_grad():
        seconds = head(video, audio)
    expected = transcribed(weights, video, audio)
    assert seconds.shape == (2,) and (seconds > 0).all()
    torch.testing.assert_close(seconds, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(seconds[0], seconds[1])  # each item its own prediction


def test_the_head_needs_some_tokens() -> None:
    with pytest.raises(ValueError, match="video tokens, the audio tokens or both"):
        DurationHead(CONFIG)()


@pytest.mark.parametrize(("seconds", "frame_rate", "low", "high", "frames"), [
    (5.0, 24.0, 1.0, 20.0, 113),  # 120 frames, down onto the grid
    (2.0, 25.0, 1.0, 20.0, 49),  # 50 -> 49
    (8.0, 30.0, 1.0, 20.0, 233),  # 240 -> 233
    (0.2, 24.0, 1.0, 20.0, 25),  # clamped to 24 frames, whose grid point below (17) undershoots: up to 25
    (1.0, 24.0, 1.0, 20.0, 25),
    (100.0, 24.0, 1.0, 20.0, 473),  # clamped to 480 -> 473
    (1.0, 24.0, 1.0, 1.0, 24),  # the bump past the maximum stops at it, off the grid (as ComfyUI's)
    (3.0, 24.0, 5.0, 20.0, 121),  # below the minimum: 120 frames -> 113 undershoots -> 121
    (0.0, 1.0, 0.5, 20.0, 1),  # round(0.5) is 0, the minimum at least one frame
    (2.0 / 3.0, 12.0, 0.5, 20.0, 9),
])
def test_seconds_to_num_frames(seconds: float, frame_rate: float, low: float, high: float, frames: int) -> None:
    assert seconds_to_num_frames(seconds, frame_rate, low, high) == frames


def test_seconds_to_num_frames_lands_on_the_grid_within_the_range() -> None:
    for tenths in range(1, 400):
        frames = seconds_to_num_frames(tenths / 10, 24.0, 1.0, 12.0)
        assert (frames - 1) % 8 == 0 and 24 <= frames <= 288


@pytest.mark.parametrize("prefix", [*PREFIXES, ""])
def test_a_head_loads_from_each_key_layout(tmp_path, prefix: str) -> None:
    path = write_tiny_duration_head(tmp_path / "head.safetensors", 24, 12, seed=4, prefix=prefix)
    sd = load_state_dict(path)
    assert is_duration_head(sd)
    assert set(normalize_state_dict(sd)) == set(DurationHead(duration_head_config(normalize_state_dict(sd)))
                                                .state_dict())
    head = load_duration_head(sd, path)
    assert head.config == DurationHeadConfig(video_dim=24, audio_dim=12, hidden=16, queries=2, mlp_hidden=8)
    assert head.unused_keys == [] and all(p.dtype == torch.float32 for p in head.parameters())
    expected = random_duration_head(head.config, seed=4).state_dict()
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_a_head_inside_a_whole_checkpoint_loads_and_reports_the_rest(tmp_path) -> None:
    """A whole LTX 2.4 file holds its head under model.diffusion_model.duration_head.: the head is read out of it
    (in float32 from a bf16 file), and the other weights are reported, not used."""
    head = random_duration_head(CONFIG, seed=5)
    tensors = {f"{PREFIXES[0]}{k}": v.to(torch.bfloat16) for k, v in head.state_dict().items()}
    tensors["model.diffusion_model.patchify_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    path = tmp_path / "ltx-2.4.safetensors"
    safetensors.torch.save_file(tensors, path)
    loaded = load_duration_head(load_state_dict(path), path)
    assert loaded.config == CONFIG
    assert loaded.unused_keys == ["model.diffusion_model.patchify_proj.weight"]
    assert loaded.mlp_out.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.mlp_out.weight, head.mlp_out.weight.to(torch.bfloat16).float())


def test_the_marker_and_broken_heads(tmp_path) -> None:
    assert not is_duration_head({"img_in.weight": torch.zeros(1), "query_tokens": torch.zeros(1)})
    assert is_duration_head({"x.duration_head.attention_pooler.query_tokens": torch.zeros(1)})
    weights = random_duration_head(CONFIG).state_dict()
    with pytest.raises(CheckpointError, match="h.safetensors: 1 weights missing .*mlp_out.bias"):
        load_duration_head({k: v for k, v in weights.items() if k != "mlp_out.bias"}, tmp_path / "h.safetensors")
    odd = DurationHeadConfig(video_dim=24, audio_dim=12, hidden=18, queries=1, mlp_hidden=8)
    with pytest.raises(CheckpointError, match="18 wide does not split into 4 attention heads"):
        duration_head_config(DurationHead(DurationHeadConfig(**{**odd.__dict__, "heads": 3})).state_dict())
