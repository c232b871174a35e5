"""XLabs' Flux ControlNets (x-flux: flux-controlnet-canny/depth/hed v3): a pixel-space hint, residuals repeated.

Such a ControlNet is a few Flux double-stream blocks in Black Forest Labs' names with its own embedders. The hint
is the picture itself (in -1..1, 8x the latent's size): a conv stack (`input_hint_block`, three stride-2 steps)
brings it to the latent's size in 16 channels; cut into 2x2 patches and embedded (`pos_embed_input`) it is added
to the image tokens. After each block a linear layer (`controlnet_blocks`) gives one residual for the image tokens.
They go to the model's double-stream blocks in turn, over and over: block i gets residual i mod n (x-flux's
`block_controlnet_hidden_states[index_block % 2]`, ComfyUI's tuple repetition for pixel-hint ControlNets), unlike
the InstantX layout's consecutive runs (`ldm.controlnet_flux.spread`); single-stream blocks get none.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize
from ldm.controlnet import LoadedControlNet
from ldm.flux import DoubleStreamBlock, Flux, FluxConfig, MLPEmbedder, grid_ids, pad_to_patch, patchify, rope_angles
from ldm.unet import timestep_embedding

HINT_CHANNELS = 16
# input_hint_block: conv layers at these indices, SiLU between; the stride-2 ones halve the size.
_CONVS = {0: (3, 1), 2: (HINT_CHANNELS, 1), 4: (HINT_CHANNELS, 2), 6: (HINT_CHANNELS, 1), 8: (HINT_CHANNELS, 2),
          10: (HINT_CHANNELS, 1), 12: (HINT_CHANNELS, 2), 14: (HINT_CHANNELS, 1)}


def is_xlabs_controlnet(sd: StateDict) -> bool:
    return "controlnet_blocks.0.weight" in sd and "double_blocks.0.img_attn.qkv.weight" in sd


def repeat(outputs: list[Tensor], blocks: int) -> list[Tensor]:
    """XLabs' rule: the residuals for `blocks` blocks, block i getting outputs[i % len(outputs)]."""
    return [outputs[i % len(outputs)] for i in range(blocks)] if outputs else []


def hint_block() -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (channels, stride) in _CONVS.items():
        layers.append(nn.Conv2d(channels, HINT_CHANNELS, 3, padding=1, stride=stride))
        if index != max(_CONVS):
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class XLabsControlNet(nn.Module):
    """An XLabs ControlNet of `config`'s shape (`depth` its double-stream blocks; it has no single-stream ones)."""

    dtype = Flux.dtype
    global_average_pooling = False  # `ldm.controlnet.Control.residuals` asks every ControlNet
    pixel_hint = True  # `ldm.controlnet_flux.FluxControl`: the hint is not VAE-encoded
    label = "a Flux"

    @property
    def control_class(self) -> type:
        """The Control that applies it (Apply ControlNet's `attach`): Flux's, which passes its picture on."""
        from ldm.controlnet_flux import FluxControl

        return FluxControl
    model_blocks: tuple[int, int] | None = None  # the (double, single) block counts of the model it last fitted

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        if c.guidance_embed:
            self.guidance_in = MLPEmbedder(256, c.hidden_size)
        self.txt_in = nn.Linear(c.context_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(c) for _ in range(c.depth)])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(c.hidden_size, c.hidden_size) for _ in range(c.depth)])
        self.pos_embed_input = nn.Linear(HINT_CHANNELS * c.patch_size**2, c.hidden_size)
        self.input_hint_block = hint_block()

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                blocks: tuple[int, int] | None = None) -> list[Tensor]:
        """The residuals [B, tokens, hidden] for latents `x` [B, 16, H, W] and the hint picture `hint`
        [B, 3, 8H, 8W] in 0..1: one per double-stream block of the model (`blocks`, by default the model it was
        fitted to, else its own count), `repeat`ed, then zeros for its single-stream blocks."""
        c, dtype, p = self.config, self.dtype, self.config.patch_size
        x = pad_to_patch(x, p)
        rows, cols = x.shape[-2] // p, x.shape[-1] // p
        features = pad_to_patch(self.input_hint_block((hint * 2 - 1).to(dtype)), p)
        img = self.img_in(patchify(x.to(dtype), p)) + self.pos_embed_input(patchify(features, p))
        vec = self.time_in(timestep_embedding(timesteps * 1000, 256).to(dtype))
        if c.guidance_embed:  # the prompt's guidance after the pooled prompt, 0 without one
            guidance = y[:, c.vec_in_dim] if y is not None and y.shape[1] > c.vec_in_dim else torch.zeros_like(
                timesteps)
            vec = vec + self.guidance_in(timestep_embedding(guidance.float() * 1000, 256).to(dtype))
        pooled = torch.zeros(x.shape[0], c.vec_in_dim, device=x.device) if y is None else y[:, :c.vec_in_dim]
        vec = vec + self.vector_in(pooled.to(dtype))
        txt = self.txt_in(context.to(dtype))
        ids = torch.cat([torch.zeros(txt.shape[1], 3, device=x.device), grid_ids(rows, cols, device=x.device)])
        rope = rope_angles(ids, c.axes_dim, c.theta)
        outs = []
        for block, out_layer in zip(self.double_blocks, self.controlnet_blocks, strict=True):
            img, txt = block(img, txt, vec, rope)
            outs.append(out_layer(img))
        doubles, singles = blocks or self.model_blocks or (len(outs), 0)
        return repeat(outs, doubles) + [torch.zeros_like(outs[0])] * singles


def load_xlabs_controlnet(sd: StateDict, path: Path, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> LoadedControlNet:
    """An XLabs Flux ControlNet from its state dict (`is_xlabs_controlnet`)."""
    from ldm.controlnet_flux import flux_controlnet_config

    if "input_hint_block.0.weight" not in sd:
        raise CheckpointError(f"{path.name}: an XLabs-layout Flux ControlNet without the input_hint_block of x-flux's "
                              "canny/depth/hed files (a MistoLine-style hint encoder?), which this engine does not run")
    convs = sorted(int(m[1]) for k in sd if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    if convs != sorted(_CONVS):
        raise CheckpointError(f"{path.name}: an XLabs Flux ControlNet whose hint encoder has convolutions "
                              f"{convs}, not x-flux's {sorted(_CONVS)}")
    try:
        config = flux_controlnet_config(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = _materialize(lambda: XLabsControlNet(config), sd, "XLabs Flux ControlNet", path, device, dtype)
    expected = set(model.state_dict())
    return LoadedControlNet(model, "flux", sorted(k for k in sd if k not in expected), path)
