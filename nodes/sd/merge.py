"""ComfyUI's model merging nodes (weighted, per block, add, subtract) and its checkpoint, CLIP, VAE and UNet savers."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from nodes.folders import get_paths, new_output_file, output_prefix_problem
from nodes.node import Node, NodeResult
from nodes.sd.imageio import workflow_metadata
from nodes.sd.models import Clip, DiffusionModel, Vae, new_bytes
from nodes.spec import Boolean, Combo, Float, InputSpec, Int, Output, Socket, String

CATEGORY = "advanced/model_merging"
# ComfyUI's CLIP merges leave these alone: a position-id table and CLIP's contrastive temperature.
CLIP_SKIP = (".position_ids", ".logit_scale")


def _ratio() -> InputSpec:
    return Float(1.0, min=0.0, max=1.0, step=0.01)


def _multiplier() -> InputSpec:
    return Float(1.0, min=-10.0, max=10.0, step=0.01)


def _describe(value: DiffusionModel | Clip) -> str:
    return value.source + (f" (with {', '.join(value.loras)})" if value.loras else "")


def _family_mismatch(first: Any, second: Any, what: str) -> str | None:
    """Why two models of these families (names, or None where unknown) cannot be merged; None when they can."""
    if first is None or second is None or first == second:
        return None
    return (f"{what}2 is an {str(second).upper()} model and {what}1 an {str(first).upper()} one: only models of "
            "the same family can be merged")


class _MergesModels(Node):
    """Two MODEL inputs of one family; the result is model1 (its sampling settings and patches) with new weights."""

    category = CATEGORY
    model1 = Socket("MODEL")
    model2 = Socket("MODEL")
    outputs = (Output("MODEL"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return _family_mismatch(linked.get("model1", {}).get("family"), linked.get("model2", {}).get("family"),
                                "model")

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model1", {})}

    @staticmethod
    def merged(model1: DiffusionModel, model2: DiffusionModel, description: str,
               merge: Callable[[nn.Module, nn.Module], nn.Module]) -> tuple[DiffusionModel]:
        problem = _family_mismatch(model1.family.name, model2.family.name, "model")
        if problem:
            raise ValueError(problem)
        unet = merge(model1.unet, model2.unet)
        return (replace(model1, unet=unet, loras=(*model1.loras, description), own_bytes=new_bytes(unet, model1.unet)),)


class ModelMergeSimple(_MergesModels):
    """model1 * ratio + model2 * (1 - ratio), weight by weight: ratio 1 is model1, 0 is model2."""

    ratio = _ratio()

    def execute(self, model1: DiffusionModel, model2: DiffusionModel, ratio: float) -> tuple[DiffusionModel]:
        from ldm.merge import weighted_merge

        return self.merged(model1, model2, f"merged with {_describe(model2)} ({1 - ratio:g} of it)",
                           lambda a, b: weighted_merge(a, b, ratio))


class _MergesBlocks(_MergesModels):
    """Per-block ratios: each weight takes the ratio of the longest input name its key starts with, else
    that of the first ratio input (ComfyUI takes the first one its call receives: the same, in its editor)."""

    def execute(self, model1: DiffusionModel, model2: DiffusionModel, **ratios: float) -> tuple[DiffusionModel]:
        from ldm.merge import prefix_ratios, weighted_merge, wrapper_prefix

        names = [name for name in self.inputs if name not in ("model1", "model2")]
        ordered = {name: float(ratios[name]) for name in names}
        changed = ", ".join(f"{name}={value:g}" for name, value in ordered.items() if value != 1.0) or "none"
        # The input names are ComfyUI's key prefixes: a key is matched as the checkpoint names its weight.
        return self.merged(model1, model2, f"merged by blocks with {_describe(model2)} (ratios not 1: {changed})",
                           lambda a, b: weighted_merge(a, b, prefix_ratios(ordered, ordered[names[0]],
                                                                           wrapper_prefix(a))))


class ModelMergeBlocks(_MergesBlocks):
    """Ratios for the input blocks (and the embeddings), the middle block, and the output blocks with the
    final layer ('out' is a prefix of both)."""

    input = _ratio()
    middle = _ratio()
    out = _ratio()


def _ratio_inputs(*names: str) -> dict[str, InputSpec]:
    """model1, model2, then a ratio input named after each weight-key prefix it sets, in ComfyUI's order."""
    return {**_MergesModels.inputs, **{name: _ratio() for name in names}}


