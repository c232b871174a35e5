"""Stable Video Diffusion's spatio-temporal UNet (SGM's VideoUNet); attribute names follow its checkpoint keys.

It is SD's UNet (`ldm.unet`) whose res blocks and transformers each gain a temporal twin, mixed with the spatial
output by a learned factor: a res block's `time_stack` convolves along the frames (3x1x1 kernels), a transformer's
`time_stack` attends along them (each pixel across frames, with a frame-position embedding added first). Frames
are the batch dimension, `num_frames` consecutive rows per video. SVD's `y` (`svd_y`) embeds the frame rate, the
motion bucket and the noise augmentation level; its context is the init image's CLIP embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.attention import CrossAttention, FeedForward, SpatialTransformer
from ldm.layout import GroupNorm
from ldm.unet import (
    Downsample,
    ResBlock,
    UNetConfig,
    Upsample,
    embed,
    timestep_embedding,
)

# SVD's added conditioning: three 256-wide embeddings of fps - 1, the motion bucket and the augmentation level.
SVD_ADM_CHANNELS = 3 * 256
TIME_KERNEL = (3, 1, 1)  # the temporal convolutions': three frames, one pixel


def svd_config(model_channels: int = 320, channel_mult: tuple[int, ...] = (1, 2, 4, 4),
               transformer_depth: tuple[int, ...] = (1, 1, 1, 0), num_res_blocks: int = 2,
               num_head_channels: int = 64, context_dim: int = 1024) -> UNetConfig:
    """SVD's UNet shape (the released img2vid and img2vid-xt models by default): SD2's linear-projection
    transformers with 64-wide heads, 8 input channels (the noisy latent and the init image's latent)."""
    return UNetConfig(in_channels=8, out_channels=4, model_channels=model_channels, channel_mult=channel_mult,
                      num_res_blocks=num_res_blocks, transformer_depth=transformer_depth,
                      num_head_channels=num_head_channels, context_dim=context_dim,
                      use_linear_in_transformer=True, adm_in_channels=SVD_ADM_CHANNELS)


def svd_y(fps: float, motion_bucket_id: float, augmentation_level: float, rows: int = 1) -> torch.Tensor:
    """SVD's added conditioning [rows, 768]: the embeddings of fps - 1, the motion bucket and the noise
    augmentation level (SGM's fps_id, motion_bucket_id and cond_aug)."""
    numbers = torch.tensor([fps - 1, motion_bucket_id, augmentation_level], dtype=torch.float32)
    return timestep_embedding(numbers, 256).reshape(1, -1).expand(rows, -1)


def with_frame_count(y: torch.Tensor, num_frames: int) -> torch.Tensor:
    """`y` with the video's frame count as one more column: how a sampler that knows nothing of videos tells
    the UNet (`SVDUNet.forward` without `num_frames`) which rows make one video, whatever it batches together."""
    return torch.cat([y, torch.full((y.shape[0], 1), float(num_frames), dtype=y.dtype, device=y.device)], dim=1)


class AlphaBlender(nn.Module):
    """A learned mix of the spatial and temporal paths: sigmoid(mix_factor) of the spatial one (SGM's
    "learned_with_images", every frame a video frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.mix_factor).to(spatial.dtype)
        return alpha * spatial + (1 - alpha) * temporal


class TemporalResBlock(nn.Module):
    """A res block over [videos, C, frames, H, W] whose convolutions run along the frames; the time embedding
    [videos, frames, E] is added per frame. Without `emb_channels` it takes none (the video VAE's)."""

    def __init__(self, channels: int, emb_channels: int | None, eps: float = 1e-5):
        super().__init__()
        padding = tuple(k // 2 for k in TIME_KERNEL)
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels, eps=eps), nn.SiLU(),
                                       nn.Conv3d(channels, channels, TIME_KERNEL, padding=padding))
        if emb_channels is not None:
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, channels, eps=eps), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv3d(channels, channels, TIME_KERNEL, padding=padding))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_layers(x)
        if emb is not None:
            h = h + self.emb_layers(emb).permute(0, 2, 1)[..., None, None]
        return x + self.out_layers(h)


def to_video(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[(videos frames), C, H, W] -> [videos, C, frames, H, W]."""
    return x.reshape(-1, frames, *x.shape[1:]).transpose(1, 2)


def from_video(x: torch.Tensor) -> torch.Tensor:
    """[videos, C, frames, H, W] -> [(videos frames), C, H, W]."""
    return x.transpose(1, 2).flatten(0, 1)


class VideoResBlock(ResBlock):
    """SD's res block, then its temporal twin on the result, mixed with it."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__(channels, emb_channels, out_channels)
        self.time_stack = TemporalResBlock(out_channels, emb_channels)
        self.time_mixer = AlphaBlender()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: int = 1) -> torch.Tensor:
        spatial = to_video(super().forward(x, emb), frames)
        temporal = self.time_stack(spatial, emb.reshape(-1, frames, emb.shape[-1]))
        return from_video(self.time_mixer(spatial, temporal))


