"""Qwen-Image 2.1 as a Loom model family, from the files ComfyUI users load: the transformer through UNETLoader
(Comfy-Org's qwen_image_2.1_bf16.safetensors: `ldm.qwen_image21`'s layout, bare or under `model.diffusion_model.`;
diffusers' split MLP names too), Qwen3-VL-8B through CLIPLoader type qwen_image (`ldm.qwen3vl_text`) and the RGBA
VAE through VAELoader (`ldm.qwen_image21_vae`).

Latents are [B, 64, H/16, W/16], normalised per channel by the VAE's 64 means and standard deviations on their way
to the transformer (as Wan's latents are). Sampling is rectified flow on SD3's shifted levels; ComfyUI's shift for
this model is not known to Loom, so it takes Qwen-Image's 3.1 (what diffusers' dynamic shift gives at about 1024 x
1024 pixels; ModelSamplingAuraFlow sets another). The prompt's image slots (where each picture's pads were) ride in
the conditioning (`ldm.sampling.cond_jobs.MODEL_INPUTS`), its reference latents as Qwen-Image-Edit's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict
from ldm.flow_family import FlowFamily
from ldm.qwen_image21 import (
    AXES_KEY,
    PrefixKV,
    QwenImage21Config,
    QwenImage21Model,
    config_from_state_dict,
    is_qwen_image21,
    to_loom_layout,
)
from ldm.qwen_image21_vae import LATENTS_MEAN, LATENTS_STD
from ldm.single_file_family import SingleFileFamily
from ldm.t5 import descaled_fp8, scaling_keys
from ldm.vae import VAEConfig

QWEN_IMAGE21_SHIFT = 3.1  # see the module docstring
LATENT_SPACE = VAEConfig(z_channels=64, scaling_factor=1.0)


@dataclass(frozen=True)
class QwenImage21Family(FlowFamily):
    """Qwen-Image 2.1's family: its transformer's config, the RGBA VAE's normalised 64-channel latents at 1/16."""

    unet_config: QwenImage21Config
    vae_config: VAEConfig = LATENT_SPACE
    name: str = "qwen_image21"
    latent_shift: float = 0.0
    latent_mean: tuple[float, ...] = tuple(LATENTS_MEAN)
    latent_std: tuple[float, ...] = tuple(LATENTS_STD)
    spatial_ratio: int = 16  # pixels per latent pixel (the sampler refits EmptyLatentImage's 1/8 latents)
    prompt_hint: str = "encode it with TextEncodeQwenImage21 on Qwen3-VL-8B (CLIPLoader type qwen_image)"

    @property
    def latent_channels(self) -> int:
        return self.unet_config.channels

    @property
    def shift(self) -> float:
        return QWEN_IMAGE21_SHIFT


class QwenImage21Denoiser(nn.Module):
    """The transformer called as Loom's denoiser calls a model: reference latents as `References` (already in the
    model's latent space), the prompt's image slots [B, n] by keyword (one call per item where the items' differ).
    `prefix_cache` (on, as ComfyUI's default; QwenImage21Cache's device "off" turns it off) has the sampler keep the
    prompt's and references' keys and values for a run (`PrefixKVRun`)."""

    prefix_cache: bool = True

    def __init__(self, model: QwenImage21Model):
        super().__init__()
        self.model = model

    @property
    def cuda_graphs_safe(self) -> bool:
        """A cached run's first call computes the prefix and later ones do not: no fixed shapes to capture."""
        return not self.prefix_cache

    @property
    def config(self) -> QwenImage21Config:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                attn_mask: Tensor | None = None, ref_latents: object = None, image_slots: Tensor | None = None,
                prefix_kv: PrefixKV | None = None) -> Tensor:
        refs = list(getattr(ref_latents, "latents", ref_latents) or [])
        if image_slots is None or bool((image_slots == image_slots[:1]).all()):
            slots = None if image_slots is None else image_slots[0].tolist()
            return self.model(x, timesteps, context, attn_mask=attn_mask, ref_latents=refs, image_slots=slots,
                              prefix_kv=prefix_kv)
        t = timesteps.reshape(-1).expand(x.shape[0])

        def item(tensor: Tensor | None, i: int) -> Tensor | None:
            return None if tensor is None else tensor[i:i + 1] if tensor.shape[0] > 1 else tensor

        return torch.cat([self.model(x[i:i + 1], t[i:i + 1], item(context, i), attn_mask=item(attn_mask, i),
                                     ref_latents=[item(r, i) for r in refs], image_slots=image_slots[i].tolist(),
                                     prefix_kv=prefix_kv) for i in range(x.shape[0])])


