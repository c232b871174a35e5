"""VAE nodes: pixels to latents and back, plain, tiled, and for inpainting."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ldm.vae import tiled_apply
from nodes.node import Node
from nodes.sd.models import Vae, device_and_dtype, on_device
from nodes.spec import InputSpec, Int, Output, Socket

log = logging.getLogger(__name__)


def _crop_to_multiple_of_8(pixels: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Centre-crop [B, H, W, C] so both sides are multiples of `factor` (how far the VAE downscales)."""
    h, w = pixels.shape[1] // factor * factor, pixels.shape[2] // factor * factor
    if h == 0 or w == 0:
        raise ValueError(f"image of {pixels.shape[2]}x{pixels.shape[1]} px is too small to encode "
                         f"({factor}x{factor} at least)")
    top, left = (pixels.shape[1] - h) // 2, (pixels.shape[2] - w) // 2
    return pixels[:, top:top + h, left:left + w, :]


def is_video_vae(vae: Vae) -> bool:
    """Whether the VAE compresses frames as well as pixels (Wan's, LTX-Video's): its latents are [B, C, T, h, w]."""
    return getattr(vae.vae, "temporal_compression", None) is not None


def encode(node: Node, vae: Vae, pixels: torch.Tensor, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """IMAGE [B, H, W, C] in 0..1 -> unscaled latents. Uses the posterior's mode, so encoding is
    deterministic (ComfyUI samples the posterior; its spread is negligible for trained VAEs). A video VAE takes
    the IMAGE's B pictures as the frames of one video, as ComfyUI's does: [1, C, T, h, w]."""
    device, _, dtype = device_and_dtype(node.ctx)
    video = is_video_vae(vae)
    factor = getattr(vae.vae, "spatial_compression", 8)
    channels = getattr(vae.vae, "image_channels", 3)  # an RGBA VAE's (Qwen-Image's Layered and 2.1) keep the alpha
    x = _crop_to_multiple_of_8(pixels, factor)[..., :channels].movedim(-1, 1).to(device, dtype) * 2 - 1
    if video:
        x = x.movedim(0, 1).unsqueeze(0)  # [T, 3, H, W] -> [1, 3, T, H, W]
    model = on_device(node.ctx, vae.vae)
    with torch.inference_mode():
        if tile is None:
            z = _or_in_tiles(lambda: model.encode(x).mode(), lambda: _encode_tiles(model, x, video, (512, 64)))
        else:
            z = _encode_tiles(model, x, video, tile)
    return z.float().cpu()


def _encode_tiles(model: torch.nn.Module, x: torch.Tensor, video: bool, tile: tuple[int, int]) -> torch.Tensor:
    """Encode in overlapping tiles of `tile` = (side, overlap) pixels, blended."""
    if video:  # tiles of the picture, every frame in each (the VAE chunks the frames itself)
        factor = model.spatial_compression
        tile_px, overlap_px = _video_tile(tile[0], factor), _video_tile(tile[1], factor, 0)
        return tiled_apply(lambda p: model.encode(p).mode(), x, tile_px, min(overlap_px, tile_px - factor),
                           1.0 / factor, model.latent_channels)
    return model.encode_tiled(x, tile_size=tile[0], overlap=tile[1]).mode()


def _video_tile(pixels: int, factor: int, least: int | None = None) -> int:
    """A tile side in pixels as a multiple of the video VAE's downscale (at least one latent pixel's worth)."""
    return max(factor if least is None else least, pixels // factor * factor)


def decode(node: Node, vae: Vae, samples: torch.Tensor, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Unscaled latents -> IMAGE [B, H, W, C] in 0..1; a video latent [B, C, T, h, w] gives its frames, video after
    video, as ComfyUI's decode does."""
    device, _, dtype = device_and_dtype(node.ctx)
    video = is_video_vae(vae)
    if samples.ndim == 5 and not video:
        raise ValueError(f"a video latent {tuple(samples.shape)} does not fit this VAE ({vae.source}), which decodes "
                         "image latents [B, C, h, w]: decode it with the video model's VAE")
    model = on_device(node.ctx, vae.vae)
    with torch.inference_mode():
        # An image latent given to a video VAE (Qwen-Image's, which is Wan 2.1's) is a batch of one-frame videos.
        z = samples.to(device, dtype) if samples.ndim == 5 or not video else samples.to(device, dtype).unsqueeze(2)
        if tile is None:
            pixels = _or_in_tiles(lambda: model.decode(z), lambda: _decode_tiles(model, z, video, _latent_tile(vae)))
        else:
            pixels = _decode_tiles(model, z, video, tile)
    images = ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()
    return images.reshape(-1, *images.shape[-3:]) if video else images


def _decode_tiles(model: torch.nn.Module, z: torch.Tensor, video: bool, tile: tuple[int, int]) -> torch.Tensor:
    """Decode in overlapping tiles of `tile` = (side, overlap) latent pixels, blended."""
    if video:  # tiles of the latent's picture, every frame in each, blended as an image VAE's are
        return tiled_apply(model.decode, z, tile[0], min(tile[1], tile[0] - 1), model.spatial_compression, 3)
    return model.decode_tiled(z, tile_size=tile[0], overlap=tile[1])


def _latent_tile(vae: Vae, tile_size: int = 512, overlap: int = 64) -> tuple[int, int]:
    """A tile and its overlap in pixels as latent pixels of this VAE (VAEDecodeTiled's defaults: VAEDecode's
    fallback)."""
    factor = getattr(vae.vae, "spatial_compression", 8)
    tile = max(8 if factor == 8 else 1, tile_size // factor)
    return tile, min(overlap // factor, tile // 2)


def _or_in_tiles(whole: Callable[[], torch.Tensor], tiled: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`whole()`, or `tiled()` when that runs out of memory, as ComfyUI's VAE nodes fall back to tiles."""
    try:
        return whole()
    except (torch.OutOfMemoryError, MemoryError):
        # Leave the except block before retrying: its traceback holds the failed attempt's tensors.
        pass
    log.warning("the VAE ran out of memory on the whole image; retrying in tiles")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return tiled()


class VAEDecode(Node):
    display_name = "VAE Decode"
    category = "latent"
    samples = Socket("LATENT")
    vae = Socket("VAE")
    outputs = (Output("IMAGE"),)

    def execute(self, samples: dict, vae: Vae) -> tuple[torch.Tensor]:
        return (decode(self, vae, samples["samples"]),)


class VAEEncode(Node):
    display_name = "VAE Encode"
    category = "latent"
    pixels = Socket("IMAGE")
    vae = Socket("VAE")
    outputs = (Output("LATENT"),)

    def execute(self, pixels: torch.Tensor, vae: Vae) -> tuple[dict]:
        return ({"samples": encode(self, vae, pixels)},)


# ComfyUI's inputs for video VAEs. Loom's bound memory over the frames themselves (Wan's VAE works a few frames at a
# time with a cache, exactly; LTX-Video's decodes the frames whole), so these are accepted and not used.
def _temporal_size() -> InputSpec:
    # Optional here (required in ComfyUI since early 2025): prompts saved before then still validate.
    return Int(64, min=8, max=4096, step=4, optional=True, tooltip="Only used for video VAEs: frames to decode at a "
               "time (Loom's video VAEs chunk the frames themselves; accepted for ComfyUI's workflows)")


def _temporal_overlap() -> InputSpec:
    return Int(8, min=4, max=4096, step=4, optional=True, tooltip="Only used for video VAEs: frames to overlap "
               "(accepted for ComfyUI's workflows)")


class VAEDecodeTiled(Node):
    """Decodes in overlapping tiles, for large images on little memory; a video's frames go whole into each tile."""

    display_name = "VAE Decode (Tiled)"
    category = "_for_testing"
    samples = Socket("LATENT")
    vae = Socket("VAE")
    tile_size = Int(512, min=64, max=4096, step=32)
    overlap = Int(64, min=0, max=4096, step=32)
    temporal_size = _temporal_size()
    temporal_overlap = _temporal_overlap()
    outputs = (Output("IMAGE"),)

    def execute(self, samples: dict, vae: Vae, tile_size: int, overlap: int, temporal_size: int = 64,
                temporal_overlap: int = 8) -> tuple[torch.Tensor]:
        return (decode(self, vae, samples["samples"], _latent_tile(vae, tile_size, overlap)),)


class VAEEncodeTiled(Node):
    display_name = "VAE Encode (Tiled)"
    category = "_for_testing"
    pixels = Socket("IMAGE")
    vae = Socket("VAE")
    tile_size = Int(512, min=64, max=4096, step=32)
    overlap = Int(64, min=0, max=4096, step=32)
    temporal_size = _temporal_size()
    temporal_overlap = _temporal_overlap()
    outputs = (Output("LATENT"),)

    def execute(self, pixels: torch.Tensor, vae: Vae, tile_size: int, overlap: int, temporal_size: int = 64,
                temporal_overlap: int = 8) -> tuple[dict]:
        return ({"samples": encode(self, vae, pixels, (tile_size, min(overlap, tile_size // 2)))},)


class VAEEncodeForInpaint(Node):
    """Encodes an image with the masked area greyed out and returns the (grown) mask as the noise mask."""

    display_name = "VAE Encode (for Inpainting)"
    category = "latent/inpaint"
    pixels = Socket("IMAGE")
    vae = Socket("VAE")
    mask = Socket("MASK")
    grow_mask_by = Int(6, min=0, max=64)
    outputs = (Output("LATENT"),)

    def execute(self, pixels: torch.Tensor, vae: Vae, mask: torch.Tensor, grow_mask_by: int) -> tuple[dict]:
        pixels = _crop_to_multiple_of_8(pixels, getattr(vae.vae, "spatial_compression", 8))
        h, w = pixels.shape[1:3]
        mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
        mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
        grown = mask
        if grow_mask_by > 0:
            # Dilate so the sampler may also repaint a margin around the mask, hiding the seam.
            grown = F.max_pool2d(mask, kernel_size=2 * grow_mask_by + 1, stride=1, padding=grow_mask_by)
            grown = grown.round()
        keep = (1 - mask.round()).movedim(1, -1)
        greyed = (pixels[..., :3] - 0.5) * keep + 0.5
        return ({"samples": encode(self, vae, greyed), "noise_mask": grown},)


NODES = [VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled, VAEEncodeForInpaint]
