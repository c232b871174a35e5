"""A tiny Flux transformer config for the tests, and diffusers' FluxTransformer2DModel with the same weights."""

from __future__ import annotations

import inspect

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import single_file_utils

from ldm import flux_presets
from ldm.flux import Flux, FluxConfig

TINY = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=24, context_dim=32, hidden_size=32, mlp_ratio=4.0,
                  num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6), guidance_embed=True)


def random_flux(config: FluxConfig = TINY, seed: int = 0) -> Flux:
    """ldm.flux_presets' seeded random transformer (every weight distinct), of the tests' tiny shape by default."""
    return flux_presets.random_flux(config, seed)


def _diffusers_conversion(inner_dim: int):
    """diffusers' own BFL -> diffusers conversion. It hard-codes Flux.1's width (inner_dim = 3072) where it splits
    the single blocks' fused linear1; the source is run as it is with that one number set to the tiny model's."""
    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in source
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)  # noqa: S102
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def diffusers_twin(model: Flux) -> FluxTransformer2DModel:
    """diffusers' transformer with `model`'s weights, renamed by diffusers' conversion (not by Loom's code)."""
    c = model.config
    reference = FluxTransformer2DModel(
        patch_size=1, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
        num_single_layers=c.depth_single_blocks, attention_head_dim=c.hidden_size // c.num_heads,
        num_attention_heads=c.num_heads, joint_attention_dim=c.context_dim, pooled_projection_dim=c.vec_in_dim,
        guidance_embeds=c.guidance_embed, axes_dims_rope=c.axes_dim)
    convert = _diffusers_conversion(c.hidden_size)
    state = convert({k: v.clone() for k, v in model.state_dict().items()})
    missing, unexpected = reference.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return reference.eval()


def diffusers_call(reference: FluxTransformer2DModel, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                   pooled: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
    """diffusers' transformer on a latent [B, C, H, W], packed, given positions and unpacked by FluxPipeline's own
    helpers, as the pipeline calls it (timestep and guidance as the pipeline passes them: sigma, and the scale)."""
    b, c, h, w = x.shape
    with torch.no_grad():
        out = reference(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), encoder_hidden_states=context,
                        pooled_projections=pooled, timestep=sigma, guidance=guidance,
                        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
                        txt_ids=torch.zeros(context.shape[1], 3), return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