class PrefixKVRun:
    """One sampling run's calls of a Qwen-Image 2.1 transformer (`module`, on its device), sharing one `PrefixKV`: the
    prefix (prompt and references, the same at every step) is computed on its first call and only the target's
    tokens after (ComfyUI's QwenImage21Cache; the same velocities)."""

    def __init__(self, module: QwenImage21Denoiser | Any):
        self.module, self.store = module, PrefixKV(capacity=4)  # both prompts, also when called item by item

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, **extra: object) -> Tensor:
        return self.module(x, t, context, y=y, prefix_kv=self.store, **extra)

    def over(self, module: QwenImage21Denoiser | Any) -> PrefixKVRun:
        """A run of another module (a guidance pass's patched copy) with its own cache: its prefix is its own."""
        return PrefixKVRun(module)


def without_prefix_cache(unet: QwenImage21Denoiser) -> QwenImage21Denoiser:
    """A copy (sharing the weights) that recomputes the prefix at every step (QwenImage21Cache's device "off")."""
    from ldm.lora import shallow_copy

    patched = shallow_copy(unet)
    patched.prefix_cache = False
    return patched


def _family(weights: StateDict, axes: tuple[int, ...] | None, prefix: str) -> QwenImage21Family:
    return QwenImage21Family(config_from_state_dict(weights, axes, prefix))


# The family of Qwen-Image 2.1 weights (the RoPE split from Loom's metadata if saved); whether a file holds them; a
# file's family from its header alone.
FILES = SingleFileFamily("a Qwen-Image 2.1 transformer", is_qwen_image21, _family, AXES_KEY)
qwen_image21_family, is_qwen_image21_file, peek_qwen_image21 = FILES.family, FILES.is_file, FILES.peek


@dataclass
class LoadedQwenImage21:
    family: QwenImage21Family
    unet: QwenImage21Denoiser
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def load_qwen_image21_unet(path: str | Path, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.bfloat16) -> LoadedQwenImage21:
    """A Qwen-Image 2.1 transformer file on `device` in `dtype` (fp8 and scaled fp8 weights cast as they load;
    diffusers' split MLP fused as the released file has it); the file's keys the model does not use are listed."""
    path = Path(path)
    sd = ckpt.load_state_dict(path)
    prefix = FILES.prefix(sd)
    if prefix is None:
        raise CheckpointError(f"{path.name}: not a Qwen-Image 2.1 transformer (no modulation / txt_in.text_norm / "
                              "img_in weights in its layout)")
    metadata = ckpt.read_metadata(path)
    family = FILES.family(sd, metadata, path.name)
    bare = dict(descaled_fp8({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}))
    weights = to_loom_layout(bare)
    model = ckpt._materialize(lambda: QwenImage21Model(family.unet_config), weights, "Qwen-Image 2.1 transformer",
                              path, device, dtype)
    used = set(model.state_dict()) | (bare.keys() - weights.keys())  # the latter fused into the MLP's gate_up
    skipped = scaling_keys(sd)
    unused = sorted(k for k in sd if k not in skipped and not (k.startswith(prefix) and k[len(prefix):] in used))
    return LoadedQwenImage21(family, QwenImage21Denoiser(model).eval(), unused, path, metadata)
