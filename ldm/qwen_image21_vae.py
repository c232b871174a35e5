"""Qwen-Image 2.1's RGBA VAE: pictures [B, 4, H, W] in -1..1 <-> 64-channel latents at 1/16 of the size.

The network is Wan 2.2's residual VAE (`ldm.wan_vae`: its levels with averaging and duplicating shortcuts, its
channel RMS norm and middle attention) cut down to still images: five levels, four 2x downsamples, no pixel patches,
and every causal 3-D convolution with a temporal kernel of one, so that on the single frame it sees it is a 2-D
convolution (`FrameConv`). The video past still shows in the shortcuts of the levels that halved time: going down a
zero frame is averaged in, going up only the second of the two frames made is kept (Wan's AvgDown3D and DupUp3D on a
first chunk, used here as they are).

Weights: ComfyUI's qwen_image_2.1_vae_bf16.safetensors (Comfy-Org/Qwen-Image-2.1, `vae/`) keeps Wan 2.2's original
keys (`encoder.conv1`, `encoder.downsamples.N.downsamples.M.residual.K`, `encoder.middle`, `encoder.head`, `conv1`,
`conv2`, `decoder.*`) with 5-D convolution weights [out, in, 1, k, k]; module names and shapes here are that file's,
so it loads as it is. diffusers' AutoencoderKLQwenImage21 (`encoder.down_blocks.N.resnets.M.conv1`, `quant_conv`,
4-D weights: its convolutions are Conv2d) is renamed on load. Both files hold the `time_conv` weights Wan convolves
the frames after the first with; a still image never reaches them, and they are left out on load.

Latents are raw (not normalised): the model family applies `LATENTS_MEAN` / `LATENTS_STD` (diffusers' config
defaults), z_norm = (z - mean) / std. Checked against diffusers 0.42's AutoencoderKLQwenImage21 with the same weights
(tests/ldm/test_qwen_image21_vae.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict
from ldm.vae import DiagonalGaussianDistribution, tiled_apply
from ldm.wan_vae import AttentionBlock, AvgDown3D, DupUp3D, RMSNorm, WanVAEConfig
from ldm.wan_vae_files import is_wan_vae, randomized_, wan_vae_config_from_state_dict

QWEN_IMAGE21_VAE_CONFIG = WanVAEConfig(z_dim=64, base_dim=96, decoder_base_dim=144, dim_mult=(1, 2, 4, 8, 8),
                                       temporal_downsample=(False, True, True, True), residual=True, image_channels=4)
# The real levels, downsamples and 64 latent channels at a few channels a level: tests and examples.
TINY_QWEN_IMAGE21_VAE = WanVAEConfig(z_dim=64, base_dim=8, decoder_base_dim=12, dim_mult=(1, 2, 4, 8, 8),
                                     temporal_downsample=(False, True, True, True), residual=True, image_channels=4)

LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722,
    1.8873, -1.7177, -0.6510, 0.2732, 0.7562, -0.6163, -1.0277, 3.8363,
    2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
    -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955,
    -0.0342, -1.0265, -0.7636, 3.0555, 0.0746, -3.0751, -0.1076, 1.7376,
    -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
    -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505,
    0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121, -0.1562, 0.0304,
)
LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910,
    3.0785, 3.6500, 3.9308, 3.0904, 2.8778, 3.7675, 3.7320, 5.0756,
    3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489,
    3.4896, 3.8513, 3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467,
    3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063, 5.1125,
    3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875,
    3.9624, 4.0168, 3.5643, 4.0550, 5.5614, 4.2963, 4.4080, 3.4959,
    3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161,
)


class FrameConv(nn.Conv3d):
    """A causal 3-D convolution with a temporal kernel of one, weights [out, in, 1, k, k] as the file holds them,
    run as the 2-D convolution it is on one frame ([B, C, 1, H, W] in and out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__(in_channels, out_channels, (1, kernel_size, kernel_size), padding=(0, padding, padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x.squeeze(2), self.weight.squeeze(2), self.bias, padding=self.padding[1:])
        return out.unsqueeze(2)


class ResidualBlock(nn.Module):
    """Norm, SiLU, conv, twice, plus the (projected) input; `residual.N` indices are Wan's Sequential's."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(RMSNorm(in_dim), nn.SiLU(), FrameConv(in_dim, out_dim, 3, padding=1),
                                      RMSNorm(out_dim), nn.SiLU(), nn.Identity(),  # dropout in training
                                      FrameConv(out_dim, out_dim, 3, padding=1))
        self.shortcut = FrameConv(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(x)


class Resample(nn.Module):
    """2x spatial down- (zero pad right and bottom, stride-2 conv) or upsampling (nearest in fp32, conv)."""

    def __init__(self, dim: int, up: bool):
        super().__init__()
        self.up = up
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frame = x.squeeze(2)
        if self.up:
            frame = self.resample[1](self.resample[0](frame.float()).to(frame.dtype))
        else:
            frame = self.resample(frame)
        return frame.unsqueeze(2)


class DownLevel(nn.Module):
    """An encoder level: residual blocks then the downsample (`downsamples`), plus Wan 2.2's averaging shortcut."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(blocks)]
        if down:
            layers.append(Resample(out_dim, up=False))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsamples(x) + self.avg_shortcut(x)


class UpLevel(nn.Module):
    """A decoder level: residual blocks then the upsample (`upsamples`), plus Wan 2.2's duplicating shortcut."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(blocks)]
        if up:
            layers.append(Resample(out_dim, up=True))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.upsamples(x)
        # A still image is always a video's first chunk: a fresh cache tells DupUp3D so.
        return out if self.avg_shortcut is None else out + self.avg_shortcut(x, {})


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), FrameConv(dim, out_dim, 3, padding=1))


class Encoder(nn.Module):
    def __init__(self, c: WanVAEConfig):
        super().__init__()
        dims = [c.base_dim * m for m in (1, *c.dim_mult)]
        last = len(c.dim_mult) - 1
        self.conv1 = FrameConv(c.image_channels, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownLevel(in_dim, out_dim, c.num_res_blocks, i < last and c.temporal_downsample[i], i < last)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True))))
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * c.z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder(nn.Module):
    def __init__(self, c: WanVAEConfig):
        super().__init__()
        mults = c.dim_mult[::-1]
        dims = [c.decoder_base_dim * m for m in (mults[0], *mults)]
        temporal_up = c.temporal_downsample[::-1]
        last = len(c.dim_mult) - 1
        self.conv1 = FrameConv(c.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        self.upsamples = nn.Sequential(*(
            UpLevel(in_dim, out_dim, c.num_res_blocks + 1, i < last and temporal_up[i], i < last)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True))))
        self.head = _head(dims[-1], c.image_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(z))))


class QwenImage21VAE(nn.Module):
    """Pictures [B, 4, H, W] in -1..1 (RGBA; RGB ones get an opaque alpha, as ComfyUI pads them; sides multiples of
    16) <-> raw latents [B, 64, H/16, W/16]. `encode` gives the posterior (`.mode()` is the latent to use); `decode`
    gives RGBA pixels clamped to -1..1."""

    scaling_factor = 1.0  # the model family normalises per channel (LATENTS_MEAN, LATENTS_STD)

    def __init__(self, config: WanVAEConfig = QWEN_IMAGE21_VAE_CONFIG):
        super().__init__()
        if not config.residual or config.patch_size != 1:
            raise ValueError("Qwen-Image 2.1's VAE is Wan 2.2's residual one without pixel patches")
        self.config = config
        self.latent_channels = config.z_dim
        self.image_channels = config.image_channels
        self.spatial_compression = config.spatial_compression
        self.encoder = Encoder(config)
        self.conv1 = FrameConv(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = FrameConv(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, image_channels, H, W] in the model's dtype, alpha 1.0 added to RGB; ValueError for other shapes."""
        channels, s = self.image_channels, self.spatial_compression
        if channels == 4 and pixels.ndim == 4 and pixels.shape[1] == 3:
            pixels = F.pad(pixels, (0, 0, 0, 0, 0, 1), value=1.0)
        if pixels.ndim != 4 or pixels.shape[1] != channels or pixels.shape[2] % s or pixels.shape[3] % s:
            raise ValueError(f"the Qwen-Image 2.1 VAE encodes pictures [B, {channels}, H, W] with sides multiples "
                             f"of {s}, got {list(pixels.shape)}")
        return pixels.to(self.dtype)

    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.encoder(pixels.unsqueeze(2))).squeeze(2)

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self._moments(self._pixels(pixels)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected Qwen-Image 2.1 latents [B, {self.latent_channels}, h, w], got {list(z.shape)}")
        return self.decoder(self.conv2(z.to(self.dtype).unsqueeze(2))).squeeze(2).clamp(-1.0, 1.0)

    def encode_tiled(self, pixels: torch.Tensor, tile_size: int = 512, overlap: int = 64
                     ) -> DiagonalGaussianDistribution:
        """`encode` in pixel tiles of `tile_size` overlapping by `overlap` (multiples of 16), blended."""
        moments = tiled_apply(self._moments, self._pixels(pixels), tile_size, overlap, 1.0 / self.spatial_compression,
                              2 * self.latent_channels)
        return DiagonalGaussianDistribution(moments)

    def decode_tiled(self, z: torch.Tensor, tile_size: int = 32, overlap: int = 4) -> torch.Tensor:
        """`decode` in latent tiles of `tile_size` overlapping by `overlap`, blended."""
        return tiled_apply(self.decode, z, tile_size, overlap, float(self.spatial_compression), self.image_channels)


# --- files -----------------------------------------------------------------------------------------------------

_NESTED = "decoder.upsamples.0.upsamples.0.residual.2.weight"  # Wan 2.2's nested levels
_DIFFUSERS_MARKERS = ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight",
                      "post_quant_conv.weight", "decoder.up_blocks.0.upsampler.resample.1.weight")
_TIME_CONV = re.compile(r"\.time_conv\.(weight|bias)$")  # frames after the first: never used for a still image
# diffusers' QwenImage21CausalConv3d layers (Conv2d there, 5-D in ComfyUI's file); its resample and attention
# convolutions are 2-D in both.
_FRAME_CONVS = {"conv_in", "conv_out", "conv1", "conv2", "conv_shortcut", "quant_conv", "post_quant_conv", "time_conv"}
_RESNET_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                 "conv_shortcut": "shortcut"}


