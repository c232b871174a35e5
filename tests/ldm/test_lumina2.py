"""The Lumina 2 transformer (ldm.lumina2) against diffusers' Lumina2Transformer2DModel with the same weights, and its
files (bare, prefixed, the all-in-one checkpoint, fp8, refused ones). diffusers' single-file converter
(convert_lumina2_to_diffusers) renames every key but splits the fused q / k / v at the released 2.6B model's sizes
only, so the tiny model's q / k / v are split here and the rest goes through the converter. diffusers takes a padded
prompt with its mask, 1 - sigma, and predicts data - noise: it is fed and negated as Lumina2Pipeline does."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from diffusers import Lumina2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

from ldm.checkpoint import UNET_PREFIX, CheckpointError
from ldm.flux_files import LATENT_SHIFT
from ldm.lumina2 import Lumina2Config, Lumina2Model, lumina2_config_from_state_dict, position_ids
from ldm.lumina2_files import (
    TINY_LUMINA2,
    Lumina2Family,
    is_lumina2_checkpoint,
    is_lumina2_file,
    load_lumina2_checkpoint,
    load_lumina2_unet,
    peek_lumina2,
    random_lumina2,
    split_lumina2_checkpoint,
    write_tiny_lumina2,
    write_tiny_lumina2_checkpoint,
)
from ldm.z_image_files import is_z_image_file, load_z_image_unet, peek_z_image, write_tiny_z_image


@pytest.fixture(scope="module")
def model() -> Lumina2Model:
    return random_lumina2(TINY_LUMINA2, seed=0).float()


def diffusers_twin(model: Lumina2Model) -> Lumina2Transformer2DModel:
    """diffusers' transformer of `model`'s shape with its weights (ComfyUI's layout, q / k / v split here)."""
    c = model.config
    twin = Lumina2Transformer2DModel(in_channels=c.in_channels, hidden_size=c.dim, num_layers=c.num_layers,
                                     num_refiner_layers=c.num_refiner_layers, num_attention_heads=c.num_heads,
                                     num_kv_heads=c.num_kv_heads, multiple_of=16, axes_dim_rope=c.axes_dim,
                                     cap_feat_dim=c.cap_feat_dim).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    qkv = {k: sd.pop(k) for k in list(sd) if k.endswith("attention.qkv.weight")}
    weights = convert_lumina2_to_diffusers(sd)
    kv = c.num_kv_heads * c.head_dim
    for key, fused in qkv.items():
        name = key.replace("attention.qkv", "attn.to_{}")
        for part, tensor in zip("qkv", fused.split([c.dim, kv, kv]), strict=True):
            weights[name.format(part)] = tensor
    twin.load_state_dict(weights)
    return twin


def pipeline_call(twin: Lumina2Transformer2DModel, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """The velocity as Lumina2Pipeline gets it: t = 1 - sigma, negated."""
    mask = torch.ones(context.shape[:2], dtype=torch.long) if mask is None else mask
    return -twin(x, 1 - sigma, context, mask, return_dict=False)[0]


def inputs(h: int, w: int, tokens: int = 7, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, h, w, generator=g), torch.rand(batch, generator=g) * 0.8 + 0.1,
            torch.randn(batch, tokens, TINY_LUMINA2.cap_feat_dim, generator=g))


@pytest.mark.parametrize(("h", "w", "tokens"), [(8, 12, 7), (6, 10, 1), (16, 8, 40)])
def test_matches_diffusers(model, h, w, tokens):
    x, sigma, context = inputs(h, w, tokens)
    with torch.no_grad():
        ours = model(x, sigma, context)
        theirs = pipeline_call(diffusers_twin(model), x, sigma, context)
    assert theirs.abs().max() > 0.5
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_prompt_mask_matches_diffusers(model):
    """Only the real tokens count: a shared mask trims the prompt; different masks run one sample at a time (diffusers
    masks the padding in the context refiner and the joint attention)."""
    x, sigma, context = inputs(8, 10, tokens=9)
    twin = diffusers_twin(model)
    shared = torch.tensor([[1] * 6 + [0] * 3])
    different = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    with torch.no_grad():
        for mask in (shared, different):
            full = mask.expand(2, -1)
            torch.testing.assert_close(model(x, sigma, context, attn_mask=mask),
                                       pipeline_call(twin, x, sigma, context, full), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, sigma, context[:, :6]), model(x, sigma, context, attn_mask=shared))
        unmasked = model(x, sigma, context)
        torch.testing.assert_close(model(x, sigma, context, attn_mask=torch.zeros(1, 9)), unmasked)


