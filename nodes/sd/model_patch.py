"""Model patches loaded from their own files (ComfyUI's models/model_patches): ControlNets that patch a MODEL rather
than ride on a conditioning, and small models that read one.

- DiffSynth's blockwise ControlNets for Qwen-Image (Comfy-Org's qwen_image_{canny,depth,inpaint}_diffsynth_controlnet
  files; `ldm.controlnet_diffsynth`): after every transformer block, a residual from that block's image tokens and
  the hint's latents.
- alibaba-pai's Z-Image-Turbo Fun ControlNet Union files (`ldm.controlnet_z_image`): control layers beside the
  transformer's, whose hints are added after every few of its layers; the 2.x files also inpaint.
- LTX 2.4's duration head (`ldm.ltx2_duration`): how long a prompt's shot lasts, from an LTX-2 model's prompt
  connectors; LTXVDurationPredictor (`nodes.sd.ltx2_duration`) runs it.

`ModelPatchLoader` loads any of them; `QwenImageDiffsynthControlnet` applies either ControlNet (as ComfyUI's does,
whatever its name says), `ZImageFunControlnet` applies a Z-Image one with its inpainting inputs. The hint image is
VAE-encoded when the sampler first runs the model, at the latent's size (cropped at the centre to its aspect and
area-resized first, as in ComfyUI), so a hint of any size fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.loaders import model_file, model_path, shared_model
from nodes.sd.models import HANDLE_SIZE, DiffusionModel, Vae, device_and_dtype, file_fingerprint, load_device
from nodes.spec import Float, Output, Socket

# What each kind of patch is for: the MODEL family it fits, and how messages name it.
KINDS = {"diffsynth": ("qwen_image", "a DiffSynth blockwise ControlNet for Qwen-Image"),
         "z_image_fun": ("z_image", "a Z-Image Fun ControlNet"),
         "ltx_duration_head": ("ltx2", "an LTX 2.4 duration head")}


@dataclass(frozen=True, eq=False)
class ModelPatch:
    """MODEL_PATCH: a loaded patch model, its kind (a key of KINDS) and its file's name."""

    model: torch.nn.Module
    kind: str
    source: str

    @property
    def family(self) -> str:
        return KINDS[self.kind][0]

    def cache_size(self) -> int:
        return HANDLE_SIZE  # the weights are the model cache's


def read_model_patch(path: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                     ) -> tuple[str, Any]:
    """(kind, loaded) for a model patch file: told apart by its weights' names; other patches ComfyUI loads here
    (SigLIP style projections, Anima LLLite, SUPIR, Uni3C...) are refused by name. A duration head loads in
    float32 whatever `dtype` says, as ComfyUI's."""
    from ldm.checkpoint import CheckpointError, load_state_dict
    from ldm.controlnet_diffsynth import is_diffsynth_controlnet, load_diffsynth_controlnet
    from ldm.controlnet_z_image import is_z_image_fun_controlnet, load_z_image_fun_controlnet
    from ldm.ltx2_duration import is_duration_head, load_duration_head

    sd = load_state_dict(path)
    if is_diffsynth_controlnet(sd):
        return "diffsynth", load_diffsynth_controlnet(sd, path, device, dtype)
    if is_z_image_fun_controlnet(sd):
        return "z_image_fun", load_z_image_fun_controlnet(sd, path, device, dtype)
    if is_duration_head(sd):
        return "ltx_duration_head", load_duration_head(sd, path, device)
    raise CheckpointError(f"{path.name}: not a model patch this engine runs (it runs DiffSynth's blockwise "
                          "ControlNets for Qwen-Image, alibaba-pai's Z-Image Fun ControlNets and LTX 2.4's "
                          "duration head); "
                          f"its first weights: {', '.join(sorted(sd)[:3])}")