def _is_comfy_layout(shapes: StateDict) -> bool:
    """Wan 2.2's original keys with a decoder head of temporal kernel one (Wan 2.2's video VAE has three)."""
    if not (is_wan_vae(shapes) and _NESTED in shapes):
        return False
    head = shapes["decoder.head.2.weight"].shape
    return len(head) == 5 and head[2] == 1


def _is_diffusers_layout(shapes: StateDict) -> bool:
    """AutoencoderKLQwenImage21's keys: its convolutions are 2-D (AutoencoderKLWan's and Qwen-Image's are 5-D)."""
    return all(k in shapes for k in _DIFFUSERS_MARKERS) and shapes["decoder.conv_out.weight"].ndim == 4


def is_qwen_image21_vae(shapes: StateDict) -> bool:
    """Whether a state dict (or its meta tensors, `ckpt.read_shapes`) is Qwen-Image 2.1's VAE, in ComfyUI's layout
    or diffusers'."""
    return _is_comfy_layout(shapes) or _is_diffusers_layout(shapes)


def peek_qwen_image21_vae(path: str | Path) -> bool:
    """Whether a .safetensors file is Qwen-Image 2.1's VAE, from its header alone."""
    try:
        shapes = ckpt.read_shapes(path)
    except (CheckpointError, OSError, ValueError):
        return False
    return shapes is not None and is_qwen_image21_vae(shapes)


