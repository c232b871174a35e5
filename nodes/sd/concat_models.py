"""Models that take an image beside the noisy latent, as extra input channels: InstructPix2Pix (the input image's
latent) and the Stable Diffusion x4 upscaler (the low-resolution image, noised to a level it is told as a class
label). Their conditioning nodes, and what the sampler feeds such models (inpainting models' part is `inpaint`)."""

from __future__ import annotations

from typing import Any

import torch

from ldm.upscaler_x4 import FAMILY as X4_FAMILY
from ldm.upscaler_x4 import IMAGE_CHANNELS, augment, noise_level
from nodes.node import Node
from nodes.sd.flux_variants import carries_references, flux_inputs, qwen_image_inputs, with_references
from nodes.sd.inpaint import inpaint_concat, with_inpaint_concat
from nodes.sd.latent import repeat_to_batch, upscale_latent
from nodes.sd.models import DiffusionModel, Vae
from nodes.sd.vae import encode
from nodes.spec import Float, Output, Socket

# ComfyUI seeds the x4 upscaler's image noise with the sampler's seed less this.
X4_SEED_OFFSET = 10


def _fit(image: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] at `samples`' height and width (centre-cropped to its aspect ratio, then bilinear, as
    ComfyUI's common_upscale), its batch cut or cycled to `samples`' batch."""
    height, width = samples.shape[-2:]
    if image.shape[-2:] != samples.shape[-2:]:
        image = upscale_latent(image, width, height, "bilinear", "center")
    return repeat_to_batch(image, samples.shape[0])


def ip2p_concat(model: DiffusionModel, samples: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """InstructPix2Pix's extra input for unscaled latents `samples`: the input image's unscaled VAE latent, as the
    model was trained (scaled only for EDM-trained CosXL-edit models, as ComfyUI does)."""
    if image.shape[1] != samples.shape[1]:
        raise ValueError(f"the InstructPix2Pix image is a {image.shape[1]}-channel latent and the latent to sample "
                         f"has {samples.shape[1]} channels: encode the image with this checkpoint's VAE")
    image = _fit(image.float(), samples)
    return model.latent_in(image) if model.family.edm is not None else image


def x4_inputs(samples: torch.Tensor, options: dict, seed: int) -> dict[str, torch.Tensor]:
    """The x4 upscaler's inputs for one conditioning entry: `concat`, the low-resolution image in -1..1 at the
    latent's size, noised by the entry's `noise_augmentation`, and `y` [1], the noise level, its class label.
    Without an image, a mid-grey one (zeros) at level 0, as in ComfyUI."""
    image = options.get("concat_image")
    if image is None:
        image = torch.zeros(samples.shape[0], IMAGE_CHANNELS, *samples.shape[-2:])
    if image.shape[1] != IMAGE_CHANNELS:
        raise ValueError(f"the x4 upscaler's low-resolution image has {image.shape[1]} channels; it takes RGB")
    image = image.float()
    if image.shape[-2:] != samples.shape[-2:]:
        image = upscale_latent(image, samples.shape[-1], samples.shape[-2], "bilinear", "center")
    augmentation = float(options.get("noise_augmentation", 0.0))
    level = noise_level(augmentation)
    if augmentation > 0:
        image = augment(image, level, seed - X4_SEED_OFFSET)
    return {"concat": repeat_to_batch(image, samples.shape[0]), "y": torch.tensor([float(level)])}


def _channels_error(model: DiffusionModel, channels: int) -> ValueError:
    expected = model.family.unet_config.in_channels
    if expected < channels:
        return ValueError(f"the latent has {channels} channels and {model.source} takes {expected}: the latent comes "
                          "from another model family's VAE")
    return ValueError(f"{model.source} takes {expected} input channels; for a {channels}-channel latent Loom runs "
                      f"inpainting models ({2 * channels + 1}: a mask and a masked image beside the latent), "
                      f"InstructPix2Pix models ({2 * channels}: an image's latent) and the x4 upscaler "
                      f"({channels + IMAGE_CHANNELS}: a low-resolution image), but no other kind with extra channels")


def model_inputs(model: DiffusionModel, latent: dict, seed: int, *conditionings: list) -> tuple[Any, list[list]]:
    """For a model that takes channels beside the latent's: the `concat` of entries that carry none (or None),
    and the conditionings with `concat` (and, for the x4 upscaler, its class label `y`) on the entries that
    carry their own image. Prompts made for the x4 upscaler are refused for any other model, which would
    sample their quarter-size latent without a word."""
    if model.family.name in ("wan21", "wan22"):  # image-to-video: a mask and the start image's latent
        from nodes.sd.wan import wan_inputs

        return wan_inputs(model, latent, *conditionings)
    if model.family.name == "hunyuan_video15":  # a start picture's latent and mask (the SR model: 66 channels)
        from nodes.sd.hunyuan_video15 import hunyuan_video15_inputs

        return hunyuan_video15_inputs(model, latent, seed, *conditionings)
    if model.family.name == "hunyuan_image21":  # no extra channels; a latent of its own VAE's
        from nodes.sd.hunyuan_image21 import check_latent

        check_latent(model, latent["samples"])
        return None, list(conditionings)
    if model.family.name == "qwen_image":  # no extra channels (in_channels are the 2x2 patches'); Edit's references
        return qwen_image_inputs(model, *conditionings)
    if model.family.name == "qwen_image21":  # no extra channels; TextEncodeQwenImage21's references, by slot
        return None, [[(embedding, with_references(model, options, "index")) for embedding, options in c]
                      for c in conditionings]
    if model.family.name == "flux2":  # no extra channels (the VAE packs 2x2 patches); multi-reference editing
        from nodes.sd.flux2 import flux2_inputs

        return flux2_inputs(model, latent, *conditionings)
    if model.family.name == "flux" or carries_references(conditionings):  # Flux's edit models, Kontext's references
        return flux_inputs(model, latent, *conditionings)
    samples = latent["samples"]
    config = model.family.unet_config
    channels, expected = samples.shape[1], config.in_channels
    upscaler_prompts = any("concat_image" in options for conditioning in conditionings for _, options in conditioning)
    if model.family.name == X4_FAMILY:
        if expected != channels + IMAGE_CHANNELS:
            raise _channels_error(model, channels)
        if not upscaler_prompts:
            raise ValueError(f"{model.source} is the x4 upscaler: it upscales an image, which the prompts do not "
                             "carry; prepare the prompts and the latent with SD_4XUpscale_Conditioning")
        return None, [_with_options(c, lambda options: x4_inputs(samples, options, seed)) for c in conditionings]
    if upscaler_prompts:
        raise ValueError(f"the prompts were prepared for the x4 upscaler (SD_4XUpscale_Conditioning), and the model "
                         f"{model.source} is {model.family.name.upper()}: sample them with the x4 upscaler checkpoint")
    if expected == channels:
        return None, list(conditionings)
    if expected == 2 * channels:  # InstructPix2Pix: entries without an image see zeros, as in ComfyUI

        def image_latent(options: dict) -> dict:
            image = options.get("concat_latent_image")
            return {} if image is None else {"concat": ip2p_concat(model, samples, image)}

        return torch.zeros_like(samples, dtype=torch.float32), [_with_options(c, image_latent) for c in conditionings]
    if expected == 2 * channels + 1:
        return (inpaint_concat(model, samples, latent.get("noise_mask")),
                [with_inpaint_concat(model, latent, conditioning) for conditioning in conditionings])
    raise _channels_error(model, channels)


def _with_options(conditioning: list, more: Any) -> list:
    """Each entry with the options `more(options)` adds."""
    return [(embedding, {**options, **more(options)}) for embedding, options in conditioning]


class InstructPixToPixConditioning(Node):
    """For InstructPix2Pix models: the prompts carry the latent of the image to edit (both of them, so that CFG
    guides by the text alone); the latent to sample is an empty one of the image's size."""

    category = "conditioning/instructpix2pix"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    vae = Socket("VAE")
    pixels = Socket("IMAGE")
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        from nodes.sd.edit_validation import with_edit_inputs  # checked against the model by the KSampler

        return with_edit_inputs(linked, ("positive", "negative"), concat="control")

    def execute(self, positive: list, negative: list, vae: Vae, pixels: torch.Tensor) -> tuple[list, list, dict]:
        image = encode(self, vae, pixels)  # centre-cropped to a multiple of 8 first; unscaled, as ComfyUI keeps it
        extra = {"concat_latent_image": image}
        return ([(e, {**o, **extra}) for e, o in positive], [(e, {**o, **extra}) for e, o in negative],
                {"samples": torch.zeros_like(image)})


