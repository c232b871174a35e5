"""LTX-Video's transformer against diffusers' LTXVideoTransformer3DModel (weights renamed by diffusers' own
single-file converter, latents packed and positions made by diffusers' pipelines), its config read from the
weights, its files, and its sampling levels against diffusers' scheduler."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers
from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline, calculate_shift
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXConditionPipeline

from ldm.checkpoint import UNET_PREFIX, CheckpointError, write_safetensors
from ldm.ltxv import LTXVConfig, LTXVModel, is_ltxv, latent_positions, ltxv_config_from_state_dict, rope_angles
from ldm.ltxv_files import (
    DEFAULT_SHIFT,
    LATENT_MEAN_KEY,
    LATENT_STD_KEY,
    TINY_LTXV,
    is_ltxv_file,
    load_ltxv_unet,
    ltxv_scheduler_sigmas,
    ltxv_shift,
    peek_ltxv,
    random_ltxv,
    write_tiny_ltxv,
)
from ldm.quant import is_fp8, quantize_fp8_
from nodes.sd.models import DiffusionModel

FRAMES, ROWS, COLS = 3, 4, 5


@pytest.fixture(scope="module")
def model():
    return random_ltxv(TINY_LTXV, seed=3)


@pytest.fixture(scope="module")
def reference(model):
    return _twin(model)


def _twin(model):
    """diffusers' transformer holding `model`'s weights, renamed by diffusers' single-file converter."""
    c = model.config
    twin = LTXVideoTransformer3DModel(
        in_channels=c.in_channels, out_channels=c.out_channels, num_attention_heads=c.num_heads,
        attention_head_dim=c.inner_dim // c.num_heads, cross_attention_dim=c.cross_attention_dim, num_layers=c.depth,
        caption_channels=c.caption_channels).eval()
    original = {UNET_PREFIX + k: v.clone() for k, v in model.state_dict().items()}  # an all-in-one file's keys
    twin.load_state_dict(convert_ltx_transformer_checkpoint_to_diffusers(original), strict=True)
    return twin


def _inputs(batch: int = 2, tokens: int = 7):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 128, FRAMES, ROWS, COLS, generator=g), torch.tensor([0.9, 0.3][:batch]),
            torch.randn(batch, tokens, TINY_LTXV.caption_channels, generator=g))


def _diffusers(reference, x, sigma, context, mask=None, frame_rate=25.0):
    """diffusers' transformer on packed latents at LTXConditionPipeline's positions (the causal first frame)."""
    batch = x.shape[0]
    ids = LTXConditionPipeline._scale_video_ids(LTXConditionPipeline._prepare_video_ids(batch, FRAMES, ROWS, COLS),
                                                scale_factor=32, scale_factor_t=8).float()
    ids[:, 0] = ids[:, 0] * (1.0 / frame_rate)
    mask = torch.ones(context.shape[:2]) if mask is None else mask
    with torch.no_grad():
        out = reference(LTXPipeline._pack_latents(x), context, sigma * 1000, mask, video_coords=ids,
                        return_dict=False)[0]
    return LTXPipeline._unpack_latents(out, FRAMES, ROWS, COLS)


@pytest.mark.parametrize("frame_rate", [25.0, 24.0])
def test_matches_diffusers_transformer(model, reference, frame_rate) -> None:
    x, sigma, context = _inputs()
    with torch.no_grad():
        ours = model(x, sigma, context, frame_rate=frame_rate)
    assert ours.shape == x.shape and ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, _diffusers(reference, x, sigma, context, frame_rate=frame_rate),
                               atol=1e-5, rtol=1e-5)


