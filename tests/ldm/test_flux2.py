"""The FLUX.2 transformer (ldm.flux2) against diffusers' Flux2Transformer2DModel with the same weights, moved from
BFL's layout by diffusers' own single-file converter, fed as Flux2Pipeline feeds it (tokens, position ids, sigma,
guidance); and its files (bare, prefixed, bf16, fp8, scaled and mixed fp8, refused ones)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from ldm.checkpoint import UNET_PREFIX, CheckpointError
from ldm.flux2 import (
    FLUX2_DEV,
    FLUX2_KLEIN_4B,
    FLUX2_KLEIN_9B,
    Flux2,
    Flux2Config,
    flux2_config_from_state_dict,
    image_ids,
    reference_positions,
    text_ids,
)
from ldm.flux2_files import (
    TINY_FLUX2,
    TINY_FLUX2_KLEIN,
    Flux2Family,
    is_flux2_file,
    load_flux2_unet,
    peek_flux2,
    random_flux2,
    write_tiny_flux2,
)
from ldm.flux_files import is_flux_file, peek_flux
from ldm.flux_presets import random_flux
from ldm.flux_variants import References
from ldm.quant import quantize_fp8_

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def dev() -> Flux2:
    return random_flux2(TINY_FLUX2, seed=0).float()


@pytest.fixture(scope="module")
def klein() -> Flux2:
    return random_flux2(TINY_FLUX2_KLEIN, seed=1).float()


def diffusers_twin(model: Flux2) -> Flux2Transformer2DModel:
    """diffusers' transformer of `model`'s shape with its weights (BFL's layout through diffusers' converter)."""
    c = model.config
    twin = Flux2Transformer2DModel(in_channels=c.in_channels, num_layers=c.depth,
                                   num_single_layers=c.depth_single_blocks, attention_head_dim=c.head_dim,
                                   num_attention_heads=c.num_heads,
                                   joint_attention_dim=c.context_dim, mlp_ratio=c.mlp_hidden / c.hidden_size,
                                   axes_dims_rope=c.axes_dim, rope_theta=c.theta,
                                   guidance_embeds=c.guidance_embed).eval()
    converted = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in model.state_dict().items()})
    twin.load_state_dict(converted)
    return twin


def pipeline_call(twin: Flux2Transformer2DModel, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                  guidance: torch.Tensor | None = None, refs: tuple[torch.Tensor, ...] = (),
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """The velocity as Flux2Pipeline gets it: the latent's tokens then the references' (one batch row each, as the
    pipeline encodes them, repeated), its position ids, sigma, and the first tokens of the output."""
    batch, channels, h, w = x.shape
    tokens, ids = Flux2Pipeline._pack_latents(x), Flux2Pipeline._prepare_latent_ids(x)
    if refs:
        ref_tokens = torch.cat([Flux2Pipeline._pack_latents(r) for r in refs], dim=1).expand(batch, -1, -1)
        ref_ids = Flux2Pipeline._prepare_image_ids(list(refs)).expand(batch, -1, -1)
        tokens, ids = torch.cat([tokens, ref_tokens], dim=1), torch.cat([ids, ref_ids], dim=1)
    kwargs = None
    if mask is not None:
        joint = torch.cat([mask.bool(), torch.ones(batch, tokens.shape[1], dtype=torch.bool)], dim=1)
        kwargs = {"attention_mask": joint[:, None, None, :]}
    out = twin(hidden_states=tokens, encoder_hidden_states=context, timestep=sigma, img_ids=ids,
               txt_ids=Flux2Pipeline._prepare_text_ids(context), guidance=guidance, joint_attention_kwargs=kwargs,
               return_dict=False)[0]
    return out[:, : h * w].transpose(1, 2).reshape(batch, channels, h, w)


def inputs(h: int, w: int, tokens: int = 9, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 128, h, w, generator=g), torch.rand(batch, generator=g) * 0.8 + 0.1,
            torch.randn(batch, tokens, TINY_FLUX2.context_dim, generator=g))


@pytest.mark.parametrize("variant", ["dev", "klein"])
@pytest.mark.parametrize(("h", "w"), [(4, 4), (5, 7)])
def test_matches_diffusers(request, variant, h, w):
    model = request.getfixturevalue(variant)
    x, sigma, context = inputs(h, w)
    guidance = torch.tensor([3.5, 2.0]) if variant == "dev" else None
    with torch.no_grad():
        ours = model(x, sigma, context, None if guidance is None else guidance[:, None])
        theirs = pipeline_call(diffusers_twin(model), x, sigma, context, guidance)
    assert theirs.abs().max() > 0.5
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


def test_dev_without_guidance_runs_unguided(dev):
    """y None: no guidance embedding added (diffusers' guidance=None; ComfyUI's FluxDisableGuidance)."""
    x, sigma, context = inputs(4, 6)
    with torch.no_grad():
        unguided = dev(x, sigma, context)
        torch.testing.assert_close(unguided, pipeline_call(diffusers_twin(dev), x, sigma, context), **TOLERANCE)
        assert (unguided - dev(x, sigma, context, torch.full((2, 1), 3.5))).abs().max() > 1e-3


@pytest.mark.parametrize("count", [1, 2])
def test_references_match_diffusers(dev, count):
    """Reference latents (batch 1, each its own size) after the latent's tokens at times 10, 20 (Flux2Pipeline's
    placement, ComfyUI's "index"); only the latent's tokens come back."""
    x, sigma, context = inputs(5, 6)
    g = torch.Generator().manual_seed(7)
    refs = tuple(torch.randn(1, 128, *size, generator=g) for size in [(4, 6), (3, 5)][:count])
    guidance = torch.tensor([4.0, 2.5])
    with torch.no_grad():
        ours = dev(x, sigma, context, guidance[:, None], ref_latents=References(refs, "index"))
        theirs = pipeline_call(diffusers_twin(dev), x, sigma, context, guidance, refs)
        plain = dev(x, sigma, context, guidance[:, None], ref_latents=list(refs))  # a bare list: "index"
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    torch.testing.assert_close(plain, ours)
    assert (ours - dev(x, sigma, context, guidance[:, None])).abs().max() > 1e-3


def test_prompt_mask_matches_diffusers(klein):
    x, sigma, context = inputs(4, 5, tokens=8)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with torch.no_grad():
        ours = klein(x, sigma, context, attn_mask=mask)
        torch.testing.assert_close(ours, pipeline_call(diffusers_twin(klein), x, sigma, context, mask=mask),
                                   **TOLERANCE)
        # the masked tokens are ignored: any values there give the same
        padded = torch.where(mask[..., None].bool(), context, torch.full_like(context, 9.0))
        torch.testing.assert_close(klein(x, sigma, padded, attn_mask=mask), ours)
        assert (klein(x, sigma, padded) - ours).abs().max() > 1e-3
        torch.testing.assert_close(klein(x, sigma, context, attn_mask=torch.ones(1, 8)), klein(x, sigma, context))


def test_reference_methods(dev):
    """"index_timestep_zero" places references as "index", modulated at timestep 0: the same at sigma 0 only;
    "offset" and "uxo" place them as Flux.1 Kontext's methods do, one token per latent pixel."""
    x, _, context = inputs(4, 4)
    refs = (torch.randn(1, 128, 3, 4), torch.randn(2, 128, 4, 2))
    with torch.no_grad():
        for sigma, same in ((torch.zeros(2), True), (torch.full((2,), 0.6), False)):
            index = dev(x, sigma, context, ref_latents=References(refs, "index"))
            zero = dev(x, sigma, context, ref_latents=References(refs, "index_timestep_zero"))
            assert torch.allclose(index, zero, **TOLERANCE) == same
    assert reference_positions([(3, 4), (4, 2)], 4, 4, "index") == [(10, 0, 0), (20, 0, 0)]
    assert reference_positions([(3, 4), (4, 2)], 4, 4, "offset") == [(1, 0, 0), (1, 0, 4)]
    assert reference_positions([(3, 4), (4, 2)], 4, 4, "uxo") == [(0, 4, 4), (0, 7, 8)]


