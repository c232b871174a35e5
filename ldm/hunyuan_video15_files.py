"""HunyuanVideo 1.5 diffusion-model files, their family, the denoiser the sampler calls, and tiny files for tests.

Files: Comfy-Org's repackaged transformers (`hunyuanvideo1.5_{480p,720p}_{t2v,i2v}*.safetensors`, the CFG- and
step-distilled copies, `hunyuanvideo1.5_1080p_sr_distilled`): Tencent's names, bare or under `model.diffusion_model.`;
fp16, bf16, fp8 and scaled fp8 (`ldm.hunyuan_video15` holds the model, and reads diffusers' and Tencent's own layouts).

Sampling (ComfyUI's HunyuanVideo15 / HunyuanVideo15_SR_Distilled): rectified flow on SD3's shifted levels, shift 7
(the super-resolution model, 98 input channels: 2), the model told sigma x 1000; latents are the VAE's 32 channels
times 1.03682 (ComfyUI's HunyuanVideo15 latent format). Beside the noisy latent the 480p / 720p models take 33
channels (`concat_channels`): the start picture's latent, scaled likewise, zeros where there is none, and a mask, 1 at
the latent frames the picture fixes; the SR model takes 66 (`nodes.sd.hunyuan_video15`). MeanFlow-distilled models
(`time_r_in`: the step-distilled 480p and the SR model) are also told where the step ends: the next level of the
sampler's schedule (`ldm.sampling.run`, which the sampler opens), as ComfyUI tells them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import UNET_PREFIX, StateDict, write_safetensors
from ldm.flow_family import FlowFamily
from ldm.hunyuan_video15 import (
    HunyuanVideo15,
    HunyuanVideo15Config,
    config_from_state_dict,
    convert_state_dict,
    is_hunyuan_video15,
    randomize,
    tiny_config,
)
from ldm.sampling.run import run_sigmas
from ldm.single_file_family import SingleFileFamily
from ldm.vae import VAEConfig

LATENT_CHANNELS = 32
LATENT_SCALE = 1.03682  # ComfyUI's latent_formats.HunyuanVideo15 (and diffusers' VAE config scaling_factor)
SHIFT, SR_SHIFT = 7.0, 2.0  # ComfyUI's sampling_settings for HunyuanVideo15 and HunyuanVideo15_SR_Distilled
SR_CHANNELS = 98  # the 1080p super-resolution model's input: the latent and 66 condition channels
FAMILY = "hunyuan_video15"


@dataclass(frozen=True)
class HunyuanVideo15Family(FlowFamily):
    """A HunyuanVideo 1.5 model's family, from its transformer's config: `HunyuanVideo15Family(config)`."""

    unet_config: HunyuanVideo15Config
    vae_config: VAEConfig = VAEConfig(z_channels=LATENT_CHANNELS, scaling_factor=LATENT_SCALE)
    name: str = FAMILY
    latent_shift: float = 0.0

    @property
    def latent_channels(self) -> int:
        return self.unet_config.out_channels

    @property
    def super_resolution(self) -> bool:
        """The 1080p SR model (HunyuanVideo15SuperResolution's conditioning)."""
        return self.unet_config.in_channels == SR_CHANNELS

    @property
    def concat_channels(self) -> int:
        """Channels the model takes beside the noisy latent: 33 (a picture's latent and its mask) or the SR's 66."""
        return self.unet_config.in_channels - self.unet_config.out_channels

    @property
    def shift(self) -> float:
        return SR_SHIFT if self.super_resolution else SHIFT


class HunyuanVideo15Denoiser(nn.Module):
    """The transformer as the sampler calls it: `x` [B, 32 + concat_channels, F, h, w] (the sampler appends the
    condition channels), flow levels `timesteps` [B] in 0..1, the prompt's Qwen2.5-VL states `context` [B, L, 3584]
    with its `attn_mask` [B, L], by keyword the glyph text's byT5 states `byt5` [B, L2, 1472] (and `byt5_mask`), and
    `y`, the start picture's SigLIP states [B, 729, 1152] (image-to-video), else None. MeanFlow models read the
    step's end from the schedule of the sampling run in progress (`ldm.sampling.run`)."""

    fp8_keep = r"^model\.(?!double_blocks\.)"  # fp8 weights for the blocks alone (--weights-dtype fp8)

    def __init__(self, model: HunyuanVideo15):
        super().__init__()
        self.model = model
        self.cuda_graphs_safe = not model.config.meanflow  # a graph would replay its first run's step ends

    @property
    def config(self) -> HunyuanVideo15Config:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.img_in.proj.weight.dtype

    def step_end(self, timesteps: Tensor) -> Tensor | None:
        """MeanFlow's `timesteps_r` for levels `timesteps` (`step_end`); None for other models, and off the run's
        schedule."""
        return step_end(run_sigmas(), timesteps) if self.config.meanflow else None

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                attn_mask: Tensor | None = None, byt5: Tensor | None = None, byt5_mask: Tensor | None = None,
                control: object = None) -> Tensor:
        if control is not None:
            raise ValueError("ControlNets and T2I-Adapters do not fit a HunyuanVideo 1.5 model")
        levels = timesteps.reshape(-1).float().expand(x.shape[0]) if timesteps.numel() == 1 else timesteps.reshape(-1)
        return self.model(x.to(self.dtype), levels * 1000, context, attn_mask, byt5, byt5_mask, y,
                          self.step_end(levels))