def peek_model_patch(path: Any) -> str | None:
    """The kind of a model patch file from its header alone (None: unreadable or unknown)."""
    from safetensors import SafetensorError

    from ldm.checkpoint import read_shapes
    from ldm.controlnet_diffsynth import is_diffsynth_controlnet
    from ldm.controlnet_z_image import is_z_image_fun_controlnet
    from ldm.ltx2_duration import is_duration_head

    try:
        sd = read_shapes(path)
    except (SafetensorError, OSError, ValueError):
        return None
    if sd is None:
        return None
    if is_diffsynth_controlnet(sd):
        return "diffsynth"
    if is_z_image_fun_controlnet(sd):
        return "z_image_fun"
    return "ltx_duration_head" if is_duration_head(sd) else None


class ModelPatchLoader(Node):
    """Loads a model patch: DiffSynth's blockwise ControlNets for Qwen-Image (canny, depth, inpaint), alibaba-pai's
    Z-Image-Turbo Fun ControlNet Union (1.0, 2.0, 2.1) or LTX 2.4's duration head, from models/model_patches."""

    display_name = "ModelPatchLoader"
    category = "advanced/loaders"
    name = model_file("model_patches")
    outputs = (Output("MODEL_PATCH"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("model_patches", str(inputs.get("name", ""))))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        path = get_paths().find_model("model_patches", str(inputs.get("name", "")))
        kind = None if path is None else peek_model_patch(path)
        return {} if kind is None else {0: {"family": KINDS[kind][0], "patch": kind,
                                            "source": str(inputs.get("name"))}}

    def execute(self, name: str) -> tuple[ModelPatch]:
        path = model_path("model_patches", name)
        _, dtype, _ = device_and_dtype(self.ctx)
        device = load_device(self.ctx)
        key = ("model_patches", str(path), str(file_fingerprint(path)), str(device), str(dtype))
        kind, loaded = shared_model(self, key, lambda: read_model_patch(path, device, dtype))
        return (ModelPatch(loaded, kind, name),)


def _patch_problem(linked: dict[str, dict[str, Any]], node: str, kinds: tuple[str, ...]) -> str | None:
    """Why the MODEL_PATCH linked does not fit the MODEL linked, or this node (by their files' headers)."""
    patch = linked.get("model_patch", {})
    kind, model = patch.get("patch"), linked.get("model", {}).get("family")
    source = patch.get("source", "the model patch linked")
    if kind is not None and kind not in kinds:
        return f"{source} is {KINDS[kind][1]}; {node} applies {' or '.join(KINDS[k][1] for k in kinds)}"
    if kind is not None and model is not None and model != KINDS[kind][0]:
        return f"{source} is {KINDS[kind][1]}; the MODEL linked is {model.upper()}"
    return None


def _keep_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """MASK [B, H, W] or [H, W] (1 where the picture is repainted) -> [B, 1, H, W], 1 where it is kept."""
    if mask is None:
        return None
    mask = mask.float().cpu()
    mask = mask.reshape(-1, 1, *mask.shape[-2:])
    return 1.0 - mask


def _scaled(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] cropped at the centre to height:width and area-resized to it (ComfyUI's common_upscale
    with "area", "center"), as an IMAGE."""
    from ldm.controlnet import prepare_hint

    pixels = image[..., :3].movedim(-1, 1).float().cpu()
    return prepare_hint(pixels, height, width, mode="area").movedim(1, -1)


class LatentsOf:
    """Encodes IMAGEs with a VAE into a MODEL's latent space, when the sampler asks, at the latent's size."""

    def __init__(self, node: Node, vae: Vae, model: DiffusionModel):
        self.node, self.vae, self.model = node, vae, model
        self.factor = getattr(vae.vae, "spatial_compression", 8)

    def __call__(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        from nodes.sd.vae import encode, is_video_vae

        pixels = _scaled(image, height * self.factor, width * self.factor)
        if is_video_vae(self.vae):  # Qwen-Image's is Wan 2.1's: each picture a video of one frame
            latents = torch.cat([encode(self.node, self.vae, pixels[i:i + 1])[:, :, 0] for i in range(len(pixels))])
        else:
            latents = encode(self.node, self.vae, pixels)
        return self.model.latent_in(latents)


def _resized_mask(keep: torch.Tensor, height: int, width: int, mode: str, crop: bool = True) -> torch.Tensor:
    """A keep mask [B, 1, H, W] resized to height x width by `mode` ("bilinear" or "nearest"), cropped at the
    centre to that aspect first unless `crop` is False."""
    from ldm.controlnet import prepare_hint

    if not crop:
        return F.interpolate(keep, size=(height, width), mode=mode, **({"align_corners": False}
                                                                       if mode == "bilinear" else {}))
    return prepare_hint(keep, height, width, mode=mode)


def diffsynth_context(latents_of: LatentsOf, image: torch.Tensor, keep: torch.Tensor | None, mask_channels: int
                      ) -> Callable[[int, int, torch.device], torch.Tensor]:
    """The hint of a DiffSynth ControlNet for latents of a size: the image's latents, then (an inpainting one's)
    the keep mask's `mask_channels` copies, bilinear at the latent's size (all ones without a mask)."""

    def encode(height: int, width: int, device: torch.device) -> torch.Tensor:
        latents = latents_of(image, height, width)
        if mask_channels:
            if keep is None:
                mask = torch.ones(latents.shape[0], mask_channels, height, width)
            else:
                mask = _resized_mask(keep, height, width, "bilinear", crop=False).expand(-1, mask_channels, -1, -1)
            batch = max(len(latents), len(mask))
            if {len(latents), len(mask)} - {1, batch}:
                raise ValueError(f"QwenImageDiffsynthControlnet: {len(latents)} hint images and {len(mask)} masks; "
                                 "give one mask, or one for each image")
            latents = torch.cat([latents.expand(batch, -1, -1, -1), mask.to(latents.dtype).expand(batch, -1, -1, -1)],
                                dim=1)
        return latents.to(device)

    return encode


def z_image_context(latents_of: LatentsOf, controlnet: Any, image: torch.Tensor | None,
                    inpaint_image: torch.Tensor | None, keep: torch.Tensor | None
                    ) -> Callable[[int, int, torch.device], torch.Tensor]:
    """The control context of a Z-Image Fun ControlNet for latents of a size, as ComfyUI forms it: the control
    image's latents; for the inpainting (2.x) files also the keep mask (nearest, at the latent's size; zeros without
    one) and the inpaint image's latents, its repainted part grey (a grey picture without one)."""
    from ldm.controlnet_z_image import control_context

    def encode(height: int, width: int, device: torch.device) -> torch.Tensor:
        factor = latents_of.factor
        control = None if image is None else latents_of(image, height, width)
        if not controlnet.inpaints:
            return control.to(device)
        like = image if image is not None else inpaint_image
        pixels = (_scaled(inpaint_image, height * factor, width * factor) if inpaint_image is not None
                  else torch.full((like.shape[0], height * factor, width * factor, 3), 0.5))
        mask = None
        if keep is not None:
            pixel_keep = _resized_mask(keep, height * factor, width * factor, "bilinear").round()
            pixels = (pixels - 0.5) * pixel_keep.movedim(1, -1) + 0.5
            mask = _resized_mask(keep, height, width, "nearest")
        if control is None:
            control = latents_of(torch.full_like(pixels, 0.5), height, width)
        inpaint = latents_of(pixels, height, width)
        return control_context(control, inpaint=inpaint, mask=mask).to(device)

    return encode


