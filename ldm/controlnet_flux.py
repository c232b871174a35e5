"""ControlNets for Flux.1 in diffusers' FluxControlNetModel layout (InstantX's, Shakker-Labs', diffusers' own files).

Such a ControlNet is a shortened Flux transformer (its embedders, a few double-stream and single-stream blocks)
that also sees the hint: the hint image is VAE-encoded into Flux's latent space (shifted and scaled), cut into 2x2
patches and embedded by its own zero-initialised linear layer (`controlnet_x_embedder`), added to the image tokens.
After each block a linear layer (`controlnet_blocks`, `controlnet_single_blocks`) gives one residual for the image
tokens. The transformer has more blocks than the ControlNet: each residual serves ceil(model blocks / ControlNet
blocks) consecutive blocks of its kind, as diffusers and ComfyUI spread them (`spread`).

Files in diffusers' names are read into Loom's (Black Forest Labs' block names, `ldm.flux`). XLabs' ControlNets
(a pixel-space hint encoder) are `ldm.controlnet_flux_xlabs`'s. A Union ControlNet (InstantX's and Shakker-Labs'
FLUX.1-dev-ControlNet-Union(-Pro)) also embeds a control mode (`controlnet_mode_embedder`), chosen with Set Union
ControlNet Type, as one more text token in front of the prompt's; with none chosen ("auto") it adds none, as in
ComfyUI. The mode is the model's own index (InstantX's: 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low
quality): ComfyUI passes the SDXL Union type list's index to it unchanged, and so does Loom.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize
from ldm.controlnet import LoadedControlNet, prepare_hint
from ldm.controlnet_sd3 import SD3Control, config_mismatch
from ldm.flux import (
    STANDARD_AXES,
    DoubleStreamBlock,
    Flux,
    FluxConfig,
    MLPEmbedder,
    SingleStreamBlock,
    grid_ids,
    pad_to_patch,
    patchify,
    rope_angles,
)
from ldm.flux_files import FLUX_VAE, LATENT_SHIFT
from ldm.unet import timestep_embedding

_DOUBLE = re.compile(r"transformer_blocks\.(\d+)\.")
_SINGLE = re.compile(r"single_transformer_blocks\.(\d+)\.")
# diffusers' module names -> BFL's, per double-stream block, per single-stream block, and for the embedders.
_DOUBLE_NAMES = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
                 "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                 "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
          "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE_NAMES = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_EMBEDDERS = {"x_embedder": "img_in", "context_embedder": "txt_in",
              "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer"}


def is_flux_controlnet(sd: StateDict) -> bool:
    """A Flux ControlNet in diffusers' layout (or XLabs', refused when loaded)."""
    return "controlnet_x_embedder.weight" in sd or ("controlnet_blocks.0.weight" in sd and "double_blocks.0."
                                                    "img_attn.qkv.weight" in sd)


def from_diffusers(sd: StateDict) -> StateDict:
    """diffusers' FluxControlNetModel names -> Loom's; keys it does not know are kept, to be reported as unused."""
    sd, out = dict(sd), {}
    renames = dict(_EMBEDDERS)
    for i in sorted({int(m[1]) for k in sd if (m := _DOUBLE.match(k))}):
        theirs, ours = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for names, stream in ((("to_q", "to_k", "to_v"), "img_attn"), (("add_q_proj", "add_k_proj", "add_v_proj"),
                                                                        "txt_attn")):
            for leaf in ("weight", "bias"):
                if f"{theirs}attn.{names[0]}.{leaf}" in sd:
                    out[f"{ours}{stream}.qkv.{leaf}"] = torch.cat([sd.pop(f"{theirs}attn.{n}.{leaf}") for n in names])
        renames.update({theirs + k: ours + v for k, v in _DOUBLE_NAMES.items()})
        out.update({f"{ours}{v}.scale": sd.pop(f"{theirs}{k}.weight") for k, v in _NORMS.items()
                    if f"{theirs}{k}.weight" in sd})
    for i in sorted({int(m[1]) for k in sd if (m := _SINGLE.match(k))}):
        theirs, ours = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        parts = [f"{theirs}attn.to_q", f"{theirs}attn.to_k", f"{theirs}attn.to_v", f"{theirs}proj_mlp"]
        for leaf in ("weight", "bias"):
            if all(f"{p}.{leaf}" in sd for p in parts):
                out[f"{ours}linear1.{leaf}"] = torch.cat([sd.pop(f"{p}.{leaf}") for p in parts])
        renames.update({theirs + k: ours + v for k, v in _SINGLE_NAMES.items()})
        out.update({f"{ours}{v}.scale": sd.pop(f"{theirs}{k}.weight") for k, v in _SINGLE_NORMS.items()
                    if f"{theirs}{k}.weight" in sd})
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        out[f"{renames[module]}.{leaf}" if module in renames else key] = value
    return out


def spread(outputs: list[Tensor], blocks: int) -> list[Tensor]:
    """A ControlNet's residuals for the `blocks` blocks of one kind: each serves ceil(blocks / len) in a row."""
    if not outputs:
        return []
    per = math.ceil(blocks / len(outputs))
    return [outputs[i // per] for i in range(blocks)]


class FluxControlNet(nn.Module):
    """A ControlNet of `config`'s shape (`depth` and `depth_single_blocks` its own block counts); `hint_width` is
    the values a hint token holds, more than the latent's for an inpainting ControlNet (`ldm.controlnet_inpaint`)."""

    dtype = Flux.dtype
    global_average_pooling = False  # `ldm.controlnet.Control.residuals` asks every ControlNet
    model_blocks: tuple[int, int] | None = None  # the (double, single) block counts of the model it last fitted
    label = "a Flux"  # for messages: "<file> is a Flux ControlNet"

    @property
    def control_class(self) -> type[FluxControl]:
        """The Control that applies it (Apply ControlNet's `attach`): its hint is VAE-encoded at the latent's size."""
        return FluxControl

    def __init__(self, config: FluxConfig, modes: int = 0, hint_width: int | None = None):
        super().__init__()
        self.config = c = config
        self.modes = modes  # a Union's control modes; 0: not a Union
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        if c.guidance_embed:
            self.guidance_in = MLPEmbedder(256, c.hidden_size)
        self.txt_in = nn.Linear(c.context_dim, c.hidden_size)
        if modes:
            self.controlnet_mode_embedder = nn.Embedding(modes, c.hidden_size)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(c) for _ in range(c.depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(c) for _ in range(c.depth_single_blocks)])
        self.controlnet_x_embedder = nn.Linear(hint_width or c.in_channels, c.hidden_size)
        self.controlnet_blocks = nn.ModuleList([nn.Linear(c.hidden_size, c.hidden_size) for _ in range(c.depth)])
        self.controlnet_single_blocks = nn.ModuleList([nn.Linear(c.hidden_size, c.hidden_size)
                                                       for _ in range(c.depth_single_blocks)])

    @property
    def mask_channels(self) -> int:
        """The hint's channels after the latent's: 1 for an inpainting ControlNet (its keep mask), else 0."""
        extra = self.controlnet_x_embedder.in_features - self.img_in.in_features
        return extra // self.config.patch_size**2

    def check_control_type(self, control_type: int | None) -> None:
        """Raise ValueError for a control mode this ControlNet has not (Set Union ControlNet Type)."""
        if control_type is not None and not 0 <= control_type < self.modes:
            raise ValueError(f"control mode {control_type} is not one of this Flux ControlNet Union's {self.modes} "
                             f"(0 to {self.modes - 1}; auto: none)" if self.modes else
                             "a single-purpose Flux ControlNet takes no control mode")

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                blocks: tuple[int, int] | None = None, control_type: int | None = None) -> list[Tensor]:
        """The residuals [B, tokens, hidden] for latents `x` [B, 16, H, W] and the hint's latents `hint`
        (scaled, `encode_hint`): one per double-stream block then one per single-stream block, spread over the
        model's `blocks` (double, single) counts (by default those of the model it was fitted to, else its own).
        A Union's `control_type` (its mode) goes in front of the text tokens."""
        self.check_control_type(control_type)
        c, dtype, p = self.config, self.dtype, self.config.patch_size
        x, hint = pad_to_patch(x, p), pad_to_patch(hint, p)  # odd sizes as the model pads them
        rows, cols = x.shape[-2] // p, x.shape[-1] // p
        img = self.img_in(patchify(x.to(dtype), p)) + self.controlnet_x_embedder(patchify(hint.to(dtype), p))
        vec = self.time_in(timestep_embedding(timesteps * 1000, 256).to(dtype))
        pooled = torch.zeros(x.shape[0], c.vec_in_dim, device=x.device) if y is None else y[:, :c.vec_in_dim]
        if c.guidance_embed:  # a guidance-distilled ControlNet: the prompt's guidance, 0 without one
            guidance = y[:, c.vec_in_dim] if y is not None and y.shape[1] > c.vec_in_dim else torch.zeros_like(
                timesteps)
            vec = vec + self.guidance_in(timestep_embedding(guidance.float() * 1000, 256).to(dtype))
        vec = vec + self.vector_in(pooled.to(dtype))
        txt = self.txt_in(context.to(dtype))
        if control_type is not None:  # at text position 0, as the prompt's tokens
            mode = self.controlnet_mode_embedder(torch.tensor([control_type], device=x.device)).to(dtype)
            txt = torch.cat([mode.expand(txt.shape[0], 1, -1), txt], dim=1)
        ids = torch.cat([torch.zeros(txt.shape[1], 3, device=x.device), grid_ids(rows, cols, device=x.device)])
        rope = rope_angles(ids, c.axes_dim, c.theta)
        doubles, singles = [], []
        for block, out_layer in zip(self.double_blocks, self.controlnet_blocks, strict=True):
            img, txt = block(img, txt, vec, rope)
            doubles.append(out_layer(img))
        tokens = torch.cat([txt, img], dim=1)
        for block, out_layer in zip(self.single_blocks, self.controlnet_single_blocks, strict=True):
            tokens = block(tokens, vec, rope)
            singles.append(out_layer(tokens[:, txt.shape[1]:]))
        blocks = blocks or self.model_blocks
        if blocks is None:
            return doubles + singles
        return spread(doubles, blocks[0]) + spread(singles, blocks[1])


