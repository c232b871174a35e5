"""Stable Zero123 (novel views of an object from one image): an SD1 UNet with 8 input channels (the noisy latent and
the input view's latent) whose context is the input view's CLIP image embedding and the camera move, projected
to the UNet's width by `cc_projection`; its single files, with their CLIP ViT-L image encoder."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    ModelFamily,
    StateDict,
    _materialize,
    _strip,
    _vae_attention_as_conv,
    detect_family,
    load_state_dict,
    read_metadata,
    write_safetensors,
)
from ldm.clip_vision import ClipVisionModel, open_clip_state_dict
from ldm.unet import ControlResiduals, UNetConfig, UNetModel
from ldm.vae import AutoencoderKL

CLIP_PREFIX = "cond_stage_model.model."  # OpenAI's CLIP ViT-L/14, its image tower under `visual.`
PROJECTION = "cc_projection."
CAMERA_WIDTH = 4  # the camera move's numbers appended to the image embedding


def camera_embedding(elevation: float, azimuth: float) -> torch.Tensor:
    """The camera move [1, 1, 4] as Stable Zero123 takes it (ComfyUI's camera_embeddings): the polar angle's change
    in radians (minus the elevation), sin and cos of the azimuth, and the fixed distance slot, pi/2."""
    return torch.tensor([[[math.radians(-elevation), math.sin(math.radians(azimuth)), math.cos(math.radians(azimuth)),
                           math.radians(90.0)]]])


class Zero123UNet(UNetModel):
    """The SD1 UNet with `cc_projection`: a context wider than the UNet's (the image embedding and the camera
    move) is projected to its width first; one already that wide (the negative prompt's zeros) is used as it is."""

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        self.cc_projection = nn.Linear(config.context_dim + CAMERA_WIDTH, config.context_dim)

    @property
    def extra_context_widths(self) -> tuple[int, ...]:
        """The context widths it takes beside its own: the image embedding with the camera move."""
        return (self.cc_projection.in_features,)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                control: list[torch.Tensor] | ControlResiduals | None = None) -> torch.Tensor:
        if context.shape[-1] != self.config.context_dim:
            context = self.cc_projection(context.to(self.dtype))
        return super().forward(x, timesteps, context, y, control)


def is_zero123_state_dict(sd: StateDict) -> bool:
    return f"{PROJECTION}weight" in sd and f"{UNET_PREFIX}input_blocks.0.0.weight" in sd


@dataclass
class LoadedZero123:
    family: ModelFamily
    unet: Zero123UNet
    vae: AutoencoderKL
    clip_vision: ClipVisionModel
    unused_keys: list[str]
    path: Path


def load_zero123_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32) -> LoadedZero123:
    """A Stable Zero123 checkpoint's UNet (with its projection), VAE and CLIP image encoder on `device` in `dtype`;
    keys no part uses are listed in `unused_keys`."""
    from ldm.svd_files import load_image_encoder

    path = Path(path)
    sd = load_state_dict(path)
    if not is_zero123_state_dict(sd):
        raise CheckpointError(f"{path.name}: not a Stable Zero123 checkpoint (no cc_projection beside an SD UNet)")
    try:
        family = detect_family(sd, read_metadata(path), v_prediction=False)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    weights = {**_strip(sd, UNET_PREFIX), **{k: v for k, v in sd.items() if k.startswith(PROJECTION)}}
    unet = _materialize(lambda: Zero123UNet(family.unet_config), weights, "UNet", path, device, dtype)
    vae = _materialize(lambda: AutoencoderKL(family.vae_config), _vae_attention_as_conv(_strip(sd, VAE_PREFIX)),
                       "VAE", path, device, dtype)
    encoder, encoder_keys = load_image_encoder(sd, CLIP_PREFIX, path, device, dtype)
    used = ({UNET_PREFIX + k for k in unet.state_dict() if not k.startswith(PROJECTION)}
            | {k for k in sd if k.startswith(PROJECTION)} | {VAE_PREFIX + k for k in vae.state_dict()} | encoder_keys)
    return LoadedZero123(family, unet, vae, encoder, sorted(set(sd) - used), path)


def make_zero123_checkpoint(path: str | Path, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """A tiny random-weight Stable Zero123 checkpoint in the real file layout: tiny-sd1's UNet with 8 input channels
    and its VAE, a projection, and a 32-wide ViT image tower in CLIP's layout."""
    from ldm.presets import build_preset, randomize_
    from ldm.svd_files import TINY_VISION

    _, _, base, vae, _ = build_preset("tiny-sd1", seed, text_encoder=False)
    generator = torch.Generator().manual_seed(seed + 1)
    config = dataclasses.replace(base.config, in_channels=8, context_dim=TINY_VISION.projection_dim)
    unet = randomize_(Zero123UNet(config), generator)
    encoder = randomize_(ClipVisionModel(TINY_VISION), generator)
    with torch.no_grad():  # He-scaled, so that the image and the camera show in the images
        for layer in (unet.cc_projection, encoder.model.visual_projection):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * layer.weight.shape[1] ** -0.5)
    tensors: StateDict = {(k if k.startswith(PROJECTION) else UNET_PREFIX + k): v for k, v in unet.state_dict().items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    tensors.update(open_clip_state_dict(encoder, CLIP_PREFIX + "visual."))
    write_safetensors(tensors, path, {"loom.preset": "tiny-zero123", "loom.seed": str(seed),
                                      "loom.unet_config": json.dumps(dataclasses.asdict(config))}, dtype)
    return Path(path)
