"""Diffusers' Stable Video Diffusion models holding our SGM-layout weights (test-only): the UNet as
`UNetSpatioTemporalConditionModel`, the VAE as `AutoencoderKLTemporalDecoder`, with the key conversion here
(diffusers has none for SVD's single files)."""

from __future__ import annotations

import re
import warnings

import torch

from ldm.unet import UNetConfig
from ldm.vae import VAEConfig
from tests.ldm.diffusers_reference import _original_config


def _split_resnet(key: str) -> str:
    """A converted res block key to the spatio-temporal block's: the temporal part's `time_stack.*` already renamed
    by diffusers' res block rules (norm1, conv1, time_emb_proj...) goes to `temporal_res_block`, the mixer stays,
    the rest is `spatial_res_block`."""
    match = re.match(r"((?:down_blocks|up_blocks)\.\d+\.resnets\.\d+\.|mid_block\.resnets\.\d+\.)(.*)", key)
    if match is None:
        return key
    prefix, rest = match.groups()
    if rest.startswith("time_stack."):
        return prefix + "temporal_res_block." + rest.removeprefix("time_stack.")
    if rest.startswith("time_mixer."):
        return key
    return prefix + "spatial_res_block." + rest


_TEMPORAL_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2"}


def _temporal_names(key: str) -> str:
    for ours, theirs in _TEMPORAL_RES.items():
        key = key.replace(f"temporal_res_block.{ours}.", f"temporal_res_block.{theirs}.")
    key = re.sub(r"\.time_stack\.(\d+)\.", r".temporal_transformer_blocks.\1.", key)
    return key.replace("time_pos_embed.0.", "time_pos_embed.linear_1.").replace(
        "time_pos_embed.2.", "time_pos_embed.linear_2.")


def diffusers_svd_unet(config: UNetConfig, sgm_state: dict[str, torch.Tensor], num_frames: int = 25):
    """UNetSpatioTemporalConditionModel with the weights of our SVDUNet state dict (SGM's keys)."""
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dconf = create_unet_diffusers_config_from_ldm(_original_config(config, VAEConfig()), {}, image_size=64)
    dconf.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    full = {f"model.diffusion_model.{k}": v for k, v in sgm_state.items()}
    converted = {_temporal_names(_split_resnet(k)): v for k, v in convert_ldm_unet_checkpoint(full, dconf).items()}
    heads = tuple(config.model_channels * m // config.num_head_channels for m in config.channel_mult)
    down = tuple("CrossAttnDownBlockSpatioTemporal" if d else "DownBlockSpatioTemporal"
                 for d in config.transformer_depth)
    up = tuple(t.replace("Down", "Up") for t in reversed(down))
    model = UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=config.in_channels, out_channels=config.out_channels, down_block_types=down,
        up_block_types=up, block_out_channels=tuple(config.model_channels * m for m in config.channel_mult),
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=config.adm_in_channels,
        layers_per_block=config.num_res_blocks, cross_attention_dim=config.context_dim,
        transformer_layers_per_block=1, num_attention_heads=heads, num_frames=num_frames)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    # diffusers builds the res blocks' group norms with eps 1e-6; SGM's (and ComfyUI's) are GroupNorm32's 1e-5.
    for name, module in model.named_modules():
        if "resnets" in name and isinstance(module, torch.nn.GroupNorm):
            module.eps = 1e-5
    return model.eval()


def diffusers_temporal_vae(config: VAEConfig, sgm_state: dict[str, torch.Tensor]):
    """AutoencoderKLTemporalDecoder with the weights of our VideoAutoencoder state dict (no quant convs: its
    quant_conv is made the identity)."""
    from diffusers import AutoencoderKLTemporalDecoder

    channels = tuple(config.ch * m for m in config.ch_mult)
    model = AutoencoderKLTemporalDecoder(
        in_channels=config.in_channels, out_channels=config.out_ch, block_out_channels=channels,
        layers_per_block=config.num_res_blocks, latent_channels=config.z_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), scaling_factor=config.scaling_factor)
    levels = len(channels)
    converted = {}
    for key, value in sgm_state.items():
        new = key
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                     lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                     lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", new)
        new = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", new)
        new = new.replace(".mid.attn_1.", ".mid_block.attentions.0.")
        new = new.replace("norm_out.", "conv_norm_out.").replace("nin_shortcut", "conv_shortcut")
        new = new.replace("decoder.conv_out.time_mix_conv.", "decoder.time_conv_out.")
        if new.startswith("decoder.") and "resnets." in new:
            head, _, rest = new.partition("resnets.")
            index, _, tail = rest.partition(".")
            if tail.startswith("time_stack."):
                tail = "temporal_res_block." + tail.removeprefix("time_stack.")
                for ours, theirs in _TEMPORAL_RES.items():
                    tail = tail.replace(f"temporal_res_block.{ours}.", f"temporal_res_block.{theirs}.")
            elif tail == "mix_factor":
                tail = "time_mixer.mix_factor"
            else:
                tail = "spatial_res_block." + tail
            new = f"{head}resnets.{index}.{tail}"
        attention = re.match(r"(.*attentions\.0\.)(norm|q|k|v|proj_out)\.(weight|bias)$", new)
        if attention:
            name = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
            new = f"{attention[1]}{name[attention[2]]}.{attention[3]}"
            value = value.flatten(1) if value.ndim == 4 else value
        converted[new] = value
    z = 2 * config.z_channels
    converted["quant_conv.weight"] = torch.eye(z)[:, :, None, None]
    converted["quant_conv.bias"] = torch.zeros(z)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()
