"""SD3 / SD3.5 transformer-only files (models/diffusion_models), as UNETLoader loads them.

Users cut the MMDiT out of Stability's checkpoints (sd3.5_large.safetensors...) with or without its
`model.diffusion_model.` prefix, in fp16/bf16, fp8 or ComfyUI's scaled fp8; a diffusers folder's transformer file (or
its shards) is renamed to Stability's layout as it loads (`ldm.diffusers_dit`). The weights make the same model as the
checkpoint's (``ldm.sd3_files``); the latent space is SD3's, which comes with the model, not with the VAE file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm import checkpoint as ckpt
from ldm.checkpoint import UNET_PREFIX, CheckpointError, StateDict
from ldm.diffusers_dit import load_dit_state_dict, read_dit_shapes
from ldm.mmdit import MMDiT, is_mmdit, mmdit_config_from_state_dict
from ldm.sd3_files import SD3Family
from ldm.t5 import descaled_fp8, scaling_keys


@dataclass
class LoadedSD3Unet:
    family: SD3Family
    unet: MMDiT
    unused_keys: list[str]
    path: Path


def _prefix(sd: StateDict) -> str | None:
    """The prefix the MMDiT's keys carry in a file ("" or `model.diffusion_model.`); None where it holds none."""
    return next((prefix for prefix in ("", UNET_PREFIX) if is_mmdit(sd, prefix)), None)


def _family(weights: StateDict, path: Path) -> SD3Family:
    try:
        return SD3Family(mmdit_config_from_state_dict(weights))
    except ValueError as e:
        raise CheckpointError(f"{path.name}: {e}") from None


def is_sd3_unet_file(path: str | Path) -> bool:
    """Whether a .safetensors file holds an SD3 MMDiT (with or without `model.diffusion_model.`, or in diffusers'
    layout, one file or its shards), from its headers."""
    shapes = read_dit_shapes(path)
    return shapes is not None and _prefix(shapes) is not None


def peek_sd3(path: str | Path) -> SD3Family | None:
    """The family of an SD3 transformer file from its .safetensors headers alone; None for other files and formats."""
    shapes = read_dit_shapes(path)
    prefix = None if shapes is None else _prefix(shapes)
    if prefix is None:
        return None
    return _family({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}, Path(path))


def load_sd3_unet(path: str | Path, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> LoadedSD3Unet:
    """An SD3 transformer file (or the transformer of a checkpoint) on `device` in `dtype`, fp8 weights cast (scaled
    fp8 descaled); keys of neither the transformer nor a checkpoint's other parts are listed as unused."""
    path = Path(path)
    sd = load_dit_state_dict(path)  # diffusers' layout converted, shards joined
    prefix = _prefix(sd)
    if prefix is None:
        raise CheckpointError(f"{path.name}: not an SD3 diffusion model (no joint_blocks / x_embedder weights in "
                              "Stability's layout)")
    weights = dict(descaled_fp8({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}))
    family = _family(weights, path)
    unet = ckpt._materialize(lambda: MMDiT(family.unet_config), weights, "SD3 transformer", path, device, dtype)
    expected, skipped = set(unet.state_dict()), scaling_keys(sd)
    unused = sorted(k for k in sd if k not in skipped and not k.startswith(("first_stage_model.", "text_encoders."))
                    and not (k.startswith(prefix) and k[len(prefix):] in expected))
    return LoadedSD3Unet(family, unet, unused, path)