class SD_4XUpscale_Conditioning(Node):
    """For the Stable Diffusion x4 upscaler: the prompts carry the images (scaled by scale_ratio, then to the
    latent's quarter size) and how much noise to add to them when sampling; the latent is an empty one whose
    decoded image is the images' size times scale_ratio."""

    category = "conditioning/upscale_diffusion"
    images = Socket("IMAGE")
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    scale_ratio = Float(4.0, min=0.0, max=10.0, step=0.01)
    noise_augmentation = Float(0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="noise added to the low-resolution images (0..1 of the highest level, 350); "
                                       "more lets the model invent more detail")
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, images: torch.Tensor, positive: list, negative: list, scale_ratio: float,
                noise_augmentation: float) -> tuple[list, list, dict]:
        width, height = (max(1, round(side * scale_ratio)) for side in (images.shape[2], images.shape[1]))
        if width < 4 or height < 4:
            raise ValueError(f"scale_ratio {scale_ratio} makes a {width}x{height} image of the {images.shape[2]}x"
                             f"{images.shape[1]} input, under the 4 pixels a side of one latent pixel")
        pixels = images[..., :IMAGE_CHANNELS].movedim(-1, 1).float() * 2 - 1
        pixels = upscale_latent(pixels, width // 4, height // 4, "bilinear", "center")
        extra = {"concat_image": pixels, "noise_augmentation": noise_augmentation}
        return ([(e, {**o, **extra}) for e, o in positive], [(e, {**o, **extra}) for e, o in negative],
                {"samples": torch.zeros(images.shape[0], 4, height // 4, width // 4)})


NODES: list[Any] = [InstructPixToPixConditioning, SD_4XUpscale_Conditioning]
