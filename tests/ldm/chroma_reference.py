"""A tiny Chroma transformer for the tests, and diffusers' ChromaTransformer2DModel with the same weights."""

from __future__ import annotations

import inspect

import torch
from diffusers import ChromaTransformer2DModel, FluxPipeline
from diffusers.loaders import single_file_utils

from ldm.chroma_files import TINY_CHROMA, random_chroma

__all__ = ["TINY_CHROMA", "diffusers_call", "diffusers_twin", "random_chroma"]


def _diffusers_conversion(inner_dim: int):
    """diffusers' own single-file Chroma conversion, which hard-codes Chroma's width (inner_dim = 3072) where it
    splits the single blocks' fused linear1; its source is run as it is with that number set to the tiny model's."""
    source = inspect.getsource(single_file_utils.convert_chroma_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in source
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)  # noqa: S102
    return namespace["convert_chroma_transformer_checkpoint_to_diffusers"]


def diffusers_twin(model) -> ChromaTransformer2DModel:
    """diffusers' transformer with `model`'s weights, renamed by diffusers' conversion (not by Loom's code). Its
    approximator's RMS norms get the 1e-6 epsilon of lodestones' and ComfyUI's code (diffusers leaves torch's
    default, the dtype's machine epsilon)."""
    c = model.config
    reference = ChromaTransformer2DModel(
        patch_size=1, in_channels=4 * c.in_channels, out_channels=4 * c.out_channels, num_layers=c.depth,
        num_single_layers=c.depth_single_blocks, attention_head_dim=c.hidden_size // c.num_heads,
        num_attention_heads=c.num_heads, joint_attention_dim=c.context_dim, axes_dims_rope=c.axes_dim,
        approximator_num_channels=c.approximator_in, approximator_hidden_dim=c.approximator_hidden,
        approximator_layers=c.approximator_layers)
    for norm in reference.distilled_guidance_layer.norms:
        norm.eps = 1e-6
    convert = _diffusers_conversion(c.hidden_size)
    state = convert({k: v.clone() for k, v in model.state_dict().items()})
    missing, unexpected = reference.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return reference.eval()


def diffusers_call(reference: ChromaTransformer2DModel, x: torch.Tensor, sigma: torch.Tensor,
                   context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' transformer on a latent [B, C, H, W], packed and given positions by FluxPipeline's helpers (which
    ChromaPipeline's are copies of), as ChromaPipeline calls it; `mask` [B, L_text] bool, extended over the image
    tokens as the pipeline extends it."""
    b, c, h, w = x.shape
    if mask is not None:
        mask = torch.cat([mask, torch.ones(b, (h // 2) * (w // 2), dtype=torch.bool)], dim=1)
    with torch.no_grad():
        out = reference(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), encoder_hidden_states=context,
                        timestep=sigma, img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device,
                                                                                        x.dtype),
                        txt_ids=torch.zeros(context.shape[1], 3), attention_mask=mask, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
