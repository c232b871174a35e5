"""SigLIP vision towers (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training") as image prompts.

The file Flux Redux users keep in models/clip_vision (sigclip_vision_patch14_384.safetensors, SigLIP so400m at
384 px) is transformers' SiglipVisionModel under `vision_model.*`: a ViT without class token or pre-LayerNorm,
whose patch embedding has a bias, and an attention-pooling `head`. Its encoding follows ComfyUI's for SigLIP: the
last hidden state after the final LayerNorm (what Redux reads), `image_embeds` the same tokens (ComfyUI's SigLIP
has no projection), images normalised with mean and std 0.5. The head count is not in the weights: so400m's 1152
width has 16 heads (72 wide); other widths get 64-wide heads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize
from ldm.clip_vision import ClipVisionOutput, preprocess

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
PREFIX = "vision_model."
_HEADS = {1152: 16}
# The attention-pooling head's output (a pooled embedding) is read by no image prompt ComfyUI runs, nor here.
_HEAD = PREFIX + "head."


def is_siglip(weights: StateDict) -> bool:
    """A SigLIP tower under transformers' names: a biased patch embedding and no class token."""
    return (PREFIX + "embeddings.patch_embedding.bias" in weights
            and PREFIX + "embeddings.class_embedding" not in weights)


@dataclass(frozen=True)
class SiglipConfig:
    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    intermediate_size: int


def siglip_config(weights: StateDict) -> SiglipConfig:
    """The tower's shape from its weights (transformers' names, `vision_model.` prefix)."""
    try:
        width, _, patch_size, _ = weights[PREFIX + "embeddings.patch_embedding.weight"].shape
        positions = weights[PREFIX + "embeddings.position_embedding.weight"].shape[0]
        intermediate = weights[PREFIX + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"incomplete SigLIP vision model: no weight {e}") from None
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise CheckpointError(f"SigLIP vision model with {positions} position embeddings: not a square grid")
    layers = len({m[1] for k in weights if (m := re.match(rf"{PREFIX}encoder\.layers\.(\d+)\.", k))})
    heads = _HEADS.get(width) or (width // 64 if width % 64 == 0 else max(1, width // 16))
    return SiglipConfig(width, layers, heads, patch_size, grid * patch_size, intermediate)


class SiglipVision(nn.Module):
    """A SigLIP image tower: transformers' `SiglipVisionModel` (without its pooling head) as `model`."""

    def __init__(self, config: SiglipConfig) -> None:
        from transformers import SiglipVisionConfig, SiglipVisionModel  # seconds to import: only when used

        super().__init__()
        self.config = config
        self.model = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=config.width, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.layers, num_attention_heads=config.heads, image_size=config.image_size,
            patch_size=config.patch_size, vision_use_head=False))

    @torch.no_grad()
    def encode(self, image: Tensor, crop: bool = True) -> ClipVisionOutput:
        """Encode an IMAGE [B, H, W, C] in 0..1 (resized and cropped as `ldm.clip_vision.preprocess`, normalised
        with SigLIP's mean and std); tensors come on the model's device."""
        weight = self.model.post_layernorm.weight
        pixels = preprocess(image.to(weight.device), self.config.image_size, crop, SIGLIP_MEAN, SIGLIP_STD)
        out = self.model(pixel_values=pixels.to(weight.dtype), output_hidden_states=True)
        return ClipVisionOutput(out.last_hidden_state, out.last_hidden_state, out.hidden_states[-2])


def load_siglip(weights: StateDict, path: Path, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[SiglipVision, list[str]]:
    """A SigLIP tower from its weights (`is_siglip`), and the keys no weight came from (the position-id buffer
    and the pooling head are known and not reported)."""
    try:
        config = siglip_config(weights)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    ours = {f"model.{k.removeprefix(PREFIX)}": v for k, v in weights.items()}
    model = _materialize(lambda: SiglipVision(config), ours, "SigLIP vision model", path, device, dtype)
    embeddings = model.model.embeddings
    # A non-persistent buffer, left on the meta device by the weights-only load.
    embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand((1, -1))
    expected = set(model.state_dict())
    unused = sorted(k for k, ours_key in zip(weights, ours, strict=True) if ours_key not in expected
                    and not k.startswith(_HEAD) and k != PREFIX + "embeddings.position_ids")
    return model, unused
