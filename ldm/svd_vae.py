"""Stable Video Diffusion's autoencoder: SD's KL encoder, and a decoder whose res blocks and output convolution
also mix along the frames (SGM's VideoDecoder, "conv-only"); attribute names follow its checkpoint keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.svd import TIME_KERNEL, TemporalResBlock, from_video, to_video
from ldm.vae import AutoencoderKL, Decoder, ResnetBlock, VAEConfig


class VideoResnetBlock(ResnetBlock):
    """The VAE's res block, then a temporal one on its result; sigmoid(mix_factor) of the temporal path is kept
    (the other way round from the UNet's mix)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.time_stack = TemporalResBlock(out_channels, None)
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, frames: int = 1) -> torch.Tensor:
        spatial = to_video(super().forward(x), frames)
        alpha = torch.sigmoid(self.mix_factor).to(spatial.dtype)
        return from_video(alpha * self.time_stack(spatial) + (1 - alpha) * spatial)


class TimeMixConv(nn.Conv2d):
    """The decoder's output convolution, followed by one along the frames (SGM's AE3DConv)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, TIME_KERNEL,
                                       padding=tuple(k // 2 for k in TIME_KERNEL))

    def forward(self, x: torch.Tensor, frames: int = 1) -> torch.Tensor:
        return from_video(self.time_mix_conv(to_video(super().forward(x), frames)))


class VideoDecoder(Decoder):
    """`ldm.vae.Decoder` with every res block a `VideoResnetBlock` and the output convolution a `TimeMixConv`."""

    def __init__(self, c: VAEConfig):
        super().__init__(c)
        for mid_name in ("block_1", "block_2"):
            block = getattr(self.mid, mid_name)
            setattr(self.mid, mid_name, _video_block(block))
        for level in self.up:
            level.block = nn.ModuleList(_video_block(block) for block in level.block)
        self.conv_out = TimeMixConv(self.conv_out.in_channels, c.out_ch)

    def forward(self, z: torch.Tensor, frames: int = 1) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, frames)), frames)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h, frames)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)), frames)


def _video_block(block: ResnetBlock) -> VideoResnetBlock:
    return VideoResnetBlock(block.conv1.in_channels, block.conv2.out_channels)


class VideoAutoencoder(AutoencoderKL):
    """SVD's VAE: `decode` takes its latents [frames, 4, h, w] as one video (or as videos of `num_frames`)."""

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        self.decoder = VideoDecoder(config)

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        frames = num_frames or z.shape[0]
        if z.shape[0] % frames:
            raise ValueError(f"{z.shape[0]} latents are not a whole number of {frames}-frame videos")
        return self.decoder(self.post_quant_conv(z.to(self.dtype)), frames)
