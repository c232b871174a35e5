"""ControlNets for SD3 (InstantX's SD3-Controlnet-*, diffusers' SD3ControlNetModel layout).

An SD3 ControlNet is a shortened copy of the MMDiT (its embedders and its first joint blocks, every block's context
stream kept) that also sees the hint: the hint image is VAE-encoded into the latent space, cut into patches by its
own strided convolution (`pos_embed_input`, zero-initialised) and added to the image tokens. After each block a
linear layer (`controlnet_blocks`) gives one output, added to the image tokens of the MMDiT's blocks
(`ldm.mmdit.MMDiT.forward`'s `control`). As in diffusers (force_zeros_for_pooled_projection) and ComfyUI, these
ControlNets see a zero pooled prompt, and the hint's latents are scaled without SD3's latent shift (but for
Alimama's inpainting ControlNet's: `ldm.controlnet_inpaint`).

Files in diffusers' names are read into Loom's (Stability's MMDiT names, `joint_blocks.N.x_block...`).
Stability AI's SD3.5 Large ControlNets have their own layout and model (`ldm.controlnet_sd35`); both are
`SD3ControlNet`s, applied by `SD3Control`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize
from ldm.controlnet import Control, LoadedControlNet, prepare_hint
from ldm.controlnet_inpaint import append_keep_mask
from ldm.mmdit import Attention, Embedder, JointBlock, MMDiT, MMDiTConfig, PatchEmbed, embed_inputs
from ldm.sd3_files import LATENT_SHIFT

_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
HINT_LATENT_SCALE = 1.5305  # SD3's latent scale; its shift is not applied to these hints (but to inpainting ones')


class SD3ControlNet(nn.Module):
    """What `SD3Control` asks of an SD3 ControlNet, whatever its layout: its `config` (an MMDiTConfig), the
    config fields that must equal the model's, its head count set to the model's, and its hint's latents."""

    config: MMDiTConfig
    fitted_fields: tuple[str, ...] = ("hidden_size", "patch_size", "in_channels", "context_dim", "adm_in_channels")
    uses_base = False  # whether `forward` takes the model itself (`base`): its patch embedding and positions
    global_average_pooling = False  # `ldm.controlnet.Control.residuals` asks every ControlNet
    mask_channels = 0  # the hint's channels after the latent's: an inpainting ControlNet's keep mask
    label = "an SD3"  # for messages: "<file> is an SD3 ControlNet"

    @property
    def control_class(self) -> type[SD3Control]:
        """The Control that applies it (Apply ControlNet's `attach`): its hint is VAE-encoded at the latent's size."""
        return SD3Control

    def attentions(self) -> list[nn.Module]:
        """Every attention layer of the blocks, whose head count is the model's (`SD3Control.fit`)."""
        return [m for m in self.modules() if isinstance(m, Attention)]

    def hint_latents(self, vae: nn.Module, image: Tensor, height: int, width: int) -> Tensor:
        """The hint image [B, 3, h, w] in 0..1 as this ControlNet's latents for latents of height x width."""
        return encode_hint(vae, image, height, width)


class InstantXControlNet(SD3ControlNet):
    """`blocks` joint blocks of an MMDiT of shape `config`, the hint's patch embedding and the output layers."""

    cropped_pos_embed = MMDiT.cropped_pos_embed
    dtype = MMDiT.dtype

    def __init__(self, config: MMDiTConfig, blocks: int, hint_channels: int):
        super().__init__()
        self.config = c = config
        self.x_embedder = PatchEmbed(c.in_channels, c.hidden_size, c.patch_size)
        self.register_buffer("pos_embed", torch.zeros(1, c.pos_embed_max_size**2, c.hidden_size))
        self.t_embedder = Embedder(256, c.hidden_size)
        self.y_embedder = Embedder(c.adm_in_channels, c.hidden_size)
        self.context_embedder = nn.Linear(c.context_dim, c.hidden_size)
        self.joint_blocks = nn.ModuleList([JointBlock(c, i, context_pre_only=False) for i in range(blocks)])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(c.hidden_size, c.hidden_size) for _ in range(blocks)])
        self.pos_embed_input = PatchEmbed(hint_channels, c.hidden_size, c.patch_size)
        self.mask_channels = hint_channels - c.in_channels

    def hint_latents(self, vae: nn.Module, image: Tensor, height: int, width: int) -> Tensor:
        latents = encode_hint(vae, image, height, width)
        # An inpainting ControlNet's (Alimama's) are shifted as SD3's latents are, as its pipeline (diffusers'
        # StableDiffusion3ControlNetInpaintingPipeline) does; ComfyUI leaves them unshifted.
        return latents - LATENT_SHIFT * HINT_LATENT_SCALE if self.mask_channels else latents

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None
                ) -> list[Tensor]:
        """One output [B, tokens, hidden] per block for latents `x` [B, 16, H, W] and the hint's latents `hint`
        [B, C, H, W] (scaled, `encode_hint`). The pooled prompt `y` is replaced by zeros, as these were trained."""
        y = None if y is None else torch.zeros_like(y)
        img, txt, vec, _ = embed_inputs(self, x, timesteps, context, y)
        p = self.config.patch_size
        h, w = hint.shape[-2:]
        padded = nn.functional.pad(hint, (0, -w % p, 0, -h % p), mode="circular") if h % p or w % p else hint
        img = img + self.pos_embed_input(padded.to(img.dtype))
        outs = []
        for block, out_layer in zip(self.joint_blocks, self.controlnet_blocks, strict=True):
            txt, img = block(txt, img, vec)
            outs.append(out_layer(img))
        return outs