class QwenImageDiffsynthControlnet(Node):
    """Guides a Qwen-Image model with DiffSynth's blockwise ControlNet (canny, depth; inpaint with a mask of what to
    repaint), or a Z-Image model with a Z-Image Fun ControlNet, as ComfyUI's node does: returns the patched MODEL."""

    category = "advanced/model_patches"
    model = Socket("MODEL")
    model_patch = Socket("MODEL_PATCH")
    vae = Socket("VAE", tooltip="the model's VAE: encodes the hint image")
    image = Socket("IMAGE", tooltip="the hint: a preprocessed image (edges, depth map...), or the picture to inpaint")
    strength = Float(1.0, min=-10.0, max=10.0, step=0.01)
    mask = Socket("MASK", optional=True, tooltip="an inpainting ControlNet's: 1 where the picture is repainted")
    outputs = (Output("MODEL"),)
    kinds: tuple[str, ...] = ("diffsynth", "z_image_fun")

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return _patch_problem(linked, cls.__name__, cls.kinds)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, model_patch: ModelPatch, vae: Vae, image: torch.Tensor | None = None,
                strength: float = 1.0, mask: torch.Tensor | None = None,
                inpaint_image: torch.Tensor | None = None) -> tuple[DiffusionModel]:
        if model_patch.kind not in self.kinds:
            raise ValueError(f"{model_patch.source} is {KINDS[model_patch.kind][1]}; {type(self).__name__} applies "
                             f"{' or '.join(KINDS[k][1] for k in self.kinds)}")
        if model.family.name != model_patch.family:
            raise ValueError(f"{model_patch.source} is {KINDS[model_patch.kind][1]}; the model ({model.source}) is "
                             f"{model.family.name.upper()}")
        keep, latents_of = _keep_mask(mask), LatentsOf(self, vae, model)
        if model_patch.kind == "diffsynth":
            from ldm.controlnet_diffsynth import with_diffsynth_control

            if image is None:
                raise ValueError("a DiffSynth ControlNet needs its hint image")
            encode = diffsynth_context(latents_of, image, keep, model_patch.model.mask_channels)
            unet = with_diffsynth_control(model.unet, model_patch.model, encode, strength)
        else:
            from ldm.controlnet_z_image import with_fun_control

            if image is None and inpaint_image is None:
                raise ValueError(f"{model_patch.source} needs an image: the control image, or (an inpainting one) "
                                 "the inpaint image")
            if image is None and not model_patch.model.inpaints:
                raise ValueError(f"{model_patch.source} is not an inpainting Fun ControlNet (1.0): it needs the "
                                 "control image")
            encode = z_image_context(latents_of, model_patch.model, image, inpaint_image, keep)
            unet = with_fun_control(model.unet, model_patch.model, encode, strength)
        return (replace(model, unet=_carrying(unet, model_patch.model), loras=(*model.loras, model_patch.source),
                        own_bytes=0),)