def _numbered(prefix: str, count: int, end: str = ".") -> list[str]:
    return [f"{prefix}{i}{end}" for i in range(count)]


def _unet_inputs(inputs: int, outputs: int, end: str) -> dict[str, InputSpec]:
    return _ratio_inputs("time_embed.", "label_emb.", *_numbered("input_blocks.", inputs, end),
                         *_numbered("middle_block.", 3, end), *_numbered("output_blocks.", outputs, end), "out.")


SPECIFIC = f"{CATEGORY}/model_specific"


class ModelMergeSD1(_MergesBlocks):
    """A ratio for each block of an SD1/SD2 UNet (input names are the weight-key prefixes they set)."""

    category = SPECIFIC
    inputs: ClassVar[dict[str, InputSpec]] = _unet_inputs(12, 12, ".")


class ModelMergeSD2(ModelMergeSD1):
    """A ratio for each block of an SD2 UNet (SD1's blocks: ComfyUI registers one node under both names)."""


class ModelMergeSDXL(_MergesBlocks):
    """A ratio for each block of an SDXL UNet (ComfyUI's block names here have no trailing dot)."""

    category = SPECIFIC
    inputs: ClassVar[dict[str, InputSpec]] = _unet_inputs(9, 9, "")


# The transformers' merges (ComfyUI's comfy_extras/nodes_model_merging_model_specific.py). Loom's transformers keep
# their checkpoints' key names (ldm.mmdit, ldm.flux, ldm.ltxv, ldm.ltx2, ldm.wan, ldm.qwen_image), which are
# ComfyUI's, so each prefix sets the same weights as there; like ComfyUI's, the nodes take models of any family (keys
# no prefix starts take the first ratio). ComfyUI's merges for AuraFlow, Mochi and Cosmos, which Loom does not run,
# are left out.
_SD3_EMBEDDERS = ("pos_embed.", "x_embedder.", "context_embedder.", "y_embedder.", "t_embedder.")


class ModelMergeSD3_2B(_MergesBlocks):
    """A ratio for each part of an SD3 Medium MMDiT: its embedders, 24 joint blocks and final layer."""

    category = SPECIFIC
    inputs: ClassVar[dict[str, InputSpec]] = _ratio_inputs(*_SD3_EMBEDDERS, *_numbered("joint_blocks.", 24),
                                                           "final_layer.")


class ModelMergeFlux1(_MergesBlocks):
    """A ratio for each part of a Flux.1 transformer: its input embedders, 19 double-stream blocks, 38
    single-stream blocks and final layer."""

    category = SPECIFIC
    inputs: ClassVar[dict[str, InputSpec]] = _ratio_inputs(
        "img_in.", "time_in.", "guidance_in", "vector_in.", "txt_in.", *_numbered("double_blocks.", 19),
        *_numbered("single_blocks.", 38), "final_layer.")


class ModelMergeSD35_Large(_MergesBlocks):
    """A ratio for each part of an SD3.5 Large MMDiT: its embedders, 38 joint blocks and final layer."""

    category = SPECIFIC
    inputs: ClassVar[dict[str, InputSpec]] = _ratio_inputs(*_SD3_EMBEDDERS, *_numbered("joint_blocks.", 38),
                                                           "final_layer.")


class ModelMergeLTXV(_MergesBlocks):
    """A ratio for each part of an LTX-Video transformer: its embedders, 28 blocks, output modulation and
    projection (on LTX-2, the video stream's embedders and the first 28 audio-video blocks)."""

    category = SPECIFIC
    inputs: ClassVar[dict[str, InputSpec]] = _ratio_inputs(
        "patchify_proj.", "adaln_single.", "caption_projection.", *_numbered("transformer_blocks.", 28),
        "scale_shift_table", "proj_out.")


class ModelMergeWAN2_1(_MergesBlocks):
    """A ratio for each part of a Wan 2.1 / 2.2 transformer: its embedders, up to 40 blocks and head (the
    description is ComfyUI's)."""

    description = "1.3B model has 30 blocks, 14B model has 40 blocks. Image to video model has the extra img_emb."
    category = SPECIFIC
    inputs: ClassVar[dict[str, InputSpec]] = _ratio_inputs(
        "patch_embedding.", "time_embedding.", "time_projection.", "text_embedding.", "img_emb.",
        *_numbered("blocks.", 40), "head.")


