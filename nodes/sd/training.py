"""ComfyUI's LoRA training nodes: train a LoRA on latents inside a workflow, apply it, save it, plot its loss.

LORA_MODEL is a LoRA's tensors by file key (kohya's layout, see `ldm.training.latent_lora`), as ComfyUI passes
it; LOSS_MAP is `{"loss": [the loss of each step]}`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from nodes.folders import get_paths, new_output_file, output_prefix_problem
from nodes.node import Node, NodeResult
from nodes.sd.loaders import model_path, shared_lora
from nodes.sd.models import DiffusionModel, device_and_dtype, file_fingerprint, on_device
from nodes.spec import INT_MAX, Boolean, Combo, Float, Int, Output, Socket, String

NO_LORA = "[None]"
# ComfyUI's choices; Loom trains plain LoRA pairs (LoHa and LoKr files it applies, but does not train).
ALGORITHMS = ("LoRA", "LoHa", "LoKr", "OFT")
TRAINING_DTYPES = {"bf16": torch.bfloat16, "fp32": None}
LORA_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Conditioning options that change what the UNet sees beyond the prompt and its size (areas, masks, timestep
# ranges, ControlNets, GLIGEN, hooks, extra input channels): training would leave them out, so they are refused.
UNTRAINED_OPTIONS = ("area", "mask", "mask_strength", "set_area_to_bounds", "start_percent", "end_percent",
                     "control", "gligen", "hooks", "concat_latent_image", "concat_mask", "concat_image", "concat")


def _algorithm_problem(algorithm: Any) -> str | None:
    if algorithm in (None, "LoRA"):
        return None
    return f"algorithm {algorithm}: Loom trains LoRA (low-rank pairs) only; choose LoRA"


def _single_items(latents: list[dict]) -> list[torch.Tensor]:
    """Every latent [C, H, W] of a list of LATENTs (batches split), refusing masked ones."""
    items = []
    for latent in latents:
        if latent.get("noise_mask") is not None:
            raise ValueError("the latents carry a noise mask (SetLatentNoiseMask, VAEEncodeForInpaint), which "
                             "training does not use: train on unmasked latents")
        items.extend(latent["samples"])
    if not items:
        raise ValueError("latents holds no latents: give at least one to train on")
    return items


def _single_prompts(positive: list[list], count: int) -> list[tuple[torch.Tensor, dict]]:
    """One (embedding [1, L, D], options) per latent: every prompt of the CONDITIONING inputs (batched entries
    split), one for all latents or one each."""
    prompts = []
    for conditioning in positive:
        for embedding, options in conditioning:
            unused = sorted(k for k in UNTRAINED_OPTIONS if options.get(k) is not None)
            if unused:
                raise ValueError(f"the positive conditioning carries {', '.join(unused)} (from area, mask, "
                                 "timestep, ControlNet, GLIGEN or hook nodes), which training does not apply: "
                                 "train on plain prompts")
            pooled = options.get("pooled_output")
            for row in range(embedding.shape[0]):
                split = {**options, "pooled_output": pooled[row:row + 1]} if pooled is not None else options
                prompts.append((embedding[row:row + 1], split))
    if len(prompts) == 1:
        return prompts * count
    if len(prompts) != count:
        raise ValueError(f"{len(prompts)} positive prompts for {count} latents: give one prompt for all the latents "
                         "or one for each")
    return prompts


def _trained_steps(path: Path) -> int:
    """The steps a saved LoRA was trained for: from its name as SaveLoRA writes it (PREFIX_N_steps_00001_), else
    kohya's `ss_steps` metadata, else 0."""
    found = re.search(r"_(\d+)_steps_", path.name)
    if found:
        return int(found.group(1))
    from ldm.checkpoint import read_metadata

    steps = read_metadata(path).get("ss_steps", "")
    return int(steps) if steps.isdigit() else 0


def lora_model(model: DiffusionModel, tensors: dict[str, torch.Tensor], strength: float, label: str) -> DiffusionModel:
    """MODEL with a LORA_MODEL's UNet layers applied at `strength` (a patched copy; the model is not changed)."""
    from ldm.lora import LoraError, apply_lora, check_lora_family, lora_from_state_dict, match_lora

    lora = lora_from_state_dict(tensors)
    check_lora_family(lora, model.family.name)
    if not match_lora(model.unet, lora):
        raise LoraError(f"the LoRA patches no layer of this model's UNet ({model.family.name.upper()}, "
                        f"{model.source}): it was made for another model")
    with torch.no_grad():
        return model.with_unet(apply_lora(model.unet, lora, strength), label)


