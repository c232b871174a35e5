"""UNet patches that change how a model runs without touching its weights: FreeU on the decoder's inputs, Kohya's
Deep Shrink on the encoder's features, HyperTile's tiled self-attention, the perturbed self-attention of
Perturbed-Attention Guidance, and the recorded self-attention map of Self-Attention Guidance.

A patched UNet is a shallow copy (`ldm.lora.shallow_copy`) sharing every weight with the original, with its
own `output_block_patches`; the original, which a cache may hold, is left as it was. A copy is a module of its
own, so compiled forwards and CUDA graphs (kept per module) never mix patched and unpatched runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.attention import CrossAttention, SpatialTransformer
from ldm.lora import shallow_copy
from ldm.quant import dequantized_weight

# Called as `h, skip = patch(h, skip)` just before an output block concatenates the decoder's features `h`
# with the encoder's skip connection.
OutputBlockPatch = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def with_output_block_patch(unet: nn.Module, patch: OutputBlockPatch) -> nn.Module:
    """A copy of `unet` that also applies `patch` (after those it already has) before each output block."""
    patched = shallow_copy(unet)
    patched.output_block_patches = (*getattr(unet, "output_block_patches", ()), patch)
    return patched


def with_input_block_patch(unet: nn.Module, patch: DeepShrink | HyperTile) -> nn.Module:
    """A copy of `unet` that also applies `patch` after each input block. Such a patch reads the timestep on
    the host, which a CUDA graph cannot replay, so the copy says it runs without them (`cuda_graphs_safe`)."""
    patched = shallow_copy(unet)
    patched.input_block_patches = (*getattr(unet, "input_block_patches", ()), patch)
    patched.cuda_graphs_safe = False
    return patched


Resize = Callable[[Tensor, int, int], Tensor]  # (x [B, C, H, W], height, width) -> resized


@dataclass(frozen=True)
class DeepShrink:
    """Kohya's Deep Shrink ("PatchModelAddDownscale"): while the UNet timestep is within [t_low, t_high], the
    features after input block `block` are shrunk by `factor`, so that the deep blocks see the image at about
    the size they were trained on and large images keep one composition. The decoder's features are resized
    back to each skip connection's size (`restore`) before the two are joined."""

    block: int
    factor: float
    t_high: float
    t_low: float
    after_skip: bool
    shrink: Resize
    grow: Resize

    def __call__(self, h: Tensor, index: int, timesteps: Tensor) -> Tensor:
        if index != self.block or not self.t_low <= float(timesteps.reshape(-1)[0]) <= self.t_high:
            return h
        height, width = h.shape[-2:]
        return self.shrink(h, max(1, round(height / self.factor)), max(1, round(width / self.factor)))

    def restore(self, h: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
        if h.shape[-2:] != skip.shape[-2:]:
            h = self.grow(h, *skip.shape[-2:])
        return h, skip


def fourier_filter(x: Tensor, threshold: int, scale: float) -> Tensor:
    """Scale the lowest spatial frequencies of `x` [B, C, H, W] (a `2 * threshold` square around the centre
    of the shifted 2-D spectrum) by `scale`: FreeU's skip-feature filter (Si et al. 2023, Eq. 6). In float32,
    as fft has no bf16 and its fp16 is numerically poor."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = x.shape[-2:]
    row, col = height // 2, width // 2
    gain = torch.ones(height, width, device=x.device)
    gain[max(row - threshold, 0):row + threshold, max(col - threshold, 0):col + threshold] = scale
    spectrum = torch.fft.ifftshift(spectrum * gain, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)


@dataclass(frozen=True)
class FreeU:
    """FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"): in the decoder's two deepest stages,
    amplify half of the backbone's channels by `b` and damp the skip connection's low frequencies by `s`.

    Stages are told apart by the backbone's channel count, as the authors' code does: `4 * model_channels`
    takes (b1, s1), `2 * model_channels` takes (b2, s2). Version 2 (ComfyUI's FreeU_V2) scales each pixel by
    `1 + (b - 1) * m`, with `m` the channel mean of the features normalised to 0..1 over each image.
    """

    model_channels: int
    b1: float
    b2: float
    s1: float
    s2: float
    version: int = 1

    def __call__(self, h: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
        channels = h.shape[1]
        if channels == 4 * self.model_channels:
            b, s = self.b1, self.s1
        elif channels == 2 * self.model_channels:
            b, s = self.b2, self.s2
        else:
            return h, skip
        half = channels // 2
        if self.version == 2:
            mean = h.mean(1, keepdim=True)
            low = mean.amin(dim=(-2, -1), keepdim=True)
            high = mean.amax(dim=(-2, -1), keepdim=True)
            gain = (b - 1) * (mean - low) / (high - low) + 1
        else:
            gain = b
        h = torch.cat([h[:, :half] * gain, h[:, half:]], dim=1)
        return h, fourier_filter(skip, threshold=1, scale=s)


def scaled_layers_copy(module: nn.Module, factors: dict[str, float]) -> nn.Module:
    """A copy of `module` in which each Linear layer whose path ends with a key of `factors` (e.g. "attn1.to_q",
    "self_attn.out_proj") has its weight and bias multiplied by that factor (ComfyUI's attention multiply
    nodes). The copy shares every other tensor; `module` itself is left as it was."""
    scaled = {path: factor for path, layer in module.named_modules() if isinstance(layer, nn.Linear)
              for suffix, factor in factors.items() if factor != 1.0 and path.endswith(suffix)}
    if not scaled:
        return module
    copy = shallow_copy(module)
    with torch.no_grad():
        for path, factor in scaled.items():
            layer = copy.get_submodule(path)
            weight = dequantized_weight(layer)  # an fp8 layer's scaled weight is stored in full precision
            layer._parameters["weight"] = nn.Parameter(weight * factor, requires_grad=False)
            if layer.bias is not None:
                layer._parameters["bias"] = nn.Parameter(layer.bias * factor, requires_grad=False)
    return copy


def perturbed_attention_copy(unet: nn.Module) -> nn.Module:
    """PAG's perturbed model (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
    Guidance"): a copy of `unet` whose middle block's self-attention layers use the identity as their
    attention map. Made afresh for each sampling run (milliseconds): a copy kept across runs would keep the
    buffer tensors the module had when it was made, wherever the module has moved since."""
    copy = shallow_copy(unet)
    for name, module in copy.middle_block.named_modules():
        if isinstance(module, CrossAttention) and name.endswith("attn1"):
            module.identity_attention = True
    return copy


class AttentionRecorder:
    """Self-Attention Guidance's view into the UNet (Hong et al. 2023): called on a UNet, it makes a copy whose
    middle block's first self-attention layer hands its map to this recorder, which keeps the last one
    (`probs`, [B*heads, L, L]) with that block's spatial size (`size`). Made per sampling run, like PAG's copy."""

    def __init__(self) -> None:
        self.probs: Tensor | None = None
        self.downsamples = 0

    def __call__(self, unet: nn.Module) -> nn.Module:
        copy = shallow_copy(unet)
        self.downsamples = len(unet.config.channel_mult) - 1
        copy.middle_block[1].transformer_blocks[0].attn1.recorder = self._record
        return copy

    def _record(self, probs: Tensor) -> None:
        self.probs = probs

    def size(self, height: int, width: int, tokens: int) -> tuple[int, int]:
        """The middle block's grid (`tokens` in all) for a latent of this size: each downsampling conv (stride
        2, padding 1) rounds up. A patch that resizes features on the way (Deep Shrink) gives another grid: then
        the factorisation of `tokens` nearest the latent's aspect ratio."""
        h, w = height, width
        for _ in range(self.downsamples):
            h, w = -(-h // 2), -(-w // 2)
        if h * w == tokens:
            return h, w
        rows = min((d for d in range(1, tokens + 1) if tokens % d == 0),
                   key=lambda d: abs(d - (tokens * height / width) ** 0.5))
        return rows, tokens // rows


class HyperTile:
    """HyperTile (tfernd/HyperTile, as ComfyUI's node sets it up): the self-attention of the transformers with
    model_channels * 2^i channels, i up to `max_depth`, runs within tiles of about `tile_size` pixels (tile_size / 8
    latent tokens a side, times 2^(channels / model_channels - 1) with `scale_depth`), which is faster on large
    images. Each call picks the number of tiles along each side among the `swap_size` largest divisors of the
    grid's side that give tiles of at least that size, so that the seams move from step to step. ComfyUI draws
    the choice from a counter that runs on across runs; here it is drawn from the step's timestep and the
    call's place in the UNet pass, so that a workflow gives the same image every time."""

    after_skip = False  # as an input-block patch: it only notes the timestep, before the skip is kept

    def __init__(self, model_channels: int, tile_size: int, swap_size: int, max_depth: int, scale_depth: bool):
        self.model_channels = model_channels
        self.latent_tile = max(32, tile_size) // 8
        self.swap_size = swap_size
        self.channels = {model_channels * 2**i for i in range(max_depth + 1)}
        self.scale_depth = scale_depth
        self._step, self._calls = 0, 0

    def __call__(self, h: Tensor, index: int, timesteps: Tensor) -> Tensor:
        if index == 0:  # a new UNet pass
            self._step, self._calls = round(float(timesteps.reshape(-1)[0]) * 1000), 0
        return h

    def tiles(self, height: int, width: int, channels: int) -> tuple[int, int]:
        """The number of tiles (rows, columns) for a transformer's grid; (1, 1) where HyperTile does not act."""
        if channels not in self.channels:
            return 1, 1
        factor = 2 ** (channels // self.model_channels - 1) if self.scale_depth else 1
        return self._divisor(height, self.latent_tile * factor), self._divisor(width, self.latent_tile * factor)

    def _divisor(self, side: int, smallest_tile: int) -> int:
        smallest_tile = min(smallest_tile, side)
        options = [side // size for size in range(smallest_tile, side + 1) if side % size == 0][: self.swap_size]
        self._calls += 1
        return options[random.Random(self._step * 10_000 + self._calls).randrange(len(options))]

    def patch(self, unet: nn.Module) -> nn.Module:
        """A copy of `unet` whose transformers tile their self-attention (see `with_input_block_patch`: it runs
        without CUDA graphs, its tiles changing from call to call)."""
        copy = with_input_block_patch(unet, self)
        for module in copy.modules():
            if isinstance(module, SpatialTransformer):
                module.hypertile = self.tiles
        return copy