def test_odd_latent_sizes_five_d_and_scalar_timestep(model):
    x, sigma, context = inputs(7, 9, batch=1)
    with torch.no_grad():
        out = model(x, sigma, context)
        assert out.shape == x.shape and torch.isfinite(out).all()
        torch.testing.assert_close(model(x[:, :, None], sigma[0], context), out[:, :, None])


def test_wrong_inputs_are_refused(model):
    x, sigma, context = inputs(8, 8)
    with pytest.raises(ValueError, match="Gemma-2-2B prompt states"):
        model(x, sigma, torch.zeros(2, 7, 2560))
    with pytest.raises(ValueError, match="Flux's VAE"):
        model(torch.zeros(2, 4, 8, 8), sigma, context)
    with pytest.raises(ValueError, match="attention mask"):
        model(x, sigma, context, attn_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="3 frames"):
        model(torch.zeros(2, 16, 3, 8, 8), sigma, context)


def test_positions():
    """Text at (j, 0, 0); the image at (text length, row, col)."""
    text, image = position_ids(3, 2, 3)
    assert text.tolist() == [[0, 0, 0], [1, 0, 0], [2, 0, 0]]
    assert image.tolist() == [[3, r, c] for r in range(2) for c in range(3)]


def test_config_from_weights(model):
    sd = model.state_dict()
    assert lumina2_config_from_state_dict(sd, TINY_LUMINA2.axes_dim) == TINY_LUMINA2
    with pytest.raises(ValueError, match="loom.lumina2_axes"):
        lumina2_config_from_state_dict(sd)
    with torch.device("meta"):
        released = Lumina2Model(Lumina2Config()).state_dict()
    assert lumina2_config_from_state_dict(released) == Lumina2Config()
    assert sum(v.numel() for v in released.values()) == pytest.approx(2.61e9, rel=0.01)
    with pytest.raises(ValueError, match="no weight"):
        lumina2_config_from_state_dict({k: v for k, v in sd.items() if k != "cap_embedder.1.weight"}, (4, 4, 4))

    c = Lumina2Config()
    assert (c.dim, c.context_dim, c.latent_channels, c.num_kv_heads) == (2304, 2304, 16, 8)


def test_family():
    family = Lumina2Family(TINY_LUMINA2)
    assert (family.name, family.prediction, family.latent_channels, family.shift) == ("lumina2", "flow", 16, 6.0)
    assert family.latent_scale_factor == 0.3611 and family.latent_shift == LATENT_SHIFT == 0.1159


@pytest.mark.parametrize("prefix", ["", UNET_PREFIX])
def test_file_round_trip(tmp_path, prefix):
    path = write_tiny_lumina2(tmp_path / "lumina_2_model_bf16.safetensors", seed=5, dtype=torch.float32,
                              prefix=prefix)
    assert is_lumina2_file(path) and not is_z_image_file(path) and peek_z_image(path) is None
    assert peek_lumina2(path) == Lumina2Family(TINY_LUMINA2)
    loaded = load_lumina2_unet(path, dtype=torch.float32)
    assert loaded.unused_keys == [] and loaded.family.unet_config == TINY_LUMINA2
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, sigma, context), random_lumina2(TINY_LUMINA2, 5)(x, sigma, context))


