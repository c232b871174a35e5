"""Wan 2.1 VACE (Alibaba's all-in-one video creation and editing model): Wan's text-to-video transformer with a
control branch, in the original checkpoint keys (`vace_patch_embedding`, `vace_blocks.N`).

The control input, `vace_context` [B, n, 96, T, H, W], holds n controls at the latent's size (ComfyUI's
WanVaceToVideo makes them, several when its nodes are chained): each the VAE latents of the control video where it
is to be kept and where it is to be remade (16 + 16 channels), then its mask with each latent pixel's 8 x 8 video
pixels folded into 64 channels. A control is patch-embedded by its own 3-D convolution and runs through the VACE
blocks, Wan blocks of their own weights (no image branch) at the main blocks' noise level, RoPE and prompt; the first
adds its projected tokens (`before_proj`) to the video's patch-embedded tokens, and each block's output, projected
(`after_proj`), is a hint added, times the control's strength, to the output of the main block it feeds
(`WanConfig.vace_layers`: every (layers // VACE blocks)th from 0, as ComfyUI and diffusers place them). The controls
run each their own chain of VACE blocks and their hints add up, as in ComfyUI's VaceWanModel. Without a control the
model is its text-to-video base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ldm.wan import Block, WanConfig, WanModel, pad_to_patch
from ldm.wan_camera import WanCameraModel

Controls = tuple[Tensor, list[float]]  # the controls' tokens [n, B, L, dim] and their strengths


class VaceBlock(Block):
    """A Wan block over a control's tokens; the first takes the video's tokens in (`before_proj`), and every one
    gives out a hint (`after_proj`)."""

    def __init__(self, c: WanConfig, first: bool):
        super().__init__(c)
        if first:
            self.before_proj = nn.Linear(c.dim, c.dim)
        self.after_proj = nn.Linear(c.dim, c.dim)

    def forward(self, control: Tensor, video: Tensor, e: Tensor, rope: tuple[Tensor, Tensor],
                context: Tensor) -> tuple[Tensor, Tensor]:
        """The hint and the control's tokens for the next VACE block, given the video's patch-embedded tokens."""
        if hasattr(self, "before_proj"):
            control = self.before_proj(control) + video
        control = super().forward(control, e, rope, context, None)
        return self.after_proj(control), control


class WanVaceModel(WanModel):
    def __init__(self, config: WanConfig):
        if not config.vace_layers:
            raise ValueError("a Wan VACE model's config names the main blocks its VACE blocks feed (vace_layers)")
        super().__init__(config)
        self.vace_patch_embedding = nn.Conv3d(config.vace_in_dim, config.dim, kernel_size=config.patch_size,
                                              stride=config.patch_size)
        self.vace_blocks = nn.ModuleList([VaceBlock(config, first=i == 0) for i in range(len(config.vace_layers))])

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                clip_fea: Tensor | None = None, denoise_mask: Tensor | None = None,
                vace_context: Tensor | None = None, vace_strength: Sequence[float] | float = 1.0) -> Tensor:
        """`WanModel.forward` guided by `vace_context` [B or 1, n, vace_in_dim, T, H, W] (n controls at the
        latent's frames and size; padded to whole patches as the latent is), each control's hints times its
        `vace_strength` (one for all, or one per control). Without controls: the base text-to-video model."""
        if vace_context is None:
            return super().forward(x, timesteps, context, y, clip_fea, denoise_mask)
        c, batch = self.config, x.shape[0]
        if (vace_context.ndim != 6 or vace_context.shape[0] not in (1, batch) or vace_context.shape[2] != c.vace_in_dim
                or vace_context.shape[-3:] != x.shape[-3:]):
            raise ValueError(f"VACE controls [{batch} or 1, n, {c.vace_in_dim}, {', '.join(map(str, x.shape[-3:]))}] "
                             f"for this latent, not {tuple(vace_context.shape)}")
        count = vace_context.shape[1]
        strengths = [float(vace_strength)] * count if isinstance(vace_strength, int | float) else \
            [float(s) for s in vace_strength]
        if len(strengths) != count:
            raise ValueError(f"{len(strengths)} VACE strengths for {count} controls: one for all, or one each")
        # All the controls of all the videos through the patch embedding at once: [n * B, C, T, H, W].
        padded = pad_to_patch(vace_context.movedim(1, 0).flatten(0, 1), c.patch_size)
        tokens = self.vace_patch_embedding(padded.to(self.dtype)).flatten(2).transpose(1, 2)
        tokens = tokens.unflatten(0, (count, -1)).expand(-1, batch, -1, -1)
        return super().forward(x, timesteps, context, y, clip_fea, denoise_mask, controls=(tokens, strengths))

    def run_blocks(self, tokens: Tensor, e0: Tensor, rope: tuple[Tensor, Tensor], context: Tensor,
                   image: Tensor | None, controls: Controls | None = None) -> Tensor:
        """The main blocks, each VACE block run after the main block it feeds and its hints added to that block's
        output. A control of strength 0 is skipped: its hints would add nothing."""
        if controls is None:
            return super().run_blocks(tokens, e0, rope, context, image)
        video, feeds = tokens, {layer: n for n, layer in enumerate(self.config.vace_layers)}
        active = [(control, strength) for control, strength in zip(controls[0].unbind(0), controls[1], strict=True)
                  if strength != 0]
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, e0, rope, context, image)
            if (n := feeds.get(i)) is None:
                continue
            for j, (control, strength) in enumerate(active):
                hint, control = self.vace_blocks[n](control, video, e0, rope, context)
                active[j] = (control, strength)
                tokens = tokens + hint * strength
        return tokens


def wan_model(config: WanConfig) -> WanModel:
    """The transformer a config describes: a VACE model if it has VACE blocks, a Fun camera model if it has a camera
    adapter (`ldm.wan_camera`), else Wan's plain one."""
    if config.camera_in_dim:
        return WanCameraModel(config)
    return WanVaceModel(config) if config.vace_layers else WanModel(config)


def is_vace(model: torch.nn.Module) -> bool:
    """Whether a model takes VACE controls (`vace_context`, `vace_strength`)."""
    return isinstance(model, WanVaceModel)
