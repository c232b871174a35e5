"""HunyuanImage 2.1 diffusion-model files, their family, the denoiser the sampler calls, and tiny files for tests.

Files: Comfy-Org's repackaged transformers (`hunyuanimage2.1_bf16.safetensors`, the distilled copies): Tencent's names
with q/k/v fused, bare or under `model.diffusion_model.` (`ldm.hunyuan_image21` holds the model and also reads
diffusers' and Tencent's own layouts). The refiner (`hunyuanimage2.1_refiner_bf16`, 128 input channels, a video-like
latent of the refiner VAE's) is refused by name: Loom does not run it yet.

Sampling (ComfyUI's HunyuanImage21): rectified flow on SD3's shifted levels, shift 5, the model told sigma x 1000;
latents are the VAE's 64 channels at 1/32 of the picture, times 0.75289 (ComfyUI's HunyuanImage21 latent format;
`ldm.hunyuan_image21_vae`). The prompt is Qwen2.5-VL's states and, for quoted text, byT5's
(`ldm.hunyuan_video15_text.HunyuanImage21TextEncoder`). The distilled model also takes a guidance strength (the
prompt's FluxGuidance, ComfyUI's default 6 without one) and, being MeanFlow-distilled, each step's end: the next level
of the run's schedule, averaged into its time embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import UNET_PREFIX, StateDict, write_safetensors
from ldm.flow_family import FlowFamily
from ldm.hunyuan_image21 import (
    HunyuanImage21,
    HunyuanImage21Config,
    config_from_state_dict,
    convert_state_dict,
    is_hunyuan_image21,
    tiny_config,
)
from ldm.hunyuan_video15 import randomize
from ldm.hunyuan_video15_files import step_end
from ldm.sampling.run import run_sigmas
from ldm.single_file_family import SingleFileFamily
from ldm.vae import VAEConfig

LATENT_CHANNELS = 64
LATENT_SCALE = 0.75289  # ComfyUI's latent_formats.HunyuanImage21 (and diffusers' converted VAE config)
LATENT_DOWNSCALE = 32
SHIFT = 5.0  # ComfyUI's sampling_settings for HunyuanImage21
DEFAULT_GUIDANCE = 6.0  # ComfyUI's for the distilled model when no FluxGuidance sets one
FAMILY = "hunyuan_image21"


@dataclass(frozen=True)
class HunyuanImage21Family(FlowFamily):
    """A HunyuanImage 2.1 model's family, from its transformer's config: `HunyuanImage21Family(config)`."""

    unet_config: HunyuanImage21Config
    vae_config: VAEConfig = VAEConfig(z_channels=LATENT_CHANNELS, scaling_factor=LATENT_SCALE)
    name: str = FAMILY
    latent_shift: float = 0.0
    spatial_ratio: int = LATENT_DOWNSCALE  # pixels per latent pixel (the sampler refits EmptyLatentImage's 1/8)

    @property
    def latent_channels(self) -> int:
        return self.unet_config.out_channels

    @property
    def shift(self) -> float:
        return SHIFT


class HunyuanImage21Denoiser(nn.Module):
    """The transformer as the sampler calls it: `x` [B, 64, h, w], flow levels `timesteps` [B] in 0..1, the prompt's
    Qwen2.5-VL states `context` [B, L, 3584] with its `attn_mask`, by keyword the glyph text's byT5 states `byt5`
    (and `byt5_mask`), and `y` [B, 1], the guidance strength of a distilled model (None for the base model). A
    distilled (MeanFlow) model reads the step's end from the schedule of the sampling run in progress."""

    fp8_keep = r"^model\.(?!double_blocks\.|single_blocks\.)"  # fp8 weights for the blocks alone (--weights-dtype)

    def __init__(self, model: HunyuanImage21):
        super().__init__()
        self.model = model
        self.cuda_graphs_safe = not model.config.meanflow  # a graph would replay its first run's step ends

    @property
    def config(self) -> HunyuanImage21Config:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: a q norm's, which fp8 weights (`ldm.quant`) leave as it is."""
        return self.model.double_blocks[0].img_attn_q_norm.weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                attn_mask: Tensor | None = None, byt5: Tensor | None = None, byt5_mask: Tensor | None = None,
                control: object = None) -> Tensor:
        if control is not None:
            raise ValueError("ControlNets and T2I-Adapters do not fit a HunyuanImage 2.1 model")
        levels = timesteps.reshape(-1).float().expand(x.shape[0]) if timesteps.numel() == 1 else timesteps.reshape(-1)
        guidance = None
        if self.config.guidance_embed:
            guidance = (torch.full_like(levels, DEFAULT_GUIDANCE) if y is None else y.reshape(-1).float()) * 1000
        ends = step_end(run_sigmas(), levels) if self.config.meanflow else None
        return self.model(x.to(self.dtype), levels * 1000, context, attn_mask, byt5, byt5_mask, guidance, ends)


