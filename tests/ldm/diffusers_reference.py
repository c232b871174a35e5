"""Diffusers reference models built from our configs and loaded with our weights (test-only)."""

from __future__ import annotations

import warnings

import torch

from ldm.unet import UNetConfig
from ldm.vae import VAEConfig


def _depth(unet: UNetConfig) -> int | list[int]:
    """SD1/SD2 yamls give one depth for all attention levels (and the middle); SDXL gives a list."""
    depths = {d for d in unet.transformer_depth if d} | {unet.transformer_depth_middle}
    return depths.pop() if len(depths) == 1 else list(unet.transformer_depth)


def _original_config(unet: UNetConfig | None, vae: VAEConfig) -> dict:
    """The LDM yaml (as a dict) that diffusers' single-file helpers read."""
    params: dict = {"first_stage_config": {"params": {"ddconfig": {
        "ch": vae.ch, "ch_mult": list(vae.ch_mult), "in_channels": vae.in_channels,
        "out_ch": vae.out_ch, "z_channels": vae.z_channels, "num_res_blocks": vae.num_res_blocks}}}}
    if unet is not None:
        unet_params = {
            "in_channels": unet.in_channels, "out_channels": unet.out_channels,
            "model_channels": unet.model_channels, "channel_mult": list(unet.channel_mult),
            "num_res_blocks": unet.num_res_blocks, "context_dim": unet.context_dim,
            "attention_resolutions": [2 ** i for i, d in enumerate(unet.transformer_depth) if d],
            "transformer_depth": _depth(unet),
            "use_linear_in_transformer": unet.use_linear_in_transformer,
        }
        if unet.num_head_channels:
            unet_params["num_head_channels"] = unet.num_head_channels
        else:
            unet_params["num_heads"] = unet.num_heads
        if unet.adm_in_channels:
            unet_params.update(num_classes="sequential", adm_in_channels=unet.adm_in_channels)
        if unet.num_classes:
            unet_params["num_classes"] = unet.num_classes
        if unet.disable_self_attentions:
            unet_params["disable_self_attentions"] = list(unet.disable_self_attentions)
        params["unet_config"] = {"params": unet_params}
    return {"model": {"params": params}}


def diffusers_unet(config: UNetConfig, ldm_state: dict[str, torch.Tensor], unclip: bool = False):
    """A diffusers UNet2DConditionModel holding the weights of our UNet state dict; with `unclip`, its `y` as
    Stable unCLIP's (`class_embed_type="projection"`: the image embedding and noise level as class labels)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    with warnings.catch_warnings():  # passing image_size (to skip family sniffing) is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        original = _original_config(config, VAEConfig())
        dconf = create_unet_diffusers_config_from_ldm(original, {}, image_size=64)
    if config.adm_in_channels and not unclip:
        # diffusers only recognises SDXL by its 2048 context; tiny SDXL models need saying so.
        dconf.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    model = UNet2DConditionModel(**dconf)
    full = {f"model.diffusion_model.{k}": v for k, v in ldm_state.items()}
    converted = convert_ldm_unet_checkpoint(full, dconf)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def diffusers_vae(config: VAEConfig, ldm_state: dict[str, torch.Tensor]):
    """A diffusers AutoencoderKL holding the weights of our VAE state dict."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dconf = create_vae_diffusers_config_from_ldm(_original_config(None, config), {}, image_size=64,
                                                     scaling_factor=config.scaling_factor)
    model = AutoencoderKL(**dconf)
    full = {f"first_stage_model.{k}": v for k, v in ldm_state.items()}
    missing, unexpected = model.load_state_dict(convert_ldm_vae_checkpoint(full, dconf), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
