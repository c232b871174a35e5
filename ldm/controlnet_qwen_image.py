"""ControlNets for Qwen-Image in diffusers' QwenImageControlNetModel layout (InstantX's Qwen-Image-ControlNet-Union
and Qwen-Image-ControlNet-Inpainting, ComfyUI's Qwen-Image-InstantX-ControlNet-*.safetensors).

Such a ControlNet is a shortened Qwen-Image transformer (its embedders and a few double-stream blocks, the model's own
key names, `ldm.qwen_image`) that also sees the hint: the hint image is VAE-encoded into Qwen-Image's latent space
(Wan 2.1's VAE, normalised by its per-channel mean and std), cut into 2x2 patches and embedded by its own
zero-initialised linear layer (`controlnet_x_embedder`), added to the image tokens. After each block a linear layer
(`controlnet_blocks`) gives one residual for the image tokens; the model adds residual i // ceil(model blocks /
ControlNet blocks) after its block i (`QwenImageModel.forward`'s `control`), as diffusers does. The Union has no
control-mode embedding: it reads the kind of hint from the hint itself.

The inpainting ControlNet's hint embedding takes one more channel after the latent's 16, the keep mask (68 values a
2x2 token), and its hint picture is blacked out where it is repainted (diffusers' QwenImageControlNetInpaintPipeline;
`ldm.controlnet_inpaint`, through Loom's ControlNetInpaintingAliMamaApply, as in ComfyUI).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize, write_safetensors
from ldm.controlnet import LoadedControlNet, prepare_hint
from ldm.controlnet_flux import spread
from ldm.controlnet_sd3 import SD3Control, config_mismatch
from ldm.flux import pad_to_patch, patchify, rope_angles
from ldm.flux_presets import distinct_random_
from ldm.qwen_image import (
    STANDARD_AXES,
    THETA,
    QwenImageBlock,
    QwenImageConfig,
    QwenImageModel,
    RMSNorm,
    TimeTextEmbed,
    msrope_grid,
    text_ids,
)
from ldm.qwen_image_files import TINY_QWEN_IMAGE
from ldm.unet import timestep_embedding
from ldm.wan_files import WAN21_MEAN, WAN21_STD

FAMILY = "qwen_image"  # QwenImageFamily.name: the models these ControlNets fit
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def is_qwen_image_controlnet(sd: StateDict) -> bool:
    """A Qwen-Image ControlNet in diffusers' layout (checked before Flux's, which also has a controlnet_x_embedder)."""
    return all(k in sd for k in ("controlnet_x_embedder.weight", "txt_norm.weight",
                                 "transformer_blocks.0.img_mod.1.weight"))


class QwenImageControlNet(nn.Module):
    """A ControlNet of `config`'s shape (`num_layers` its own block count); `hint_width` is the values a hint token
    holds, more than the latent's for the inpainting ControlNet."""

    dtype = QwenImageModel.dtype
    global_average_pooling = False  # `ldm.controlnet.Control.residuals` asks every ControlNet
    model_blocks: int | None = None  # the block count of the model it last fitted (`QwenImageControl.fit`)
    label = "a Qwen-Image"  # for messages: "<file> is a Qwen-Image ControlNet"
    accepts_attn_mask = True  # the prompt's padding mask, as the model takes it (`ldm.controlnet.Control.residuals`)

    def __init__(self, config: QwenImageConfig, hint_width: int | None = None):
        super().__init__()
        self.config = c = config
        self.img_in = nn.Linear(c.in_channels, c.dim)
        self.txt_norm = RMSNorm(c.joint_attention_dim, c.eps)
        self.txt_in = nn.Linear(c.joint_attention_dim, c.dim)
        self.time_text_embed = TimeTextEmbed(c.dim)
        self.transformer_blocks = nn.ModuleList([QwenImageBlock(c) for _ in range(c.num_layers)])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(c.dim, c.dim) for _ in range(c.num_layers)])
        self.controlnet_x_embedder = nn.Linear(hint_width or c.in_channels, c.dim)

    @property
    def control_class(self) -> type[QwenImageControl]:
        """The Control that applies it (Apply ControlNet's `attach`): its hint is VAE-encoded at the latent's size."""
        return QwenImageControl

    @property
    def mask_channels(self) -> int:
        """The hint's channels after the latent's: 1 for the inpainting ControlNet (its keep mask), else 0."""
        extra = self.controlnet_x_embedder.in_features - self.img_in.in_features
        return extra // self.config.patch_size**2

    def hint_latents(self, vae: nn.Module, image: Tensor, height: int, width: int) -> Tensor:
        """The hint image [B, 3, h, w] in 0..1 as this ControlNet's latents for latents of height x width."""
        return encode_hint(vae, image, height, width)

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                attn_mask: Tensor | None = None, blocks: int | None = None) -> list[Tensor]:
        """The residuals [B, n, dim] for latents `x` [B, 16, H, W] and the hint's latents `hint` [B, C, H, W] (in
        the model's latent space, `encode_hint`; C = 17 with the keep mask) at flow levels `timesteps` (0..1) with
        the Qwen2.5-VL prompt states `context` (`attn_mask` as `QwenImageModel.forward` takes it): one per block,
        spread over the model's `blocks` (by default those of the model it was fitted to, else its own). `y` is
        unused, as the model's."""
        c, dtype, p = self.config, self.dtype, self.config.patch_size
        if x.ndim == 5:  # one frame of Wan 2.1's video latents, as the model takes them
            x = x[:, :, 0]
        if hint.shape[-2:] != x.shape[-2:] or hint.shape[0] != x.shape[0]:
            raise ValueError(f"a Qwen-Image ControlNet hint of shape {list(hint.shape)} for latents "
                             f"{list(x.shape)}: it takes the hint's latents at the latent's size, one per latent")
        x, hint = pad_to_patch(x, p), pad_to_patch(hint, p)  # odd sizes as the model pads them
        rows, cols = x.shape[-2] // p, x.shape[-1] // p
        img = self.img_in(patchify(x.to(dtype), p)) + self.controlnet_x_embedder(patchify(hint.to(dtype), p))
        txt = self.txt_in(self.txt_norm(context.to(dtype)))
        t = timesteps.reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1 else timesteps
        temb = self.time_text_embed.timestep_embedder(timestep_embedding(t.float() * 1000, 256).to(dtype))
        ids = torch.cat([text_ids(max(rows // 2, cols // 2), txt.shape[1], x.device),
                         msrope_grid(rows, cols, device=x.device)])
        rope = rope_angles(ids, c.axes_dim, THETA)
        mask = None if attn_mask is None else QwenImageModel._joint_mask(attn_mask, txt.shape[:2], img.shape[1])
        outs = []
        for block, out_layer in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            img, txt = block(img, txt, temb, rope, mask)
            outs.append(out_layer(img))
        blocks = blocks or self.model_blocks
        return outs if blocks is None else spread(outs, blocks)


def qwen_image_controlnet_config(sd: StateDict) -> tuple[QwenImageConfig, int]:
    """(config, hint width) of a Qwen-Image ControlNet's weights. The RoPE split of a head is not in the weights:
    Qwen-Image's for its 128-wide heads; other widths get a provisional one, the model's when used
    (`QwenImageControl.fit`)."""
    try:
        dim, in_channels = sd["img_in.weight"].shape
        head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        config = QwenImageConfig(
            num_layers=len({int(m[1]) for k in sd if (m := _BLOCK.match(k))}), num_heads=dim // head_dim,
            head_dim=head_dim, in_channels=in_channels, out_channels=in_channels // 4,
            joint_attention_dim=sd["txt_in.weight"].shape[1],
            mlp_hidden=sd["transformer_blocks.0.img_mlp.net.0.proj.weight"].shape[0],
            axes_dim=STANDARD_AXES if head_dim == sum(STANDARD_AXES) else (head_dim, 0, 0))
        hint_width = sd["controlnet_x_embedder.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"an incomplete Qwen-Image ControlNet: no weight {e}") from None
    patch = config.patch_size**2
    if hint_width < in_channels or hint_width % patch:
        raise CheckpointError(f"a Qwen-Image ControlNet whose hint embedding takes {hint_width} values a token: the "
                              f"latent's {in_channels}, or more in whole channels of 2x2 patches (the inpainting "
                              f"one's {in_channels + patch}), expected")
    return config, hint_width


def load_qwen_image_controlnet(sd: StateDict, path: Path, device: torch.device | str = "cpu",
                               dtype: torch.dtype = torch.float32) -> LoadedControlNet:
    """A Qwen-Image ControlNet from a state dict in diffusers' layout (`is_qwen_image_controlnet`); keys it does not
    use are listed as unused."""
    try:
        config, hint_width = qwen_image_controlnet_config(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = _materialize(lambda: QwenImageControlNet(config, hint_width), sd, "Qwen-Image ControlNet", path, device,
                         dtype)
    expected = set(model.state_dict())
    return LoadedControlNet(model, FAMILY, sorted(k for k in sd if k not in expected), path)


def encode_hint(vae: nn.Module, image: Tensor, height: int, width: int) -> Tensor:
    """The hint image [B, 3, h, w] in 0..1 as a Qwen-Image ControlNet takes it for latents of height x width:
    cropped and resized to the VAE's scale of that size, each picture encoded by `vae` (Wan 2.1's, a one-frame video;
    the posterior's mode) and normalised by Wan 2.1's per-channel mean and std, as the model's latents are."""
    factor = getattr(vae, "spatial_compression", 8)
    pixels = prepare_hint(image.float(), height * factor, width * factor)
    param = next(vae.parameters())
    with torch.no_grad():
        latents = vae.encode((pixels * 2 - 1)[:, :, None].to(param.device, param.dtype)).mode()[:, :, 0].float()
    shape = (1, -1, 1, 1)
    mean, std = (torch.tensor(v, device=latents.device).reshape(shape) for v in (WAN21_MEAN, WAN21_STD))
    if latents.shape[1] != mean.shape[1]:
        raise ValueError(f"a VAE of {latents.shape[1]} latent channels for a Qwen-Image ControlNet's hint: it takes "
                         "Qwen-Image's (Wan 2.1's) VAE, of 16")
    return (latents - mean) / std


@dataclass(eq=False)
class QwenImageControl(SD3Control):
    """One Qwen-Image ControlNet applied to one conditioning (see `SD3Control`: the hint is VAE-encoded when first
    used, at the latent's size)."""

    def fit(self, unet: nn.Module, schedule: object) -> str | None:
        ours, theirs = self.model.config, getattr(unet, "config", None)
        if not isinstance(theirs, QwenImageConfig):
            return "a Qwen-Image ControlNet runs with Qwen-Image models only"
        problem = config_mismatch(ours, theirs, ("dim", "num_heads", "in_channels", "joint_attention_dim",
                                                 "patch_size"), "a Qwen-Image model")
        if problem:
            return problem
        if ours.num_layers > theirs.num_layers:
            return (f"the ControlNet has {ours.num_layers} blocks, more than the model's {theirs.num_layers}: it was "
                    "made for a larger Qwen-Image model")
        if ours.axes_dim != theirs.axes_dim:  # a copy of the model's blocks: its RoPE split
            self.model.config = dataclasses.replace(ours, axes_dim=theirs.axes_dim)
        self.model.model_blocks = theirs.num_layers  # for every Control of this ControlNet
        self.sigma_range = tuple(schedule.sigma_at_percent(p) for p in self.percent_range)
        return None

    def _encode(self, height: int, width: int, device: torch.device) -> Tensor:
        if self.vae is None:
            raise ValueError(f"{self.source or 'the Qwen-Image ControlNet'} needs Qwen-Image's VAE to encode its hint "
                             "image (Apply ControlNet's vae input)")
        return super()._encode(height, width, device)  # on the compute device (`hint_latents`)


def random_qwen_image_controlnet(config: QwenImageConfig = TINY_QWEN_IMAGE, blocks: int = 1, seed: int = 0,
                                 inpaint: bool = False) -> QwenImageControlNet:
    """A Qwen-Image ControlNet of `blocks` blocks for a model of `config`'s width, every weight random and distinct
    (its output layers too, which training starts at zero); `inpaint`: with the keep mask's channel."""
    config = dataclasses.replace(config, num_layers=blocks, zero_cond_t=False)
    hint_width = config.in_channels + (config.patch_size**2 if inpaint else 0)
    return distinct_random_(QwenImageControlNet(config, hint_width).eval(), seed, norm_scales=(
        "norm.weight", "norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight"))


def write_tiny_qwen_image_controlnet(path: str | Path, config: QwenImageConfig = TINY_QWEN_IMAGE, blocks: int = 1,
                                     seed: int = 0, inpaint: bool = False,
                                     dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random Qwen-Image ControlNet (`random_qwen_image_controlnet`) for models of `config`'s shape
    (`ldm.qwen_image_presets`' tiny model by default) in diffusers' key names, as InstantX publish theirs; returns
    the path."""
    model = random_qwen_image_controlnet(config, blocks, seed, inpaint)
    path = Path(path)
    write_safetensors(model.state_dict(), path, {"loom.seed": str(seed)}, dtype)
    return path
