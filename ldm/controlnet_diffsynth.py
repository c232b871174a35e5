"""DiffSynth-Studio's blockwise ControlNets for Qwen-Image (Qwen-Image-Blockwise-ControlNet canny, depth, inpaint;
Comfy-Org's qwen_image_*_diffsynth_controlnet files, the same keys), applied as a patch of the transformer.

No transformer of its own: the hint's latents (in the model's latent space, Wan 2.1's normalised; an inpainting
file's followed by a keep mask, 1 where the picture stays) are cut into 2x2 patches as the noisy latent is (odd sizes
padded as the model pads them) and projected to the model's width by `img_in`, once per latent size. After the
model's block i, ControlNet block i (`controlnet_blocks.i`) RMS-normalises the noisy latent's image tokens and the
hint's tokens, adds them and runs linear, GELU, linear; that, times the strength, is added to the image tokens
(DiffSynth's blockwise_forward, after every block; ComfyUI's double-block patch does the same). There is one
ControlNet block per model block, 60 in the released files, indexed by the model's block: DiffSynth fails on a
shorter file and would leave a longer one's last blocks unused; Loom refuses both, naming the two depths.

A file's width tells the kind: 64 values a token (16 latent channels x 2 x 2) for canny and depth, 68 (one more
channel, the keep mask) for inpaint.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize, write_safetensors
from ldm.flux import pad_to_patch, patchify
from ldm.flux_presets import distinct_random_
from ldm.qwen_image import QwenImageModel, RMSNorm, with_block_patch

LATENT_CHANNELS = 16  # Qwen-Image's latent (Wan 2.1's VAE): every hint starts with these channels
_BLOCK = re.compile(r"controlnet_blocks\.(\d+)\.")
# The keys that tell a DiffSynth blockwise ControlNet (ComfyUI's ModelPatchLoader looks for the second).
_MARKERS = ("img_in.weight", "controlnet_blocks.0.y_rms.weight")

# Returns the hint's latents [B, hint channels, height, width] for latents of height x width, on the device.
Encode = Callable[[int, int, torch.device], Tensor]


@dataclass(frozen=True)
class BlockwiseControlNetConfig:
    """Shape of a blockwise ControlNet (defaults: the released files, for the 20B Qwen-Image)."""

    dim: int = 3072  # the model's width
    num_blocks: int = 60  # one per model block
    in_channels: int = 64  # values a hint token holds: hint channels x 2 x 2 patch (68 for inpaint)
    patch_size: int = 2
    eps: float = 1e-6

    @property
    def hint_channels(self) -> int:
        return self.in_channels // self.patch_size**2

    @property
    def mask_channels(self) -> int:
        """The hint's channels after the latent's: 1 for an inpainting ControlNet (its keep mask), else 0."""
        return self.hint_channels - LATENT_CHANNELS


# For the tiny Qwen-Image (`ldm.qwen_image_files.TINY_QWEN_IMAGE`: 32 wide, 2 blocks).
TINY_DIFFSYNTH_CONTROLNET = BlockwiseControlNetConfig(dim=32, num_blocks=2)


class ControlBlock(nn.Module):
    """DiffSynth's BlockWiseControlBlock: the residual of one model block's image tokens given the hint's tokens."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.x_rms = RMSNorm(dim, eps)
        self.y_rms = RMSNorm(dim, eps)
        self.input_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, img: Tensor, hint: Tensor) -> Tensor:
        return self.output_proj(F.gelu(self.input_proj(self.x_rms(img) + self.y_rms(hint))))


