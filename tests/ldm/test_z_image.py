"""The Z-Image transformer (ldm.z_image) against diffusers' ZImageTransformer2DModel with the same weights, converted
from ComfyUI's single-file layout by diffusers' own converter, and its files (bare, prefixed, fp8, scaled fp8,
refused ones). diffusers takes per-sample lists (latents [16, 1, H, W], the prompt's real tokens, 1 - sigma) and
predicts data - noise: it is fed and negated as ZImagePipeline does."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from diffusers import ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

from ldm.checkpoint import UNET_PREFIX, CheckpointError
from ldm.flux_files import LATENT_SHIFT
from ldm.flux_presets import random_flux
from ldm.quant import quantize_fp8_
from ldm.z_image import ZImageConfig, ZImageModel, position_ids, z_image_config_from_state_dict
from ldm.z_image_files import (
    TINY_Z_IMAGE,
    ZImageFamily,
    is_z_image_file,
    load_z_image_unet,
    peek_z_image,
    random_z_image,
    write_tiny_z_image,
)


@pytest.fixture(scope="module")
def model() -> ZImageModel:
    return random_z_image(TINY_Z_IMAGE, seed=0).float()


def diffusers_twin(model: ZImageModel) -> ZImageTransformer2DModel:
    """diffusers' transformer of `model`'s shape with its weights (ComfyUI's layout through diffusers' converter)."""
    c = model.config
    twin = ZImageTransformer2DModel(in_channels=c.in_channels, dim=c.dim, n_layers=c.num_layers,
                                    n_refiner_layers=c.num_refiner_layers, n_heads=c.num_heads,
                                    n_kv_heads=c.num_heads, cap_feat_dim=c.cap_feat_dim, axes_dims=list(c.axes_dim),
                                    axes_lens=[1024, 512, 512]).eval()
    weights = convert_z_image_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in model.state_dict().items()})
    twin.load_state_dict(weights)
    return twin


def pipeline_call(twin: ZImageTransformer2DModel, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """The velocity as ZImagePipeline gets it: per-sample latents and real tokens, t = 1 - sigma, negated."""
    mask = torch.ones(context.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    out = twin([s[:, None] for s in x], 1 - sigma, [c[m] for c, m in zip(context, mask, strict=True)],
               return_dict=False)[0]
    return -torch.stack(out)[:, :, 0]


def inputs(h: int, w: int, tokens: int = 7, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, h, w, generator=g), torch.rand(batch, generator=g) * 0.8 + 0.1,
            torch.randn(batch, tokens, TINY_Z_IMAGE.cap_feat_dim, generator=g))


# Prompts of 7 tokens (padded to 32), exactly 32, and 40 (two pads' worth); 6 x 10 makes 15 patches (padded to 32).
@pytest.mark.parametrize(("h", "w", "tokens"), [(8, 12, 7), (6, 10, 32), (16, 16, 40)])
def test_matches_diffusers(model, h, w, tokens):
    x, sigma, context = inputs(h, w, tokens)
    with torch.no_grad():
        ours = model(x, sigma, context)
        theirs = pipeline_call(diffusers_twin(model), x, sigma, context)
    assert theirs.abs().max() > 0.5
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_prompt_mask_matches_diffusers(model):
    """Only the real tokens count: a shared mask trims the prompt; different masks run one sample at a time."""
    x, sigma, context = inputs(8, 8, tokens=9)
    twin = diffusers_twin(model)
    shared = torch.tensor([[1] * 6 + [0] * 3])
    different = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    with torch.no_grad():
        for mask in (shared, different):
            full = mask.expand(2, -1)
            torch.testing.assert_close(model(x, sigma, context, attn_mask=mask),
                                       pipeline_call(twin, x, sigma, context, full), rtol=1e-5, atol=1e-5)
        # padding is ignored: the trimmed prompt gives the same as the padded one with its mask
        torch.testing.assert_close(model(x, sigma, context[:, :6]), model(x, sigma, context, attn_mask=shared))
        # a prompt that is all padding keeps its tokens (ComfyUI ignores the mask), alone or beside another
        unmasked = model(x, sigma, context)
        torch.testing.assert_close(model(x, sigma, context, attn_mask=torch.zeros(1, 9)), unmasked)
        torch.testing.assert_close(model(x, sigma, context, attn_mask=torch.tensor([[0] * 9, [1] * 9])), unmasked)


def test_odd_latent_sizes_five_d_and_scalar_timestep(model):
    x, sigma, context = inputs(7, 9, batch=1)
    with torch.no_grad():
        out = model(x, sigma, context)
        assert out.shape == x.shape and torch.isfinite(out).all()
        torch.testing.assert_close(model(x[:, :, None], sigma[0], context), out[:, :, None])


def test_wrong_inputs_are_refused(model):
    x, sigma, context = inputs(8, 8)
    with pytest.raises(ValueError, match="Qwen3-4B prompt states"):
        model(x, sigma, torch.zeros(2, 7, 4096))
    with pytest.raises(ValueError, match="Flux's VAE"):
        model(torch.zeros(2, 4, 8, 8), sigma, context)
    with pytest.raises(ValueError, match="attention mask"):
        model(x, sigma, context, attn_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="3 frames"):
        model(torch.zeros(2, 16, 3, 8, 8), sigma, context)


def test_positions():
    """Text at (1 + j, 0, 0), its pad tokens numbered on; the image at (padded text + 1, row, col), its pads at 0."""
    text, image = position_ids(3, 2, 3)
    assert text.shape == (32, 3) and text[:, 0].tolist() == list(range(1, 33)) and not text[:, 1:].any()
    assert image.shape == (32, 3)
    assert image[:6].tolist() == [[33, r, c] for r in range(2) for c in range(3)] and not image[6:].any()


def test_config_from_weights(model):
    sd = model.state_dict()
    assert z_image_config_from_state_dict(sd, TINY_Z_IMAGE.axes_dim) == TINY_Z_IMAGE
    with pytest.raises(ValueError, match="loom.z_image_axes"):
        z_image_config_from_state_dict(sd)
    with torch.device("meta"):
        released = ZImageModel(ZImageConfig()).state_dict()
    assert z_image_config_from_state_dict(released) == ZImageConfig()
    with pytest.raises(ValueError, match="Z-Image-Omni"):
        z_image_config_from_state_dict({**sd, "siglip_embedder.1.weight": torch.zeros(2, 2)}, (4, 6, 6))
    with pytest.raises(ValueError, match="no weight"):
        z_image_config_from_state_dict({k: v for k, v in sd.items() if k != "cap_embedder.1.weight"}, (4, 6, 6))


def test_family():
    family = ZImageFamily(TINY_Z_IMAGE)
    assert (family.name, family.prediction, family.latent_channels, family.shift) == ("z_image", "flow", 16, 3.0)
    assert family.latent_scale_factor == 0.3611 and family.latent_shift == LATENT_SHIFT == 0.1159


@pytest.mark.parametrize("prefix", ["", UNET_PREFIX])
def test_file_round_trip(tmp_path, prefix):
    path = write_tiny_z_image(tmp_path / "z_image_turbo.safetensors", seed=5, dtype=torch.float32, prefix=prefix)
    assert is_z_image_file(path)
    assert peek_z_image(path) == ZImageFamily(TINY_Z_IMAGE)
    loaded = load_z_image_unet(path, dtype=torch.float32)
    assert loaded.unused_keys == [] and loaded.family.unet_config == TINY_Z_IMAGE
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, sigma, context), random_z_image(TINY_Z_IMAGE, 5)(x, sigma, context))


def test_fp8_and_scaled_fp8_files_load(tmp_path):
    path = write_tiny_z_image(tmp_path / "z_image_turbo_fp8_e4m3fn.safetensors", seed=1, dtype=torch.float8_e4m3fn)
    fp8 = safetensors.torch.load_file(path)
    weight = "layers.0.attention.qkv.weight"
    assert fp8[weight].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(load_z_image_unet(path, dtype=torch.float32).unet.state_dict()[weight],
                               fp8[weight].float())
    # ComfyUI's scaled fp8: each weight stored divided by its `.scale_weight`, a `scaled_fp8` marker; Lumina 2's
    # unused final norm beside them.
    scaled = dict(fp8)
    scaled[weight] = (fp8[weight].float() / 4).to(torch.float8_e4m3fn)
    scaled[weight.replace(".weight", ".scale_weight")] = torch.tensor(4.0)
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    scaled["norm_final.weight"] = torch.ones(TINY_Z_IMAGE.dim)
    scaled_path = tmp_path / "z_image_scaled.safetensors"
    safetensors.torch.save_file(scaled, scaled_path, metadata=safetensors.safe_open(path, "pt").metadata())
    descaled = load_z_image_unet(scaled_path, dtype=torch.float32)
    assert descaled.unused_keys == []
    torch.testing.assert_close(descaled.unet.state_dict()[weight], scaled[weight].float() * 4)
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        assert torch.isfinite(descaled.unet(x, sigma, context)).all()


def test_other_and_broken_files_are_refused(tmp_path):
    flux = tmp_path / "flux1-dev.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in random_flux().state_dict().items()}, flux)
    assert not is_z_image_file(flux) and peek_z_image(flux) is None
    with pytest.raises(CheckpointError, match="flux1-dev.safetensors: not a Z-Image diffusion model"):
        load_z_image_unet(flux)
    sd = random_z_image().state_dict()
    lumina = tmp_path / "lumina_2.safetensors"
    safetensors.torch.save_file({k: v for k, v in sd.items() if not k.endswith("pad_token")}, lumina)
    with pytest.raises(CheckpointError, match="Lumina 2"):
        load_z_image_unet(lumina)
    broken = tmp_path / "z_image_broken.safetensors"
    safetensors.torch.save_file({k: v for k, v in sd.items() if k != "layers.1.feed_forward.w2.weight"}, broken,
                                metadata={"loom.z_image_axes": "4,6,6"})
    with pytest.raises(CheckpointError, match="missing 1 weights: layers.1.feed_forward.w2.weight"):
        load_z_image_unet(broken)
    omni = tmp_path / "z_image_omni.safetensors"
    safetensors.torch.save_file({**sd, "siglip_embedder.1.weight": torch.zeros(2, 2)}, omni,
                                metadata={"loom.z_image_axes": "4,6,6"})
    with pytest.raises(CheckpointError, match="z_image_omni.safetensors: a Z-Image-Omni"):
        peek_z_image(omni)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_follows_the_load(tmp_path, dtype):
    """Loaded in bf16 or fp16, the model computes in it and gives the fp32 model's output to its rounding."""
    path = write_tiny_z_image(tmp_path / "z.safetensors", dtype=torch.float32)
    loaded = load_z_image_unet(path, dtype=dtype)
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        out = loaded.unet(x, sigma, context)
        exact = load_z_image_unet(path, dtype=torch.float32).unet(x, sigma, context)
    assert loaded.unet.dtype == dtype and out.dtype == torch.float32
    assert (out - exact).norm() < 0.05 * exact.norm()


def test_runs_with_fp8_weight_storage(model):
    """Weights kept in fp8 (`ldm.quant`) change the output only by their rounding."""
    quantized = quantize_fp8_(random_z_image(TINY_Z_IMAGE, seed=0))
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        exact, rounded = model(x, sigma, context), quantized(x, sigma, context)
    assert quantized.dtype == torch.float32 and quantized.layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn
    assert 0 < (exact - rounded).norm() < 0.1 * exact.norm()  # e4m3 keeps 3 bits: a few percent per weight

    c = ZImageConfig()
    assert (c.dim, c.context_dim, c.latent_channels, c.axes_dim) == (3840, 2560, 16, (32, 48, 48))