class VideoTransformerBlock(nn.Module):
    """Attention along the frames, each pixel a sequence of `frames` tokens: a feed-forward in, self-attention,
    attention to the first frame's context, a feed-forward out (SGM's VideoTransformerBlock with ff_in)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        rows, tokens, dim = x.shape
        # [(videos frames), pixels, C] -> [(videos pixels), frames, C]
        x = x.reshape(-1, frames, tokens, dim).transpose(1, 2).reshape(-1, frames, dim)
        x = self.ff_in(self.norm_in(x)) + x
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        x = self.ff(self.norm3(x)) + x
        return x.reshape(-1, tokens, frames, dim).transpose(1, 2).reshape(rows, tokens, dim)


class SpatialVideoTransformer(SpatialTransformer):
    """SD2's spatial transformer; after each of its blocks a temporal block sees the tokens plus a frame-position
    embedding, and the two are mixed. The temporal blocks attend to each video's first-frame context."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__(channels, heads, dim_head, depth, context_dim, use_linear=True)
        inner = heads * dim_head
        self.in_channels = channels
        self.time_stack = nn.ModuleList(
            VideoTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.time_pos_embed = nn.Sequential(nn.Linear(channels, channels * 4), nn.SiLU(),
                                            nn.Linear(channels * 4, channels))
        self.time_mixer = AlphaBlender()

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int = 1) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        # The first frame's context of each video, once per pixel: the temporal blocks' cross-attention.
        time_context = context[::frames].repeat_interleave(h * w, dim=0)
        x = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, -1))
        positions = torch.arange(frames, device=x.device).repeat(b // frames)
        frame_emb = self.time_pos_embed(timestep_embedding(positions, self.in_channels).to(x.dtype))[:, None]
        for block, temporal in zip(self.transformer_blocks, self.time_stack, strict=True):
            x = block(x, context)
            x = self.time_mixer(x, temporal(x + frame_emb, time_context, frames))
        x = self.proj_out(x)
        return x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() + x_in


class VideoSequential(nn.Sequential):
    """A sequence of layers, each getting what it takes: the time embedding, the context, the frame count."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, frames: int,
                upsample_size: torch.Size | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, VideoResBlock):
                x = layer(x, emb, frames)
            elif isinstance(layer, SpatialVideoTransformer):
                x = layer(x, context, frames)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class SVDUNet(nn.Module):
    """The VideoUNet: `forward(x, timesteps, context, y, num_frames)` as `ldm.unet.UNetModel`'s, the rows of
    x a whole number of videos of `num_frames` frames each."""

    # Set on patched copies (`ldm.patches.with_output_block_patch`, FreeU): `h, skip = patch(h, skip)` before each
    # output block, as in `ldm.unet.UNetModel`.
    output_block_patches: tuple = ()

    def __init__(self, config: UNetConfig):
        super().__init__()
        if config.adm_in_channels != SVD_ADM_CHANNELS or not config.use_linear_in_transformer:
            raise ValueError("an SVD UNet takes a 768-wide y and linear transformer projections (see svd_config)")
        self.config = c = config
        ted = c.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, ted), nn.SiLU(),
                                                     nn.Linear(ted, ted)))
        ch = c.model_channels
        self.input_blocks = nn.ModuleList([VideoSequential(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [VideoResBlock(ch, ted, c.model_channels * mult)]
                ch = c.model_channels * mult
                if c.transformer_depth[level]:
                    layers.append(self._transformer(ch, c.transformer_depth[level]))
                self.input_blocks.append(VideoSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(VideoSequential(Downsample(ch)))
                skip_channels.append(ch)
        self.middle_block = VideoSequential(VideoResBlock(ch, ted, ch),
                                            self._transformer(ch, c.transformer_depth_middle),
                                            VideoResBlock(ch, ted, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [VideoResBlock(ch + skip_channels.pop(), ted, c.model_channels * mult)]
                ch = c.model_channels * mult
                if c.transformer_depth[level]:
                    layers.append(self._transformer(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(VideoSequential(*layers))
        self.out = nn.Sequential(GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

    def _transformer(self, channels: int, depth: int) -> SpatialVideoTransformer:
        heads, dim_head = self.config.heads(channels)
        return SpatialVideoTransformer(channels, heads, dim_head, depth, self.config.context_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                num_frames: int | None = None, control: object = None) -> torch.Tensor:
        """Predict v for latents `x` [(videos frames), 8, H, W] (the noisy latent, then the init image's) at
        `timesteps` [rows] given `context` [rows, L, D] and `y` [rows, 768] (`svd_y`). Without `num_frames`,
        `y` carries it as a last column (`with_frame_count`)."""
        if control is not None:
            raise ValueError("ControlNets and T2I-Adapters do not fit Stable Video Diffusion's UNet")
        if num_frames is None:
            if y.shape[-1] != SVD_ADM_CHANNELS + 1:
                raise ValueError("SVD's UNet needs num_frames, or y with the frame count as its last column")
            num_frames, y = round(float(y[0, -1])), y[:, :-1]
        if num_frames < 1 or x.shape[0] % num_frames:
            raise ValueError(f"{x.shape[0]} latent rows are not a whole number of {num_frames}-frame videos")
        dtype = self.dtype
        emb = embed(self, self.config, timesteps, y, dtype)
        h, context = x.to(dtype), context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, num_frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for block in self.output_blocks:
            skip = skips.pop()
            for patch in self.output_block_patches:
                h, skip = patch(h, skip)
            h = torch.cat([h, skip], dim=1)
            h = block(h, emb, context, num_frames, skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(x.dtype)