class BlockwiseControlNet(nn.Module):
    """DiffSynth's QwenImageBlockWiseControlNet; module names are the released file's keys."""

    def __init__(self, config: BlockwiseControlNetConfig):
        super().__init__()
        self.config = c = config
        self.img_in = nn.Linear(c.in_channels, c.dim)
        self.controlnet_blocks = nn.ModuleList([ControlBlock(c.dim, c.eps) for _ in range(c.num_blocks)])

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def mask_channels(self) -> int:
        return self.config.mask_channels

    def hint_tokens(self, hint: Tensor) -> Tensor:
        """The hint's latents [B, hint_channels, h, w] as tokens [B, patches, dim], row by row, as the model cuts
        its latent (DiffSynth's process_controlnet_conditioning)."""
        c = self.config
        if hint.ndim != 4 or hint.shape[1] != c.hint_channels:
            mask = f" + {c.mask_channels} keep mask" if c.mask_channels else ""
            raise ValueError(f"this DiffSynth ControlNet takes hint latents [B, {c.hint_channels} ({LATENT_CHANNELS} "
                             f"latent{mask}), h, w]; got {list(hint.shape)}")
        p = c.patch_size
        return self.img_in(patchify(pad_to_patch(hint.to(self.dtype), p), p))

    def forward(self, block: int, img: Tensor, hint_tokens: Tensor) -> Tensor:
        """The residual for the image tokens `img` [B, n, dim] after the model's block `block`."""
        return self.controlnet_blocks[block](img, hint_tokens)


def is_diffsynth_controlnet(sd: StateDict) -> bool:
    """Whether a state dict holds a DiffSynth blockwise ControlNet for Qwen-Image (bare keys, as released)."""
    return all(k in sd for k in _MARKERS)


def diffsynth_controlnet_config(sd: StateDict) -> BlockwiseControlNetConfig:
    """The shape of a blockwise ControlNet from its weights: the block count from the highest block index (a gap is
    reported as missing weights when loaded)."""
    try:
        dim, in_channels = sd["img_in.weight"].shape
    except (KeyError, ValueError):
        raise CheckpointError("not a DiffSynth blockwise ControlNet: no img_in.weight [dim, width]") from None
    blocks = {int(m[1]) for k in sd if (m := _BLOCK.match(k))}
    config = BlockwiseControlNetConfig(dim=dim, num_blocks=max(blocks) + 1 if blocks else 0, in_channels=in_channels)
    p2 = config.patch_size**2
    if in_channels % p2 or config.mask_channels < 0:
        raise CheckpointError(f"a DiffSynth ControlNet whose img_in takes {in_channels} values a token: "
                              f"{LATENT_CHANNELS * p2} ({LATENT_CHANNELS} latent channels x 2 x 2, canny / depth) or "
                              f"more in whole channels ({(LATENT_CHANNELS + 1) * p2} for inpaint) expected")
    if not blocks:
        raise CheckpointError("a DiffSynth ControlNet without control blocks (controlnet_blocks.N)")
    return config


