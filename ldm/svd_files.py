"""Stable Video Diffusion's single files (`svd.safetensors`, `svd_xt.safetensors`): tell them, load their UNet,
video VAE and CLIP image encoder, write them back, and make tiny random-weight ones for tests."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    ModelFamily,
    StateDict,
    _materialize,
    _strip,
    _unet_config,
    _vae_attention_as_conv,
    _vae_config,
    load_state_dict,
    read_metadata,
    write_safetensors,
)
from ldm.clip_vision import ClipVisionConfig, ClipVisionModel, clip_vision_config, open_clip_state_dict, to_transformers
from ldm.svd import SVDUNet, svd_config
from ldm.svd_vae import VideoAutoencoder
from ldm.vae import VAEConfig

# The OpenCLIP ViT-H image encoder of SGM's conditioner (its text tower was dropped before saving).
CLIP_PREFIX = "conditioner.embedders.0.open_clip.model."
FAMILY = "svd"
# EDM-style continuous noise levels, as SVD was trained (ComfyUI's sampling settings for it).
SIGMA_MIN, SIGMA_MAX = 0.002, 700.0
_PROBE = f"{UNET_PREFIX}input_blocks.1.0.time_stack.in_layers.0.weight"  # a temporal res block


def is_svd_state_dict(sd: StateDict) -> bool:
    """Whether a state dict (or a header's meta tensors) is a video UNet's checkpoint: its res blocks have
    temporal twins."""
    return _PROBE in sd


@dataclass
class LoadedSVD:
    family: ModelFamily
    unet: SVDUNet
    vae: VideoAutoencoder
    clip_vision: ClipVisionModel
    unused_keys: list[str]
    path: Path


def _family(sd: StateDict, metadata: dict[str, str]) -> ModelFamily:
    saved = json.loads(metadata["loom.unet_config"]) if "loom.unet_config" in metadata else None
    heads = ({"num_heads": saved["num_heads"], "num_head_channels": saved["num_head_channels"]} if saved
             else {"num_head_channels": 64})
    unet_config = _unet_config(sd, heads)
    if unet_config.adm_in_channels != 768 or not unet_config.use_linear_in_transformer:
        raise CheckpointError("not a Stable Video Diffusion UNet: its y is not 768 wide, or its transformers' "
                              "projections are not linear")
    return ModelFamily(FAMILY, "v", unet_config, _vae_config(sd, VAE_PREFIX, 0.18215))


def load_svd_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> LoadedSVD:
    """An SVD img2vid checkpoint's UNet, video VAE and CLIP image encoder on `device` in `dtype`. Every key the
    parts do not use is listed in `unused_keys`; a file that is not one raises CheckpointError saying so."""
    path = Path(path)
    sd = load_state_dict(path)
    if not is_svd_state_dict(sd):
        raise CheckpointError(f"{path.name}: not a Stable Video Diffusion checkpoint (no temporal layers in "
                              "model.diffusion_model); load image models with Load Checkpoint")
    try:
        family = _family(sd, read_metadata(path))
    except (KeyError, StopIteration) as e:
        raise CheckpointError(f"{path.name}: incomplete Stable Video Diffusion checkpoint: no weight {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    unet = _materialize(lambda: SVDUNet(family.unet_config), _strip(sd, UNET_PREFIX), "video UNet", path, device,
                        dtype)
    vae = _materialize(lambda: VideoAutoencoder(family.vae_config), _vae_attention_as_conv(_strip(sd, VAE_PREFIX)),
                       "video VAE", path, device, dtype)
    encoder, encoder_keys = load_image_encoder(sd, CLIP_PREFIX, path, device, dtype)
    used = {UNET_PREFIX + k for k in unet.state_dict()} | {VAE_PREFIX + k for k in vae.state_dict()}
    used |= encoder_keys
    return LoadedSVD(family, unet, vae, encoder, sorted(set(sd) - used), path)


def load_image_encoder(sd: StateDict, model_prefix: str, path: Path, device: torch.device | str,
                       dtype: torch.dtype) -> tuple[ClipVisionModel, set[str]]:
    """The CLIP image tower a checkpoint keeps under `model_prefix` + `visual.` (open_clip's layout, OpenAI's too), and
    the keys under `model_prefix` it accounts for (a text half kept beside it is known and read by nothing)."""
    vision = {k.removeprefix(model_prefix): v for k, v in sd.items() if k.startswith(model_prefix)}
    if not vision:
        raise CheckpointError(f"{path.name}: no CLIP image encoder ({model_prefix}visual.*)")
    weights, unused = to_transformers(vision, path.name)
    config = clip_vision_config(weights)
    encoder = _materialize(lambda: ClipVisionModel(config), {f"model.{k}": v for k, v in weights.items()},
                           "CLIP image encoder", path, device, dtype)
    embeddings = encoder.model.vision_model.embeddings
    # A non-persistent buffer, left on the meta device by the weights-only load.
    embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand((1, -1))
    return encoder, {model_prefix + k for k in vision} - {model_prefix + k for k in unused}


def save_svd_checkpoint(path: str | Path, unet: SVDUNet, vae: VideoAutoencoder, clip_vision: ClipVisionModel,
                        metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the three parts in SGM's single-file layout (as `load_svd_checkpoint` and ComfyUI read it), the
    UNet's head layout in the metadata so that tiny models survive the round trip."""
    tensors: StateDict = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    tensors.update(open_clip_state_dict(clip_vision, CLIP_PREFIX + "visual."))
    metadata = {"loom.family": FAMILY, "loom.unet_config": json.dumps(dataclasses.asdict(unet.config)),
                **(metadata or {})}
    write_safetensors(tensors, path, metadata, dtype)
    return Path(path)


TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, use_quant_conv=False)
TINY_VISION = ClipVisionConfig(width=32, layers=2, heads=2, patch_size=8, image_size=32, projection_dim=32,
                               intermediate_size=64, activation="quick_gelu")  # as loaded: the rule by width


