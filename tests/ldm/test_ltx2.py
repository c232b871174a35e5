"""LTX-2's audio-video transformer and text connectors (ldm/ltx2.py), in LTX-2.0's and LTX-2.3's layouts, against
diffusers 0.42.1's LTX2VideoTransformer3DModel and LTX2ConnectorTransformer1d, with identical random weights copied
across by `convert_diffusers_state_dict`, float32."""

import json
import math
from contextlib import contextmanager

import pytest
import torch
from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformer3DModel
from diffusers.pipelines.ltx2.connectors import LTX2ConnectorTransformer1d

from ldm.ltx2 import (
    MODEL_KEYS_PREFIX,
    LTX2Model,
    config_from_state_dict,
    convert_diffusers_state_dict,
    guide_attention_bias,
    is_ltx2,
    tiny_config,
    tiny_config_23,
)

TOL = 1e-4
CONFIGS = {"ltx2.0": tiny_config, "ltx2.3": tiny_config_23,
           "ltx2.0-interleaved": lambda: tiny_config(rope_type="interleaved")}  # ComfyUI's default without metadata


def _lively(module: torch.nn.Module, seed: int) -> None:
    """Random weights at 0.2 (the default init leaves modulation paths near zero), and ComfyUI's (and Loom's) q / k
    norm eps, 1e-5, where diffusers has 1e-6."""
    torch.manual_seed(seed)
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    for name, sub in module.named_modules():
        if name.endswith(("norm_q", "norm_k")):
            sub.eps = 1e-5


def _diffusers_transformer(c) -> LTX2VideoTransformer3DModel:
    ref = LTX2VideoTransformer3DModel(
        in_channels=c.in_channels, out_channels=c.out_channels, num_attention_heads=c.num_heads,
        attention_head_dim=c.head_dim, cross_attention_dim=c.inner_dim, audio_in_channels=c.audio_in_channels,
        audio_out_channels=c.audio_out_channels, audio_num_attention_heads=c.audio_num_heads,
        audio_attention_head_dim=c.audio_head_dim, audio_cross_attention_dim=c.audio_inner_dim, num_layers=c.depth,
        caption_channels=c.connector_dim, rope_type=c.rope_type, rope_double_precision=True,
        timestep_scale_multiplier=1000, cross_attn_timestep_scale_multiplier=1000,
        gated_attn=c.gated_attention, audio_gated_attn=c.gated_attention, cross_attn_mod=c.cross_attention_adaln,
        audio_cross_attn_mod=c.cross_attention_adaln, use_prompt_embeddings=c.caption_projection).eval()
    _lively(ref, 0)
    return ref


def _diffusers_connector(c, dim: int, heads: int, seed: int) -> LTX2ConnectorTransformer1d:
    ref = LTX2ConnectorTransformer1d(num_attention_heads=heads, attention_head_dim=dim // heads,
                                     num_layers=c.connector_depth, num_learnable_registers=c.connector_registers,
                                     rope_type=c.rope_type, rope_double_precision=True,
                                     gated_attention=c.connector_gated_attention).eval()
    _lively(ref, seed)
    return ref


@contextmanager
def _gates_from_other_stream(ref: LTX2VideoTransformer3DModel, video_max: float, audio_max: float):
    """diffusers with ComfyUI's av cross-attention gates: each driven by the other stream's largest level (diffusers
    takes the stream's own, or with use_cross_timestep the other's for the scale / shift too)."""
    originals = {}
    for name, level in (("av_cross_attn_video_a2v_gate", audio_max), ("av_cross_attn_audio_v2a_gate", video_max)):
        module = getattr(ref, name)
        originals[name] = forward = module.forward
        module.forward = (lambda t, *args, _f=forward, _v=level, **kw: _f(torch.full_like(t, _v), *args, **kw))
    try:
        yield
    finally:
        for name, forward in originals.items():
            getattr(ref, name).forward = forward


def _references(c):
    """(diffusers transformer, video connector, audio connector, Loom's model with their weights)."""
    ref = _diffusers_transformer(c)
    video = _diffusers_connector(c, c.connector_dim, c.connector_heads, 1)
    audio = _diffusers_connector(c, c.audio_connector_dim, c.audio_connector_heads, 2)
    sd = {**ref.state_dict(), **{f"video_connector.{k}": v for k, v in video.state_dict().items()},
          **{f"audio_connector.{k}": v for k, v in audio.state_dict().items()}}
    model = LTX2Model(c).eval()
    model.load_state_dict(convert_diffusers_state_dict(sd), strict=True)
    return ref, video, audio, model


