"""HiDream-I1 diffusion-model files (ComfyUI's single files, hidream_i1_full_fp16, hidream_i1_dev_bf16,
hidream_i1_fast_fp8 and the like: diffusers' keys, bare or under `model.diffusion_model.`; bf16, fp16, fp8 and scaled
fp8), their family, and tiny random files.

The family carries what the sampler needs beyond the weights: HiDream's VAE is Flux's (its latent scale 0.3611 and
shift 0.1159, ComfyUI's Flux latent format), and the model samples on SD3's shifted flow levels,
`shift * t / (1 + (shift - 1) * t)` (ComfyUI's ModelSamplingSD3, multiplier 1000 inside the model), at shift 3,
ComfyUI's default for the family (its workflows set 3.0 for full, 6.0 for dev and fast with ModelSamplingSD3).

What the weights cannot tell (the RoPE split of a head and the Llama layer each block reads) is the released
model's; files Loom writes carry theirs in metadata (`LAYOUT_KEY`: the three RoPE axes, then the Llama layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import StateDict, write_safetensors
from ldm.flux_files import FLUX_VAE
from ldm.flux_presets import distinct_random_
from ldm.hidream import HiDreamConfig, HiDreamModel, hidream_config_from_state_dict, is_hidream
from ldm.single_file_family import SingleFileFamily
from ldm.z_image_files import ZImageFamily

HIDREAM_SHIFT = 3.0  # ComfyUI's sampling shift for HiDream (SD3-style schedule)
LAYOUT_KEY = "loom.hidream_layout"
# Two double and two single blocks reading 4 Llama layers out of order, 4 experts of which 2 are active: widths
# that fit the tiny text encoders HiDream's tests use (T5 96 wide, Llama 32, CLIP-L's 32 and CLIP-G's 48 pooled).
# The SwiGLU widths are diffusers' rule for this width (a multiple of 256).
TINY_HIDREAM = HiDreamConfig(hidden_size=32, num_layers=2, num_single_layers=2, axes_dim=(8, 4, 4), t5_dim=96,
                             llama_dim=32, text_emb_dim=80, ffn_hidden=256, shared_hidden=256,
                             llama_layers=(3, 0, 2, 2))


@dataclass(frozen=True)
class HiDreamFamily(ZImageFamily):
    """A HiDream-I1 model's family: Z-Image's (its transformer's config, Flux's 16-channel latent space) under its own
    name and sampling shift. Built as `HiDreamFamily(config)`."""

    unet_config: HiDreamConfig
    name: str = "hidream"

    @property
    def shift(self) -> float:
        return HIDREAM_SHIFT


@dataclass
class LoadedHiDream:
    family: HiDreamFamily
    unet: HiDreamModel
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def _family(weights: StateDict, layout: tuple[int, ...] | None, prefix: str) -> HiDreamFamily:
    axes, layers = (None, None) if layout is None else (layout[:3], layout[3:])
    config = hidream_config_from_state_dict(weights, prefix, axes, layers)
    if config.in_channels != FLUX_VAE.z_channels:
        raise ValueError(f"a model of {config.in_channels} latent channels; HiDream's VAE (Flux's) makes 16")
    return HiDreamFamily(config)


# The family of HiDream weights (the RoPE split and Llama layers from Loom's metadata if saved); whether a file holds
# them; a file's family from its header alone.
FILES = SingleFileFamily("a HiDream-I1 transformer", is_hidream, _family, LAYOUT_KEY)
hidream_family, is_hidream_file, peek_hidream = FILES.family, FILES.is_file, FILES.peek


def load_hidream_unet(path: str | Path, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16) -> LoadedHiDream:
    """Load a HiDream-I1 diffusion-model file on `device` in `dtype` (fp8 and scaled fp8 weights cast as they
    load); keys the transformer does not use are listed as unused."""
    path = Path(path)
    family, model, unused, metadata = FILES.load(
        path, lambda family: HiDreamModel(family.unet_config), "HiDream transformer", device, dtype,
        lambda sd: "not a HiDream-I1 diffusion model (no x_embedder.proj / caption_projection / double_stream_blocks "
                   "weights in diffusers' layout)")
    return LoadedHiDream(family, model, unused, path, metadata)


def random_hidream(config: HiDreamConfig = TINY_HIDREAM, seed: int = 0) -> HiDreamModel:
    """A HiDream transformer with seeded random weights, each distinct (`ldm.flux_presets.distinct_random_`; the
    RMS norms' weights near 1)."""
    return distinct_random_(HiDreamModel(config).eval(), seed, norm_scales=("rms_norm.weight", "rms_norm_t.weight"))


def layout_metadata(config: HiDreamConfig) -> dict[str, str]:
    """The metadata that carries what the weights cannot tell, for files Loom writes."""
    return {LAYOUT_KEY: ",".join(map(str, (*config.axes_dim, *config.llama_layers)))}


def write_tiny_hidream(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, prefix: str = "",
                       config: HiDreamConfig = TINY_HIDREAM) -> Path:
    """Write a tiny random HiDream transformer (`TINY_HIDREAM` unless `config` says) in ComfyUI's single-file layout
    (its keys under `prefix`: bare, as Comfy-Org's files are), with its layout in Loom's metadata; returns the path.
    Its images are noise."""
    model = random_hidream(config, seed)
    path = Path(path)
    write_safetensors({prefix + k: v for k, v in model.state_dict().items()}, path,
                      {**layout_metadata(config), "loom.seed": str(seed)}, dtype)
    return path