def tiny_svd_parts(seed: int = 0) -> tuple[SVDUNet, VideoAutoencoder, ClipVisionModel]:
    """Seeded random-weight tiny parts: a two-level video UNet (32 and 64 channels, 16-wide heads), SD's tiny VAE
    shape with temporal decoder layers, a 32-wide ViT; the mix factors spread over -2..2, so that both paths of
    each mix show in the output."""
    from ldm.presets import randomize_

    generator = torch.Generator().manual_seed(seed)
    unet = randomize_(SVDUNet(svd_config(32, (1, 2), (1, 0), 1, 16, TINY_VISION.projection_dim)), generator)
    vae = randomize_(VideoAutoencoder(TINY_VAE), generator)
    encoder = randomize_(ClipVisionModel(TINY_VISION), generator)
    with torch.no_grad():
        for module in (unet, vae):
            for name, param in module.named_parameters():
                if name.endswith("mix_factor"):
                    param.copy_(torch.rand(1, generator=generator) * 4 - 2)
        # The decoder's last layer mixes each frame with its neighbours: near the identity (the middle tap), as a
        # trained one is; randomize_'s small weights would leave every decoded frame flat grey.
        mix = vae.decoder.conv_out.time_mix_conv.weight
        mix.mul_(0.1)[:, :, 1, 0, 0] += torch.eye(mix.shape[0])
        # He-scaled image projection: randomize_'s small weights would leave the init image all but invisible.
        projection = encoder.model.visual_projection.weight
        projection.copy_(torch.randn(projection.shape, generator=generator) * projection.shape[1] ** -0.5)
    return unet.eval(), vae.eval(), encoder.eval()


def make_svd_checkpoint(path: str | Path, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """A tiny random-weight SVD checkpoint in the real single-file layout (`tiny_svd_parts`)."""
    return save_svd_checkpoint(path, *tiny_svd_parts(seed), {"loom.preset": "tiny-svd", "loom.seed": str(seed)},
                               dtype)