def test_text_mask_matches_diffusers_and_drops_the_masked_tokens(model, reference) -> None:
    x, sigma, context = _inputs()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        ours = model(x, sigma, context, attention_mask=mask)
        changed = context.clone()
        changed[0, 5:] += 5.0
        changed[1, 6] -= 3.0
        again = model(x, sigma, changed, attention_mask=mask.bool())
        unmasked = model(x, sigma, context)
    torch.testing.assert_close(ours, _diffusers(reference, x, sigma, context, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=1e-6)  # masked tokens count for nothing
    assert (unmasked - ours).abs().max() > 1e-3


def test_per_token_timesteps_match_diffusers(model, reference) -> None:
    """Image-to-video conditioning gives the first latent frame its own level (a denoise mask per latent pixel)."""
    x, _, context = _inputs()
    levels = torch.full((2, FRAMES, ROWS, COLS), 0.7)
    levels[:, 0] = torch.tensor([0.0, 0.2])[:, None, None]
    with torch.no_grad():
        ours = model(x, levels, context)
        uniform = model(x, torch.tensor([0.7, 0.7]), context)
    reference_out = _diffusers(reference, x, levels.flatten(1), context)
    torch.testing.assert_close(ours, reference_out, atol=1e-5, rtol=1e-5)
    assert (uniform - ours).abs().max() > 1e-3


@pytest.mark.parametrize("causal_fix", [True, False])
def test_rope_matches_diffusers(causal_fix) -> None:
    """Both of diffusers' position rules: LTXPipeline's `rope_interpolation_scale` (8 f / frame_rate) and the
    causal first frame of its LTXConditionPipeline (given as `video_coords`)."""
    dim, frame_rate = 2048, 24.0  # 2048 % 6 == 2: two unrotated leading channels, as in the 2B models
    rope = LTXVideoRotaryPosEmbed(dim)
    hidden = torch.zeros(1, FRAMES * ROWS * COLS, dim)
    if causal_fix:
        ids = LTXConditionPipeline._scale_video_ids(LTXConditionPipeline._prepare_video_ids(1, FRAMES, ROWS, COLS),
                                                    scale_factor=32, scale_factor_t=8).float()
        ids[:, 0] = ids[:, 0] / frame_rate
        cos, sin = rope(hidden, video_coords=ids)
    else:
        cos, sin = rope(hidden, FRAMES, ROWS, COLS, rope_interpolation_scale=(8 / frame_rate, 32, 32))
    ours = rope_angles(latent_positions(FRAMES, ROWS, COLS, frame_rate, causal_fix=causal_fix), dim)
    torch.testing.assert_close(ours[0], cos[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[1], sin[0], atol=1e-6, rtol=1e-5)


def test_positions_follow_the_causal_vae() -> None:
    positions = latent_positions(3, 1, 2, frame_rate=8.0).reshape(3, 1, 2, 3)
    # latent frame f covers video frames 8 f - 7 .. 8 f, the first frame alone: seconds (0, 1/8, 9/8)
    assert positions[:, 0, 0, 0].tolist() == [0.0, 0.125, 1.125]
    assert positions[0, 0, :, 2].tolist() == [0.0, 32.0]


def test_config_is_read_from_the_weights(model) -> None:
    sd = model.state_dict()
    assert is_ltxv(sd) and not is_ltxv(sd, UNET_PREFIX)
    assert ltxv_config_from_state_dict(sd) == TINY_LTXV
    assert not is_ltxv({**sd, "audio_patchify_proj.weight": sd["patchify_proj.weight"]})  # LTX-2's audio-video
    no_norm = {k: v for k, v in sd.items() if "_norm" not in k}
    assert ltxv_config_from_state_dict(no_norm).qk_norm is False
    with pytest.raises(ValueError, match="proj_out.weight"):
        ltxv_config_from_state_dict({k: v for k, v in sd.items() if not k.startswith("proj_out")})


def test_2b_shapes() -> None:
    """The 2B models' shapes, as Lightricks' files hold them, read back as the 2B config."""
    with torch.device("meta"):
        sd = LTXVModel(LTXVConfig()).state_dict()
    assert sd["transformer_blocks.27.scale_shift_table"].shape == (6, 2048)
    assert sd["adaln_single.emb.timestep_embedder.linear_1.weight"].shape == (2048, 256)
    assert sd["transformer_blocks.0.attn1.q_norm.weight"].shape == (2048,)
    assert ltxv_config_from_state_dict(sd) == LTXVConfig()


def test_bad_inputs_are_refused(model) -> None:
    x, sigma, context = _inputs()
    with pytest.raises(ValueError, match="video latents"):
        model(x[:, :16], sigma, context)
    with pytest.raises(ValueError, match="timesteps per video"):
        model(x, torch.rand(2, 5), context)
    with pytest.raises(ValueError, match="attention mask"):
        model(x, sigma, context, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="ControlNets"):
        model(x, sigma, context, control=[x])


def test_fp8_storage_runs_in_the_compute_dtype(model) -> None:
    quantized = quantize_fp8_(copy.deepcopy(model))
    assert is_fp8(quantized.transformer_blocks[0].attn1.to_q) and quantized.dtype == torch.float32
    x, sigma, context = _inputs()
    with torch.no_grad():
        out, full = quantized(x, sigma, context), model(x, sigma, context)
    assert out.dtype == torch.float32
    assert (out - full).abs().mean() < 0.05 * full.abs().mean()


def test_all_in_one_file_loads_with_the_vae_statistics(tmp_path, model) -> None:
    mean, std = torch.linspace(-1, 1, 128), torch.linspace(0.5, 2, 128)
    tensors = {UNET_PREFIX + k: v for k, v in model.state_dict().items()}
    tensors |= {LATENT_MEAN_KEY: mean, LATENT_STD_KEY: std, "vae.decoder.conv_in.conv.weight": torch.zeros(1),
                "model.diffusion_model.stray": torch.zeros(1)}
    path = tmp_path / "ltx-video-2b-v0.9.5.safetensors"
    write_safetensors(tensors, path, {})
    family = peek_ltxv(path)
    assert family.unet_config == TINY_LTXV and family.name == "ltxv" and family.prediction == "flow"
    assert family.shift == DEFAULT_SHIFT and family.latent_scale_factor == 1.0 and family.latent_channels == 128
    torch.testing.assert_close(torch.tensor(family.latent_mean), mean)
    loaded = load_ltxv_unet(path)
    assert loaded.family == family
    assert loaded.unused_keys == ["model.diffusion_model.stray"]  # the VAE's keys are the VAE loader's
    x, sigma, context = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, sigma, context), model(x, sigma, context), atol=0, rtol=0)
    # a MODEL's latents are the VAE's, normalised as diffusers' LTX pipelines normalise them
    wrapped = DiffusionModel(loaded.unet, family, path.name)
    expected = LTXPipeline._normalize_latents(x, mean, std)
    torch.testing.assert_close(wrapped.latent_in(x), expected)
    torch.testing.assert_close(wrapped.latent_out(expected), x, atol=1e-5, rtol=1e-5)


