"""ComfyUI's LoRA stack loaders (LoadLoraModel, LoadLoraTextEncoder) and its bypass loaders (LoraLoaderBypass,
LoraLoaderBypassModelOnly), over LoraLoader's machinery (nodes/sd/loaders.py).

The stack loaders take ComfyUI's "dynamic group" input `loras`: up to twenty rows of (lora_name, strength), which its
API prompts carry as `loras.0.lora_name`, `loras.0.strength`, `loras.1.lora_name`, ... and its editor files as
widgets_values [row count, name 0, strength 0, name 1, strength 1, ...]. Loom declares what the group expands to,
every row's two inputs, optional; a row counts when it names a file. Rows after the first default to strength 0
(off), so that Loom's editor, which shows all twenty rows, applies only those the user turns on.

The bypass loaders add each LoRA at forward time, y = W x + strength * alpha/rank * up(down(x)), leaving the model's
weights as they are (ldm.lora.apply_lora_bypass); the result equals LoraLoader's up to float rounding.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.loaders import LoraLoader, lora_metadata, model_file, shared_lora
from nodes.sd.models import Clip, DiffusionModel, file_fingerprint
from nodes.spec import Float, InputSpec, Output, Socket

log = logging.getLogger(__name__)

GROUP = "loras"
MAX_ROWS = 20  # ComfyUI's _DynamicGroup allows rows 0 .. 19, at least one submitted


def _row_inputs() -> dict[str, InputSpec]:
    inputs: dict[str, InputSpec] = {}
    for row in range(MAX_ROWS):
        inputs[f"{GROUP}.{row}.lora_name"] = model_file("loras").model_copy(update={"optional": True})
        inputs[f"{GROUP}.{row}.strength"] = Float(1.0 if row == 0 else 0.0, min=-100.0, max=100.0, step=0.01,
                                                  optional=True, tooltip="how strongly to apply this row's LoRA; "
                                                  "0 = off, negative inverts the effect")
    return inputs


def stack_rows(inputs: dict[str, Any]) -> list[tuple[str, float]]:
    """The (lora_name, strength) of each row that names a file, in row order, whatever their strength."""
    rows = []
    for row in range(MAX_ROWS):
        name = inputs.get(f"{GROUP}.{row}.lora_name")
        if name:
            rows.append((name, inputs.get(f"{GROUP}.{row}.strength")))
    return rows


class _LoraStack(Node):
    """What the two stack loaders share: the rows' declaration, their checks and their reading from editor files."""

    category = "model/loaders"
    # the rows' constants reach check_inputs whatever their names, so that a row ComfyUI's group would refuse
    # (loras.20.x, loras.0.typo) is named, not silently dropped
    accept_all_inputs = True

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        unknown = sorted(k for k in inputs if k.startswith(f"{GROUP}.") and k not in cls.inputs)
        if unknown:
            return (f"{cls.name}: {', '.join(unknown)} is not a row field; the rows are {GROUP}.0 to "
                    f"{GROUP}.{MAX_ROWS - 1}, each with lora_name and strength")
        return None

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        """At least one row (ComfyUI's group takes one to twenty); each LoRA named must fit the linked model."""
        rows = stack_rows({**inputs, **{name: "linked" for name in linked if name.endswith(".lora_name")}})
        if not rows:
            return (f"{cls.name} needs at least one LoRA row: give {GROUP}.0.lora_name (and {GROUP}.0.strength) a "
                    "file of models/loras")
        for row in range(MAX_ROWS):
            name, strength = (f"{GROUP}.{row}.{field}" for field in ("lora_name", "strength"))
            if name in inputs and strength not in inputs and strength not in linked:
                return f"{cls.name}: row {row} names {inputs[name]} but has no {strength}"
            if inputs.get(name) and inputs.get(strength) != 0:
                refusal = LoraLoader.check_links({"lora_name": inputs[name]}, linked)
                if refusal:
                    return f"{cls.name} row {row}: {refusal}"
        return None

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return [file_fingerprint(get_paths().find_model("loras", str(name))) for name, _ in stack_rows(inputs)]

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [row count, name 0, strength 0, ...]; Loom's editor every row's two widgets in
        order (None: read by position)."""
        count = values[0] if values else None
        if not isinstance(count, int) or isinstance(count, bool) or len(values) != 1 + 2 * count:
            return None
        if count > MAX_ROWS:
            raise ValueError(f"{cls.name}: the file holds {count} LoRA rows; ComfyUI's group takes at most {MAX_ROWS}")
        named: dict[str, Any] = {}
        for row in range(count):
            named[f"{GROUP}.{row}.lora_name"], named[f"{GROUP}.{row}.strength"] = values[1 + 2 * row:3 + 2 * row]
        return named


class LoadLoraModel(_LoraStack):
    """Applies a stack of LoRAs to a diffusion model, one row per LoRA (rows without a file or at strength 0 are
    skipped), in row order, as LoraLoaderModelOnly applies each."""

    display_name = "Load LoRA (Model)"
    inputs = {"model": Socket("MODEL", tooltip="the diffusion model the LoRAs are applied to"), **_row_inputs()}
    outputs = (Output("MODEL", tooltip="the modified diffusion model"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, **rows: Any) -> tuple[DiffusionModel]:
        from nodes.sd.loaders import LoraLoaderModelOnly

        loader = LoraLoaderModelOnly()
        loader.ctx = self.ctx
        for name, strength in stack_rows(rows):
            if strength:
                (model,) = loader.execute(model, name, strength)
        return (model,)


class LoadLoraTextEncoder(_LoraStack):
    """Applies a stack of LoRAs to a text encoder, one row per LoRA (rows without a file or at strength 0 are
    skipped), in row order."""

    display_name = "Load LoRA (Text Encoder)"
    inputs = {"clip": Socket("CLIP", tooltip="the text encoder the LoRAs are applied to"), **_row_inputs()}
    outputs = (Output("CLIP", tooltip="the modified text encoder"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("clip", {})}

    def execute(self, clip: Clip, **rows: Any) -> tuple[Clip]:
        from ldm.lora import apply_lora, check_lora_family, match_lora

        for name, strength in stack_rows(rows):
            if not strength:
                continue
            lora = shared_lora(self, name)
            check_lora_family(lora, clip.family_name)
            if not match_lora(clip.encoder, lora):
                log.warning("%s: no key patches this text encoder (a diffusion-model-only LoRA?)", name)
                continue
            with torch.no_grad():
                clip = clip.with_encoder(apply_lora(clip.encoder, lora, strength), name)
        return (clip,)


class LoraLoaderBypass(Node):
    """Applies a LoRA without changing the model's weights: each patched layer adds the LoRA's path to its output
    at run time (ComfyUI's debugging loader). Patches a sum cannot express (DoRA, full weight differences) are merged,
    as ComfyUI does; the images equal LoraLoader's up to float rounding."""

    display_name = "Load LoRA (Bypass) (For debugging)"
    category = "model/loaders"
    model = Socket("MODEL", tooltip="the diffusion model the LoRA is applied to")
    clip = Socket("CLIP", tooltip="the CLIP model the LoRA is applied to")
    lora_name = model_file("loras")
    strength_model = Float(1.0, min=-100.0, max=100.0, step=0.01,
                           tooltip="how strongly to modify the diffusion model; may be negative")
    strength_clip = Float(1.0, min=-100.0, max=100.0, step=0.01,
                          tooltip="how strongly to modify the CLIP model; may be negative")
    outputs = (Output("MODEL", tooltip="the modified diffusion model"),
               Output("CLIP", tooltip="the modified CLIP model"))

    fingerprint = LoraLoader.fingerprint
    check_links = LoraLoader.check_links
    output_facts = LoraLoader.output_facts

    def execute(self, model: DiffusionModel, clip: Clip | None, lora_name: str, strength_model: float,
                strength_clip: float) -> tuple[DiffusionModel, Clip | None]:
        from ldm.lora import LoraError, apply_lora_bypass, check_lora_family, match_lora

        if strength_model == 0 and strength_clip == 0:  # as ComfyUI: off, the file not even read
            return model, clip
        lora = shared_lora(self, lora_name)
        check_lora_family(lora, model.family.name)
        encoder = clip.encoder if clip is not None else None
        if not match_lora(model.unet, lora) and (encoder is None or not match_lora(encoder, lora)):
            raise LoraError(f"{self.name}: {lora_name} patches no layer of this model ({model.family.name.upper()}):"
                            " it is a LoRA for another kind of model")
        unet = apply_lora_bypass(model.unet, lora, strength_model)
        model = model.with_unet(unet, lora_name, lora_metadata(lora))
        if clip is not None:
            clip = clip.with_encoder(apply_lora_bypass(encoder, lora, strength_clip), lora_name)
        return model, clip


class LoraLoaderBypassModelOnly(LoraLoaderBypass):
    """Applies a LoRA to the diffusion model alone in bypass mode (see LoraLoaderBypass)."""

    display_name = "Load LoRA (Bypass, Model Only) (for debugging)"
    inputs = {"model": LoraLoaderBypass.inputs["model"], "lora_name": model_file("loras"),
              "strength_model": Float(1.0, min=-100.0, max=100.0, step=0.01)}
    outputs = (Output("MODEL"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, lora_name: str, strength_model: float) -> tuple[DiffusionModel]:
        return (super().execute(model, None, lora_name, strength_model, 0)[0],)


NODES = [LoadLoraModel, LoadLoraTextEncoder, LoraLoaderBypass, LoraLoaderBypassModelOnly]