def step_end(sigmas: Tensor | None, timesteps: Tensor) -> Tensor | None:
    """A MeanFlow model's `timesteps_r` x 1000 for flow levels `timesteps` [B]: the level after each in the run's
    schedule `sigmas` (0 after the last). ComfyUI looks the level up in its sample_sigmas and adds no step end where it
    is not there (a second-order sampler's midpoint, a flow SDE sampler's moved first level): None then."""
    if sigmas is None:
        return None
    levels = timesteps.detach().float().cpu()  # the schedule is on the CPU: no device copy per call
    match = (sigmas[None, :].float() - levels[:, None]).abs() < 1e-5
    if not bool(match.any(1).all()):
        return None
    ends = torch.cat([sigmas[1:].float(), sigmas.new_zeros(1, dtype=torch.float32)])
    return (ends[match.int().argmax(1)] * 1000).to(timesteps.device)


@dataclass
class LoadedHunyuanVideo15:
    family: HunyuanVideo15Family
    unet: HunyuanVideo15Denoiser
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def _family(weights: StateDict, axes: object, prefix: str) -> HunyuanVideo15Family:
    return HunyuanVideo15Family(config_from_state_dict(convert_state_dict(
        {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})))


_REFUSAL = "not a HunyuanVideo 1.5 transformer (no cond_type_embedding / txt_in.individual_token_refiner weights)"
# The family of HunyuanVideo 1.5 weights; whether a file holds them; a file's family from its header alone.
FILES = SingleFileFamily(_REFUSAL.removeprefix("not "), is_hunyuan_video15, _family)
hunyuan_video15_family, is_hunyuan_video15_file, peek_hunyuan_video15 = FILES.family, FILES.is_file, FILES.peek


def load_hunyuan_video15_unet(path: str | Path, device: torch.device | str = "cpu",
                              dtype: torch.dtype = torch.bfloat16) -> LoadedHunyuanVideo15:
    """A HunyuanVideo 1.5 transformer on `device` in `dtype`, fp8 and scaled fp8 weights cast as they load."""
    path = Path(path)
    family, model, unused, metadata = FILES.load(
        path, lambda family: HunyuanVideo15(family.unet_config), "HunyuanVideo 1.5 transformer", device, dtype,
        lambda sd: _REFUSAL, convert=convert_state_dict)
    return LoadedHunyuanVideo15(family, HunyuanVideo15Denoiser(model).eval(), unused, path, metadata)


# Tiny models for tests: the real condition channels (65 in, 32 out), and condition widths of Loom's tiny encoders.
TINY_KINDS = {"t2v": {}, "i2v": {}, "sr": {"in_channels": SR_CHANNELS, "meanflow": True},
              "distilled": {"meanflow": True}}


def tiny_hunyuan_video15_config(kind: str = "t2v", text_dim: int = 32, byt5_dim: int = 32,
                                image_dim: int = 32) -> HunyuanVideo15Config:
    if kind not in TINY_KINDS:
        raise ValueError(f"kind {kind!r}: one of {', '.join(TINY_KINDS)}")
    return tiny_config(text_dim=text_dim, byt5_dim=byt5_dim, byt5_hidden=32, image_dim=image_dim,
                       **TINY_KINDS[kind])