def is_sd3_controlnet(sd: StateDict) -> bool:
    """An SD3 ControlNet in diffusers' layout (InstantX's) or Stability's (SD3.5 Large's)."""
    return "pos_embed_input.proj.weight" in sd and "controlnet_blocks.0.weight" in sd


def _qkv(sd: StateDict, prefix: str, names: tuple[str, str, str], leaf: str) -> Tensor:
    return torch.cat([sd.pop(f"{prefix}{name}.{leaf}") for name in names])


def from_diffusers(sd: StateDict) -> StateDict:
    """diffusers' SD3ControlNetModel names -> Loom's (Stability's MMDiT names); keys it does not know are kept
    as they are, to be reported as unused."""
    sd = dict(sd)
    out: dict[str, Tensor] = {}
    renames = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}
    block = {"norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
             "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
             "attn2.norm_k": "x_block.attn2.ln_k", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
             "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
    if "pos_embed.pos_embed" in sd:
        out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    for i in sorted({int(m[1]) for k in sd if (m := _BLOCK.match(k))}):
        theirs, ours = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for attn, names, stream in (("attn", ("to_q", "to_k", "to_v"), "x_block.attn"),
                                    ("attn", ("add_q_proj", "add_k_proj", "add_v_proj"), "context_block.attn"),
                                    ("attn2", ("to_q", "to_k", "to_v"), "x_block.attn2")):
            for leaf in ("weight", "bias"):
                if f"{theirs}{attn}.{names[0]}.{leaf}" in sd:
                    out[f"{ours}{stream}.qkv.{leaf}"] = _qkv(sd, f"{theirs}{attn}.", names, leaf)
        renames.update({theirs + k: ours + v for k, v in block.items()})
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        out[f"{renames[module]}.{leaf}" if module in renames else key] = value
    return out


def sd3_controlnet_shape(sd: StateDict) -> tuple[MMDiTConfig, int, int]:
    """(config, blocks, hint channels) of a Loom-named SD3 ControlNet. The head count is not in the weights
    without per-head norms: 64-wide heads, as in every released SD3 model (ComfyUI's rule too); `SD3Control`
    takes the model's own when it is used."""
    try:
        hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
        blocks = len({int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks.")})
        qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in sd
        heads = hidden // sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if qk_norm else max(1, hidden // 64)
        table = sd["pos_embed"].shape[1]
        size = int(round(table**0.5))
        config = MMDiTConfig(
            in_channels=in_channels, out_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=blocks,
            num_heads=heads, mlp_ratio=sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
            adm_in_channels=sd["y_embedder.mlp.0.weight"].shape[1], context_dim=sd["context_embedder.weight"].shape[1],
            pos_embed_max_size=size, qk_norm=qk_norm,
            dual_attention_layers=tuple(sorted(int(k.split(".")[1]) for k in sd
                                               if k.endswith("x_block.attn2.qkv.weight"))))
        return config, blocks, sd["pos_embed_input.proj.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"an incomplete SD3 ControlNet: no weight {e}") from None


def load_sd3_controlnet(sd: StateDict, path: Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> LoadedControlNet:
    """An SD3 ControlNet from a state dict in diffusers' layout (`is_sd3_controlnet`)."""
    if "transformer_blocks.0.adaLN_modulation.1.bias" in sd:  # Stability AI's SD3.5 Large ControlNets
        from ldm.controlnet_sd35 import load_sd35_controlnet

        return load_sd35_controlnet(sd, path, device, dtype)
    sd = from_diffusers(sd)
    if "pos_embed" not in sd:
        raise CheckpointError(f"{path.name}: an SD3 ControlNet without its position table (pos_embed.pos_embed)")
    try:
        config, blocks, hint_channels = sd3_controlnet_shape(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = _materialize(lambda: InstantXControlNet(config, blocks, hint_channels), sd, "SD3 ControlNet", path, device,
                         dtype)
    expected = set(model.state_dict())
    return LoadedControlNet(model, "sd3", sorted(k for k in sd if k not in expected), path)


def encode_hint(vae: nn.Module, image: Tensor, height: int, width: int) -> Tensor:
    """The hint image [B, 3, h, w] in 0..1 as an SD3 ControlNet takes it for latents of height x width: cropped and
    resized to 8x that size (as ComfyUI prepares it), encoded by `vae` (the posterior's mode), times SD3's latent
    scale, without its shift."""
    pixels = prepare_hint(image.float(), height * 8, width * 8)
    param = next(vae.parameters())
    with torch.no_grad():
        latents = vae.encode((pixels * 2 - 1).to(param.device, param.dtype)).mode()
    return latents.float() * HINT_LATENT_SCALE


def config_mismatch(ours: object, theirs: object, names: tuple[str, ...], model: str) -> str | None:
    """Why a ControlNet of config `ours` (a copy of part of `model`, e.g. "a Flux model") does not fit a model of
    config `theirs`: the first of the `names` whose values differ; None when all agree."""
    for name in names:
        if getattr(ours, name) != getattr(theirs, name):
            return (f"the ControlNet was made for {model} with {name} {getattr(ours, name)}, and this one has "
                    f"{getattr(theirs, name)}")
    return None


@dataclass(eq=False)
class SD3Control(Control):
    """One SD3 ControlNet applied to one conditioning: the hint image is encoded by `vae` at the latent's size
    when first used. `percent_range` (start, end) becomes `sigma_range` with the model's schedule (`fit`)."""

    vae: nn.Module | None = None
    percent_range: tuple[float, float] = (0.0, 1.0)
    hint_mask: Tensor | None = None  # an inpainting ControlNet's keep mask [B, 1, H, W] (`ldm.controlnet_inpaint`)
    _latents: dict = field(default_factory=dict, repr=False)

    def fit(self, unet: nn.Module, schedule: object) -> str | None:
        """Why this ControlNet does not fit the model `unet` (None when it does); takes the model's head count and
        the schedule's levels for its range."""
        ours, theirs = self.model.config, getattr(unet, "config", None)
        if not isinstance(theirs, MMDiTConfig):
            return "an SD3 ControlNet runs with SD3 models only"
        problem = config_mismatch(ours, theirs, self.model.fitted_fields, "an SD3 model")
        if problem:
            return problem
        if not ours.qk_norm and ours.num_heads != theirs.num_heads:  # a copy of the model's blocks: its heads
            for attention in self.model.attentions():
                attention.heads = theirs.num_heads
            self.model.config = dataclasses.replace(ours, num_heads=theirs.num_heads)
        if self.model.uses_base:  # until released: the model's own patch embedding and positions
            self.model_kwargs = {**self.model_kwargs, "base": unet}
        self.sigma_range = tuple(schedule.sigma_at_percent(p) for p in self.percent_range)
        return None

    def release(self) -> None:
        super().release()
        self._latents.clear()
        self.model_kwargs.pop("base", None)

    def _hint(self, x: Tensor, repeats: int) -> Tensor:
        batch, _, height, width = x.shape
        key = (batch, height, width, repeats, x.device, self.model.dtype)
        if key not in self._hints:
            if len(self._hints) >= 4:
                self._hints.clear()
            if (height, width) not in self._latents:
                latents = self._encode(height, width, x.device)
                if self.hint_mask is not None:
                    latents = append_keep_mask(latents, self.hint_mask)
                self._latents[height, width] = latents
            hint = self._latents[height, width].to(x.device)
            hint = hint[torch.arange(batch // repeats, device=hint.device) % hint.shape[0]]  # cycled over the batch
            self._hints[key] = hint.repeat(repeats, 1, 1, 1).to(self.model.dtype)
        return self._hints[key]

    def _encode(self, height: int, width: int, device: torch.device) -> Tensor:
        if self.vae is None:
            raise ValueError(f"{self.source or 'the SD3 ControlNet'} needs a VAE to encode its hint image "
                             "(Apply Controlnet with VAE)")
        vae = self.vae
        if next(vae.parameters()).device != device:  # a copy on the compute device, once per hint size
            vae = copy.deepcopy(vae).to(device, torch.float32)
        return self.model.hint_latents(vae, self.hint, height, width).to(device)