def test_tiny_and_bare_files(tmp_path, model) -> None:
    path = write_tiny_ltxv(tmp_path / "ltxv-tiny.safetensors", seed=3, dtype=torch.float32)
    assert is_ltxv_file(path)
    loaded = load_ltxv_unet(path)
    assert loaded.unused_keys == [] and loaded.family.latent_mean is None and loaded.metadata["loom.seed"] == "3"
    bare = tmp_path / "ltxv-transformer.safetensors"
    write_safetensors(model.state_dict(), bare, {}, torch.bfloat16)
    bare_loaded = load_ltxv_unet(bare, dtype=torch.bfloat16)
    assert bare_loaded.unet.dtype == torch.bfloat16 and peek_ltxv(bare).unet_config == TINY_LTXV
    x, sigma, context = _inputs(1)
    with torch.no_grad():
        out = bare_loaded.unet(x, sigma, context)
        full = loaded.unet(x, sigma, context)
        theirs = model(x, sigma, context)
    assert out.dtype == x.dtype
    torch.testing.assert_close(full, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, full, atol=0.1, rtol=0.05)


def test_tiny_all_in_one_file_with_the_vae(tmp_path) -> None:
    from ldm.ltxv_vae import LTXVVAE, TINY_LTXV_095  # the VAE's module: only this test needs it

    vae = LTXVVAE(TINY_LTXV_095)
    statistics = vae.per_channel_statistics
    statistics.get_buffer("mean-of-means").copy_(torch.linspace(-0.5, 0.5, 128))
    statistics.get_buffer("std-of-means").copy_(torch.linspace(0.25, 1.0, 128))
    path = write_tiny_ltxv(tmp_path / "ltx-video-tiny.safetensors", seed=2, vae=vae)
    loaded = load_ltxv_unet(path)
    assert loaded.unused_keys == [] and peek_ltxv(path) == loaded.family
    assert loaded.family.latent_std[0] == 0.25 and loaded.family.latent_mean[-1] == 0.5


