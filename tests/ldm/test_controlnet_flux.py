"""Flux ControlNets in diffusers' layout: a file written by diffusers' FluxControlNetModel loads into Loom's, whose
residuals, and the transformer's output with them, match diffusers' with the same weights; the refusals."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from diffusers import FluxControlNetModel, FluxPipeline

from ldm.checkpoint import CheckpointError
from ldm.controlnet import load_controlnet
from ldm.controlnet_flux import FluxControl, FluxControlNet, spread
from ldm.flux import FluxConfig
from ldm.sampling.flow import FlowSchedule
from tests.ldm.flux_reference import TINY, diffusers_twin, random_flux


def diffusers_controlnet(seed: int = 0, config: FluxConfig = TINY, num_mode: int | None = None) -> FluxControlNetModel:
    """diffusers' ControlNet (2 double blocks, 1 single block) for a transformer of `config`, every weight random;
    a Union with `num_mode` control modes."""
    model = FluxControlNetModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=config.context_dim,
                                pooled_projection_dim=config.vec_in_dim, guidance_embeds=True,
                                axes_dims_rope=TINY.axes_dim, num_mode=num_mode)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the zero-initialised output layers too
        for name, param in model.named_parameters():
            scale = 0.05 if param.ndim == 1 else param[0].numel() ** -0.5
            param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator) if "norm" in name
                        else scale * torch.randn(param.shape, generator=generator))
    return model.eval()


def write(model: FluxControlNetModel, path) -> None:
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def inputs(seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    x, hint = torch.randn(2, 16, 6, 8, generator=generator), torch.randn(2, 16, 6, 8, generator=generator)
    context = torch.randn(2, 5, TINY.context_dim, generator=generator)
    pooled = torch.randn(2, TINY.vec_in_dim, generator=generator)
    return x, hint, context, pooled, torch.tensor([0.8, 0.4]), torch.tensor([3.5, 2.0])


def pack(x: torch.Tensor) -> torch.Tensor:
    return FluxPipeline._pack_latents(x, *x.shape)


def test_residuals_and_guided_transformer_match_diffusers(tmp_path) -> None:
    reference = diffusers_controlnet()
    write(reference, tmp_path / "cn.safetensors")
    loaded = load_controlnet(tmp_path / "cn.safetensors")
    assert isinstance(loaded.model, FluxControlNet) and loaded.family == "flux" and loaded.unused_keys == []
    model = random_flux()  # 2 double and 2 single blocks: the ControlNet's one single residual serves both
    control = FluxControl(loaded.model, torch.zeros(1, 3, 48, 64), percent_range=(0.0, 0.5))
    assert control.fit(model, FlowSchedule(1.0)) is None  # the model's RoPE split, its block counts, its levels
    assert loaded.model.config.axes_dim == TINY.axes_dim and loaded.model.model_blocks == (2, 2)
    assert control.sigma_range == (FlowSchedule(1.0).sigma_at_percent(0.0), FlowSchedule(1.0).sigma_at_percent(0.5))
    x, hint, context, pooled, sigma, guidance = inputs(1)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    with torch.no_grad():
        doubles, singles = reference(hidden_states=pack(x), controlnet_cond=pack(hint), encoder_hidden_states=context,
                                     pooled_projections=pooled, timestep=sigma, guidance=guidance, img_ids=ids,
                                     txt_ids=torch.zeros(5, 3), return_dict=False)
        ours = loaded.model(x, hint, sigma, context, torch.cat([pooled, guidance[:, None]], dim=1), blocks=(2, 1))
    assert len(ours) == 3
    for mine, theirs in zip(ours, [*doubles, *singles], strict=True):
        assert theirs.abs().mean() > 0.05
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)

    transformer = diffusers_twin(model)
    y = torch.cat([pooled, guidance[:, None]], dim=1)
    with torch.no_grad():
        residuals = loaded.model(x, hint, sigma, context, y)  # spread over the fitted model's (2, 2) blocks
        guided = model(x, sigma, context, y, control=residuals)
        plain = model(x, sigma, context, y)
        expected = transformer(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=pooled,
                               timestep=sigma, guidance=guidance, img_ids=ids, txt_ids=torch.zeros(5, 3),
                               controlnet_block_samples=list(doubles), controlnet_single_block_samples=list(singles),
                               return_dict=False)[0]
    assert (guided - plain).abs().mean() > 1e-2
    torch.testing.assert_close(guided, FluxPipeline._unpack_latents(expected, 48, 64, 8), rtol=1e-5, atol=1e-5)


def test_spread_gives_each_residual_to_consecutive_blocks() -> None:
    a, b, c = (torch.full((1,), float(i)) for i in range(3))
    assert [float(t) for t in spread([a, b, c], 7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [float(t) for t in spread([a, b], 2)] == [0, 1] and spread([], 4) == []


def test_other_layouts_and_wrong_residuals_are_refused(tmp_path) -> None:
    xlabs = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32), "controlnet_blocks.0.weight":
             torch.zeros(32, 32), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}
    safetensors.torch.save_file(xlabs, tmp_path / "xlabs.safetensors")
    with pytest.raises(CheckpointError, match=r"xlabs.safetensors: an XLabs Flux ControlNet whose hint encoder has "
                                              r"convolutions \[0\], not"):
        load_controlnet(tmp_path / "xlabs.safetensors")
    x, _, context, pooled, sigma, _ = inputs(2)
    with pytest.raises(ValueError, match="takes a Flux ControlNet's residuals .* one per block"):
        random_flux()(x, sigma, context, pooled, control=[torch.zeros(2, 12, 32)])


def test_a_union_takes_its_control_mode_as_diffusers_does(tmp_path) -> None:
    """FLUX.1-dev-ControlNet-Union's layout: the mode embedded in front of the text tokens (diffusers'
    `controlnet_mode`); "auto" (no mode) adds no token, as ComfyUI runs it."""
    reference = diffusers_controlnet(seed=4, num_mode=7)
    write(reference, tmp_path / "union.safetensors")
    loaded = load_controlnet(tmp_path / "union.safetensors")
    assert isinstance(loaded.model, FluxControlNet) and loaded.model.modes == 7 and loaded.unused_keys == []
    assert FluxControl(loaded.model, torch.zeros(1, 3, 48, 64)).fit(random_flux(), FlowSchedule(1.0)) is None
    x, hint, context, pooled, sigma, guidance = inputs(5)
    y = torch.cat([pooled, guidance[:, None]], dim=1)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    with torch.no_grad():
        by_mode = {}
        for mode in (2, 5):
            doubles, singles = reference(
                hidden_states=pack(x), controlnet_cond=pack(hint), controlnet_mode=torch.tensor([[mode], [mode]]),
                encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma, guidance=guidance,
                img_ids=ids, txt_ids=torch.zeros(5, 3), return_dict=False)
            by_mode[mode] = loaded.model(x, hint, sigma, context, y, blocks=(2, 1), control_type=mode)
            for mine, theirs in zip(by_mode[mode], [*doubles, *singles], strict=True):
                # These residuals run to hundreds (the mode token's attention): 1e-5 of their scale.
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
        auto = loaded.model(x, hint, sigma, context, y, blocks=(2, 1))
    assert (by_mode[2][0] - by_mode[5][0]).abs().max() > 1e-3 and (by_mode[2][0] - auto[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="control mode 7 is not one of this Flux ControlNet Union's 7"):
        loaded.model(x, hint, sigma, context, y, control_type=7)