class TrainLoraNode(Node):
    """Trains a LoRA on the model's UNet from latents and their prompts (one prompt for all latents or one each):
    every layer gets an adapter, as in ComfyUI. The input model is not changed; the outputs are the model with the
    LoRA, the LoRA (for Load LoRA Model and Save LoRA Weights), the loss of each step and the steps trained in all
    (with those of an existing LoRA continued)."""

    display_name = "Train LoRA"
    category = "training"
    input_is_list = True  # latents and prompts may come as lists, e.g. one per image of a data set
    model = Socket("MODEL", tooltip="the model to train the LoRA on")
    latents = Socket("LATENT", tooltip="the latents to train on")
    positive = Socket("CONDITIONING", tooltip="the prompt of every latent, or one prompt per latent")
    batch_size = Int(1, min=1, max=10000, tooltip="latents per step")
    grad_accumulation_steps = Int(1, min=1, max=1024, tooltip="batches whose gradients add up to one step")
    steps = Int(16, min=1, max=100000, tooltip="optimizer steps to train for")
    learning_rate = Float(0.0005, min=0.0000001, max=1.0, step=0.0000001)
    rank = Int(8, min=1, max=128, tooltip="the rank of the new LoRA layers")
    optimizer = Combo(["AdamW", "Adam", "SGD", "RMSprop"])
    loss_function = Combo(["MSE", "L1", "Huber", "SmoothL1"])
    seed = Int(0, min=0, max=INT_MAX, tooltip="the seed of the LoRA's start and of every noise draw")
    training_dtype = Combo(list(TRAINING_DTYPES), tooltip="bf16: matrix products in bf16 (autocast)")
    lora_dtype = Combo(list(LORA_DTYPES), tooltip="the dtype the LoRA's weights are held and trained in")
    algorithm = Combo(ALGORITHMS, tooltip="Loom trains LoRA only")
    gradient_checkpointing = Boolean(True, tooltip="recompute activations in the backward pass: less memory, slower")
    existing_lora = Combo(lambda: [*get_paths().list_models("loras"), NO_LORA], default=NO_LORA,
                          tooltip="a LoRA in models/loras to continue training, or [None] for a new one")
    outputs = (Output("MODEL", "model", tooltip="the model with the LoRA applied"),
               Output("LORA_MODEL", "lora", tooltip="the LoRA's weights"),
               Output("LOSS_MAP", "loss_map", tooltip="the loss of each step"),
               Output("INT", "steps", tooltip="steps trained, with those of the existing LoRA"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        name = str(inputs.get("existing_lora", NO_LORA))
        return None if name == NO_LORA else file_fingerprint(get_paths().find_model("loras", name))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return _algorithm_problem(inputs.get("algorithm"))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: list[DiffusionModel], latents: list[dict], positive: list[list], batch_size: list[int],
                grad_accumulation_steps: list[int], steps: list[int], learning_rate: list[float], rank: list[int],
                optimizer: list[str], loss_function: list[str], seed: list[int], training_dtype: list[str],
                lora_dtype: list[str], algorithm: list[str], gradient_checkpointing: list[bool],
                existing_lora: list[str]) -> tuple[DiffusionModel, dict, dict, int]:
        from ldm.checkpoint import load_state_dict
        from ldm.lora import check_lora_family, unmatched_lora_keys
        from ldm.training.latent_lora import Example, LatentLoraConfig, train_latent_lora
        from nodes.sd.sampling import _check_prompt_widths, _with_adm

        base = model[0]
        problem = _algorithm_problem(algorithm[0])
        if problem:
            raise ValueError(problem)
        items = _single_items(latents)
        prompts = _single_prompts(positive, len(items))
        _check_prompt_widths(base, prompts, [])
        expected, channels = base.family.unet_config.in_channels, sorted({item.shape[0] for item in items})
        if channels != [expected]:
            raise ValueError(f"{base.source} takes {expected} input channels and the latents have "
                             f"{' or '.join(map(str, channels))}: training takes models that see the latent alone "
                             "(not inpainting, InstructPix2Pix or upscaling models), and latents made for them")
        device, _, _ = device_and_dtype(self.ctx)
        autocast = TRAINING_DTYPES[training_dtype[0]]
        if autocast is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU cannot compute in bf16: choose training_dtype fp32")
        examples = []
        for latent, (embedding, options) in zip(items, prompts, strict=True):
            [(_, with_y)] = _with_adm([(embedding, options)], base, latent[None], seed=seed[0])
            y = with_y.get("y")
            examples.append(Example(base.latent_in(latent.to(device, torch.float32)), embedding[0].to(device).float(),
                                    None if y is None else y[0].to(device).float()))
        existing, carried, done = None, {}, 0
        if existing_lora[0] != NO_LORA:
            existing = shared_lora(self, existing_lora[0])
            check_lora_family(existing, base.family.name)
            path = model_path("loras", existing_lora[0])
            # Its layers outside the UNet (a text encoder's) go on into the result unchanged.
            keep = set(unmatched_lora_keys(existing, base.unet))
            carried = {k: v for k, v in load_state_dict(path).items() if k in keep}
            done = _trained_steps(path)
        config = LatentLoraConfig(steps=steps[0], batch_size=batch_size[0],
                                  grad_accumulation=grad_accumulation_steps[0], lr=learning_rate[0], rank=rank[0],
                                  optimizer=optimizer[0], loss=loss_function[0], seed=seed[0], autocast=autocast,
                                  lora_dtype=LORA_DTYPES[lora_dtype[0]], grad_checkpointing=gradient_checkpointing[0])
        unet = on_device(self.ctx, base.unet)
        tensors, losses = train_latent_lora(unet, examples, base.schedule, base.prediction, base.family.name, config,
                                            existing, on_step=self.ctx.progress)
        lora = {**carried, **tensors}
        return lora_model(base, lora, 1.0, "trained LoRA"), lora, {"loss": losses}, steps[0] + done


class LoraModelLoader(Node):
    """Applies a LoRA from Train LoRA (a LORA_MODEL) to the model's UNet at a strength, as Load LoRA applies a
    file. The model is not changed: the result is a patched copy."""

    display_name = "Load LoRA Model"
    category = "loaders"
    model = Socket("MODEL", tooltip="the diffusion model the LoRA will be applied to")
    lora = Socket("LORA_MODEL", tooltip="the LoRA to apply")
    strength_model = Float(1.0, min=-100.0, max=100.0, step=0.01, tooltip="how strongly; may be negative")
    outputs = (Output("MODEL", tooltip="the model with the LoRA"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, lora: dict, strength_model: float) -> tuple[DiffusionModel]:
        if strength_model == 0:
            return (model,)
        return (lora_model(model, lora, strength_model, "trained LoRA"),)


class SaveLoRANode(Node):
    """Saves a LORA_MODEL as PREFIX_00001_.safetensors (PREFIX_N_steps_00001_ with the steps) in the output
    folder; move it to models/loras to load it with Load LoRA or continue it in Train LoRA."""

    name = "SaveLoRA"
    display_name = "Save LoRA Weights"
    category = "loaders"
    output_node = True
    lora = Socket("LORA_MODEL", tooltip="the LoRA to save (not the model with the LoRA)")
    prefix = String("loras/ComfyUI_trained_lora", tooltip="file name prefix, in the output folder")
    steps = Socket("INT", optional=True, tooltip="the steps it was trained for, to name the file")

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        problem = output_prefix_problem(inputs.get("prefix"))
        return None if problem is None else problem.replace("filename_prefix", "prefix", 1)

    def execute(self, lora: dict, prefix: str, steps: int | None = None) -> NodeResult:
        from ldm.checkpoint import write_safetensors

        if not lora:
            raise ValueError("the LoRA holds no weights")
        name = prefix if steps is None else f"{prefix}_{steps}_steps"
        metadata = {} if steps is None else {"ss_steps": str(steps)}
        with new_output_file(get_paths().output, name, ".safetensors") as (path, handle, subfolder):
            handle.close()  # safetensors writes by path
            write_safetensors(lora, path, metadata)
        return NodeResult(ui={"files": [{"filename": path.name, "subfolder": subfolder, "type": "output"}]})


class LossGraphNode(Node):
    """Plots the loss of each training step (log scale) and saves it as a PNG in the output folder."""

    display_name = "Plot Loss Graph"
    category = "training"
    output_node = True
    loss = Socket("LOSS_MAP", tooltip="the loss map of Train LoRA")
    filename_prefix = String("loss_graph", tooltip="file name prefix, in the output folder")

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, loss: dict, filename_prefix: str) -> NodeResult:
        from ldm.training.loop import History, draw_losses
        from nodes.sd.image import save_images
        from nodes.sd.imageio import from_pil

        values = loss.get("loss") if isinstance(loss, dict) else None
        if not isinstance(values, list | tuple) or not all(isinstance(v, int | float) for v in values):
            raise ValueError("the loss map holds no list of losses under 'loss' (connect Train LoRA's loss_map)")
        points = [(step, float(v)) for step, v in enumerate(values, 1) if math.isfinite(v) and v > 0]
        if not points:
            raise ValueError("the loss map holds no positive losses to plot")
        history = History([s for s, _ in points], [v for _, v in points])
        image = from_pil(draw_losses({"loss": history}, width=800, height=480))
        saved = save_images(self.ctx, image, get_paths().output, filename_prefix, "output")
        return NodeResult(ui={"images": saved})


NODES: list[Any] = [TrainLoraNode, LoraModelLoader, SaveLoRANode, LossGraphNode]
