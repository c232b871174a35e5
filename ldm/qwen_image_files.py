"""Qwen-Image diffusion-model files (ComfyUI's single files, qwen_image_bf16 / qwen_image_fp8_e4m3fn: the released
keys, bare or under `model.diffusion_model.`; bf16, fp16, fp8 and scaled fp8), their family, and tiny random files.
Qwen-Image-Edit's and Edit-2509's files are the same keys; Edit-2511's add the empty `__index_timestep_zero__` marker.
Qwen-Image-Layered's (qwen_image_layered_bf16 / _fp8mixed) add `time_text_embed.addition_t_embedding.weight`, which
makes the loaded config `layered` (`ldm.qwen_image`); its VAE is Wan 2.1's made RGBA (`ldm.wan_vae`, 4 image
channels), with the same latent space.

The family carries what the sampler needs beyond the weights: Qwen-Image's VAE is Wan 2.1's (the same per-channel
latent mean and standard deviation: diffusers' AutoencoderKLQwenImage config, ComfyUI's Wan21 latent format), and
the model samples on SD3's shifted flow levels, `shift * t / (1 + (shift - 1) * t)` (ComfyUI's ModelSamplingAuraFlow,
a ModelSamplingDiscreteFlow with multiplier 1), at shift 3.1, the value ComfyUI's Qwen-Image workflows set. ComfyUI's
own default for a bare QwenImage model (supported_models: shift 1.15, Flux's exponential shift) is not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ldm.checkpoint import UNET_PREFIX, StateDict, write_safetensors
from ldm.flow_family import FlowFamily
from ldm.flux_presets import distinct_random_
from ldm.qwen_image import (
    ZERO_COND_KEY,
    QwenImageConfig,
    QwenImageModel,
    is_qwen_image,
    qwen_image_config_from_state_dict,
)
from ldm.single_file_family import SingleFileFamily
from ldm.vae import VAEConfig
from ldm.wan_files import WAN21_MEAN, WAN21_STD

QWEN_IMAGE_SHIFT = 3.1  # ModelSamplingAuraFlow's shift in ComfyUI's Qwen-Image workflows (SD3-style schedule)
# Files Loom writes carry the RoPE split, which the weights cannot tell (the released model's heads are 128 wide).
AXES_KEY = "loom.qwen_image_axes"
TINY_QWEN_IMAGE = QwenImageConfig(num_layers=2, num_heads=2, head_dim=16, joint_attention_dim=32, mlp_hidden=128,
                                  axes_dim=(4, 6, 6))
TINY_QWEN_IMAGE_LAYERED = replace(TINY_QWEN_IMAGE, layered=True)


@dataclass(frozen=True)
class QwenImageFamily(FlowFamily):
    """A Qwen-Image model's family: its transformer's config and Wan 2.1's 16-channel latent space (normalised per
    channel by `latent_mean` / `latent_std`, scale 1). `vae_config` only names the latent space for previews: the
    VAE is Wan 2.1's (`ldm.wan_vae`). Built as `QwenImageFamily(config)`."""

    unet_config: QwenImageConfig
    vae_config: VAEConfig = field(default_factory=lambda: VAEConfig(z_channels=16, scaling_factor=1.0))
    name: str = "qwen_image"
    latent_shift: float = 0.0
    latent_mean: tuple[float, ...] = WAN21_MEAN
    latent_std: tuple[float, ...] = WAN21_STD

    @property
    def latent_channels(self) -> int:
        return self.unet_config.out_channels

    @property
    def shift(self) -> float:
        return QWEN_IMAGE_SHIFT


@dataclass
class LoadedQwenImage:
    family: QwenImageFamily
    unet: QwenImageModel
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def _family(weights: StateDict, axes: tuple[int, ...] | None, prefix: str) -> QwenImageFamily:
    config = qwen_image_config_from_state_dict(weights, axes, prefix, layered=True)
    if config.out_channels != len(WAN21_MEAN):
        raise ValueError(f"a model of {config.out_channels} latent channels; Qwen-Image's VAE makes 16")
    return QwenImageFamily(config)


# The family of Qwen-Image weights (the RoPE split from Loom's metadata if saved); whether a file holds them; a file's
# family from its header alone.
FILES = SingleFileFamily("a Qwen-Image transformer", is_qwen_image, _family, AXES_KEY)
qwen_image_family, is_qwen_image_file, peek_qwen_image = FILES.family, FILES.is_file, FILES.peek


def _refusal(sd: StateDict) -> str:
    """Why a file is not a Qwen-Image transformer, naming what it looks like instead."""
    keys = {k.removeprefix(UNET_PREFIX) for k in sd}
    if "double_blocks.0.img_attn.qkv.weight" in keys:
        looks = "; it is a Flux transformer (load it as Flux)"
    elif "patch_embedding.weight" in keys and "blocks.0.cross_attn.q.weight" in keys:
        looks = "; it is a Wan video transformer (load it as Wan)"
    elif "txt_in.text_norm.weight" in keys:
        looks = "; it is a Qwen-Image 2.1 transformer, a different architecture Loom does not run"
    elif "joint_blocks.0.x_block.attn.qkv.weight" in keys:
        looks = "; it is an SD3 transformer"
    else:
        looks = ""
    return ("not a Qwen-Image diffusion model (no img_in / txt_norm / transformer_blocks.0.img_mod weights in its "
            f"released layout){looks}")


def load_qwen_image_unet(path: str | Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.bfloat16) -> LoadedQwenImage:
    """Load a Qwen-Image diffusion-model file on `device` in `dtype` (fp8 and scaled fp8 weights cast as they load);
    keys the transformer does not use are listed as unused (not Edit-2511's marker, which its config reads)."""
    path = Path(path)
    family, model, unused, metadata = FILES.load(
        path, lambda family: QwenImageModel(family.unet_config), "Qwen-Image transformer", device, dtype, _refusal,
        lambda sd, prefix: (prefix + ZERO_COND_KEY,))
    return LoadedQwenImage(family, model, unused, path, metadata)


def random_qwen_image(config: QwenImageConfig = TINY_QWEN_IMAGE, seed: int = 0) -> QwenImageModel:
    """A Qwen-Image transformer with seeded random weights, each distinct (`ldm.flux_presets.distinct_random_`; the
    RMS norms' weights near 1)."""
    return distinct_random_(QwenImageModel(config).eval(), seed, norm_scales=("norm.weight", "norm_q.weight",
                            "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight"))


def write_tiny_qwen_image(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                          prefix: str = "", config: QwenImageConfig = TINY_QWEN_IMAGE) -> Path:
    """Write a tiny random Qwen-Image transformer (prompt width 32) in ComfyUI's single-file layout (its keys under
    `prefix`: bare, as Comfy-Org's files are), with the RoPE split in Loom's metadata, and Edit-2511's marker for a
    `config` with zero_cond_t (a `layered` config writes Qwen-Image-Layered's extra weight); returns the path. Its
    images are noise."""
    model = random_qwen_image(config, seed)
    path = Path(path)
    marker = {ZERO_COND_KEY: torch.zeros(0)} if config.zero_cond_t else {}
    write_safetensors({prefix + k: v for k, v in {**model.state_dict(), **marker}.items()}, path,
                      {AXES_KEY: ",".join(map(str, config.axes_dim)), "loom.seed": str(seed)}, dtype)
    return path
