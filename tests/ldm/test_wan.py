"""Wan's transformer against diffusers' WanTransformer3DModel (weights renamed by diffusers' own single-file
converter), its config and family read from the weights, and its files (bare, prefixed, fp8, refused ones)."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.embeddings import Timesteps

from ldm.checkpoint import CheckpointError
from ldm.wan import WanConfig, WanModel, is_wan, sinusoidal_embedding, wan_config_from_state_dict
from ldm.wan_files import (
    TINY_WAN,
    WAN21_MEAN,
    WAN22_STD,
    WanFamily,
    is_wan_file,
    load_wan_unet,
    peek_wan,
    random_wan,
    tiny_wan_config,
    write_tiny_wan,
)
from tests.ldm.flux_reference import random_flux

KINDS = ("t2v", "i2v", "flf2v", "ti2v")


def diffusers_twin(model: WanModel) -> WanTransformer3DModel:
    """diffusers' transformer with `model`'s weights, renamed by diffusers' converter (not by Loom's code). The
    converter has no rule for FLF2V's `img_emb.emb_pos` (diffusers' conversion script names it `pos_embed`). Its
    timestep sinusoid is Wan's float64 one: diffusers computes it in float32 (`test_timestep_embedding`)."""
    c = model.config
    image = c.image_input != "none"
    reference = WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_dim,
        out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
        cross_attn_norm=c.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=c.eps,
        image_dim=c.clip_dim if image else None, added_kv_proj_dim=c.dim if image else None,
        pos_embed_seq_len=c.flf_tokens if c.image_input == "flf2v" else None)
    state = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in model.state_dict().items()})
    state = {k.replace("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"): v for k, v in state.items()}
    reference.load_state_dict(state, strict=True)
    reference.condition_embedder.timesteps_proj.forward = lambda t: sinusoidal_embedding(t, c.freq_dim).float()
    return reference.eval()


def diffusers_call(reference: WanTransformer3DModel, x, sigma, context, clip_fea=None):
    """diffusers' transformer as WanPipeline calls it: the timestep is sigma * 1000, the prompt padded to 512
    tokens; FLF2V's two images' states go in as a batch of twice as many images (diffusers views them back)."""
    if clip_fea is not None and reference.config.pos_embed_seq_len is not None:
        clip_fea = clip_fea.reshape(-1, clip_fea.shape[1] // 2, clip_fea.shape[2])
    with torch.no_grad():
        return reference(x, sigma * 1000, context, encoder_hidden_states_image=clip_fea, return_dict=False)[0]


def _inputs(config: WanConfig, batch: int = 2, size: tuple[int, int, int] = (3, 4, 6), tokens: int = 512):
    g = torch.Generator().manual_seed(1)
    clip_tokens = config.flf_tokens if config.image_input == "flf2v" else 7
    return (torch.randn(batch, config.in_dim, *size, generator=g), torch.tensor([0.9, 0.3][:batch]),
            torch.randn(batch, tokens, config.text_dim, generator=g),
            torch.randn(batch, clip_tokens, config.clip_dim, generator=g) if config.image_input != "none" else None)


@pytest.fixture(scope="module")
def models():
    return {kind: random_wan(tiny_wan_config(kind), seed=3) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_matches_diffusers_transformer(models, kind: str) -> None:
    model = models[kind]
    x, sigma, context, clip_fea = _inputs(model.config)
    with torch.no_grad():
        ours = model(x, sigma, context, clip_fea=clip_fea)
    theirs = diffusers_call(diffusers_twin(model), x, sigma, context, clip_fea)
    assert ours.shape == (2, model.config.out_dim, 3, 4, 6)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_odd_sizes_are_padded_round_and_cropped(models) -> None:
    """Rows and columns not a multiple of the 2x2 patch: the latent is padded wrapping round (ComfyUI's
    pad_to_patch_size), run, and the prediction cropped back; diffusers, which takes whole patches only, sees the
    padded latent."""
    model = models["i2v"]
    x, sigma, context, clip_fea = _inputs(model.config, size=(2, 5, 7))
    with torch.no_grad():
        ours = model(x, sigma, context, clip_fea=clip_fea)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1, 0, 0), mode="circular")
    theirs = diffusers_call(diffusers_twin(model), padded, sigma, context, clip_fea)
    assert ours.shape == (2, 16, 2, 5, 7)
    torch.testing.assert_close(ours, theirs[..., :5, :7], atol=1e-5, rtol=1e-5)


