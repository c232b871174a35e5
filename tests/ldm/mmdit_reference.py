"""Tiny MMDiT configs for the tests (a small position table, to crop), and diffusers' SD3Transformer2DModel with
the same weights."""

from __future__ import annotations

import dataclasses

import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from ldm.mmdit import MMDiT, MMDiTConfig
from ldm.sd3_presets import random_mmdit

# SD3 medium's shape, tiny: one head per block, as Stability's rule has it.
TINY_SD3 = MMDiTConfig(in_channels=16, out_channels=16, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                       mlp_ratio=4.0, adm_in_channels=24, context_dim=40, pos_embed_max_size=8)
TINY_SD35_LARGE = dataclasses.replace(TINY_SD3, depth=3, num_heads=4, qk_norm=True)
TINY_SD35_MEDIUM = dataclasses.replace(TINY_SD3, depth=3, qk_norm=True, dual_attention_layers=(0, 1))
VARIANTS = {"sd3-medium": TINY_SD3, "sd3.5-large": TINY_SD35_LARGE, "sd3.5-medium": TINY_SD35_MEDIUM}
__all__ = ["TINY_SD3", "VARIANTS", "diffusers_call", "diffusers_twin", "random_mmdit"]


def diffusers_twin(model: MMDiT) -> SD3Transformer2DModel:
    """diffusers' transformer with `model`'s weights, renamed by diffusers' conversion (not by Loom's code)."""
    c = model.config
    reference = SD3Transformer2DModel(
        sample_size=c.pos_embed_max_size * c.patch_size, patch_size=c.patch_size, in_channels=c.in_channels,
        num_layers=c.depth, attention_head_dim=c.hidden_size // c.num_heads, num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_dim, caption_projection_dim=c.hidden_size,
        pooled_projection_dim=c.adm_in_channels, out_channels=c.out_channels, pos_embed_max_size=c.pos_embed_max_size,
        dual_attention_layers=c.dual_attention_layers, qk_norm="rms_norm" if c.qk_norm else None)
    state = convert_sd3_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v.clone() for k, v in model.state_dict().items()})
    missing, unexpected = reference.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return reference.eval()


def diffusers_call(reference: SD3Transformer2DModel, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                   pooled: torch.Tensor) -> torch.Tensor:
    """diffusers' transformer as StableDiffusion3Pipeline calls it: the timestep is sigma * 1000."""
    with torch.no_grad():
        return reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                         timestep=sigma * 1000, return_dict=False)[0]
