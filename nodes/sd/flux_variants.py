"""Flux Kontext, Fill, Depth and Canny: reference latents, Kontext image scaling, and the concat of Flux edit models;
the reference latents of Qwen-Image-Edit (the qwen_image family), which take the same path."""

from __future__ import annotations

from typing import Any

import torch

from ldm.flux_variants import FLUX_METHODS, References, fold_mask
from nodes.node import Node
from nodes.sd.image import resize_image
from nodes.sd.latent import repeat_to_batch, upscale_latent
from nodes.sd.models import DiffusionModel
from nodes.spec import Combo, Output, Socket

# The resolutions (width, height) FLUX.1 Kontext was trained at, as Black Forest Labs and ComfyUI list them.
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))
_KINDS = {"fill": "Fill (inpainting)", "control": "Depth / Canny (control image)"}
# The families whose models take reference latents (ReferenceLatent): Flux Kontext's, Qwen-Image-Edit's and FLUX.2's.
REFERENCE_FAMILIES = ("flux", "qwen_image", "flux2")


def references_refusal(source: str, family: str, kind: str | None) -> str | None:
    """Why a model (`source`, of `family`, a Flux one of edit `kind`) refuses prompts with reference latents; the
    words of the run (`flux_inputs`) and of validation (`nodes.sd.edit_validation`)."""
    if family not in REFERENCE_FAMILIES:
        return (f"the prompts carry reference latents (ReferenceLatent), which Flux Kontext, FLUX.2 and "
                f"Qwen-Image-Edit take; {source} is {family.upper()}, which takes none")
    if family == "flux" and kind is not None:
        return (f"the prompts carry reference latents (ReferenceLatent), which Flux Kontext takes; {source} is a "
                f"Flux {_KINDS[kind]} model, which takes none")
    return None


def concat_refusal(source: str, kind: str | None, mask: bool) -> str | None:
    """Why a Flux model (`source`, of edit `kind`) refuses prompts with an image to concat: with a `mask`
    (InpaintModelConditioning's) or without (InstructPixToPixConditioning's)."""
    if kind is None and not mask:
        return (f"the prompts carry a control image (InstructPixToPixConditioning) and {source} takes none: use a "
                "Flux Depth or Canny model")
    if kind == "control" and mask:
        return (f"the prompts carry an inpainting mask (InpaintModelConditioning) and {source} is a Flux Depth / "
                "Canny model, which takes a control image: use InstructPixToPixConditioning, or a Flux Fill model")
    return None