def write_tiny_hunyuan_video15(path: str | Path, kind: str = "t2v", seed: int = 0,
                               dtype: torch.dtype = torch.float16, prefix: str = UNET_PREFIX,
                               **widths: int) -> Path:
    """Write a tiny random HunyuanVideo 1.5 transformer of `kind` ("t2v", "i2v", "distilled": MeanFlow, "sr": the
    98-channel SR model) in ComfyUI's single-file layout; returns the path. Its videos are noise."""
    model = randomize(HunyuanVideo15(tiny_hunyuan_video15_config(kind, **widths)), seed)
    path = Path(path)
    write_safetensors({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, path,
                      {"loom.seed": str(seed)}, dtype)
    return path


TINY_QWEN_LAYERS = 4  # the states are taken 3 layers from the top: 4 keep one layer in play
TINY_SIGLIP = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 56, "patch_size": 14}


def write_tiny_sigclip(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """A tiny random SigLIP tower in sigclip_vision_patch14_384.safetensors' layout (`vision_model.`, with its
    attention-pooling head): 32 wide, 4 x 4 patches of 14 pixels."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from ldm.flux_presets import distinct_random_

    torch.manual_seed(seed)
    model = distinct_random_(SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).eval(), seed,
                             norm_scales=("layer_norm1.weight", "layer_norm2.weight", "layernorm.weight"))
    path = Path(path)
    write_safetensors({"vision_model." + k.removeprefix("vision_model."): v.contiguous()
                       for k, v in model.state_dict().items() if not k.endswith("position_ids")}, path,
                      {"loom.seed": str(seed)}, dtype)
    return path


def make_hunyuan_video15_files(models_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16
                               ) -> dict[str, Path]:
    """Tiny random HunyuanVideo 1.5 files in the model folders under `models_dir`, named like Comfy-Org's with
    `-tiny`: the 720p text-to-video and image-to-video transformers, the 1080p SR one, the VAE, Qwen2.5-VL's language
    model, the byT5 glyph encoder, the SigLIP tower and the 1080p latent upsampler; returns each file's path by part.
    Their videos are noise."""
    from ldm.hunyuan_video15_text import write_tiny_byt5
    from ldm.hunyuan_video15_upsampler import tiny_state_dict as tiny_upsampler_state
    from ldm.hunyuan_video15_vae import tiny_state_dict as tiny_vae_state
    from ldm.qwen_text import tiny_qwen25_state

    models_dir = Path(models_dir)
    paths = {"t2v": models_dir / "diffusion_models" / "hunyuanvideo1.5_720p_t2v-tiny.safetensors",
             "i2v": models_dir / "diffusion_models" / "hunyuanvideo1.5_720p_i2v-tiny.safetensors",
             "sr": models_dir / "diffusion_models" / "hunyuanvideo1.5_1080p_sr_distilled-tiny.safetensors",
             "vae": models_dir / "vae" / "hunyuanvideo15_vae-tiny.safetensors",
             "qwen": models_dir / "text_encoders" / "qwen_2.5_vl_7b-hunyuan_video15-tiny.safetensors",
             "byt5": models_dir / "text_encoders" / "byt5_small_glyphxl-tiny.safetensors",
             "clip_vision": models_dir / "clip_vision" / "sigclip_vision_patch14_384-tiny.safetensors",
             "upsampler": models_dir / "latent_upscale_models" / "hunyuanvideo15_latent_upsampler_1080p-tiny"
                                                                 ".safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(("t2v", "i2v", "sr")):
        write_tiny_hunyuan_video15(paths[kind], kind, seed + i, dtype)
    write_safetensors(tiny_vae_state(seed + 3), paths["vae"], {"loom.seed": str(seed + 3)}, dtype)
    write_safetensors(tiny_qwen25_state(seed + 4, layers=TINY_QWEN_LAYERS), paths["qwen"],
                      {"loom.seed": str(seed + 4)}, dtype)
    write_tiny_byt5(paths["byt5"], seed + 5, dtype)
    write_tiny_sigclip(paths["clip_vision"], seed + 6, dtype)
    write_safetensors(tiny_upsampler_state(seed + 7), paths["upsampler"], {"loom.seed": str(seed + 7)}, dtype)
    return paths
