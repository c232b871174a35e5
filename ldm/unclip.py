"""Stable unCLIP (SD 2.1 unCLIP): the noise augmentor of image embeddings, and the UNet's `y` made from them.

An unCLIP UNet is SD 2.1's with a `label_emb` that takes a CLIP image embedding and the embedding of the noise
level it was augmented to: [embedding, timestep_embedding(level)], 2 x 1024 wide for sd21-unclip-h (LAION's
ViT-H/14), 2 x 768 for -l (OpenAI's ViT-L/14). At training the image embedding was noised to a random level of
a DDPM schedule (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", who
augment the decoder's conditioning so), and that level embedded with the UNet's sinusoidal timestep embedding;
at sampling the level is chosen (ComfyUI's noise_augmentation), higher levels keeping less of the image.

The checkpoint keeps the augmentor under `noise_augmentor.`: the schedule (squaredcos_cap_v2 over 1000 steps:
`betas`, `alphas_cumprod` and values derived from them) and, where a converter saved them, the statistics it
normalises embeddings with (`data_mean`, `data_std`; the released files have none: zero mean, unit spread).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import UNET_PREFIX, VAE_PREFIX, CheckpointError, StateDict, write_safetensors
from ldm.unet import UNetModel, timestep_embedding

PREFIX = "noise_augmentor."
MAX_NOISE_LEVEL = 1000
MERGE_NOISE = 0.05  # the level several image prompts' sum is noised to again (ComfyUI's default)
SEED_OFFSET = 10  # the augmentation noise is drawn from the sampler's seed minus this, as ComfyUI draws it
# What the schedule is saved as: `alphas_cumprod` is checked; the others are derived from the same betas.
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod")


def squaredcos_cap_v2(timesteps: int = MAX_NOISE_LEVEL, max_beta: float = 0.999) -> Tensor:
    """The cosine schedule of Nichol & Dhariwal 2021 ("Improved Denoising Diffusion Probabilistic Models",
    eq. 17), betas capped at `max_beta`, in float64 as LDM computes it."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta)
                         for i in range(timesteps)], dtype=torch.float64)


class NoiseAugmentor(nn.Module):
    """LDM's CLIPEmbeddingNoiseAugmentation: normalise an embedding, noise it to a level with DDPM's forward
    process q(x_t | x_0), normalise it back, and append the level's timestep embedding."""

    def __init__(self, embed_dim: int, timesteps: int = MAX_NOISE_LEVEL) -> None:
        super().__init__()
        alphas_cumprod = torch.cumprod(1 - squaredcos_cap_v2(timesteps), dim=0)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float())
        self.register_buffer("data_mean", torch.zeros(1, embed_dim))
        self.register_buffer("data_std", torch.ones(1, embed_dim))

    @property
    def embed_dim(self) -> int:
        return self.data_mean.shape[1]

    @property
    def max_noise_level(self) -> int:
        return self.sqrt_alphas_cumprod.shape[0]

    def level(self, noise_augmentation: float) -> int:
        """The schedule step a noise_augmentation in 0..1 means (ComfyUI's rounding)."""
        return round((self.max_noise_level - 1) * noise_augmentation)

    def forward(self, embeds: Tensor, level: int, noise: Tensor) -> Tensor:
        """[B, D] image embeddings, noised to `level` with `noise` [B or 1, D] -> [B, 2D] (float32)."""
        mean, std = self.data_mean.to(embeds.device), self.data_std.to(embeds.device)
        x = (embeds.float() - mean) / std
        x = self.sqrt_alphas_cumprod[level] * x + self.sqrt_one_minus_alphas_cumprod[level] * noise.to(x)
        x = x * std + mean
        levels = torch.full((x.shape[0],), level, device=x.device)
        return torch.cat([x, timestep_embedding(levels, self.embed_dim)], dim=1)


def load_noise_augmentor(sd: StateDict, embed_dim: int, name: str = "checkpoint") -> tuple[NoiseAugmentor, set[str]]:
    """The augmentor of an unCLIP state dict (the standard one where it keeps none), and the keys it used.

    A saved schedule other than squaredcos_cap_v2 is refused; saved statistics are taken (shape-checked)."""
    betas = sd.get(PREFIX + "betas")
    augmentor = NoiseAugmentor(embed_dim, MAX_NOISE_LEVEL if betas is None else betas.shape[0])
    saved = sd.get(PREFIX + "alphas_cumprod")
    if saved is not None and not saved.is_meta:
        expected = augmentor.sqrt_alphas_cumprod.double() ** 2
        if saved.shape != expected.shape or not torch.allclose(saved.double(), expected, atol=2e-3):
            raise CheckpointError(f"{name}: the noise augmentor's schedule is not SD 2.1 unCLIP's "
                                  f"(squaredcos_cap_v2 over {augmentor.max_noise_level} steps)")
    for stat in ("data_mean", "data_std"):
        tensor = sd.get(PREFIX + stat)
        if tensor is None or tensor.is_meta:
            continue
        if tensor.numel() != embed_dim:
            raise CheckpointError(f"{name}: {PREFIX}{stat} holds {tensor.numel()} values; the UNet's image "
                                  f"embedding is {embed_dim} wide")
        getattr(augmentor, stat).copy_(tensor.reshape(1, -1))
    used = {PREFIX + k for k in (*SCHEDULE_KEYS, "data_mean", "data_std") if PREFIX + k in sd}
    return augmentor.eval(), used