def test_positions():
    """Text token j at (0, 0, 0, j); image token (row, col) at (time, row, col, 0)."""
    assert text_ids(3).tolist() == [[0, 0, 0, j] for j in range(3)]
    assert image_ids(2, 3, 10, 1, 2).tolist() == [[10, 1 + r, 2 + c, 0] for r in range(2) for c in range(3)]


def test_wrong_inputs_are_refused(dev):
    x, sigma, context = inputs(4, 4)
    with pytest.raises(ValueError, match=r"prompt states \[B, L, 24\]"):
        dev(x, sigma, torch.zeros(2, 5, 4096))
    with pytest.raises(ValueError, match="FLUX.2 VAE"):
        dev(torch.zeros(2, 16, 8, 8), sigma, context)
    with pytest.raises(ValueError, match="guidance strength"):
        dev(x, sigma, context, torch.zeros(2, 769))
    with pytest.raises(ValueError, match="attention mask"):
        dev(x, sigma, context, attn_mask=torch.ones(2, 9, 9))
    with pytest.raises(ValueError, match="reference latent"):
        dev(x, sigma, context, ref_latents=[torch.zeros(1, 16, 4, 4)])


def test_config_from_weights(dev):
    sd = dev.state_dict()
    assert flux2_config_from_state_dict(sd, TINY_FLUX2.axes_dim) == TINY_FLUX2
    with pytest.raises(ValueError, match="loom.flux2_axes"):
        flux2_config_from_state_dict(sd)
    for released in (FLUX2_DEV, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B):
        with torch.device("meta"):
            weights = Flux2(released).state_dict()
        assert flux2_config_from_state_dict(weights) == released
    assert (FLUX2_DEV.context_dim, FLUX2_KLEIN_4B.context_dim, FLUX2_KLEIN_9B.context_dim) == (15360, 7680, 12288)