class ModelMergeQwenImage(_MergesBlocks):
    """A ratio for each part of a Qwen-Image transformer: its embedders, 60 blocks and output projection
    ("pos_embeds." sets nothing: the rotary position embedding has no weights, in ComfyUI either)."""

    category = SPECIFIC
    inputs: ClassVar[dict[str, InputSpec]] = _ratio_inputs(
        "pos_embeds.", "img_in.", "txt_norm.", "txt_in.", "time_text_embed.", *_numbered("transformer_blocks.", 60),
        "proj_out.")


class ModelMergeSubtract(_MergesModels):
    """(model1 - model2) * multiplier, as ComfyUI computes it: with ModelMergeAdd, 'add difference' merges."""

    multiplier = _multiplier()

    def execute(self, model1: DiffusionModel, model2: DiffusionModel, multiplier: float) -> tuple[DiffusionModel]:
        from ldm.merge import subtract

        return self.merged(model1, model2, f"minus {_describe(model2)}, times {multiplier:g}",
                           lambda a, b: subtract(a, b, multiplier))


class ModelMergeAdd(_MergesModels):
    """model1 + model2, weight by weight (e.g. a ModelMergeSubtract difference added to another model)."""

    def execute(self, model1: DiffusionModel, model2: DiffusionModel) -> tuple[DiffusionModel]:
        from ldm.merge import add

        return self.merged(model1, model2, f"plus {_describe(model2)}", add)


class _MergesClips(Node):
    """Two CLIP inputs of one family; the result is clip1 (its clip skip) with new weights."""

    category = CATEGORY
    clip1 = Socket("CLIP")
    clip2 = Socket("CLIP")
    outputs = (Output("CLIP"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return _family_mismatch(linked.get("clip1", {}).get("family"), linked.get("clip2", {}).get("family"), "clip")

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("clip1", {})}

    @staticmethod
    def merged(clip1: Clip, clip2: Clip, description: str,
               merge: Callable[[nn.Module, nn.Module], nn.Module]) -> tuple[Clip]:
        problem = _family_mismatch(clip1.family_name, clip2.family_name, "clip")
        if problem:
            raise ValueError(problem)
        encoder = merge(clip1.encoder, clip2.encoder)
        return (replace(clip1, encoder=encoder, loras=(*clip1.loras, description),
                        own_bytes=new_bytes(encoder, clip1.encoder)),)


class CLIPMergeSimple(_MergesClips):
    """clip1 * ratio + clip2 * (1 - ratio), weight by weight."""

    ratio = _ratio()

    def execute(self, clip1: Clip, clip2: Clip, ratio: float) -> tuple[Clip]:
        from ldm.merge import weighted_merge

        return self.merged(clip1, clip2, f"merged with {_describe(clip2)} ({1 - ratio:g} of it)",
                           lambda a, b: weighted_merge(a, b, ratio, CLIP_SKIP))


class CLIPMergeSubtract(_MergesClips):
    """(clip1 - clip2) * multiplier, as ComfyUI computes it."""

    multiplier = _multiplier()

    def execute(self, clip1: Clip, clip2: Clip, multiplier: float) -> tuple[Clip]:
        from ldm.merge import subtract

        return self.merged(clip1, clip2, f"minus {_describe(clip2)}, times {multiplier:g}",
                           lambda a, b: subtract(a, b, multiplier, CLIP_SKIP))


class CLIPMergeAdd(_MergesClips):
    """clip1 + clip2, weight by weight."""

    def execute(self, clip1: Clip, clip2: Clip) -> tuple[Clip]:
        from ldm.merge import add

        return self.merged(clip1, clip2, f"plus {_describe(clip2)}", lambda a, b: add(a, b, CLIP_SKIP))


# --- saving ----------------------------------------------------------------------------------------------

def _save(prefix: str, write: Callable[[Path, str], Any]) -> dict[str, str]:
    """Write a new PREFIX_NNNNN_.safetensors in the output folder with `write(path, title)` (the title "NAME
    NNNNN", ComfyUI's); its UI entry. A file whose writing fails is removed."""
    with new_output_file(get_paths().output, prefix, ".safetensors") as (path, handle, subfolder):
        handle.close()  # the writers take a path
        name, counter = path.name[:-len("_.safetensors")].rsplit("_", 1)
        write(path, f"{name} {counter}")
    return {"filename": path.name, "subfolder": subfolder, "type": "output"}


_ARCHITECTURES = {"sdxl": "stable-diffusion-xl-v1-base", "sdxl_refiner": "stable-diffusion-xl-v1-refiner"}


def _model_metadata(model: DiffusionModel, title: str) -> dict[str, str]:
    """What Loom's loaders read back (family, prediction, the UNet's head layout) and ComfyUI's ModelSpec keys."""
    metadata = {"loom.family": model.family.name, "loom.prediction": model.prediction,
                "loom.unet_config": json.dumps(asdict(model.unet.config)),
                "modelspec.predict_key": "v" if model.prediction == "v" else "epsilon"}
    architecture = _ARCHITECTURES.get(model.family.name)
    if architecture:
        metadata.update({"modelspec.architecture": architecture, "modelspec.sai_model_spec": "1.0.0",
                         "modelspec.implementation": "sgm", "modelspec.title": title})
    return metadata


def _markers(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """ComfyUI's `v_pred`/`ztsnr` marker tensors for how this MODEL samples (ModelSamplingDiscrete included;
    an LCM or x0 override has no marker and is not kept), and Qwen-Image-Edit-2511's `__index_timestep_zero__`."""
    from ldm.checkpoint import UNET_PREFIX, sampling_markers
    from ldm.qwen_image import ZERO_COND_KEY

    markers = sampling_markers(model.prediction, getattr(model.schedule, "zero_snr", False))
    if getattr(model.family.unet_config, "zero_cond_t", False):
        markers[UNET_PREFIX + ZERO_COND_KEY] = torch.zeros(0)
    return markers


def _parts_mismatch(model: Any, clip: Any) -> str | None:
    """Why a checkpoint of this MODEL and CLIP (family names, None where unknown) would not load; None if it would."""
    if model is None or clip is None or model == clip:
        return None
    return (f"the CLIP is an {str(clip).upper()} text encoder and the MODEL an {str(model).upper()} UNet: a checkpoint "
            "holds the parts of one family")


class _Saves(Node):
    category = CATEGORY
    output_node = True

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))