def _comfy_name(key: str, blocks: int) -> str:
    """diffusers' name of a weight as ComfyUI's file (Wan 2.2's original keys) has it; `blocks` residual blocks per
    encoder level (the decoder's levels have one more)."""
    rules = (
        (r"quant_conv\.(.+)", r"conv1.\1"),
        (r"post_quant_conv\.(.+)", r"conv2.\1"),
        (r"(encoder|decoder)\.conv_in\.(.+)", r"\1.conv1.\2"),
        (r"(encoder|decoder)\.norm_out\.(.+)", r"\1.head.0.\2"),
        (r"(encoder|decoder)\.conv_out\.(.+)", r"\1.head.2.\2"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", r"\1.middle.1.\2"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(.+)",
         lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_RESNET_PARTS[m[3]]}.{m[4]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}"),
        (r"encoder\.down_blocks\.(\d+)\.downsampler\.(.+)", rf"encoder.downsamples.\1.downsamples.{blocks}.\2"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"decoder.upsamples.{m[1]}.upsamples.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}"),
        (r"decoder\.up_blocks\.(\d+)\.upsampler\.(.+)", rf"decoder.upsamples.\1.upsamples.{blocks + 1}.\2"),
    )
    for pattern, replacement in rules:
        renamed, count = re.subn(rf"^{pattern}$", replacement, key)
        if count:
            return renamed
    raise ValueError(f"{key} has no place in Qwen-Image 2.1's VAE")


