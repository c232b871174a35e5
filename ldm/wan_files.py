"""Wan 2.1 / 2.2 diffusion-model files (ComfyUI's single files: Wan's original keys, bare or under
`model.diffusion_model.`; fp16, bf16, fp8 and scaled fp8; Wan 2.1 VACE's load as `ldm.wan_vace.WanVaceModel`), their
family, and tiny random files for tests.

The family carries what the sampler needs beyond the weights: Wan's VAE latents are normalised per channel (the
published mean and standard deviation of Wan 2.1's 16-channel VAE, or of Wan 2.2's 48-channel one, which ComfyUI's
Wan21 / Wan22 latent formats and diffusers' AutoencoderKLWan configs hold), and the model samples on SD3's shifted
flow levels with ComfyUI's default shift for Wan, 8 (WAN21_T2V, WAN21_I2V and WAN22_T2V alike).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm import checkpoint as ckpt
from ldm.checkpoint import UNET_PREFIX, CheckpointError, StateDict, write_safetensors
from ldm.flow_family import FlowFamily
from ldm.flux_presets import distinct_random_
from ldm.t5 import descaled_fp8, scaling_keys
from ldm.vae import VAEConfig
from ldm.wan import WanConfig, WanModel, is_wan, wan_config_from_state_dict, wan_weights
from ldm.wan_vace import wan_model

WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
              -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
              -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
              -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
              0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
             0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
             0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
             0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
             0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)
WAN_SHIFT = 8.0  # ComfyUI's sampling shift for every Wan kind (supported_models: WAN21_T2V and its subclasses)
# Files Loom writes carry the head count, which the weights cannot tell (released models have 128-wide heads).
HEADS_KEY = "loom.wan_num_heads"
TINY_WAN = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32)  # TINY_UMT5's width
TINY_KINDS = {"t2v": {}, "i2v": {"in_dim": 36, "image_input": "i2v", "clip_dim": 20},
              "flf2v": {"in_dim": 36, "image_input": "flf2v", "clip_dim": 20, "flf_tokens": 10},
              "ti2v": {"in_dim": 48, "out_dim": 48},
              "vace": {"num_layers": 4, "vace_layers": (0, 2)},  # VACE blocks after main blocks 0 and 2
              # Wan 2.1 Fun camera: the start image's latent beside the noisy one (32 channels, no mask), CLIP image
              # branch, and a camera adapter (its input is Plücker rays, 24 channels)
              "camera": {"in_dim": 32, "image_input": "i2v", "clip_dim": 20, "camera_in_dim": 24},
              # Wan 2.2 Fun Control: the control video's latent, 4 mask channels and the start image's latent beside
              # the noisy one (16 + 16 + 4 + 16), and a reference image's latent through `ref_conv`
              "fun_control": {"in_dim": 52, "ref_conv_in_dim": 16}}


@dataclass(frozen=True)
class WanFamily(FlowFamily):
    """A Wan model's family: "wan21" (16-channel latents: Wan 2.1, Wan 2.2's 14B experts) or "wan22" (Wan 2.2 5B's
    48-channel latents), from its transformer's config. `vae_config` only names the latent space (its channels,
    scale 1) for latent previews: Wan's video VAE is `ldm.wan_vae`'s. Built as `WanFamily(config)`."""

    unet_config: WanConfig
    vae_config: VAEConfig | None = None
    name: str = ""
    latent_shift: float = 0.0
    latent_mean: tuple[float, ...] = ()
    latent_std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        wan22 = self.unet_config.out_dim == len(WAN22_MEAN)
        defaults = {"name": "wan22" if wan22 else "wan21",
                    "vae_config": VAEConfig(z_channels=self.unet_config.out_dim, scaling_factor=1.0),
                    "latent_mean": WAN22_MEAN if wan22 else WAN21_MEAN, "latent_std": WAN22_STD if wan22 else WAN21_STD}
        for field, value in defaults.items():
            if not getattr(self, field):
                object.__setattr__(self, field, value)
        if len(self.latent_mean) != self.unet_config.out_dim:
            raise ValueError(f"a Wan model of {self.unet_config.out_dim} latent channels has no published latent "
                             "statistics (Wan's VAEs make 16 or 48)")

    @property
    def latent_channels(self) -> int:
        return self.unet_config.out_dim

    @property
    def shift(self) -> float:
        return WAN_SHIFT

    @property
    def token_timesteps(self) -> bool:
        """Whether a noise mask reaches the model as per-frame noise levels, its kept frames clean: Wan 2.2 5B's
        image-to-video (ComfyUI's WAN22; `ldm.sampling.masked_timesteps`)."""
        return self.name == "wan22"


@dataclass
class LoadedWan:
    family: WanFamily
    unet: WanModel
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def _heads(metadata: dict[str, str]) -> int | None:
    saved = metadata.get(HEADS_KEY)
    return None if saved is None else int(saved)


def wan_family(weights: StateDict, metadata: dict[str, str] | None = None, name: str = "") -> WanFamily:
    """The family of Wan weights (bare or prefixed), the head count from Loom's metadata if saved."""
    try:
        return WanFamily(wan_config_from_state_dict(weights, _heads(metadata or {})))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}" if name else str(e)) from None