def test_checkpoint_round_trip_and_split(tmp_path):
    from ldm.gemma_text import is_gemma2

    path = write_tiny_lumina2_checkpoint(tmp_path / "lumina_2.safetensors", seed=3, dtype=torch.float32)
    sd = safetensors.torch.load_file(path)
    assert is_lumina2_checkpoint(sd) and is_lumina2_file(path) and not is_z_image_file(path)
    assert sd["text_encoders.spiece_model"].dtype == torch.uint8
    unet, vae, gemma = split_lumina2_checkpoint(sd)
    assert set(unet) == set(random_lumina2().state_dict()) | {"norm_final.weight"}
    assert "encoder.conv_in.weight" in vae and "decoder.conv_out.weight" in vae
    assert is_gemma2(gemma) and gemma["spiece_model"].dtype == torch.uint8
    loaded = load_lumina2_unet(path, dtype=torch.float32)
    assert loaded.unused_keys == []
    torch.testing.assert_close(loaded.unet.state_dict(), random_lumina2(TINY_LUMINA2, 3).state_dict())
    with pytest.raises(CheckpointError, match="outside its transformer"):
        split_lumina2_checkpoint({**sd, "cond_stage_model.x": torch.zeros(1)})

    whole = load_lumina2_checkpoint(path, dtype=torch.float32)
    assert whole.unused_keys == [] and whole.family == Lumina2Family(TINY_LUMINA2)
    assert whole.vae.config.z_channels == 16 and whole.text_encoder.main_encoder == "gemma2_2b"
    x, sigma, _ = inputs(8, 8, batch=1)
    with torch.no_grad():
        encoding = whole.text_encoder.encode(["a photo of a cat"])
        out = whole.unet(x, sigma, encoding.cond, attn_mask=encoding.extra["attention_mask"])
        assert out.shape == x.shape and torch.isfinite(out).all()
        latent = whole.vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1).mean
    assert latent.shape[1] == 16
    assert load_lumina2_checkpoint(path, dtype=torch.float32, text_encoder=False).text_encoder is None
    with pytest.raises(CheckpointError, match="not a Lumina 2 checkpoint"):
        load_lumina2_checkpoint(write_tiny_lumina2(tmp_path / "lumina_2_model_bf16.safetensors"))


def test_fp8_and_scaled_fp8_files_load(tmp_path):
    path = write_tiny_lumina2(tmp_path / "lumina_2_fp8_e4m3fn.safetensors", seed=1, dtype=torch.float8_e4m3fn)
    fp8 = safetensors.torch.load_file(path)
    weight = "layers.0.attention.qkv.weight"
    scaled = dict(fp8)
    scaled[weight] = (fp8[weight].float() / 4).to(torch.float8_e4m3fn)
    scaled[weight.replace(".weight", ".scale_weight")] = torch.tensor(4.0)
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    scaled_path = tmp_path / "lumina_2_scaled.safetensors"
    safetensors.torch.save_file(scaled, scaled_path, metadata=safetensors.safe_open(path, "pt").metadata())
    descaled = load_lumina2_unet(scaled_path, dtype=torch.float32)
    assert descaled.unused_keys == []
    torch.testing.assert_close(descaled.unet.state_dict()[weight], scaled[weight].float() * 4)
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        assert torch.isfinite(descaled.unet(x, sigma, context)).all()


def test_z_image_and_lumina2_do_not_claim_each_other(tmp_path):
    z_image = write_tiny_z_image(tmp_path / "z_image_turbo.safetensors")
    assert not is_lumina2_file(z_image) and peek_lumina2(z_image) is None
    with pytest.raises(CheckpointError, match="z_image_turbo.safetensors: not a Lumina 2 diffusion model.*Z-Image"):
        load_lumina2_unet(z_image)
    lumina = write_tiny_lumina2(tmp_path / "lumina_2_model_bf16.safetensors")
    with pytest.raises(CheckpointError, match="not a Z-Image diffusion model.*Lumina 2"):
        load_z_image_unet(lumina)
    sd = random_lumina2().state_dict()
    broken = tmp_path / "lumina_broken.safetensors"
    safetensors.torch.save_file({k: v for k, v in sd.items() if k != "layers.1.feed_forward.w2.weight"}, broken,
                                metadata={"loom.lumina2_axes": "4,4,4"})
    with pytest.raises(CheckpointError, match="missing 1 weights: layers.1.feed_forward.w2.weight"):
        load_lumina2_unet(broken)


def test_dtype_follows_the_load(tmp_path):
    """Loaded in bf16, the model computes in it and gives the fp32 model's output to its rounding."""
    path = write_tiny_lumina2(tmp_path / "l.safetensors", dtype=torch.float32)
    loaded = load_lumina2_unet(path, dtype=torch.bfloat16)
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        out = loaded.unet(x, sigma, context)
        exact = load_lumina2_unet(path, dtype=torch.float32).unet(x, sigma, context)
    assert loaded.unet.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert (out - exact).norm() < 0.05 * exact.norm()