def test_unknown_layouts_are_refused(dev):
    sd = dev.state_dict()
    axes = TINY_FLUX2.axes_dim
    refusals = {"txt_norm": ({**sd, "txt_norm.scale": torch.ones(24)}, "txt_norm"),
                "vector_in": ({**sd, "vector_in.in_layer.weight": torch.zeros(64, 768)}, "vector_in"),
                "bias": ({**sd, "img_in.bias": torch.zeros(64)}, "biases"),
                "edit": ({**sd, "img_in.weight": torch.zeros(64, 256)}, "img_in takes 256 channels"),
                "missing": ({k: v for k, v in sd.items() if k != "txt_in.weight"}, "no weight 'txt_in.weight'")}
    for weights, message in refusals.values():
        with pytest.raises(ValueError, match=message):
            flux2_config_from_state_dict(weights, axes)


def test_family():
    family = Flux2Family(TINY_FLUX2)
    assert (family.name, family.prediction, family.latent_channels, family.shift) == ("flux2", "flow", 128, 2.02)
    assert family.latent_scale_factor == 1.0 and family.latent_shift == 0.0
    assert (family.variant, Flux2Family(TINY_FLUX2_KLEIN).variant) == ("dev", "klein")


@pytest.mark.parametrize("prefix", ["", UNET_PREFIX])
@pytest.mark.parametrize("config", [TINY_FLUX2, TINY_FLUX2_KLEIN])
def test_bf16_file_round_trip(tmp_path, prefix, config):
    path = write_tiny_flux2(tmp_path / "flux-2-klein.safetensors", seed=5, prefix=prefix, config=config)
    assert safetensors.torch.load_file(path)[prefix + "img_in.weight"].dtype == torch.bfloat16
    assert is_flux2_file(path)
    assert peek_flux2(path) == Flux2Family(config)
    loaded = load_flux2_unet(path, dtype=torch.float32)
    assert loaded.unused_keys == [] and loaded.family.unet_config == config
    x, sigma, context = inputs(4, 4)
    rounded = random_flux2(config, 5).bfloat16().float()
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, sigma, context), rounded(x, sigma, context))


def test_unused_keys_are_reported(tmp_path):
    path = write_tiny_flux2(tmp_path / "f.safetensors", prefix=UNET_PREFIX)
    extra = {**safetensors.torch.load_file(path), "model.diffusion_model.double_blocks.0.img_mod.lin.weight":
             torch.zeros(1), "vae.decoder.conv_in.weight": torch.zeros(1)}
    safetensors.torch.save_file(extra, tmp_path / "g.safetensors", metadata={"loom.flux2_axes": "4,4,4,4"})
    assert load_flux2_unet(tmp_path / "g.safetensors").unused_keys == [
        "model.diffusion_model.double_blocks.0.img_mod.lin.weight", "vae.decoder.conv_in.weight"]