@dataclass
class LoadedHunyuanImage21:
    family: HunyuanImage21Family
    unet: HunyuanImage21Denoiser
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def _family(weights: StateDict, axes: object, prefix: str) -> HunyuanImage21Family:
    config = config_from_state_dict(convert_state_dict({k[len(prefix):]: v for k, v in weights.items()
                                                        if k.startswith(prefix)}))
    if config.refiner:
        raise ValueError("HunyuanImage 2.1's refiner, which Loom does not run yet (its latents are the refiner VAE's, "
                         "prepared by HunyuanRefinerLatent); sample with the base or distilled model")
    return HunyuanImage21Family(config)


_REFUSAL = "not a HunyuanImage 2.1 transformer (no txt_in.individual_token_refiner / single_blocks weights)"
# The family of HunyuanImage 2.1 weights; whether a file holds them; a file's family from its header alone.
FILES = SingleFileFamily(_REFUSAL.removeprefix("not "), is_hunyuan_image21, _family)
hunyuan_image21_family, is_hunyuan_image21_file, peek_hunyuan_image21 = FILES.family, FILES.is_file, FILES.peek


def load_hunyuan_image21_unet(path: str | Path, device: torch.device | str = "cpu",
                              dtype: torch.dtype = torch.bfloat16) -> LoadedHunyuanImage21:
    """A HunyuanImage 2.1 transformer on `device` in `dtype`, fp8 and scaled fp8 weights cast as they load."""
    path = Path(path)
    family, model, unused, metadata = FILES.load(
        path, lambda family: HunyuanImage21(family.unet_config), "HunyuanImage 2.1 transformer", device, dtype,
        lambda sd: _REFUSAL, convert=convert_state_dict)
    return LoadedHunyuanImage21(family, HunyuanImage21Denoiser(model).eval(), unused, path, metadata)


def tiny_hunyuan_image21_config(distilled: bool = False, text_dim: int = 32, byt5_dim: int = 32
                                ) -> HunyuanImage21Config:
    """A tiny HunyuanImage 2.1 (`ldm.hunyuan_image21.tiny_config`) with the widths of Loom's tiny encoders; distilled:
    with the guidance and MeanFlow embeddings."""
    return tiny_config(text_dim=text_dim, byt5_dim=byt5_dim, byt5_hidden=32, guidance_embed=distilled,
                       meanflow=distilled)


def write_tiny_hunyuan_image21(path: str | Path, distilled: bool = False, seed: int = 0,
                               dtype: torch.dtype = torch.float16, prefix: str = UNET_PREFIX) -> Path:
    """Write a tiny random HunyuanImage 2.1 transformer in ComfyUI's single-file layout; returns the path. Its
    pictures are noise."""
    model = randomize(HunyuanImage21(tiny_hunyuan_image21_config(distilled)), seed)
    path = Path(path)
    write_safetensors({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, path,
                      {"loom.seed": str(seed)}, dtype)
    return path


def make_hunyuan_image21_files(models_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16
                               ) -> dict[str, Path]:
    """Tiny random HunyuanImage 2.1 files in the model folders under `models_dir`, named like Comfy-Org's with
    `-tiny`: the transformer and its distilled copy, the VAE, Qwen2.5-VL's language model and the byT5 glyph encoder;
    returns each file's path by part. Their pictures are noise."""
    from ldm.hunyuan_image21_vae import tiny_state_dict as tiny_vae_state
    from ldm.hunyuan_video15_files import TINY_QWEN_LAYERS
    from ldm.hunyuan_video15_text import write_tiny_byt5
    from ldm.qwen_text import tiny_qwen25_state

    models_dir = Path(models_dir)
    paths = {"unet": models_dir / "diffusion_models" / "hunyuanimage2.1-tiny.safetensors",
             "distilled": models_dir / "diffusion_models" / "hunyuanimage2.1_distilled-tiny.safetensors",
             "vae": models_dir / "vae" / "hunyuan_image_2.1_vae-tiny.safetensors",
             "qwen": models_dir / "text_encoders" / "qwen_2.5_vl_7b-hunyuan_image21-tiny.safetensors",
             "byt5": models_dir / "text_encoders" / "byt5_small_glyphxl-hunyuan_image21-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_hunyuan_image21(paths["unet"], False, seed, dtype)
    write_tiny_hunyuan_image21(paths["distilled"], True, seed + 1, dtype)
    write_safetensors(tiny_vae_state(seed + 2), paths["vae"], {"loom.seed": str(seed + 2)}, dtype)
    write_safetensors(tiny_qwen25_state(seed + 3, layers=TINY_QWEN_LAYERS), paths["qwen"],
                      {"loom.seed": str(seed + 3)}, dtype)
    write_tiny_byt5(paths["byt5"], seed + 4, dtype)
    return paths