def load_diffsynth_controlnet(sd: StateDict, path: Path, device: torch.device | str = "cpu",
                              dtype: torch.dtype = torch.float32) -> BlockwiseControlNet:
    """A blockwise ControlNet from a state dict in the released layout (`is_diffsynth_controlnet`); keys it does
    not use are listed in its `unused_keys`."""
    path = Path(path)
    try:
        config = diffsynth_controlnet_config(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = _materialize(lambda: BlockwiseControlNet(config), sd, "DiffSynth ControlNet", path, device, dtype)
    expected = set(model.state_dict())
    model.unused_keys = sorted(k for k in sd if k not in expected)
    return model


def check_fits(model: QwenImageModel, controlnet: BlockwiseControlNet) -> None:
    """Raise ValueError naming both shapes when `controlnet` was not made for `model`."""
    ours, theirs = controlnet.config, model.config
    if ours.dim != theirs.dim:
        raise ValueError(f"the DiffSynth ControlNet is {ours.dim} wide and the Qwen-Image model {theirs.dim}: it was "
                         "made for another model")
    if ours.num_blocks != theirs.num_layers:
        raise ValueError(f"the DiffSynth ControlNet has {ours.num_blocks} blocks and the Qwen-Image model "
                         f"{theirs.num_layers}: it adds one residual after each model block, so the two must match")
    extra = ours.in_channels - theirs.in_channels
    if extra < 0 or extra % ours.patch_size**2:
        raise ValueError(f"the DiffSynth ControlNet takes {ours.in_channels} values a hint token and the Qwen-Image "
                         f"model's latent tokens hold {theirs.in_channels}: its hint must be the latent's channels, "
                         "then whole mask channels")


@dataclass(eq=False)
class DiffsynthControl:
    """A Qwen-Image block patch (`ldm.qwen_image.with_block_patch`): after block i, the residual of the noisy
    latent's image tokens. The hint is encoded when first needed and kept for the latest latent size and device;
    a hint batch smaller than the latent's is cycled over it."""

    controlnet: BlockwiseControlNet
    encode: Encode
    strength: float
    _cached: tuple[tuple[int, int, torch.device], Tensor] | None = field(default=None, repr=False)

    def hint_tokens(self, size: tuple[int, int], device: torch.device) -> Tensor:
        """The hint's tokens [B, patches, dim] for latents of `size` (h, w, before padding)."""
        key = (*size, device)
        if self._cached is None or self._cached[0] != key:
            hint = self.encode(*size, device)
            if hint.ndim != 4 or tuple(hint.shape[-2:]) != tuple(size):
                raise ValueError(f"the DiffSynth ControlNet's hint for latents of {size[0]}x{size[1]} came as "
                                 f"{list(hint.shape)}; [B, C, {size[0]}, {size[1]}] expected")
            self._cached = (key, self.controlnet.hint_tokens(hint.to(device)))
        return self._cached[1]

    def __call__(self, block: int, img: Tensor, size: tuple[int, int]) -> Tensor | None:
        if self.strength == 0:
            return None
        hint = self.hint_tokens(size, img.device)
        if hint.shape[1] != img.shape[1]:
            raise ValueError(f"the DiffSynth ControlNet's hint makes {hint.shape[1]} tokens for {img.shape[1]} image "
                             "tokens")
        if hint.shape[0] != img.shape[0]:
            hint = hint[torch.arange(img.shape[0], device=hint.device) % hint.shape[0]]
        residual = self.controlnet(block, img.to(self.controlnet.dtype), hint)
        return (residual * self.strength).to(img.dtype)


def with_diffsynth_control(model: QwenImageModel, controlnet: BlockwiseControlNet, encode: Encode,
                           strength: float) -> QwenImageModel:
    """A copy of `model` (sharing its weights) guided by `controlnet`: `encode(height, width, device)` gives the
    hint's latents [B, hint channels, height, width] in the model's latent space for latents of that size (with the
    keep mask's channels for an inpainting ControlNet); each residual is scaled by `strength`."""
    check_fits(model, controlnet)
    return with_block_patch(model, DiffsynthControl(controlnet, encode, float(strength)))


def random_diffsynth_controlnet(config: BlockwiseControlNetConfig = TINY_DIFFSYNTH_CONTROLNET,
                                seed: int = 0) -> BlockwiseControlNet:
    """A blockwise ControlNet with seeded random weights, each distinct (the RMS norms' near 1; the released
    initialisation's zero output layers would hide every error)."""
    return distinct_random_(BlockwiseControlNet(config).eval(), seed, norm_scales=("_rms.weight",))


def write_tiny_diffsynth_controlnet(path: str | Path, config: BlockwiseControlNetConfig = TINY_DIFFSYNTH_CONTROLNET,
                                    seed: int = 0, inpaint: bool = False,
                                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random blockwise ControlNet of `config` (by default one for `TINY_QWEN_IMAGE`) in the released keys;
    `inpaint` adds the keep mask's channel to its hint. Returns the path."""
    if inpaint:
        config = dataclasses.replace(config, in_channels=config.in_channels + config.patch_size**2)
    path = Path(path)
    write_safetensors(random_diffsynth_controlnet(config, seed).state_dict(), path, {"loom.seed": str(seed)}, dtype)
    return path