def unclip_adm(images: Sequence[tuple[Tensor, float, float]], augmentor: NoiseAugmentor, seed: int,
               merge_noise: float = MERGE_NOISE) -> Tensor:
    """The unCLIP UNet's `y` [1, 2D] from image prompts (image_embeds [N, D], strength, noise_augmentation),
    as ComfyUI builds it: each image (each row of each prompt's embeddings) noise-augmented to its level,
    scaled by its strength; several are summed and the sum's embedding part noised again to `merge_noise`.

    The noise is drawn from `seed - SEED_OFFSET`, the same for every image, as ComfyUI draws the first; its
    second draw (for a sum) is unseeded there, here it is the same seeded noise, so runs repeat."""
    dim = augmentor.embed_dim
    for embeds, _, _ in images:
        if embeds.shape[-1] != dim:
            raise ValueError(f"the image embedding is {embeds.shape[-1]} wide and this unCLIP model takes {dim}: "
                             "encode the image with the CLIP vision model of its checkpoint")
    noise = torch.randn((1, dim), generator=torch.Generator().manual_seed(seed - SEED_OFFSET))
    parts = [augmentor(embed[None], augmentor.level(amount), noise) * strength
             for embeds, strength, amount in images for embed in embeds]
    if not parts:
        raise ValueError("unclip_adm needs at least one image embedding")
    if len(parts) == 1:
        return parts[0]
    summed = torch.stack(parts).sum(0)
    return augmentor(summed[:, :dim], augmentor.level(merge_noise), noise)


def make_unclip_checkpoint(path: str | Path, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Write a random-weight SD 2.1 unCLIP checkpoint in the real file layout (tiny: tiny-sd2's parts, a
    32-wide ViT image encoder in open_clip's layout under `embedder.model.visual.` with the text-side leftovers
    the released files keep beside it, and the augmentor's schedule), fp16 unless `dtype` says."""
    from ldm.clip_vision import UNCLIP_PREFIX, ClipVisionConfig, ClipVisionModel, open_clip_state_dict
    from ldm.presets import build_preset, randomize_

    _, prediction, base, vae, text_encoder = build_preset("tiny-sd2", seed)
    vision = ClipVisionConfig(width=32, layers=3, heads=2, patch_size=8, image_size=32, projection_dim=16,
                              intermediate_size=64, activation="quick_gelu")
    generator = torch.Generator().manual_seed(seed + 1)
    unet = randomize_(UNetModel(dataclasses.replace(base.config, adm_in_channels=2 * vision.projection_dim)),
                      generator)
    encoder = randomize_(ClipVisionModel(vision), generator)
    # He-scaled image projection and label_emb: randomize_'s small weights would leave the image prompt all but
    # invisible in the images.
    with torch.no_grad():
        for layer in (unet.label_emb[0][0], unet.label_emb[0][2], encoder.model.visual_projection):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * layer.weight.shape[1] ** -0.5)
    tensors: StateDict = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    tensors.update(text_encoder.ldm_state_dict())
    tensors.update(open_clip_state_dict(encoder, UNCLIP_PREFIX))
    leftovers = {"logit_scale": torch.tensor(4.6052), "ln_final.weight": torch.ones(32),
                 "ln_final.bias": torch.zeros(32), "text_projection": torch.randn(32, 16, generator=generator)}
    tensors.update({f"embedder.model.{k}": v for k, v in leftovers.items()})
    betas = squaredcos_cap_v2()
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    schedule = {"betas": betas, "alphas_cumprod": alphas_cumprod,
                "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]),
                "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
                "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
                "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
                "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
                "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt()}
    tensors.update({PREFIX + k: v.float() for k, v in schedule.items()})
    metadata = {"loom.preset": "tiny-sd2-unclip", "loom.seed": str(seed), "loom.family": "sd2",
                "loom.prediction": prediction, "loom.scaling_factor": str(vae.scaling_factor),
                "loom.unet_config": json.dumps(dataclasses.asdict(unet.config))}
    # The schedule stays in fp32 (as LDM saves it): fp16 would round its smallest values to nothing.
    write_safetensors({k: v if k.startswith(PREFIX) else v.to(dtype or torch.float16) for k, v in tensors.items()},
                      path, metadata)
    return Path(path)