def _carrying(unet: torch.nn.Module, patch: torch.nn.Module) -> torch.nn.Module:
    """The patched copy `unet` with the patch model as one of its modules, so that moving the model to the compute
    device (and the device manager's accounting of it) takes the patch model along. The copy's module table is its
    own (`ldm.lora.shallow_copy`): the model it was made from is left as it was."""
    carried = sum(name.startswith("model_patch_") for name in unet._modules)
    unet.add_module(f"model_patch_{carried}", patch)
    return unet


class ZImageFunControlnet(QwenImageDiffsynthControlnet):
    """Guides a Z-Image model with alibaba-pai's Fun ControlNet Union: a control image (canny, depth, pose...), and
    for the 2.x files an inpaint image and a mask of what to repaint (either alone, or both)."""

    category = "advanced/model_patches"
    model = Socket("MODEL")
    model_patch = Socket("MODEL_PATCH")
    vae = Socket("VAE", tooltip="the model's VAE (Flux's): encodes the images")
    strength = Float(1.0, min=-10.0, max=10.0, step=0.01)
    image = Socket("IMAGE", optional=True, tooltip="the control image: edges, depth map, pose...")
    inpaint_image = Socket("IMAGE", optional=True, tooltip="2.x files: the picture to inpaint")
    mask = Socket("MASK", optional=True, tooltip="2.x files: 1 where the picture is repainted")
    kinds = ("z_image_fun",)


NODES = [ModelPatchLoader, QwenImageDiffsynthControlnet, ZImageFunControlnet]