def flux_controlnet_config(sd: StateDict) -> FluxConfig:
    """The shape of a Loom-named Flux ControlNet. The RoPE split of a head is not in the weights: Flux.1's for its
    128-wide heads; other widths get a provisional one, the model's when used (`FluxControl.fit`)."""
    try:
        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        axes_dim = STANDARD_AXES if head_dim == sum(STANDARD_AXES) else (head_dim, 0, 0)
        return FluxConfig(
            in_channels=in_channels, out_channels=in_channels, vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
            context_dim=sd["txt_in.weight"].shape[1], hidden_size=hidden,
            mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden, num_heads=hidden // head_dim,
            depth=len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")}),
            depth_single_blocks=len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")}),
            axes_dim=axes_dim, qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
            guidance_embed="guidance_in.in_layer.weight" in sd)
    except KeyError as e:
        raise CheckpointError(f"an incomplete Flux ControlNet: no weight {e}") from None
    except ValueError as e:
        raise CheckpointError(f"a Flux ControlNet of a shape Flux.1 has not: {e}") from None


def load_flux_controlnet(sd: StateDict, path: Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> LoadedControlNet:
    """A Flux ControlNet from a state dict in diffusers' layout (`is_flux_controlnet`)."""
    from ldm.controlnet_flux_xlabs import is_xlabs_controlnet, load_xlabs_controlnet

    if is_xlabs_controlnet(sd):
        return load_xlabs_controlnet(sd, path, device, dtype)
    sd = from_diffusers(sd)
    modes = sd["controlnet_mode_embedder.weight"].shape[0] if "controlnet_mode_embedder.weight" in sd else 0
    try:
        config = flux_controlnet_config(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    hint_width = sd["controlnet_x_embedder.weight"].shape[1] if "controlnet_x_embedder.weight" in sd else None
    if hint_width is not None and (hint_width < config.in_channels or hint_width % config.patch_size**2):
        raise CheckpointError(f"{path.name}: a Flux ControlNet whose hint embedding takes {hint_width} values a token: "
                              f"the latent's {config.in_channels}, or more in whole channels of "
                              f"{config.patch_size}x{config.patch_size} patches (an inpainting one's 68), expected")
    model = _materialize(lambda: FluxControlNet(config, modes, hint_width), sd, "Flux ControlNet", path, device,
                         dtype)
    expected = set(model.state_dict())
    return LoadedControlNet(model, "flux", sorted(k for k in sd if k not in expected), path)


def encode_hint(vae: nn.Module, image: Tensor, height: int, width: int) -> Tensor:
    """The hint image [B, 3, h, w] in 0..1 as a Flux ControlNet takes it for latents of height x width: cropped and
    resized to 8x that size, encoded by `vae` (the posterior's mode), shifted and scaled into Flux's latent space."""
    pixels = prepare_hint(image.float(), height * 8, width * 8)
    param = next(vae.parameters())
    with torch.no_grad():
        latents = vae.encode((pixels * 2 - 1).to(param.device, param.dtype)).mode()
    return (latents.float() - LATENT_SHIFT) * FLUX_VAE.scaling_factor


@dataclass(eq=False)
class FluxControl(SD3Control):
    """One Flux ControlNet applied to one conditioning (see `SD3Control`: the hint is VAE-encoded when first used)."""

    def fit(self, unet: nn.Module, schedule: object) -> str | None:
        ours, theirs = self.model.config, getattr(unet, "config", None)
        if not isinstance(theirs, FluxConfig):
            return "a Flux ControlNet runs with Flux models only"
        problem = config_mismatch(ours, theirs, ("hidden_size", "context_dim", "vec_in_dim", "num_heads",
                                                 "latent_channels"), "a Flux model")
        if problem:
            return problem
        if ours.axes_dim != theirs.axes_dim:  # a copy of the model's blocks: its RoPE split
            self.model.config = dataclasses.replace(ours, axes_dim=theirs.axes_dim)
        self.model.model_blocks = (theirs.depth, theirs.depth_single_blocks)  # for every Control of this ControlNet
        self.sigma_range = tuple(schedule.sigma_at_percent(p) for p in self.percent_range)
        return None

    def _encode(self, height: int, width: int, device: torch.device) -> Tensor:
        if getattr(self.model, "pixel_hint", False):  # XLabs': the picture itself, at 8x the latent's size
            return prepare_hint(self.hint.float(), height * 8, width * 8).to(device)
        if self.vae is None:
            raise ValueError(f"{self.source or 'the Flux ControlNet'} needs a VAE to encode its hint image "
                             "(Apply ControlNet's vae input)")
        latents = encode_hint(self.vae, self.hint, height, width)
        return latents.to(device)