def test_head_count_from_lightricks_metadata(tmp_path) -> None:
    """Lightricks' single files carry their configs as JSON metadata; the head count is read from it."""
    config = LTXVConfig(**{**TINY_LTXV.__dict__, "num_heads": 4})
    model = random_ltxv(config, seed=5)
    path = tmp_path / "ltxv-4-heads.safetensors"
    metadata = {"config": json.dumps({"transformer": {"num_attention_heads": 4, "attention_head_dim": 16}})}
    write_safetensors({UNET_PREFIX + k: v for k, v in model.state_dict().items()}, path, metadata)
    assert peek_ltxv(path).unet_config == config
    loaded = load_ltxv_unet(path)
    x, sigma, context = _inputs()
    with torch.no_grad():
        ours = loaded.unet(x, sigma, context)
    torch.testing.assert_close(ours, _diffusers(_twin(model), x, sigma, context), atol=1e-5, rtol=1e-5)


def test_scaled_fp8_file_loads_descaled(tmp_path, model) -> None:
    sd = model.state_dict()
    key = "transformer_blocks.0.attn1.to_q.weight"
    scale = torch.tensor(0.5)
    tensors = {k: (v / scale).to(torch.float8_e4m3fn) if k == key else v for k, v in sd.items()}
    tensors |= {key.replace(".weight", ".scale_weight"): scale, "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    path = tmp_path / "ltxv-fp8.safetensors"
    write_safetensors(tensors, path, {})
    loaded = load_ltxv_unet(path)
    assert loaded.unused_keys == []
    weight = loaded.unet.transformer_blocks[0].attn1.to_q.weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, sd[key], atol=0.1 * sd[key].abs().max().item(), rtol=0.07)


def test_other_files_are_refused(tmp_path) -> None:
    path = tmp_path / "not-ltxv.safetensors"
    write_safetensors({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(4)}, path, {})
    assert peek_ltxv(path) is None and not is_ltxv_file(path)
    with pytest.raises(CheckpointError, match="not an LTX-Video"):
        load_ltxv_unet(path)
    broken = tmp_path / "broken-ltxv.safetensors"
    sd = random_ltxv(TINY_LTXV).state_dict()
    write_safetensors({k: v for k, v in sd.items() if "blocks.1.ff" not in k}, broken, {})
    with pytest.raises(CheckpointError, match="missing 4 weights"):
        load_ltxv_unet(broken)


@pytest.mark.parametrize(("steps", "tokens"), [(20, 4096), (8, 3 * 16 * 24), (30, 13 * 16 * 24)])
def test_scheduler_matches_diffusers(steps, tokens) -> None:
    """LTXVScheduler's levels are diffusers' LTX scheduler config's: exponential dynamic shifting with mu on the
    line through (1024, 0.95) and (4096, 2.05), stretched to a terminal 0.1."""
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096,
        shift_terminal=0.1, time_shift_type="exponential")
    mu = calculate_shift(tokens, 1024, 4096, 0.95, 2.05)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert ltxv_shift(tokens) == pytest.approx(mu)
    ours = ltxv_scheduler_sigmas(steps, tokens=tokens)
    torch.testing.assert_close(ours, scheduler.sigmas, atol=2e-7, rtol=1e-6)
    assert ours[-2].item() == pytest.approx(0.1) and ours[-1].item() == 0.0


def test_scheduler_formulas() -> None:
    """The documented rules where diffusers has no counterpart: no stretch, custom shifts, one step."""
    assert ltxv_shift(1024) == pytest.approx(0.95) and ltxv_shift(4096) == pytest.approx(2.05)
    assert ltxv_shift(2560, max_shift=3.0, base_shift=1.0) == pytest.approx(2.0)
    plain = ltxv_scheduler_sigmas(4, stretch=False, tokens=4096)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    expected = torch.exp(torch.tensor(2.05)) / (torch.exp(torch.tensor(2.05)) + 1 / t - 1)
    torch.testing.assert_close(plain, torch.cat([expected, torch.zeros(1)]))
    stretched = ltxv_scheduler_sigmas(4, terminal=0.2, tokens=4096)
    torch.testing.assert_close(stretched[:-1], 1 - (1 - plain[:-1]) * 0.8 / (1 - plain[-2]))
    assert ltxv_scheduler_sigmas(1).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="terminal"):
        ltxv_scheduler_sigmas(4, terminal=1.0)