def is_wan_file(path: str | Path) -> bool:
    """Whether a .safetensors file holds a Wan transformer (bare or prefixed), from its header."""
    shapes = ckpt.shapes_or_none(path)
    return shapes is not None and (is_wan(shapes) or is_wan(shapes, UNET_PREFIX))


def peek_wan(path: str | Path) -> WanFamily | None:
    """The family of a Wan file from its header alone; None for other files and formats (a Wan file of a variant
    Loom does not run raises CheckpointError)."""
    shapes = ckpt.shapes_or_none(path)
    if shapes is None or not (is_wan(shapes) or is_wan(shapes, UNET_PREFIX)):
        return None
    return wan_family(shapes, ckpt.read_metadata(path), Path(path).name)


def load_wan_unet(path: str | Path, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> LoadedWan:
    """Load a Wan diffusion-model file on `device` in `dtype` (fp8 and scaled fp8 weights cast as they load); keys
    the transformer does not use are listed as unused."""
    path = Path(path)
    sd = ckpt.load_state_dict(path)
    if not (is_wan(sd) or is_wan(sd, UNET_PREFIX)):
        diffusers = any(k.startswith("condition_embedder.") for k in sd)
        raise CheckpointError(f"{path.name}: not a Wan diffusion model (no patch_embedding / blocks.0.cross_attn / "
                              "head.modulation weights in Wan's original layout)"
                              + ("; it is a diffusers-layout transformer: use ComfyUI's repackaged single file"
                                 if diffusers else ""))
    metadata = ckpt.read_metadata(path)
    family = wan_family(sd, metadata, path.name)
    weights = descaled_fp8(wan_weights(sd))
    model = ckpt._materialize(lambda: wan_model(family.unet_config), weights, "Wan transformer", path, device, dtype)
    expected = set(model.state_dict())
    prefix = UNET_PREFIX if is_wan(sd, UNET_PREFIX) else ""
    skipped = scaling_keys(sd)
    unused = sorted(k for k in sd if k not in skipped and not (k.startswith(prefix) and k[len(prefix):] in expected))
    return LoadedWan(family, model, unused, path, metadata)


def tiny_wan_config(kind: str = "t2v") -> WanConfig:
    """TINY_WAN as a "t2v", "i2v", "flf2v", "ti2v" (Wan 2.2 5B's 48 channels), "vace" (Wan 2.1 VACE's
    control branch, `ldm.wan_vace`), "camera" (Wan 2.1 Fun camera control, `ldm.wan_camera`) or "fun_control"
    (Wan 2.2 Fun Control, with a reference image input) model."""
    if kind not in TINY_KINDS:
        raise ValueError(f"kind {kind!r}: one of {', '.join(TINY_KINDS)}")
    return dataclasses.replace(TINY_WAN, **TINY_KINDS[kind])


def random_wan(config: WanConfig = TINY_WAN, seed: int = 0) -> WanModel:
    """A Wan transformer with seeded random weights, each distinct (`ldm.flux_presets.distinct_random_`; the RMS
    and layer norms' weights near 1)."""
    norms = (".norm_q.weight", ".norm_k.weight", ".norm_k_img.weight", ".norm3.weight", "proj.0.weight",
             "proj.4.weight")
    return distinct_random_(wan_model(config).eval(), seed, norm_scales=norms)


def write_tiny_wan(path: str | Path, kind: str = "t2v", seed: int = 0, dtype: torch.dtype = torch.float16,
                   prefix: str = UNET_PREFIX) -> Path:
    """Write a tiny random Wan transformer of `kind` (see `tiny_wan_config`) in ComfyUI's single-file layout (its
    keys under `prefix`), with the head count in Loom's metadata; returns the path. Its videos are noise."""
    model = random_wan(tiny_wan_config(kind), seed)
    path = Path(path)
    write_safetensors({prefix + k: v for k, v in model.state_dict().items()}, path,
                      {HEADS_KEY: str(model.config.num_heads), "loom.seed": str(seed)}, dtype)
    return path