class CheckpointSave(_Saves):
    """Saves MODEL, CLIP and VAE as one LDM-layout checkpoint in output/ (Load Checkpoint reads it back)."""

    display_name = "Save Checkpoint"
    model = Socket("MODEL")
    clip = Socket("CLIP")
    vae = Socket("VAE")
    filename_prefix = String("checkpoints/ComfyUI", tooltip="file name prefix, inside the output folder")

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return _parts_mismatch(linked.get("model", {}).get("family"), linked.get("clip", {}).get("family"))

    def execute(self, model: DiffusionModel, clip: Clip, vae: Vae, filename_prefix: str) -> NodeResult:
        from ldm.checkpoint import save_checkpoint
        from ldm.merge import dequantized

        problem = _parts_mismatch(model.family.name, clip.family_name)
        if problem:
            raise ValueError(problem)
        unet, encoder, workflow = dequantized(model.unet), dequantized(clip.encoder), workflow_metadata(self.ctx)
        entry = _save(filename_prefix, lambda path, title: save_checkpoint(
            path, unet, vae.vae, encoder, {**workflow, **_model_metadata(model, title)}, markers=_markers(model)))
        return NodeResult(ui={"files": [entry]})


class CLIPSave(_Saves):
    """Saves each text encoder of a CLIP as its own file, in transformers' layout (SDXL: PREFIX_clip_l_...
    and PREFIX_clip_g_...), as ComfyUI's CLIPSave does."""

    clip = Socket("CLIP")
    filename_prefix = String("clip/ComfyUI", tooltip="file name prefix, inside the output folder")

    def execute(self, clip: Clip, filename_prefix: str) -> NodeResult:
        from ldm.checkpoint import write_safetensors
        from ldm.merge import dequantized

        entries = []
        for name, encoder in dequantized(clip.encoder).encoders.items():
            # Which encoder a file holds: the released ones tell by their width, smaller ones need saying.
            metadata = {"format": "pt", **workflow_metadata(self.ctx), "loom.text_encoder": name}
            entries.append(_save(f"{filename_prefix}_{name}", lambda path, _title, encoder=encoder, metadata=metadata:
                                 write_safetensors(encoder.state_dict(), path, metadata)))
        return NodeResult(ui={"files": entries})


