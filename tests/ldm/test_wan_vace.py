"""Wan 2.1 VACE against diffusers' WanVACETransformer3DModel (weights renamed by diffusers' own single-file
converter), several controls as ComfyUI runs them, its config read from the weights, and its files."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import WanVACETransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from ldm.checkpoint import CheckpointError
from ldm.wan import WanConfig, WanModel, sinusoidal_embedding, wan_config_from_state_dict
from ldm.wan_files import WanFamily, load_wan_unet, peek_wan, random_wan, tiny_wan_config, write_tiny_wan
from ldm.wan_vace import WanVaceModel, is_vace, wan_model

SIZE = (3, 4, 6)


def diffusers_twin(model: WanVaceModel) -> WanVACETransformer3DModel:
    """diffusers' VACE transformer with `model`'s weights, renamed by diffusers' converter (not by Loom's code), its
    timestep sinusoid Wan's float64 one (as tests/ldm/test_wan.py's twin)."""
    c = model.config
    reference = WanVACETransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_dim,
        out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
        cross_attn_norm=c.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=c.eps,
        vace_layers=list(c.vace_layers), vace_in_channels=c.vace_in_dim)
    state = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in model.state_dict().items()})
    reference.load_state_dict(state, strict=True)
    reference.condition_embedder.timesteps_proj.forward = lambda t: sinusoidal_embedding(t, c.freq_dim).float()
    return reference.eval()


def _inputs(config: WanConfig, controls: int = 1, batch: int = 2, size: tuple[int, int, int] = SIZE):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, config.in_dim, *size, generator=g), torch.tensor([0.9, 0.3][:batch]),
            torch.randn(batch, 512, config.text_dim, generator=g),
            torch.randn(batch, controls, config.vace_in_dim, *size, generator=g))


@pytest.fixture(scope="module")
def model() -> WanVaceModel:
    return random_wan(tiny_wan_config("vace"), seed=3)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_matches_diffusers_vace_transformer(model, strength: float) -> None:
    x, sigma, context, vace = _inputs(model.config)
    with torch.no_grad():
        ours = model(x, sigma, context, vace_context=vace, vace_strength=[strength])
        plain = model(x, sigma, context)
        scale = torch.full((len(model.config.vace_layers),), strength)  # diffusers: one per VACE block
        theirs = diffusers_twin(model)(x, sigma * 1000, context, control_hidden_states=vace[:, 0],
                                       control_hidden_states_scale=scale, return_dict=False)[0]
    assert ours.shape == (2, 16, *SIZE) and ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().mean() > 0.1 * plain.abs().mean()  # the control counts


def test_strength_zero_and_no_control_are_the_plain_wan_model(model) -> None:
    """Main weights drawn first (`random_wan`), so the plain model of the same seed and shape has the same ones."""
    plain_model = random_wan(dataclasses.replace(model.config, vace_layers=()), seed=3)
    assert type(plain_model) is WanModel and not is_vace(plain_model) and is_vace(model)
    x, sigma, context, vace = _inputs(model.config)
    with torch.no_grad():
        plain = plain_model(x, sigma, context)
        assert torch.equal(model(x, sigma, context, vace_context=vace, vace_strength=0.0), plain)
        assert torch.equal(model(x, sigma, context), plain)


def test_several_controls_add_their_hints(model) -> None:
    """ComfyUI's VaceWanModel: each control runs its own chain of VACE blocks from the video's tokens and adds its
    hints times its strength; so one control given twice at half strength is the control at full strength, a
    control at strength 0 is as if absent, and the controls' order does not matter."""
    x, sigma, context, vace = _inputs(model.config, controls=2)
    with torch.no_grad():
        first = model(x, sigma, context, vace_context=vace[:, :1], vace_strength=0.8)
        second = model(x, sigma, context, vace_context=vace[:, 1:], vace_strength=0.5)
        twice = model(x, sigma, context, vace_context=vace[:, [0, 0]], vace_strength=[0.4, 0.4])
        one_off = model(x, sigma, context, vace_context=vace, vace_strength=[0.8, 0.0])
        both = model(x, sigma, context, vace_context=vace, vace_strength=[0.8, 0.5])
        swapped = model(x, sigma, context, vace_context=vace.flip(1), vace_strength=[0.5, 0.8])
        shared = model(x, sigma, context, vace_context=vace[:1], vace_strength=[0.8, 0.5])  # one for the batch
    torch.testing.assert_close(twice, first, atol=1e-5, rtol=1e-5)
    assert torch.equal(one_off, first)
    torch.testing.assert_close(swapped, both, atol=1e-5, rtol=1e-5)
    assert (both - first).abs().mean() > 0.05 * first.abs().mean()
    assert (both - second).abs().mean() > 0.05 * second.abs().mean()
    torch.testing.assert_close(shared[:1], both[:1], atol=1e-6, rtol=1e-6)
    assert (shared[1] - both[1]).abs().max() > 1e-3


