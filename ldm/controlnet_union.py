"""ControlNet Union (xinsir's ControlNet++: controlnet-union-sdxl-1.0 and its "promax" file): one SDXL
ControlNet for several control types, the type chosen with each hint.

It is a diffusers-layout ControlNet (read by `ldm.controlnet.load_controlnet`) with four extra parts, named
here as in its files:

- `control_add_embedding`: the control type as a one-hot vector, each entry embedded sinusoidally (256 wide)
  as SDXL embeds its size numbers, then two linear layers; added to the time embedding.
- `task_embedding` [types, 320]: one vector per control type, added to the hint's features averaged over
  the image: one token per hint.
- `transformer_layes` (sic): a CLIP-style residual attention block over those tokens.
- `spatial_ch_projs`: the token, projected back to the hint features' channels and added to every position.

The type is an index into `CONTROL_TYPES` (the promax file knows all eight, the first release the first
six), or None, ComfyUI's "auto": the hint features are added as a plain ControlNet adds them, and the type
embedding is that of the all-zero vector.

The attention runs over one sample's tokens, as in ComfyUI. xinsir's code, and diffusers'
`ControlNetUnionModel` after it, give `nn.MultiheadAttention` [batch, tokens, C] without `batch_first`, so
its attention runs across the batch instead; the two agree at batch size 1, and only this one gives each
sample the same residuals whatever else is in its batch (positive and negative prompts, say).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _indices
from ldm.controlnet import HINT_WIDTHS, ControlNet
from ldm.unet import UNetConfig, embed, timestep_embedding

# Index = the type's position in the one-hot vector and in `task_embedding` (ComfyUI's UNION_CONTROLNET_TYPES).
CONTROL_TYPES = ("openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd", "normal",
                 "segment", "tile", "repaint")
MARKER = "control_add_embedding.linear_1.weight"  # with `task_embedding`: what makes a file a Union
# The released models' condition transformer; no weight records it. With one hint per apply, each sample has
# one token, over which attention is its value projection whatever the heads.
HEADS = 8


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class TokenAttention(nn.Module):
    """Multi-head self-attention over [B, tokens, C], its weights named as torch's `nn.MultiheadAttention`
    names them (the files' keys)."""

    def __init__(self, width: int, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = (t.reshape(batch, tokens, self.heads, -1).transpose(1, 2)
                   for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        return self.out_proj(out)


class ConditionBlock(nn.Module):
    """CLIP's residual attention block: pre-norm attention, then a quick-GELU MLP 4x wide."""

    def __init__(self, width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = TokenAttention(width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ControlTypeEmbedding(nn.Module):
    """The control type's one-hot vector, each entry embedded sinusoidally, through two linear layers."""

    def __init__(self, types: int, out_dim: int, entry_dim: int = 256):
        super().__init__()
        self.types, self.entry_dim = types, entry_dim
        self.linear_1 = nn.Linear(types * entry_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, control_type: int | None, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        one_hot = torch.zeros(self.types, device=device)
        if control_type is not None:
            one_hot[control_type] = 1.0
        entries = timestep_embedding(one_hot, self.entry_dim).to(dtype).reshape(1, -1)
        return self.linear_2(F.silu(self.linear_1(entries))).expand(batch, -1)


class UnionControlNet(ControlNet):
    def __init__(self, config: UNetConfig, types: int, layers: int = 1, hint_channels: int = 3,
                 hint_widths: tuple[int, ...] = HINT_WIDTHS):
        super().__init__(config, hint_channels, hint_widths)
        width = config.model_channels  # the tokens are the hint features' channels (320 in the released files)
        self.task_embedding = nn.Parameter(torch.empty(types, width))
        self.transformer_layes = nn.Sequential(*(ConditionBlock(width) for _ in range(layers)))
        self.spatial_ch_projs = nn.Linear(width, width)
        self.control_add_embedding = ControlTypeEmbedding(types, config.time_embed_dim)

    @property
    def types(self) -> int:
        return self.task_embedding.shape[0]

    def check_control_type(self, control_type: int | None) -> None:
        """Raise ValueError for a type this model was not trained with (tile and repaint need the promax file)."""
        if control_type is not None and not 0 <= control_type < self.types:
            name = CONTROL_TYPES[control_type] if 0 <= control_type < len(CONTROL_TYPES) else str(control_type)
            raise ValueError(f"control type {name!r} needs a ControlNet Union with at least {control_type + 1} "
                             f"control types (the promax file has {len(CONTROL_TYPES)}); this one has {self.types}: "
                             f"{', '.join(CONTROL_TYPES[:self.types])} or auto")

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                control_type: int | None = None) -> list[Tensor]:
        """`ControlNet.forward` with the control type: an index into `CONTROL_TYPES`, None for auto."""
        self.check_control_type(control_type)
        dtype = self.dtype
        emb = embed(self, self.config, timesteps, y, dtype)
        emb = emb + self.control_add_embedding(control_type, x.shape[0], dtype, x.device)
        guided = self.input_hint_block(hint.to(dtype))
        if control_type is not None:
            guided = guided + self._type_offset(guided, control_type)
        return self.encode(x, guided, emb, context)

    def _type_offset(self, features: Tensor, control_type: int) -> Tensor:
        """The per-channel offset [B, C, 1, 1] that the hint's token, typed and transformed, adds to its features."""
        # On the offload device with low VRAM: the streaming moves only submodules.
        task = self.task_embedding[control_type].to(features.device, features.dtype)
        tokens = (features.mean(dim=(2, 3)) + task).unsqueeze(1)
        return self.spatial_ch_projs(self.transformer_layes(tokens)[:, 0])[..., None, None]


def union_layout(sd: StateDict) -> tuple[int, int] | None:
    """(control types, condition transformer blocks) of a ControlNet Union state dict; None for other ControlNets."""
    if "task_embedding" not in sd or MARKER not in sd:
        return None
    types, width = sd["task_embedding"].shape
    channels = sd["input_blocks.0.0.weight"].shape[0] if "input_blocks.0.0.weight" in sd else width
    if width != channels:
        raise CheckpointError(f"a ControlNet Union whose control types are {width} wide and its hint features "
                              f"{channels}")
    return types, len(_indices(list(sd), r"transformer_layes\.(\d+)\."))