def _fit(t: torch.Tensor, samples: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """[b, c, h, w] at `samples`' size times `scale` (centre-cropped to its aspect, then bilinear, as ComfyUI's
    common_upscale), its batch cut or cycled to `samples`' batch."""
    height, width = samples.shape[-2] * scale, samples.shape[-1] * scale
    if t.shape[-2:] != (height, width):
        t = upscale_latent(t, width, height, "bilinear", "center")
    return repeat_to_batch(t, samples.shape[0])


def flux_concat(model: DiffusionModel, samples: torch.Tensor, image: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """The extra input of a Flux Fill or Depth / Canny model for unscaled latents `samples` [B, 16, h, w], in the
    model's latent space: the image's unscaled latent (zeros without one), scaled; for Fill followed by the mask
    (any resolution; all ones without one) at the image's pixel size, folded 8x8 into 64 channels."""
    image = torch.zeros_like(samples, dtype=torch.float32) if image is None else _fit(image.float(), samples)
    image = model.latent_in(image)
    if model.family.unet_config.edit_kind != "fill":
        return image
    mask = torch.ones_like(samples[:, :1], dtype=torch.float32) if mask is None else mask.float()
    mask = _fit(mask.reshape(-1, 1, *mask.shape[-2:]), samples, scale=8)
    return torch.cat([image, fold_mask(mask)], dim=1)


def with_references(model: DiffusionModel, options: dict, default_method: str) -> dict:
    """An entry's options with `ref_latents` (`References`, in the model's latent space) made of its reference
    latents and method (`default_method` where it names none, as the model's own default in ComfyUI); unchanged
    without reference latents."""
    config, source = model.family.unet_config, model.source
    refs = options.get("reference_latents")
    if not refs:
        return options
    if any(r.shape[1] != config.latent_channels for r in refs):
        raise ValueError(f"a reference latent has {sorted({r.shape[1] for r in refs})} channels and {source} "
                         f"takes {config.latent_channels}: encode the reference image with the model's VAE")
    method = options.get("reference_latents_method", default_method)
    return {**options, "ref_latents": References(tuple(model.latent_in(r.float()) for r in refs), method)}


def qwen_image_inputs(model: DiffusionModel, *conditionings: list) -> tuple[None, list[list]]:
    """`nodes.sd.concat_models.model_inputs` for Qwen-Image: no extra channels (None), and the conditionings with
    each entry's `ref_latents` (Qwen-Image-Edit's), placed by the model's default method where the prompts name
    none ("index", or "index_timestep_zero" for an Edit-2511 file, as ComfyUI does)."""
    method = model.family.unet_config.reference_method
    return None, [[(embedding, with_references(model, options, method)) for embedding, options in c]
                  for c in conditionings]


def _entry_inputs(model: DiffusionModel, latent: dict, options: dict) -> dict:
    """One entry's options with what the model takes from it: `ref_latents` from its reference latents, `concat`
    from its masked image / control image; prompts for another kind of edit model are refused."""
    config, source = model.family.unet_config, model.source
    kind = config.edit_kind
    if options.get("reference_latents"):
        if kind is not None:
            raise ValueError(references_refusal(source, "flux", kind))
        method = options.get("reference_latents_method", "offset")
        if method not in FLUX_METHODS:
            raise ValueError(f"the prompts place their reference latents by {method!r} (Qwen-Image-Edit-2511's "
                             f"method); {source} is Flux, which Loom runs with {', '.join(FLUX_METHODS)}")
        options = with_references(model, options, "offset")
    image, mask = options.get("concat_latent_image"), options.get("concat_mask")
    if image is not None or mask is not None:
        refusal = concat_refusal(source, kind, mask is not None)
        if refusal:
            raise ValueError(refusal)
    if kind is None:
        return options  # an inpainting mask: a plain model inpaints by the latent's noise mask alone, as in ComfyUI
    if image is None and mask is None:
        return options
    if image is not None and image.shape[1] != config.latent_channels:
        raise ValueError(f"the prompts' image latent has {image.shape[1]} channels and {source} takes "
                         f"{config.latent_channels}: encode the image with the Flux VAE")
    mask = latent.get("noise_mask") if mask is None else mask
    return {**options, "concat": flux_concat(model, latent["samples"], image, mask)}


def flux_inputs(model: DiffusionModel, latent: dict, *conditionings: list) -> tuple[Any, list[list]]:
    """`nodes.sd.concat_models.model_inputs` for Flux models (and any model of another family given reference
    latents, which it refuses): the `concat` of entries that carry none (Fill and Depth / Canny models; None for the
    others), and the conditionings with each entry's `ref_latents` and `concat`."""
    if model.family.name != "flux":
        raise ValueError(references_refusal(model.source, model.family.name, None))
    config, samples = model.family.unet_config, latent["samples"]
    if samples.shape[1] != config.latent_channels:
        raise ValueError(f"the latent has {samples.shape[1]} channels and {model.source} takes "
                         f"{config.latent_channels}: the latent comes from another model family's VAE")
    out = [[(embedding, _entry_inputs(model, latent, options)) for embedding, options in c] for c in conditionings]
    default = None if config.edit_kind is None else flux_concat(model, samples, None, latent.get("noise_mask"))
    return default, out


def carries_references(conditionings: tuple[list, ...]) -> bool:
    return any(options.get("reference_latents") for c in conditionings for _, options in c)


class ReferenceLatent(Node):
    """Adds a latent to the prompts as a reference image for an edit model (Flux Kontext, Qwen-Image-Edit); chain
    several nodes for several references."""

    category = "advanced/conditioning/edit_models"
    conditioning = Socket("CONDITIONING")
    latent = Socket("LATENT", optional=True)
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        from nodes.sd.edit_validation import with_edit_inputs  # checked against the model by the KSampler

        if "latent" not in linked:
            return {0: linked.get("conditioning", {})}
        return with_edit_inputs(linked, ("conditioning",), reference_latents=True)

    def execute(self, conditioning: list, latent: dict | None = None) -> tuple[list]:
        if latent is None:
            return (conditioning,)
        return ([(e, {**o, "reference_latents": [*o.get("reference_latents", []), latent["samples"]]})
                 for e, o in conditioning],)


class FluxKontextImageScale(Node):
    """Scales the image (lanczos, centre-cropped) to the Kontext training resolution closest to its aspect ratio."""

    category = "advanced/conditioning/flux"
    image = Socket("IMAGE")
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        aspect = image.shape[2] / image.shape[1]
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
        return (resize_image(image, width, height, "lanczos", "center"),)


class FluxKontextMultiReferenceLatentMethod(Node):
    """How several reference latents are placed for Flux Kontext: "offset" side by side at index 1, "index" each at
    its own index, "uxo/uno" diagonally past the image (UNO/USO); "index_timestep_zero" (Qwen-Image-Edit-2511's) as
    "index", the references modulated as at timestep 0."""

    category = "advanced/conditioning/flux"
    conditioning = Socket("CONDITIONING")
    reference_latents_method = Combo(["offset", "index", "uxo/uno", "index_timestep_zero"])
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, reference_latents_method: str) -> tuple[list]:
        method = "uxo" if "uxo" in reference_latents_method or "uso" in reference_latents_method \
            else reference_latents_method
        return ([(e, {**o, "reference_latents_method": method}) for e, o in conditioning],)


NODES: list[Any] = [ReferenceLatent, FluxKontextImageScale, FluxKontextMultiReferenceLatentMethod]