def test_per_frame_levels_and_odd_sizes(model) -> None:
    """Per-frame noise levels reach the VACE blocks as the main ones; rows and columns not a multiple of the patch
    pad the controls as the latent, and diffusers, which takes whole patches, sees both padded."""
    x, sigma, context, vace = _inputs(model.config, size=(2, 5, 7))
    with torch.no_grad():
        ours = model(x, sigma, context, vace_context=vace)
        per_frame = model(x, sigma[:, None].expand(-1, 2), context, vace_context=vace)
        pad = (0, 1, 0, 1, 0, 0)
        theirs = diffusers_twin(model)(torch.nn.functional.pad(x, pad, mode="circular"), sigma * 1000, context,
                                       control_hidden_states=torch.nn.functional.pad(vace[:, 0], pad, mode="circular"),
                                       return_dict=False)[0]
    assert ours.shape == (2, 16, 2, 5, 7)
    torch.testing.assert_close(ours, theirs[..., :5, :7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_frame, ours, atol=1e-5, rtol=1e-5)


def test_bad_controls_are_refused(model) -> None:
    x, sigma, context, vace = _inputs(model.config, controls=2)
    with pytest.raises(ValueError, match=r"VACE controls \[2 or 1, n, 96, 3, 4, 6\] for this latent, not "
                                         r"\(2, 2, 96, 3, 4, 5\)"):
        model(x, sigma, context, vace_context=vace[..., :5])
    with pytest.raises(ValueError, match=r"VACE controls .* not \(2, 96, 3, 4, 6\)"):
        model(x, sigma, context, vace_context=vace[:, 0])
    with pytest.raises(ValueError, match="3 VACE strengths for 2 controls"):
        model(x, sigma, context, vace_context=vace, vace_strength=[1.0, 1.0, 1.0])
    with pytest.raises(TypeError):  # the plain model takes no controls
        WanModel(dataclasses.replace(model.config, vace_layers=()))(x, sigma, context, controls=None)


def test_config_is_read_from_the_weights(model) -> None:
    assert wan_config_from_state_dict(model.state_dict(), num_heads=2) == model.config == tiny_wan_config("vace")
    assert model.config.vace_layers == (0, 2) and model.config.vace_in_dim == 96 and model.config.kind == "t2v"
    # The released shapes on the meta device: VACE 1.3B (15 VACE blocks, every 2nd of 30) and 14B (8, every 5th).
    released = {(1536, 8960, 12, 30): tuple(range(0, 30, 2)), (5120, 13824, 40, 40): tuple(range(0, 40, 5))}
    for (dim, ffn, heads, layers), feeds in released.items():
        config = WanConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, vace_layers=feeds)
        with torch.device("meta"):
            sd = wan_model(config).state_dict()
        assert wan_config_from_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()}) == config
        assert sum(k.endswith("before_proj.weight") for k in sd) == 1
        assert f"vace_blocks.{len(feeds) - 1}.after_proj.bias" in sd
    sd = model.state_dict()
    with pytest.raises(ValueError, match="an incomplete Wan transformer: no weight 'vace_patch_embedding.weight'"):
        wan_config_from_state_dict({k: v for k, v in sd.items() if not k.startswith("vace_patch")}, num_heads=2)
    with pytest.raises(ValueError, match="5 VACE blocks for 4 main blocks"):
        wan_config_from_state_dict({**sd, **{f"vace_blocks.{n}.after_proj.bias": torch.zeros(32) for n in (2, 3, 4)}},
                                   num_heads=2)
    with pytest.raises(ValueError, match="a text-to-video model's blocks, ascending from 0, of its 4"):
        dataclasses.replace(model.config, vace_layers=(1, 3))
    with pytest.raises(ValueError, match="names the main blocks its VACE blocks feed"):
        WanVaceModel(tiny_wan_config("t2v"))


def test_file_round_trip(tmp_path) -> None:
    path = write_tiny_wan(tmp_path / "wan-vace.safetensors", "vace", seed=5, dtype=torch.float32)
    loaded = load_wan_unet(path)
    assert isinstance(loaded.unet, WanVaceModel) and not loaded.unused_keys
    assert loaded.family == peek_wan(path) == WanFamily(tiny_wan_config("vace")) and loaded.family.name == "wan21"
    model = random_wan(tiny_wan_config("vace"), seed=5)
    for (name, ours), theirs in zip(loaded.unet.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    x, sigma, context, vace = _inputs(model.config, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, sigma, context[:, :9], vace_context=vace),
                                   model(x, sigma, context[:, :9], vace_context=vace), atol=1e-6, rtol=1e-6)

    tensors = safetensors.torch.load_file(path)
    del tensors["model.diffusion_model.vace_blocks.1.after_proj.weight"]
    safetensors.torch.save_file(tensors, tmp_path / "broken.safetensors", metadata={"loom.wan_num_heads": "2"})
    with pytest.raises(CheckpointError, match="broken.safetensors: the Wan transformer is missing 1 weights: "
                                              "vace_blocks.1.after_proj.weight"):
        load_wan_unet(tmp_path / "broken.safetensors")


def test_bfloat16_follows_float32(model) -> None:
    x, sigma, context, vace = _inputs(model.config)
    half = random_wan(tiny_wan_config("vace"), seed=3).to(torch.bfloat16)
    with torch.no_grad():
        full, low = model(x, sigma, context, vace_context=vace), half(x, sigma, context, vace_context=vace)
    assert low.dtype == x.dtype
    assert (low - full).abs().mean() < 0.03 * full.abs().mean()
