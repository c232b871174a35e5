"""Stability AI's SD3.5 Large ControlNets (sd3.5_large_controlnet_blur/canny/depth.safetensors), in their own layout.

Unlike InstantX's SD3 ControlNets (`ldm.controlnet_sd3`), these have no patch embedding, position table or text
stream of their own: the latents are embedded by the model's own `x_embedder` plus its cropped position table (as
diffusers' pipeline does with `use_pos_embed=False`), the hint's latents are added through `pos_embed_input`, and
image-only transformer blocks (`transformer_blocks.N`, diffusers' SD3SingleTransformerBlock: an MMDiT block's image
stream, attending to itself) run, each followed by a linear `controlnet_blocks.N` output. The timestep and the
pooled prompt (not zeroed: diffusers' force_zeros_for_pooled_projection=False) are embedded by the file's own
embedders, stored in diffusers' names (`time_text_embed.*`).

The hint image is VAE-encoded with SD3's latent shift and scale. A `control_type` entry in the file says what the
hint is, and how it is prepared for the VAE: blur (0) and others as usual (2x - 1); canny (1) as Stability's
sd3_infer.py does (x * 127.5 + 0.5, a range the edges were trained with); depth (2) inverted first (1 - x), as
ComfyUI does, for depth maps where near is white. (ComfyUI's canny input to the VAE is x * 255, not Stability's.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize
from ldm.controlnet import LoadedControlNet, prepare_hint
from ldm.controlnet_sd3 import HINT_LATENT_SCALE, SD3ControlNet
from ldm.mmdit import DismantledBlock, Embedder, MMDiT, MMDiTConfig, PatchEmbed, _attend
from ldm.unet import timestep_embedding

HINT_LATENT_SHIFT = 0.0609  # SD3's latent shift, applied to these hints
HINT_KINDS = {0: "blur", 1: "canny", 2: "depth"}  # the file's `control_type`
_EMBEDDERS = {"time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
              "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}


class SD35ControlNet(SD3ControlNet):
    """`blocks` image-only blocks of width `config.hidden_size`, the embedders of the timestep and pooled prompt, the
    hint's patch embedding and the output layers; `hint_kind` ("blur", "canny", "depth" or None) prepares the hint."""

    fitted_fields = ("hidden_size", "patch_size", "in_channels", "adm_in_channels")
    uses_base = True

    def __init__(self, config: MMDiTConfig, blocks: int, hint_kind: str | None = None):
        super().__init__()
        self.config = c = config
        self.hint_kind = hint_kind
        self.t_embedder = Embedder(256, c.hidden_size)
        self.y_embedder = Embedder(c.adm_in_channels, c.hidden_size)
        self.transformer_blocks = nn.ModuleList([DismantledBlock(c) for _ in range(blocks)])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(c.hidden_size, c.hidden_size) for _ in range(blocks)])
        self.pos_embed_input = PatchEmbed(c.in_channels, c.hidden_size, c.patch_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.controlnet_blocks[0].bias.dtype

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None, *,
                base: MMDiT) -> list[Tensor]:
        """One output [B, tokens, hidden] per block for latents `x` [B, 16, H, W] and the hint's latents `hint`,
        the patches of `x` embedded by the model `base`. The prompt's tokens `context` are not used."""
        dtype, p = self.dtype, self.config.patch_size
        h, w = x.shape[-2:]
        pad = (0, -w % p, 0, -h % p)
        padded = F.pad(x, pad, mode="circular") if h % p or w % p else x
        rows, cols = padded.shape[-2] // p, padded.shape[-1] // p
        img = base.x_embedder(padded.to(base.dtype)) + base.cropped_pos_embed(rows, cols).to(base.dtype)
        hint = F.pad(hint, pad, mode="circular") if h % p or w % p else hint
        img = img.to(dtype) + self.pos_embed_input(hint.to(dtype))
        if y is None:
            y = torch.zeros(x.shape[0], self.config.adm_in_channels, device=x.device)
        vec = self.t_embedder(timestep_embedding(timesteps * 1000, 256).to(dtype)) + self.y_embedder(y.to(dtype))
        outs = []
        for block, out_layer in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            qkv, mods = block.pre(img, vec)
            img = block.post(img, _attend(*qkv), mods)
            outs.append(out_layer(img))
        return outs

    def hint_latents(self, vae: nn.Module, image: Tensor, height: int, width: int) -> Tensor:
        """The hint cropped and resized to 8x the latent's size, prepared for its kind, encoded by `vae` (the
        posterior's mode), shifted and scaled as SD3's latents."""
        pixels = prepare_hint(image.float(), height * 8, width * 8)
        if self.hint_kind == "canny":
            pixels = pixels * 127.5 + 0.5
        else:
            pixels = (1 - pixels if self.hint_kind == "depth" else pixels) * 2 - 1
        param = next(vae.parameters())
        with torch.no_grad():
            latents = vae.encode(pixels.to(param.device, param.dtype)).mode()
        return (latents.float() - HINT_LATENT_SHIFT) * HINT_LATENT_SCALE


def sd35_controlnet_shape(sd: StateDict) -> tuple[MMDiTConfig, int]:
    """(config, blocks) of a Loom-named SD3.5 Large ControlNet. Heads are 64 wide until fitted to a model."""
    try:
        hidden, in_channels, patch, _ = sd["pos_embed_input.proj.weight"].shape
        blocks = len({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
        config = MMDiTConfig(
            in_channels=in_channels, out_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=blocks,
            num_heads=max(1, hidden // 64), mlp_ratio=sd["transformer_blocks.0.mlp.fc1.weight"].shape[0] / hidden,
            adm_in_channels=sd["y_embedder.mlp.0.weight"].shape[1])
    except KeyError as e:
        raise CheckpointError(f"an incomplete SD3.5 Large ControlNet: no weight {e}") from None
    pooled = tuple(sd["y_embedder.mlp.0.weight"].shape)
    if pooled[0] != hidden:  # a variant with a second pooled-prompt embedder (ComfyUI reads one): not run here
        raise CheckpointError(f"an SD3.5 ControlNet whose pooled-prompt embedder is {pooled} for blocks {hidden} "
                              "wide, a layout this engine does not run")
    return config, blocks


def load_sd35_controlnet(sd: StateDict, path: Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> LoadedControlNet:
    """An SD3.5 Large ControlNet from a state dict in Stability's layout (`transformer_blocks.N.adaLN_modulation`)."""
    sd = dict(sd)
    kind = sd.pop("control_type", None)
    hint_kind = None if kind is None else HINT_KINDS.get(round(kind.float().item()))
    renamed: dict[str, Tensor] = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        renamed[f"{_EMBEDDERS[module]}.{leaf}" if module in _EMBEDDERS else key] = value
    try:
        config, blocks = sd35_controlnet_shape(renamed)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = _materialize(lambda: SD35ControlNet(config, blocks, hint_kind), renamed, "SD3.5 Large ControlNet",
                         path, device, dtype)
    expected = set(model.state_dict())
    return LoadedControlNet(model, "sd3", sorted(k for k in renamed if k not in expected), path)