def test_timestep_embedding() -> None:
    """Wan (and ComfyUI) make the sinusoid in float64; diffusers' float32 one differs by float32 rounding only."""
    t = torch.tensor([900.0, 300.0, 1.0])
    ours = sinusoidal_embedding(t, 256)
    assert ours.dtype == torch.float64 and ours.shape == (3, 256)
    theirs = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    torch.testing.assert_close(ours.float(), theirs, atol=2e-4, rtol=0)


def test_prompt_is_padded_to_512_tokens_and_y_carries_the_image_inputs(models) -> None:
    model = models["i2v"]
    x, sigma, context, clip_fea = _inputs(model.config, tokens=512)
    context[:, 20:] = 0
    with torch.no_grad():
        full = model(x, sigma, context, clip_fea=clip_fea)
        short = model(x, sigma, context[:, :20], clip_fea=clip_fea)
        as_y = model(x, sigma, context, y=clip_fea)  # Loom's sampler passes the CLIP states as the model's `y`
        concat = model(x[:, :16], sigma, context, y=x[:, 16:], clip_fea=clip_fea)  # Wan's own `y`
        no_image = model(x, sigma, context)
    torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-6)
    assert torch.equal(as_y, full) and torch.equal(concat, full)
    assert torch.isfinite(no_image).all() and (no_image - full).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"video latents \[B, 36, frames, h, w\].*16 latent channels, then 20"):
        model(x[:, :16], sigma, context)
    with pytest.raises(ValueError, match="the prompt is 5 wide"):
        model(x, sigma, context[..., :5])


def test_config_is_read_from_the_weights(models) -> None:
    for kind, model in models.items():
        sd = model.state_dict()
        assert is_wan(sd) and is_wan({"model.diffusion_model." + k for k in sd}, "model.diffusion_model.")
        assert wan_config_from_state_dict(sd, num_heads=2) == model.config == tiny_wan_config(kind)
        assert model.config.kind == kind
    with pytest.raises(ValueError, match="not a multiple of Wan's 128-wide heads"):
        wan_config_from_state_dict(models["t2v"].state_dict())
    assert not is_wan(random_flux().state_dict())
    # The released shapes, on the meta device: Wan 2.1 1.3B, 2.1 14B i2v 480p / 720p, 2.2 5B, 2.1 FLF2V 14B.
    released = [WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
                WanConfig(in_dim=36, image_input="i2v"),
                WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
                WanConfig(in_dim=36, image_input="flf2v")]
    for config in released:
        with torch.device("meta"):
            sd = WanModel(config).state_dict()
        assert wan_config_from_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()}) == config
    assert [c.rope_axes for c in released[:1]] == [(44, 42, 42)]  # Wan's split of a 128-wide head
    with pytest.raises(ValueError, match="a Wan S2V model"):  # VACE, Fun camera: their own test modules
        wan_config_from_state_dict({**models["t2v"].state_dict(), "casual_audio_encoder.weight": torch.zeros(1)})


def test_family() -> None:
    t2v, ti2v = WanFamily(TINY_WAN), WanFamily(tiny_wan_config("ti2v"))
    assert (t2v.name, t2v.latent_channels, t2v.prediction, t2v.shift) == ("wan21", 16, "flow", 8.0)
    assert t2v.latent_mean == WAN21_MEAN and len(t2v.latent_std) == 16 and t2v.latent_mean[7] == 1.5508
    assert (t2v.latent_scale_factor, t2v.latent_shift, t2v.zero_snr, t2v.edm, t2v.playground) == (1.0, 0.0, False,
                                                                                                  None, False)
    assert t2v.vae_config.z_channels == 16 and WanFamily(tiny_wan_config("i2v")).name == "wan21"
    assert (ti2v.name, ti2v.latent_channels, ti2v.latent_std) == ("wan22", 48, WAN22_STD)
    assert len(ti2v.latent_mean) == 48 and ti2v.latent_mean[19] == 0.5109 and ti2v.vae_config.z_channels == 48
    with pytest.raises(ValueError, match="no published latent statistics"):
        WanFamily(dataclasses.replace(TINY_WAN, out_dim=8))


