"""Z-Image diffusion-model files (ComfyUI's single files, z_image_turbo_bf16 and the like: the released keys, bare or
under `model.diffusion_model.`; bf16, fp16, fp8 and scaled fp8), their family, and tiny random files.

The family carries what the sampler needs beyond the weights: Z-Image's VAE is Flux's (its latent scale 0.3611 and
shift 0.1159, ComfyUI's Flux latent format), and the model samples on SD3's shifted flow levels,
`shift * t / (1 + (shift - 1) * t)` (ComfyUI's ModelSamplingAuraFlow, multiplier 1), at shift 3, ComfyUI's default
for the family (supported_models' ZImage) and the value its Z-Image-Turbo workflow sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import UNET_PREFIX, StateDict, write_safetensors
from ldm.flow_family import FlowFamily
from ldm.flux_files import FLUX_VAE, LATENT_SHIFT
from ldm.flux_presets import distinct_random_
from ldm.single_file_family import SingleFileFamily
from ldm.vae import VAEConfig
from ldm.z_image import UNUSED, ZImageConfig, ZImageModel, is_z_image, z_image_config_from_state_dict

Z_IMAGE_SHIFT = 3.0  # ComfyUI's sampling shift for Z-Image (SD3-style schedule, multiplier 1)
# Files Loom writes carry the RoPE split, which the weights cannot tell (the released model's heads are 128 wide).
AXES_KEY = "loom.z_image_axes"
# The MLP widths are diffusers' for this width (int(dim / 3 * 8); the timestep MLP 1024 wide at any width).
TINY_Z_IMAGE = ZImageConfig(num_layers=2, num_refiner_layers=1, num_heads=2, head_dim=16, cap_feat_dim=32,
                            ffn_hidden=85, t_hidden=1024, adaln_dim=32, axes_dim=(4, 6, 6))


@dataclass(frozen=True)
class ZImageFamily(FlowFamily):
    """A Z-Image model's family: its transformer's config and Flux's 16-channel latent space. Built as
    `ZImageFamily(config)`."""

    unet_config: ZImageConfig
    vae_config: VAEConfig = FLUX_VAE
    name: str = "z_image"
    latent_shift: float = LATENT_SHIFT

    @property
    def latent_channels(self) -> int:
        return self.unet_config.out_channels

    @property
    def shift(self) -> float:
        return Z_IMAGE_SHIFT


@dataclass
class LoadedZImage:
    family: ZImageFamily
    unet: ZImageModel
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def _family(weights: StateDict, axes: tuple[int, ...] | None, prefix: str) -> ZImageFamily:
    config = z_image_config_from_state_dict(weights, axes, prefix)
    if config.in_channels != FLUX_VAE.z_channels:
        raise ValueError(f"a model of {config.in_channels} latent channels; Z-Image's VAE (Flux's) makes 16")
    return ZImageFamily(config)


# The family of Z-Image weights (the RoPE split from Loom's metadata if saved); whether a file holds them; a file's
# family from its header alone.
FILES = SingleFileFamily("a Z-Image transformer", is_z_image, _family, AXES_KEY)
z_image_family, is_z_image_file, peek_z_image = FILES.family, FILES.is_file, FILES.peek


def load_z_image_unet(path: str | Path, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16) -> LoadedZImage:
    """Load a Z-Image diffusion-model file on `device` in `dtype` (fp8 and scaled fp8 weights cast as they load);
    keys the transformer does not use are listed as unused (not Lumina 2's final norm, which no one uses)."""
    path = Path(path)
    family, model, unused, metadata = FILES.load(
        path, lambda family: ZImageModel(family.unet_config), "Z-Image transformer", device, dtype, _refusal,
        lambda sd, prefix: (prefix + k for k in UNUSED))
    return LoadedZImage(family, model, unused, path, metadata)


def _refusal(sd: StateDict) -> str:
    looks = ("; it is a Lumina 2 transformer (no pad tokens), which Lumina 2's loader (ldm.lumina2_files) takes"
             if any(k.removeprefix(UNET_PREFIX) == "cap_embedder.1.weight" for k in sd) else "")
    return ("not a Z-Image diffusion model (no x_embedder / cap_pad_token / layers.0.attention.qkv weights in its "
            f"released layout){looks}")


def random_z_image(config: ZImageConfig = TINY_Z_IMAGE, seed: int = 0) -> ZImageModel:
    """A Z-Image transformer with seeded random weights, each distinct (`ldm.flux_presets.distinct_random_`; the
    RMS norms' weights near 1)."""
    return distinct_random_(ZImageModel(config).eval(), seed, norm_scales=(
        "norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight", "cap_embedder.0.weight"))


def write_tiny_z_image(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, prefix: str = "",
                       config: ZImageConfig = TINY_Z_IMAGE) -> Path:
    """Write a tiny random Z-Image transformer (prompt width 32 unless `config` says) in ComfyUI's single-file
    layout (its keys under `prefix`: bare, as Comfy-Org's files are), with the RoPE split in Loom's metadata;
    returns the path. Its images are noise."""
    model = random_z_image(config, seed)
    path = Path(path)
    write_safetensors({prefix + k: v for k, v in model.state_dict().items()}, path,
                      {AXES_KEY: ",".join(map(str, config.axes_dim)), "loom.seed": str(seed)}, dtype)
    return path
