"""The LDM UNet (SD1, SD2, SDXL); attribute names follow the `model.diffusion_model.` checkpoint keys."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import SpatialTransformer
from ldm.layout import GroupNorm


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a UNet. `transformer_depth[i]` is the number of transformer blocks at level i (0: none).

    Heads: `num_head_channels` (SD2, SDXL: 64 channels per head) wins over `num_heads`
    (SD1: 8 heads whatever the width). `num_classes`: a class-label embedding table added to the time
    embedding (the x4 upscaler's noise level); `disable_self_attentions[i]`: level i's transformer blocks
    attend to the context in their first attention too, not to the image (the x4 upscaler's lower levels).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    num_heads: int = 8
    num_head_channels: int | None = None
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    num_classes: int | None = None
    disable_self_attentions: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("transformer_depth needs one entry per channel_mult level")
        if self.disable_self_attentions is not None and len(self.disable_self_attentions) != len(self.channel_mult):
            raise ValueError("disable_self_attentions needs one entry per channel_mult level")
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ValueError("a UNet takes class labels (num_classes) or an adm vector (adm_in_channels), not both")

    @property
    def takes_y(self) -> bool:
        """Whether the UNet's forward needs `y`: an adm vector, or class labels."""
        return self.adm_in_channels is not None or self.num_classes is not None

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) for a transformer of `channels` width."""
        if self.num_head_channels:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim], cosines first (the LDM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sdxl_adm(pooled: torch.Tensor, width: int, height: int, crop_w: int = 0, crop_h: int = 0,
             target_width: int | None = None, target_height: int | None = None) -> torch.Tensor:
    """SDXL's `y`: pooled text embedding followed by 256-wide embeddings of the size and crop numbers.

    The order is SDXL's: original (height, width), crop (top, left), target (height, width).
    """
    return _adm(pooled, [height, width, crop_h, crop_w, target_height or height, target_width or width])


def sdxl_refiner_adm(pooled: torch.Tensor, width: int, height: int, crop_w: int = 0, crop_h: int = 0,
                     aesthetic_score: float = 6.0) -> torch.Tensor:
    """The SDXL refiner's `y`: pooled text embedding, then original (height, width), crop (top, left) and
    the aesthetic score it was trained on (ComfyUI's defaults: 6 for the positive prompt, 2.5 negative)."""
    return _adm(pooled, [height, width, crop_h, crop_w, aesthetic_score])


# How many 256-wide number embeddings follow the pooled text embedding in `y`, per family.
ADM_NUMBERS = {"sdxl": 6, "sdxl_refiner": 5}


def _adm(pooled: torch.Tensor, numbers: list[float]) -> torch.Tensor:
    emb = timestep_embedding(torch.tensor(numbers, dtype=torch.float32, device=pooled.device), 256)
    emb = emb.reshape(1, -1).expand(pooled.shape[0], -1).to(pooled.dtype)
    return torch.cat([pooled, emb], dim=1)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each getting the time embedding or the context if it takes one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                upsample_size: torch.Size | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        # Interpolating to the skip's size (not always x2) lets sizes that are not a multiple of 8 work.
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


def _transformer(c: UNetConfig, ch: int, depth: int, level: int | None = None) -> SpatialTransformer:
    """Level `level`'s transformer (None: the middle block's, which always attends to itself)."""
    heads, dim_head = c.heads(ch)
    text_only = level is not None and c.disable_self_attentions is not None and c.disable_self_attentions[level]
    return SpatialTransformer(ch, heads, dim_head, depth, c.context_dim, c.use_linear_in_transformer,
                              disable_self_attn=text_only)


def build_encoder(module: nn.Module, c: UNetConfig) -> list[int]:
    """The UNet's embeddings, input blocks and middle block, made on `module` under LDM's names (a
    ControlNet is this encoder plus its own layers); returns each input block's output channels."""
    ted = c.time_embed_dim
    module.time_embed = nn.Sequential(nn.Linear(c.model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
    if c.adm_in_channels is not None:
        module.label_emb = nn.Sequential(nn.Sequential(
            nn.Linear(c.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))
    elif c.num_classes is not None:
        module.label_emb = nn.Embedding(c.num_classes, ted)
    ch = c.model_channels
    module.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
    skip_channels = [ch]
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, ted, c.model_channels * mult)]
            ch = c.model_channels * mult
            if c.transformer_depth[level]:
                layers.append(_transformer(c, ch, c.transformer_depth[level], level))
            module.input_blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(c.channel_mult) - 1:
            module.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
    module.middle_block = TimestepEmbedSequential(
        ResBlock(ch, ted, ch), _transformer(c, ch, c.transformer_depth_middle), ResBlock(ch, ted, ch))
    return skip_channels


def embed(module: nn.Module, c: UNetConfig, timesteps: torch.Tensor, y: torch.Tensor | None,
          dtype: torch.dtype) -> torch.Tensor:
    """The time embedding of an encoder made by `build_encoder`, plus, for SDXL, that of its class/size vector
    `y`, or, for a UNet with `num_classes` (the x4 upscaler), that of the class labels `y` [B] (whole numbers)."""
    if (y is None) == c.takes_y:
        raise ValueError("y is required for models with adm_in_channels or num_classes, and only for them")
    emb = module.time_embed(timestep_embedding(timesteps, c.model_channels).to(dtype))
    if c.num_classes is not None:
        emb = emb + module.label_emb(y.round().long())
    elif y is not None:
        emb = emb + module.label_emb(y.to(dtype))
    return emb


def block_places(c: UNetConfig) -> list[str | None]:
    """A name for each input block's output, then the middle block's, where a T2I-Adapter's features can be
    added (`ldm.t2i_adapter`): "level{i}" after level i's last res block, "down{i}" after its downsample,
    "middle"; None for the other blocks."""
    places: list[str | None] = [None]  # the input convolution
    for level in range(len(c.channel_mult)):
        places += [None] * (c.num_res_blocks - 1) + [f"level{level}"]
        if level != len(c.channel_mult) - 1:
            places.append(f"down{level}")
    return [*places, "middle"]


@dataclass
class ControlResiduals:
    """What control models add to one UNet call (`UNetModel.forward`'s `control`, which also takes `skips`
    alone as a plain list). `skips`: ControlNets' residuals (`ldm.controlnet`), one per input block added to
    its skip connection, then one added to the middle block's output. `features`: T2I-Adapters' features
    (`ldm.t2i_adapter`) by place (`block_places`), added to that block's output, which the blocks after see."""

    skips: list[torch.Tensor] | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class UNetModel(nn.Module):
    # Set on patched copies (see `ldm.patches`): `h = patch(h, index, timesteps)` after each input block, before
    # its output is kept for the skip connection (or after, for patches with `after_skip`), and
    # `h, skip = patch(h, skip)` before each output block.
    input_block_patches: tuple = ()
    output_block_patches: tuple = ()

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ted = c.time_embed_dim
        skip_channels = build_encoder(self, c)
        ch = skip_channels[-1]

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, c.model_channels * mult)]
                ch = c.model_channels * mult
                if c.transformer_depth[level]:
                    layers.append(_transformer(c, ch, c.transformer_depth[level], level))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None,
                control: list[torch.Tensor] | ControlResiduals | None = None) -> torch.Tensor:
        """Predict noise (or v) for latents `x` [B,C,H,W] at `timesteps` [B] given `context` [B,L,D].

        `y` [B, adm_in_channels] is required by SDXL models (see `sdxl_adm`), `y` [B] class labels by models
        with `num_classes` (the x4 upscaler's noise level), and refused otherwise.
        `control` is a ControlNet's output (`ldm.controlnet`): one residual per input block, added to
        that block's skip connection, then one added to the middle block's output; or `ControlResiduals`,
        which may hold a T2I-Adapter's features too.
        """
        features: dict[int, torch.Tensor] = {}  # T2I-Adapter features by input block, the middle block last
        if isinstance(control, ControlResiduals):
            features = {i: control.features[place] for i, place in enumerate(block_places(self.config))
                        if place in control.features}
            control = control.skips
        dtype = self.dtype
        emb = embed(self, self.config, timesteps, y, dtype)
        h = x.to(dtype)
        context = context.to(dtype)
        skips = []
        for index, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if index in features:
                h = h + features[index].to(dtype)
            for patch in self.input_block_patches:
                h = h if patch.after_skip else patch(h, index, timesteps)
            skips.append(h)
            for patch in self.input_block_patches:
                h = patch(h, index, timesteps) if patch.after_skip else h
        h = self.middle_block(h, emb, context)
        if len(self.input_blocks) in features:
            h = h + features[len(self.input_blocks)].to(dtype)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"control has {len(control)} residuals; this UNet takes {len(skips) + 1}")
            h = h + control[-1].to(dtype)
        for block in self.output_blocks:
            skip = skips.pop()
            if control is not None:
                skip = skip + control[len(skips)].to(dtype)
            for patch in self.output_block_patches:
                h, skip = patch(h, skip)
            h = torch.cat([h, skip], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(x.dtype, memory_format=torch.contiguous_format)