@pytest.mark.parametrize("name", ["ltx2.0", "ltx2.3"])  # the RoPE type is the metadata's, not the weights'
def test_config_read_back_from_the_file_layout(name):
    c = CONFIGS[name]()
    sd = {MODEL_KEYS_PREFIX + k: v for k, v in LTX2Model(c).state_dict().items()}
    assert is_ltx2(sd, MODEL_KEYS_PREFIX)
    read = config_from_state_dict(sd, MODEL_KEYS_PREFIX, num_heads=2, audio_num_heads=2, connector_heads=2,
                                  audio_connector_heads=2)
    assert read == c
    meta = {"config": json.dumps({"transformer": {"rope_type": "interleaved", "frequencies_precision": "float32",
                                                  "av_ca_timestep_scale_multiplier": 1.0,
                                                  "connector_num_attention_heads": 4}})}
    told = config_from_state_dict(sd, MODEL_KEYS_PREFIX, 2, 2, metadata=meta)
    assert (told.rope_type, told.rope_float64, told.av_ca_timestep_scale) == ("interleaved", False, 1.0)
    assert (told.connector_heads, told.audio_connector_heads) == (4, 4)
    LTX2Model(read).load_state_dict({k[len(MODEL_KEYS_PREFIX):]: v for k, v in sd.items()}, strict=True)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_forward_matches_diffusers(name):
    c = CONFIGS[name]()
    ref, _, _, model = _references(c)
    torch.manual_seed(2)
    b, f, h, w, t, text = 2, 3, 4, 5, 7, 6
    video, audio = torch.randn(b, c.in_channels, f, h, w), torch.randn(b, 8, t, 16)
    v_ctx, a_ctx = torch.randn(b, text, c.connector_dim), torch.randn(b, text, c.audio_connector_dim)
    mask = torch.ones(b, text)
    mask[1, 4:] = 0
    # a keyframe guide as LTXVAddGuide appends one: the last latent frame's tokens told they are pixel frame 0
    coords = ref.rope.prepare_video_coords(b, f, h, w, "cpu", fps=24.0)
    guide = coords[:, :, :h * w].clone()
    guide[:, 0] *= 24.0
    guided = coords.clone()
    guided[:, :, -h * w:] = coords[:, :, :h * w]
    cases = ((torch.tensor([0.9, 0.35]), torch.tensor([0.7, 0.2]), None, None),
             (torch.rand(b, f * h * w), torch.rand(b, t), guide, guided))  # per latent pixel / frame
    worst = 0.0
    for v_t, a_t, keyframes, v_coords in cases:
        out_v, out_a = model(video, audio, v_t, a_t, v_ctx, a_ctx, mask, frame_rate=24.0, keyframe_idxs=keyframes)
        with _gates_from_other_stream(ref, v_t.max().item() * 1000, a_t.max().item() * 1000):
            exp_v, exp_a = ref(video.flatten(2).transpose(1, 2), audio.transpose(1, 2).flatten(2), v_ctx, a_ctx,
                               timestep=v_t * 1000, audio_timestep=a_t * 1000,
                               sigma=v_t.reshape(b, -1).amax(1) * 1000, audio_sigma=a_t.reshape(b, -1).amax(1) * 1000,
                               encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=f,
                               height=h, width=w, fps=24.0, audio_num_frames=t, video_coords=v_coords,
                               use_cross_timestep=False, return_dict=False)
        exp_v = exp_v.transpose(1, 2).reshape(out_v.shape)
        exp_a = exp_a.unflatten(-1, (8, 16)).transpose(1, 2)
        assert out_v.shape == video.shape and out_a.shape == audio.shape
        assert exp_v.abs().max() > 1 and exp_a.abs().max() > 1  # not a vacuous comparison
        worst = max(worst, (out_v - exp_v).abs().max().item(), (out_a - exp_a).abs().max().item())
    assert worst < TOL, worst  # measured: 5.7e-6 (2.0 and 2.3) on outputs up to 25


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_connectors_match_diffusers(name):
    c = CONFIGS[name]()
    _, ref_video, ref_audio, model = _references(c)
    torch.manual_seed(3)
    lengths, total = (5, 9), 1024  # diffusers' pipeline pads Gemma's prompt to 1024 tokens, on the left
    shared = c.caption_projection  # LTX-2.0: one feature set for both; LTX-2.3: each stream's, side by side
    width = c.connector_dim if shared else c.connector_dim + c.audio_connector_dim
    features = torch.randn(2, total, width)
    mask = torch.zeros(2, total)
    for i, n in enumerate(lengths):
        mask[i, total - n:] = 1
    bias = ((mask - 1) * torch.finfo(torch.float32).max)[:, None, None, :]
    v_in, a_in = (features, features) if shared else features.split([c.connector_dim, c.audio_connector_dim], -1)
    expected_v, _ = ref_video(v_in, bias)
    expected_a, _ = ref_audio(a_in, bias)
    video, audio, out_mask = model.preprocess_text_embeds(features, mask)
    assert out_mask is None and video.shape == (2, total, c.connector_dim)
    assert (video - expected_v).abs().max() < TOL and (audio - expected_a).abs().max() < TOL  # measured: 1.3e-6
    # ComfyUI's way: the prompt alone, padded to 1024 tokens with the registers
    alone, alone_a, _ = model.preprocess_text_embeds(features[1:, total - lengths[1]:])
    assert (alone - expected_v[1:]).abs().max() < TOL and (alone_a - expected_a[1:]).abs().max() < TOL