def comfy_from_diffusers(sd: StateDict) -> StateDict:
    """An AutoencoderKLQwenImage21 state dict in ComfyUI's layout: Wan 2.2's original keys, the causal
    convolutions' weights 5-D; ValueError naming a key that has no place."""
    blocks = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
    out = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        frame_conv = leaf == "weight" and module.rpartition(".")[2] in _FRAME_CONVS and value.ndim == 4
        out[_comfy_name(key, blocks)] = value.unsqueeze(2) if frame_conv else value
    return out


def load_qwen_image21_vae(path_or_state_dict: str | Path | StateDict, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> QwenImage21VAE:
    """Qwen-Image 2.1's VAE from its file (or its tensors; ComfyUI's layout or diffusers'), on `device` in `dtype`,
    frozen; CheckpointError naming the problem for a file that is not one, lacks weights, or holds weights that
    have no place in it."""
    if isinstance(path_or_state_dict, dict):
        sd, path = path_or_state_dict, Path("state dict")
    else:
        path = Path(path_or_state_dict)
        sd = ckpt.load_state_dict(path)
    if not is_qwen_image21_vae(sd):
        raise CheckpointError(f"{path.name}: not Qwen-Image 2.1's VAE (no Wan 2.2 VAE weights with a temporal kernel "
                              "of one, nor AutoencoderKLQwenImage21's)")
    try:
        if _is_diffusers_layout(sd):
            sd = comfy_from_diffusers(sd)
        config = wan_vae_config_from_state_dict(sd)
        if not config.residual or config.patch_size != 1:
            raise ValueError("a Wan VAE, not Qwen-Image 2.1's (its levels are not residual, or it packs pixels)")
    except ValueError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    weights = {k: v for k, v in sd.items() if not _TIME_CONV.search(k)}
    vae = ckpt._materialize(lambda: QwenImage21VAE(config), weights, "Qwen-Image 2.1 VAE", path, device, dtype)
    unused = sorted(set(weights) - set(vae.state_dict()))
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise CheckpointError(f"{path.name}: {len(unused)} weights have no place in Qwen-Image 2.1's VAE: {shown}")
    return vae


def random_qwen_image21_vae(config: WanVAEConfig = TINY_QWEN_IMAGE21_VAE, seed: int = 0) -> QwenImage21VAE:
    """A QwenImage21VAE with seeded random weights that keep activations in range (norm gains near 1, small
    biases)."""
    return randomized_(QwenImage21VAE(config), seed)


def _time_convs(config: WanVAEConfig, generator: torch.Generator) -> StateDict:
    """Random `time_conv` weights where ComfyUI's file has them (each temporal resample), temporal kernel one."""
    out: StateDict = {}
    widths = [config.base_dim * m for m in config.dim_mult]
    up_widths = [config.decoder_base_dim * m for m in config.dim_mult[::-1]]
    last = len(config.dim_mult) - 1
    for i in range(last):
        places = ((f"encoder.downsamples.{i}.downsamples.{config.num_res_blocks}", widths[i], 1,
                   config.temporal_downsample[i]),
                  (f"decoder.upsamples.{i}.upsamples.{config.num_res_blocks + 1}", up_widths[i], 2,
                   config.temporal_downsample[::-1][i]))
        for prefix, dim, times, temporal in places:
            if temporal:
                weight = torch.randn(times * dim, dim, 1, 1, 1, generator=generator) * dim ** -0.5
                out[f"{prefix}.time_conv.weight"] = weight
                out[f"{prefix}.time_conv.bias"] = torch.zeros(times * dim)
    return out


def write_tiny_qwen_image21_vae(path: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen-Image 2.1 VAE file (TINY_QWEN_IMAGE21_VAE: the real levels and 64 latent channels) with random
    weights in ComfyUI's layout, `time_conv` weights included as the real file has them."""
    model = random_qwen_image21_vae(TINY_QWEN_IMAGE21_VAE, seed)
    tensors = {**model.state_dict(), **_time_convs(TINY_QWEN_IMAGE21_VAE, torch.Generator().manual_seed(seed + 1))}
    ckpt.write_safetensors(tensors, path, {})
    return Path(path)