class VAESave(_Saves):
    """Saves a VAE in the LDM layout without prefix, as ComfyUI does (Load VAE reads it back)."""

    vae = Socket("VAE")
    filename_prefix = String("vae/ComfyUI_vae", tooltip="file name prefix, inside the output folder")

    def execute(self, vae: Vae, filename_prefix: str) -> NodeResult:
        from ldm.checkpoint import write_safetensors

        metadata = {**workflow_metadata(self.ctx), "loom.scaling_factor": str(vae.scaling_factor)}
        entry = _save(filename_prefix, lambda path, _title: write_safetensors(vae.vae.state_dict(), path, metadata))
        return NodeResult(ui={"files": [entry]})


class ModelSave(_Saves):
    """Saves a MODEL's UNet alone, under the keys a checkpoint holds it at (model.diffusion_model.), as ComfyUI."""

    model = Socket("MODEL")
    filename_prefix = String("diffusion_models/ComfyUI", tooltip="file name prefix, inside the output folder")

    def execute(self, model: DiffusionModel, filename_prefix: str) -> NodeResult:
        from ldm.checkpoint import UNET_PREFIX, write_safetensors
        from ldm.merge import dequantized

        tensors: dict[str, torch.Tensor] = {UNET_PREFIX + k: v for k, v in dequantized(model.unet).state_dict().items()}
        tensors.update(_markers(model))
        workflow = workflow_metadata(self.ctx)
        entry = _save(filename_prefix, lambda path, title: write_safetensors(
            tensors, path, {**workflow, **_model_metadata(model, title)}))
        return NodeResult(ui={"files": [entry]})


class LoraSave(_Saves):
    """Extracts a LoRA from model differences (a fine-tune minus its base: ModelMergeSubtract, CLIPMergeSubtract):
    each changed layer as the low-rank pair closest to its difference ("standard"), or as the whole difference
    ("full_diff"); Load LoRA reads the file back from models/loras."""

    category = "_for_testing"
    filename_prefix = String("loras/ComfyUI_extracted_lora", tooltip="file name prefix, inside the output folder")
    rank = Int(8, min=1, max=4096, step=1)
    lora_type = Combo(["standard", "full_diff"])
    bias_diff = Boolean(True, tooltip="also the biases' and norm layers' differences, whole")
    model_diff = Socket("MODEL", optional=True, tooltip="a UNet whose weights are differences")
    text_encoder_diff = Socket("CLIP", optional=True, tooltip="text encoders whose weights are differences")

    def execute(self, filename_prefix: str, rank: int, lora_type: str, bias_diff: bool,
                model_diff: DiffusionModel | None = None, text_encoder_diff: Clip | None = None) -> NodeResult:
        from ldm.checkpoint import write_safetensors
        from ldm.lora_extract import extract_lora

        tensors: dict[str, torch.Tensor] = {}
        for part in (model_diff.unet if model_diff else None, text_encoder_diff.encoder if text_encoder_diff else None):
            if part is not None:
                tensors.update(extract_lora(part, rank, lora_type, bias_diff))
        if not tensors:
            raise ValueError("nothing to extract: connect model_diff or text_encoder_diff, with weights that differ "
                             "(a fine-tune minus its base, e.g. ModelMergeSubtract's output)")
        metadata = {**workflow_metadata(self.ctx), "ss_network_module": "networks.lora",
                    "ss_network_dim": str(rank), "loom.lora_type": lora_type}
        entry = _save(filename_prefix, lambda path, _title: write_safetensors(tensors, path, metadata))
        return NodeResult(ui={"files": [entry]})


NODES = [ModelMergeSimple, ModelMergeBlocks, ModelMergeSubtract, ModelMergeAdd, CLIPMergeSimple, CLIPMergeSubtract,
         CLIPMergeAdd, ModelMergeSD1, ModelMergeSD2, ModelMergeSDXL, ModelMergeSD3_2B, ModelMergeFlux1,
         ModelMergeSD35_Large, ModelMergeLTXV, ModelMergeWAN2_1, ModelMergeQwenImage, CheckpointSave, CLIPSave, VAESave,
         ModelSave, LoraSave]
