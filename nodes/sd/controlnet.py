"""ControlNet nodes, under ComfyUI's names and inputs: load a ControlNet, attach it to conditioning.

A CONTROL_NET value is the loaded model. The Apply nodes put an `ldm.controlnet.Control` (hint image,
strength, part of the schedule, and the control already there, which it chains after) into each
conditioning entry's options; the KSampler moves the ControlNets to the device and the guider runs
them with the UNet at every step.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from ldm.controlnet_union import CONTROL_TYPES, UnionControlNet
from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.loaders import header_family, model_file, model_path, shared_model
from nodes.sd.models import HANDLE_SIZE, DiffusionModel, device_and_dtype, file_fingerprint, load_device
from nodes.spec import Combo, Float, Output, Socket

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ControlNetModel:
    """CONTROL_NET: a loaded ControlNet and the UNet family it fits."""

    model: torch.nn.Module  # ldm.controlnet.ControlNet, ldm.t2i_adapter.T2IAdapter or ldm.control_lora.ControlLora
    family: str | None  # None: a T2I-Adapter that fits any UNet with its blocks' shapes (SD1, SD2)
    source: str
    control_type: int | None = None  # a ControlNet Union's (SetUnionControlNetType): an index of CONTROL_TYPES
    own_bytes: int = 0  # weights held here, not in the model cache (a difference ControlNet's)

    def cache_size(self) -> int:
        return HANDLE_SIZE + self.own_bytes  # the weights are the model cache's, unless held here


class ControlNetLoader(Node):
    """Loads a ControlNet: LDM single files (the SD1.5 1.0/1.1 releases) or diffusers' layout (most SDXL ones,
    ControlNet Unions too). T2I-Adapters load here too, in TencentARC's layout or diffusers', and Control-LoRAs
    (Stability AI's control-lora-*), whose ControlNet the KSampler makes from the UNet of the model it samples."""

    display_name = "Load ControlNet Model"
    category = "loaders"
    control_net_name = model_file("controlnet")
    outputs = (Output("CONTROL_NET"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("controlnet", str(inputs.get("control_net_name", ""))))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        family = header_family("controlnet", inputs.get("control_net_name"))
        return {} if family is None else {0: {"family": family, "source": str(inputs.get("control_net_name"))}}

    def execute(self, control_net_name: str) -> tuple[ControlNetModel]:
        from ldm.controlnet import load_controlnet

        path = model_path("controlnet", control_net_name)
        _, dtype, _ = device_and_dtype(self.ctx)
        device = load_device(self.ctx)
        key = ("controlnet", str(path), str(file_fingerprint(path)), str(device), str(dtype))
        def load() -> Any:
            loaded = load_controlnet(path, device=device, dtype=dtype)
            if loaded.unused_keys:
                log.warning("%s: %d unused keys, e.g. %s", path.name, len(loaded.unused_keys), loaded.unused_keys[:3])
            return loaded

        loaded = shared_model(self, key, load)
        return (ControlNetModel(loaded.model, loaded.family, control_net_name),)


class DiffControlNetLoader(Node):
    """Loads a difference ControlNet (the early diff_control_sd15_* files): its weights are offsets from the
    model's UNet, to which they are added. A Control-LoRA is made into a ControlNet with the model's UNet here. A
    plain ControlNet loads here as it would in Load ControlNet Model."""

    display_name = "Load ControlNet Model (diff)"
    category = "loaders"
    model = Socket("MODEL")
    control_net_name = model_file("controlnet")
    outputs = (Output("CONTROL_NET"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return ControlNetLoader.fingerprint(inputs)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return ControlNetLoader.output_facts(inputs, linked)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        family = header_family("controlnet", inputs.get("control_net_name"))
        model = linked.get("model", {}).get("family")
        if family is None or model is None or family == model:
            return None
        return (f"{inputs.get('control_net_name')} is a ControlNet for {family.upper()}; the MODEL linked is "
                f"{model.upper()}")

    def execute(self, model: DiffusionModel, control_net_name: str) -> tuple[ControlNetModel]:
        from ldm.controlnet import load_controlnet, unet_weights

        path = model_path("controlnet", control_net_name)
        _, dtype, _ = device_and_dtype(self.ctx)
        # Not in the model cache: its weights depend on the model's, which LoRAs may have changed; its output,
        # which holds them, is cached instead.
        loaded = load_controlnet(path, device=load_device(self.ctx), dtype=dtype, base=unet_weights(model.unet))
        size = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
        return (ControlNetModel(loaded.model, loaded.family, control_net_name, own_bytes=size),)


@functools.cache
def _sigmas() -> torch.Tensor:
    from ldm.sampling.schedules import DiscreteSchedule

    return DiscreteSchedule().sigmas


def _hint(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> the hint [B, 3, H, W] (an alpha channel is dropped)."""
    return image[..., :3].movedim(-1, 1).float().cpu()


def control_family_problem(linked: dict[str, dict[str, Any]], conditionings: tuple[str, ...]) -> str | None:
    """Why the ControlNet linked does not fit the conditionings linked (by the families their files' headers
    name: the ControlNet's, the CLIP's that encoded them); None when they fit or validation cannot tell."""
    facts = linked.get("control_net", {})
    control = facts.get("family")
    for name in conditionings:
        family = linked.get(name, {}).get("family")
        if control is not None and family is not None and family != control:
            return (f"{facts.get('source', 'the ControlNet linked')} is a ControlNet for {control.upper()}; the "
                    f"{name} conditioning linked was encoded for {family.upper()}")
    return None


def conditioning_facts(linked: dict[str, dict[str, Any]], conditionings: tuple[str, ...]) -> dict[int, dict[str, Any]]:
    """Each CONDITIONING output keeps the family of the one it came from."""
    return {i: linked[name] for i, name in enumerate(conditionings) if linked.get(name)}


def attach(conditionings: list[list], control_net: ControlNetModel, image: torch.Tensor, strength: float,
           start_percent: float = 0.0, end_percent: float = 1.0, apply_to_uncond: bool = False,
           vae: Any = None, keep_mask: torch.Tensor | None = None) -> list[list]:
    """Each conditioning with a Control on every entry; entries that had the same control before (or none)
    get the same new one, so a positive and a negative prompt still share one model call. `apply_to_uncond`
    marks entries whose control the KSampler also gives a negative prompt that has none (the OLD node). An SD3,
    Flux or Qwen-Image ControlNet needs the `vae` (a Vae) that encodes its hint; an inpainting one its `keep_mask`
    too."""
    from ldm.controlnet import Control
    from ldm.sampling.schedules import sigma_at_percent
    from ldm.t2i_adapter import T2IAdapter, T2IAdapterControl

    if getattr(control_net.model, "mask_channels", 0) and keep_mask is None:
        raise ValueError(f"{control_net.source} is an inpainting ControlNet (its hint is a masked picture and the "
                         "mask): apply it with ControlNetInpaintingAliMamaApply")
    hint = _hint(image)
    sigma_range = (sigma_at_percent(start_percent, _sigmas()), sigma_at_percent(end_percent, _sigmas()))
    made: dict[int, Control] = {}
    # A T2I-Adapter's features are made once per run, from the hint alone, and go to the UNet's blocks.
    kind: Any = T2IAdapterControl if isinstance(control_net.model, T2IAdapter) else Control
    # The ControlNets whose hint goes in as latents (SD3's, Flux's, Qwen-Image's) name their own Control, an
    # SD3Control, and their kind for messages (`label`).
    latent_kind = getattr(control_net.model, "control_class", None)
    if latent_kind is not None:
        if vae is None and not getattr(control_net.model, "pixel_hint", False):  # XLabs' takes the picture
            raise ValueError(f"{control_net.source} is {control_net.model.label} ControlNet, whose hint image is "
                             "VAE-encoded: link the model's VAE (Apply Controlnet with VAE, or the vae input of Apply "
                             "ControlNet)")
        # Its range in levels is the model's, known when the KSampler places it (SD3Control.fit).
        kind = functools.partial(latent_kind, vae=None if vae is None else vae.vae,
                                 percent_range=(start_percent, end_percent), hint_mask=keep_mask)

    def control_after(previous: Control | None) -> Control:
        if id(previous) not in made:
            made[id(previous)] = kind(control_net.model, hint, strength, sigma_range, previous,
                                      source=control_net.source, family=control_net.family,
                                      model_kwargs=_model_kwargs(control_net))
        return made[id(previous)]

    return [[(embedding, {**options, "control": control_after(options.get("control")),
                          "control_apply_to_uncond": apply_to_uncond})
             for embedding, options in conditioning] for conditioning in conditionings]


class ControlNetApplyAdvanced(Node):
    """Guides sampling with a ControlNet and a hint image (edges, depth, pose...) on both prompts, over
    part of the schedule. The hint is cropped at the centre to the latent's aspect and resized to it."""

    display_name = "Apply ControlNet"
    category = "conditioning/controlnet"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    control_net = Socket("CONTROL_NET")
    image = Socket("IMAGE", tooltip="the hint: a preprocessed image (edges, depth map, pose...) in 0..1")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001, tooltip="where in the schedule it starts acting")
    end_percent = Float(1.0, min=0.0, max=1.0, step=0.001, tooltip="where in the schedule it stops")
    vae = Socket("VAE", optional=True, tooltip="encodes the hint of the ControlNets that take latents (SD3's, Flux's, "
                 "Qwen-Image's)")
    outputs = (Output("CONDITIONING", name="positive"), Output("CONDITIONING", name="negative"))

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return control_family_problem(linked, ("positive", "negative"))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return conditioning_facts(linked, ("positive", "negative"))

    def execute(self, positive: list, negative: list, control_net: ControlNetModel, image: torch.Tensor,
                strength: float, start_percent: float, end_percent: float, vae: Any = None) -> tuple[list, list]:
        if strength == 0:
            return positive, negative
        # A start after the end is accepted, as in ComfyUI: the ControlNet then never acts.
        positive, negative = attach([positive, negative], control_net, image, strength, start_percent, end_percent,
                                    vae=vae)
        return positive, negative


class ControlNetInpaintingAliMamaApply(Node):
    """Guides inpainting with Alimama's inpainting ControlNets (FLUX.1-dev-Controlnet-Inpainting, the SD3 one) and
    InstantX's Qwen-Image-ControlNet-Inpainting: their hint is the picture with the masked part blacked out,
    VAE-encoded, and the mask of what to keep."""

    category = "conditioning/controlnet"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    control_net = Socket("CONTROL_NET")
    vae = Socket("VAE")
    image = Socket("IMAGE", tooltip="the picture to inpaint, in 0..1")
    mask = Socket("MASK", tooltip="1 where the picture is repainted")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001)
    end_percent = Float(1.0, min=0.0, max=1.0, step=0.001)
    outputs = (Output("CONDITIONING", name="positive"), Output("CONDITIONING", name="negative"))

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return control_family_problem(linked, ("positive", "negative"))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return conditioning_facts(linked, ("positive", "negative"))

    def execute(self, positive: list, negative: list, control_net: ControlNetModel, vae: Any, image: torch.Tensor,
                mask: torch.Tensor, strength: float, start_percent: float,
                end_percent: float) -> tuple[list, list]:
        from ldm.controlnet_inpaint import masked_picture

        if not getattr(control_net.model, "mask_channels", 0):
            raise ValueError(f"{control_net.source} is not an inpainting ControlNet (its hint embedding takes no mask "
                             "channel): this node is for Alimama's FLUX.1-dev / SD3 Controlnet-Inpainting and "
                             "InstantX's Qwen-Image-ControlNet-Inpainting; apply other ControlNets with Apply "
                             "ControlNet")
        if strength == 0:
            return positive, negative
        pixels, keep = masked_picture(_hint(image), mask.cpu())
        positive, negative = attach([positive, negative], control_net, pixels.movedim(1, -1), strength,
                                    start_percent, end_percent, vae=vae, keep_mask=keep)
        return positive, negative


class ControlNetApply(Node):
    """Guides sampling with a ControlNet on one conditioning (the older node, usually on the positive prompt).
    As in ComfyUI, the KSampler gives its control to a negative prompt that has none, so the image is the
    one Apply ControlNet would make with the full range."""

    display_name = "Apply ControlNet (OLD)"
    category = "conditioning/controlnet"
    conditioning = Socket("CONDITIONING")
    control_net = Socket("CONTROL_NET")
    image = Socket("IMAGE")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return control_family_problem(linked, ("conditioning",))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return conditioning_facts(linked, ("conditioning",))

    def execute(self, conditioning: list, control_net: ControlNetModel, image: torch.Tensor,
                strength: float) -> tuple[list]:
        if strength == 0:
            return (conditioning,)
        [conditioning] = attach([conditioning], control_net, image, strength, apply_to_uncond=True)
        return (conditioning,)


# --- ControlNet Union (ldm.controlnet_union) ---------------------------------------------------------------


def _model_kwargs(control_net: ControlNetModel) -> dict:
    return {} if control_net.control_type is None else {"control_type": control_net.control_type}


class SetUnionControlNetType(Node):
    """Chooses what a ControlNet Union (xinsir's controlnet-union-sdxl-1.0, its promax file) reads its hint
    as; "auto" lets the model tell from the hint. A Flux ControlNet Union takes the type's index as its own mode,
    as in ComfyUI (ldm.controlnet_flux). Other ControlNets pass through unchanged, as in ComfyUI."""

    category = "conditioning/controlnet"
    control_net = Socket("CONTROL_NET")
    type = Combo(("auto", *CONTROL_TYPES), tooltip="tile and repaint need the promax file")
    outputs = (Output("CONTROL_NET"),)

    def execute(self, control_net: ControlNetModel, type: str) -> tuple[ControlNetModel]:
        control_type = None if type == "auto" else CONTROL_TYPES.index(type)
        if not isinstance(control_net.model, UnionControlNet) and not getattr(control_net.model, "modes", 0):
            if control_type is not None:
                log.warning("%s is not a ControlNet Union: the control type %r does nothing", control_net.source, type)
            return (control_net,)
        try:
            control_net.model.check_control_type(control_type)
        except ValueError as e:
            raise ValueError(f"{control_net.source}: {e}") from None
        return (replace(control_net, control_type=control_type),)


NODES = [ControlNetLoader, DiffControlNetLoader, ControlNetApplyAdvanced, ControlNetInpaintingAliMamaApply,
         ControlNetApply, SetUnionControlNetType]