@pytest.mark.parametrize("kind", KINDS)
def test_files_load_as_written(tmp_path, kind: str) -> None:
    path = write_tiny_wan(tmp_path / f"wan-{kind}.safetensors", kind, seed=5, dtype=torch.float32)
    loaded = load_wan_unet(path)
    assert loaded.family == peek_wan(path) == WanFamily(tiny_wan_config(kind)) and is_wan_file(path)
    assert not loaded.unused_keys and loaded.metadata["loom.wan_num_heads"] == "2"
    model = random_wan(tiny_wan_config(kind), seed=5)
    for (name, ours), theirs in zip(loaded.unet.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    x, sigma, context, clip_fea = _inputs(model.config, batch=1, tokens=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, sigma, context, clip_fea=clip_fea),
                                   model(x, sigma, context, clip_fea=clip_fea), atol=1e-6, rtol=1e-6)


def test_bare_keys_fp8_and_scaled_fp8(tmp_path) -> None:
    model = random_wan(TINY_WAN, seed=5)
    bare = write_tiny_wan(tmp_path / "bare.safetensors", seed=5, dtype=torch.float32, prefix="")
    fp8 = write_tiny_wan(tmp_path / "fp8.safetensors", seed=5, dtype=torch.float8_e4m3fn)
    assert not any(k.startswith("model.") for k in safetensors.torch.load_file(bare))
    assert load_wan_unet(bare).family == load_wan_unet(fp8).family
    loaded = load_wan_unet(fp8, dtype=torch.bfloat16)
    weight = loaded.unet.blocks[1].ffn[0].weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, model.blocks[1].ffn[0].weight.to(torch.float8_e4m3fn).to(torch.bfloat16))

    tensors = safetensors.torch.load_file(bare)
    for key in ("blocks.0.self_attn.q.weight", "blocks.1.ffn.2.weight"):
        scale = tensors[key].abs().max() / 448
        tensors[key] = (tensors[key] / scale).to(torch.float8_e4m3fn)
        tensors[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
    tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    safetensors.torch.save_file(tensors, tmp_path / "scaled.safetensors", metadata={"loom.wan_num_heads": "2"})
    scaled = load_wan_unet(tmp_path / "scaled.safetensors")
    assert scaled.unused_keys == []
    torch.testing.assert_close(scaled.unet.blocks[1].ffn[2].weight, model.blocks[1].ffn[2].weight, rtol=0.07,
                               atol=5e-3)
    x, sigma, context, _ = _inputs(TINY_WAN, batch=1, tokens=9)
    with torch.no_grad():
        reference, approx = model(x, sigma, context), scaled.unet(x, sigma, context)
    assert (approx - reference).abs().mean() < 0.05 * reference.abs().mean()


def test_wrong_files_are_refused_by_name(tmp_path) -> None:
    flux = tmp_path / "flux.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in random_flux().state_dict().items()}, flux)
    with pytest.raises(CheckpointError, match="flux.safetensors: not a Wan diffusion model"):
        load_wan_unet(flux)
    assert peek_wan(flux) is None and not is_wan_file(flux)

    path = write_tiny_wan(tmp_path / "wan.safetensors", dtype=torch.float32)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors: unreadable or truncated"):
        load_wan_unet(truncated)
    assert peek_wan(truncated) is None

    tensors = safetensors.torch.load_file(path)
    del tensors["model.diffusion_model.blocks.1.cross_attn.o.bias"]
    safetensors.torch.save_file(tensors, tmp_path / "broken.safetensors", metadata={"loom.wan_num_heads": "2"})
    with pytest.raises(CheckpointError, match="broken.safetensors: the Wan transformer is missing 1 weights: "
                                              "blocks.1.cross_attn.o.bias"):
        load_wan_unet(tmp_path / "broken.safetensors")
    safetensors.torch.save_file(tensors | {"model.diffusion_model.blocks.1.cross_attn.o.bias": torch.zeros(32)},
                                tmp_path / "no_heads.safetensors")
    with pytest.raises(CheckpointError, match="no_heads.safetensors: its width 32 is not a multiple"):
        peek_wan(tmp_path / "no_heads.safetensors")


def test_bfloat16_follows_float32(models) -> None:
    model = models["i2v"]
    x, sigma, context, clip_fea = _inputs(model.config)
    half = random_wan(tiny_wan_config("i2v"), seed=3).to(torch.bfloat16)
    with torch.no_grad():
        full, low = model(x, sigma, context, clip_fea=clip_fea), half(x, sigma, context, clip_fea=clip_fea)
    assert low.dtype == x.dtype
    assert (low - full).abs().mean() < 0.03 * full.abs().mean()


def _per_token(levels, tokens_per_frame: int):
    """Per-frame levels [B, T] as diffusers takes them for Wan 2.2 5B: one per token, [B, T * tokens_per_frame]."""
    return levels.repeat_interleave(tokens_per_frame, dim=1)


@pytest.mark.parametrize(("size", "patch"), [((3, 4, 6), (1, 2, 2)), ((2, 5, 7), (1, 2, 2)), ((4, 4, 4), (2, 2, 2))])
def test_frame_timesteps_match_diffusers_per_token_timesteps(size, patch) -> None:
    """Wan 2.2 5B's image-to-video: a noise level per latent frame ([B, T]), each token at its frame's, against
    diffusers given the same levels per token ([B, seq_len], as WanPipeline's `expand_timesteps` passes them).
    Odd sizes: diffusers sees the padded latent. Frames two to a patch (no released model's) take the patch's
    first frame's level, which diffusers is given for the whole patch."""
    model = random_wan(dataclasses.replace(tiny_wan_config("ti2v"), patch_size=patch), seed=3)
    x, _, context, _ = _inputs(model.config, size=size)
    levels = torch.tensor([[0.0, 0.9, 0.9, 0.7], [0.3, 0.6, 0.6, 0.0]])[:, :size[0]]
    with torch.no_grad():
        ours = model(x, levels, context)
        uniform = model(x, torch.tensor([0.9, 0.3]), context)
    padded = torch.nn.functional.pad(x, (0, -size[2] % 2, 0, -size[1] % 2, 0, 0), mode="circular")
    per_token = _per_token(levels[:, ::patch[0]], padded.shape[3] * padded.shape[4] // 4)
    theirs = diffusers_call(diffusers_twin(model), padded, per_token, context)[..., :size[1], :size[2]]
    assert ours.shape == (2, 48, *size) and ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - uniform).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-2  # every video's levels count


def test_one_level_per_video_equals_the_same_level_for_every_frame(models) -> None:
    model = models["ti2v"]
    x, sigma, context, _ = _inputs(model.config)
    with torch.no_grad():
        per_video = model(x, sigma, context)
        per_frame = model(x, sigma[:, None].expand(-1, 3), context)
        shared = model(x, torch.tensor([[0.6, 0.6, 0.6]]), context)  # one row of levels for the whole batch
        scalar = model(x, torch.tensor(0.6), context)
    # Equal but for float32 rounding: the time embedding's matmuls run over B * T rows instead of B.
    torch.testing.assert_close(per_frame, per_video, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared, scalar, atol=1e-5, rtol=1e-5)
    assert (per_frame - per_video).abs().max() < 1e-5 and per_video.abs().mean() > 0.1


def test_denoise_mask_gives_the_frames_levels(models) -> None:
    """ComfyUI's WAN22 model: each frame's level is the step's times the mask's mean over channels, rows and
    columns (the start image's frame at 0); the mask may be one for the batch or one per video."""
    model = models["ti2v"]
    x, sigma, context, _ = _inputs(model.config)
    start_frame = torch.ones(1, 1, 3, 4, 6)
    start_frame[:, :, 0] = 0
    half = torch.ones(2, 48, 3, 4, 6)  # frame 1 half kept (its left columns), second video's frame 2 all kept
    half[:, :, 1, :, :3] = 0
    half[1, :, 2] = 0
    with torch.no_grad():
        from_mask = model(x, sigma, context, denoise_mask=start_frame)
        explicit = model(x, torch.tensor([[0.0, 0.9, 0.9], [0.0, 0.3, 0.3]]), context)
        from_half = model(x, sigma, context, denoise_mask=half)
        explicit_half = model(x, torch.tensor([[0.9, 0.45, 0.9], [0.3, 0.15, 0.0]]), context)
        scalar = model(x, torch.tensor(0.9), context, denoise_mask=start_frame)
        explicit_scalar = model(x, torch.tensor([[0.0, 0.9, 0.9]]), context)
    assert torch.equal(from_mask, explicit) and torch.equal(from_half, explicit_half)
    assert torch.equal(scalar, explicit_scalar)
    with pytest.raises(ValueError, match=r"a denoise mask \[2 or 1, 1 or C, 3, h, w\] for this latent, not "
                                         r"\(1, 1, 2, 4, 6\)"):
        model(x, sigma, context, denoise_mask=start_frame[:, :, :2])
    with pytest.raises(ValueError, match=r"timesteps \(2, 3\) with a denoise mask"):
        model(x, explicit.new_ones(2, 3), context, denoise_mask=start_frame)
    with pytest.raises(ValueError, match=r"per-frame timesteps \[2, 3\] for this latent, not \(2, 4\)"):
        model(x, torch.ones(2, 4), context)