@torch.no_grad()
def test_odd_sizes_and_video_only():
    c = tiny_config()
    torch.manual_seed(4)
    model = LTX2Model(c).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    video, audio = torch.randn(1, c.in_channels, 3, 5, 7), torch.randn(1, 8, 11, 16)
    v_ctx, a_ctx, mask = model.preprocess_text_embeds(torch.randn(1, 13, c.connector_dim))
    assert v_ctx.shape == (1, 1024, c.connector_dim) and mask is None
    out_v, out_a = model(video, audio, torch.tensor([0.5]), None, v_ctx, a_ctx, mask, frame_rate=25.0)
    assert out_v.shape == video.shape and out_a.shape == audio.shape
    assert torch.isfinite(out_v).all() and torch.isfinite(out_a).all()
    only_v, no_a = model(video, None, torch.tensor([0.5]), None, v_ctx, None, mask)
    assert no_a is None and only_v.shape == video.shape and torch.isfinite(only_v).all()
    with pytest.raises(ValueError, match="timesteps"):
        model(video, audio, torch.rand(1, 7), None, v_ctx, a_ctx)


# --- keyframe guides' attention strength (ComfyUI's LTXVModel._build_guide_self_attention_mask) -------------------


def _hand_bias(strengths: list[list[float]], counts: list[int], tokens: int) -> torch.Tensor:
    """ComfyUI's rule written out token by token, in float64: log(strength) (or -finfo(float32).max at 0) between
    each token before the guides and each token of a guide, both ways; 0 elsewhere."""
    guide_tokens = sum(counts)
    start = tokens - guide_tokens
    bias = torch.zeros(len(strengths), 1, tokens, tokens, dtype=torch.float64)
    for b, item in enumerate(strengths):
        per_token = [s for s, n in zip(item, counts, strict=True) for _ in range(n)]
        for k, s in enumerate(per_token):
            value = math.log(s) if s > 0 else torch.finfo(torch.float32).min
            for i in range(start):
                bias[b, 0, i, start + k] = value
                bias[b, 0, start + k, i] = value
    return bias


def _per_token(counts: list[int], strengths: list[list[float]]) -> torch.Tensor:
    """[B, K, 2]: each guide token's (guide, weight), every token of a guide at its strength."""
    return torch.tensor([[[g, s] for g, (n, s) in enumerate(zip(counts, item, strict=True)) for _ in range(n)]
                         for item in strengths])