def _tag(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def test_fp8_scaled_and_mixed_files_load(tmp_path):
    path = write_tiny_flux2(tmp_path / "flux-2-klein-9b-fp8.safetensors", seed=1, dtype=torch.float8_e4m3fn)
    fp8 = safetensors.torch.load_file(path)
    metadata = safetensors.safe_open(path, "pt").metadata()
    weight = "double_blocks.0.img_attn.qkv.weight"
    assert fp8[weight].dtype == torch.float8_e4m3fn
    loaded = load_flux2_unet(path, dtype=torch.float32).unet.state_dict()
    torch.testing.assert_close(loaded[weight], fp8[weight].float())
    # ComfyUI's scaled fp8 (`.scale_weight`, a `scaled_fp8` marker) and mixed precision (`.weight_scale` per row
    # beside a `.comfy_quant` tag, flux2_dev_fp8mixed's spelling, with an input scale)
    scaled = {**fp8, weight: (fp8[weight].float() / 4).to(torch.float8_e4m3fn),
              weight.replace(".weight", ".scale_weight"): torch.tensor(4.0),
              "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    rows = torch.linspace(0.5, 2.0, fp8[weight].shape[0])
    mixed = {**fp8, weight: (fp8[weight].float() / rows[:, None]).to(torch.float8_e4m3fn),
             weight.replace("weight", "weight_scale"): rows, weight.replace("weight", "input_scale"): torch.tensor(1.0),
             weight.replace("weight", "comfy_quant"): _tag("float8_e4m3fn")}
    for name, sd, scale in (("scaled", scaled, 4.0), ("mixed", mixed, rows[:, None])):
        safetensors.torch.save_file(sd, tmp_path / f"{name}.safetensors", metadata=metadata)
        loaded = load_flux2_unet(tmp_path / f"{name}.safetensors", dtype=torch.float32)
        assert loaded.unused_keys == []
        torch.testing.assert_close(loaded.unet.state_dict()[weight], sd[weight].float() * scale)
    mixed[weight.replace("weight", "comfy_quant")] = _tag("nvfp4")
    safetensors.torch.save_file(mixed, tmp_path / "nvfp4.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match="nvfp4"):
        load_flux2_unet(tmp_path / "nvfp4.safetensors")


def test_other_and_broken_files_are_refused(tmp_path):
    flux1 = tmp_path / "flux1-dev.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in random_flux().state_dict().items()}, flux1)
    assert not is_flux2_file(flux1) and peek_flux2(flux1) is None
    with pytest.raises(CheckpointError, match="flux1-dev.safetensors: not a FLUX.2 diffusion model"):
        load_flux2_unet(flux1)
    sd = random_flux2().state_dict()
    broken = tmp_path / "flux2_broken.safetensors"
    safetensors.torch.save_file({k: v for k, v in sd.items() if k != "single_blocks.1.linear2.weight"}, broken,
                                metadata={"loom.flux2_axes": "4,4,4,4"})
    with pytest.raises(CheckpointError, match="missing 1 weights: single_blocks.1.linear2.weight"):
        load_flux2_unet(broken)
    variant = tmp_path / "flux2_variant.safetensors"
    safetensors.torch.save_file({**sd, "txt_norm.scale": torch.ones(24)}, variant,
                                metadata={"loom.flux2_axes": "4,4,4,4"})
    with pytest.raises(CheckpointError, match="flux2_variant.safetensors: a transformer on FLUX.2's layout"):
        peek_flux2(variant)
    unsplit = tmp_path / "flux2_no_axes.safetensors"
    safetensors.torch.save_file(sd, unsplit)
    with pytest.raises(CheckpointError, match="16 wide"):
        load_flux2_unet(unsplit)


def test_flux1_probes_leave_flux2_files_alone(tmp_path):
    path = write_tiny_flux2(tmp_path / "flux-2-klein-4b.safetensors")
    assert not is_flux_file(path)
    assert peek_flux(path) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_follows_the_load(tmp_path, dtype):
    """Loaded in bf16 or fp16, the model computes in it and gives the fp32 model's output to its rounding."""
    path = write_tiny_flux2(tmp_path / "f.safetensors", dtype=torch.float32)
    loaded = load_flux2_unet(path, dtype=dtype)
    x, sigma, context = inputs(4, 4)
    with torch.no_grad():
        out = loaded.unet(x, sigma, context, torch.full((2, 1), 3.5))
        exact = load_flux2_unet(path, dtype=torch.float32).unet(x, sigma, context, torch.full((2, 1), 3.5))
    assert loaded.unet.dtype == dtype and out.dtype == torch.float32
    assert (out - exact).norm() < 0.05 * exact.norm()


def test_runs_with_fp8_weight_storage(dev):
    """Weights kept in fp8 (`ldm.quant`, --weights-dtype) change the output only by their rounding."""
    quantized = quantize_fp8_(random_flux2(TINY_FLUX2, seed=0))
    x, sigma, context = inputs(4, 4)
    with torch.no_grad():
        exact, rounded = dev(x, sigma, context), quantized(x, sigma, context)
    assert quantized.dtype == torch.float32 and quantized.single_blocks[0].linear1.weight.dtype == torch.float8_e4m3fn
    assert 0 < (exact - rounded).norm() < 0.1 * exact.norm()


def test_released_shapes():
    assert Flux2Config() == FLUX2_DEV and FLUX2_DEV.head_dim == 128 and FLUX2_DEV.latent_channels == 128
    assert not FLUX2_KLEIN_4B.guidance_embed and FLUX2_DEV.guidance_embed