def test_guide_attention_bias_is_comfyuis_rule():
    counts, tokens = [4, 2], 11
    strengths = [[0.7, 0.0], [0.5, 1.0]]
    table = _per_token(counts, strengths)
    bias = guide_attention_bias(table, tokens, sum(counts), torch.float32)
    assert bias.shape == (2, 1, tokens, tokens) and bias.dtype == torch.float32
    torch.testing.assert_close(bias.double(), _hand_bias(strengths, counts, tokens), rtol=1e-7, atol=0)
    assert bias[0, 0, 0, 9].item() == torch.finfo(torch.float32).min  # strength 0: masked, as ComfyUI
    shared = guide_attention_bias(table[:1].expand(3, -1, -1), tokens, 6, torch.float32)
    assert shared.shape == (1, 1, tokens, tokens) and torch.equal(shared, bias[:1])  # one row for a batch that agrees
    half = guide_attention_bias(table, tokens, 6, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half[0, 0, 9, 0].item() == torch.finfo(torch.bfloat16).min
    assert half[0, 0, 0, 5].item() == torch.tensor(0.7, dtype=torch.bfloat16).log().item()  # log in the dtype
    table[..., 1] = 1.0
    assert guide_attention_bias(table, tokens, 6, torch.float32) is None  # all at strength 1: no bias at all
    with pytest.raises(ValueError, match=r"is not \[B, 5, 2\]"):
        guide_attention_bias(table, tokens, 5, torch.float32)


def _guided_inputs(c, b=2, f=4, h=3, w=2, t=5, text=6):
    """Video latents (their last 2 frames two guides' of h x w tokens each), audio latents, the two contexts."""
    torch.manual_seed(5)
    video, audio = torch.randn(b, c.in_channels, f, h, w), torch.randn(b, 8, t, 16)
    v_ctx, a_ctx = torch.randn(b, text, c.connector_dim), torch.randn(b, text, c.audio_connector_dim)
    return video, audio, v_ctx, a_ctx


@pytest.mark.parametrize("name", ["ltx2.0", "ltx2.3"])
@torch.no_grad()
def test_guide_attention_matches_diffusers_with_the_bias_injected(name):
    """Guides of strength 0.7 and 0.25 (item 0) and 0.5 and 1 (item 1) against diffusers 0.42.1 run in float64 with
    ComfyUI's bias, hand-built, passed as its video self-attention mask (diffusers adds (1 - m) * -10000 to the
    video self-attention's logits: m = 1 + bias / 10000); strength 1 throughout is bit-identical to no entries."""
    c = CONFIGS[name]()
    ref, _, _, model = _references(c)
    ref = ref.double()
    b, f, h, w, t = 2, 4, 3, 2, 5
    video, audio, v_ctx, a_ctx = _guided_inputs(c, b, f, h, w, t)
    v_t, a_t = torch.tensor([0.9, 0.35]), torch.tensor([0.7, 0.2])
    coords = ref.rope.prepare_video_coords(b, f, h, w, "cpu", fps=24.0)
    guided = coords.clone()
    guided[:, :, -2 * h * w:] = coords[:, :, :2 * h * w]  # both guides told they are the first latent frame
    keyframes = coords[:, :, :2 * h * w].clone()
    keyframes[:, 0] *= 24.0  # back to pixel frames, as keyframe_idxs hold them
    counts, strengths = [h * w, h * w], [[0.7, 0.25], [0.5, 1.0]]
    table = _per_token(counts, strengths)
    tokens = f * h * w
    out_v, out_a = model(video, audio, v_t, a_t, v_ctx, a_ctx, None, 24.0, keyframes, guide_attention=table)
    plain_v, _ = model(video, audio, v_t, a_t, v_ctx, a_ctx, None, 24.0, keyframes)
    with _gates_from_other_stream(ref, v_t.max().item() * 1000, a_t.max().item() * 1000):
        exp_v, exp_a = ref(video.flatten(2).transpose(1, 2).double(), audio.transpose(1, 2).flatten(2).double(),
                           v_ctx.double(), a_ctx.double(), timestep=v_t.double() * 1000,
                           audio_timestep=a_t.double() * 1000, sigma=v_t.double() * 1000,
                           audio_sigma=a_t.double() * 1000, num_frames=f, height=h, width=w, fps=24.0,
                           audio_num_frames=t, video_coords=guided.double(), use_cross_timestep=False,
                           video_self_attention_mask=1 + _hand_bias(strengths, counts, tokens)[:, 0] / 10000,
                           return_dict=False)
    exp_v = exp_v.transpose(1, 2).reshape(out_v.shape).float()
    exp_a = exp_a.unflatten(-1, (8, 16)).transpose(1, 2).float()
    assert exp_v.abs().max() > 1 and (out_v - plain_v).abs().max() > 1e-2  # the bias matters here
    worst = max((out_v - exp_v).abs().max().item(), (out_a - exp_a).abs().max().item())
    assert worst < TOL, worst  # measured: 1.0e-5 (2.0), 1.5e-5 (2.3) on outputs up to 11; the bias moves them by 0.5

    table[..., 1] = 1.0
    ones_v, ones_a = model(video, audio, v_t, a_t, v_ctx, a_ctx, None, 24.0, keyframes, guide_attention=table)
    assert torch.equal(ones_v, plain_v)
    with pytest.raises(ValueError, match="without the guides' keyframe_idxs"):
        model(video, audio, v_t, a_t, v_ctx, a_ctx, guide_attention=table)


def test_fp8_weights_are_the_blocks_alone():
    """--weights-dtype fp8 on the sampler's LTX-2 model stores its blocks' layers in fp8 and keeps the rest (the
    patchify and output projections, the timestep embedders, the connectors) in the model dtype, as Lightricks'
    fp8 files do."""
    from ldm.ltx2_files import LTX2Denoiser
    from ldm.quant import quantize_

    denoiser = quantize_(LTX2Denoiser(LTX2Model(tiny_config())), "fp8")
    kinds = {name: type(m).__name__ for name, m in denoiser.named_modules()}
    assert kinds["model.patchify_proj"] == kinds["model.adaln_single.linear"] == "Linear"
    assert kinds["model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q"] == "Linear"
    assert kinds["model.transformer_blocks.0.attn1.to_q"] != "Linear"
