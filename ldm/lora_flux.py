"""Flux LoRA names: kohya's and BFL's names of our Flux layers, diffusers' split ones as row slots of fused layers.

BFL (and Loom) fuse what diffusers keeps apart: a double block's `img_attn.qkv` is diffusers' `attn.to_q`, `to_k`
and `to_v` stacked by rows (`txt_attn.qkv`: `add_q_proj`, `add_k_proj`, `add_v_proj`), a single block's `linear1`
is q, k, v and `proj_mlp`. A diffusers LoRA (ai-toolkit, diffusers' scripts, most Civitai Flux files) patches each
part with its own rank and alpha, so each becomes a `Slot` of the fused weight and the layer's patch a
`SlicedWeight`: every part applied to its own rows. The final layer's modulation is diffusers' `norm_out.linear`
with its halves swapped (scale, shift where BFL has shift, scale): a slot rolled by half its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ldm.flux import Flux
from ldm.lora_formats import WeightPatch
from ldm.lora_t5 import t5_index


@dataclass(frozen=True)
class Slot:
    """Rows [start, start + rows) of the layer at `path`, taking a file patch's rows rolled by `roll` (0: as they
    are; half the rows: its halves swapped)."""

    path: str
    start: int
    rows: int
    roll: int = 0

    def part(self, weight: Tensor) -> Tensor:
        """This slot's rows of a weight or bias, in the file patch's row order."""
        return weight[self.start:self.start + self.rows].roll(-self.roll, 0)


@dataclass
class SlicedWeight(WeightPatch):
    """A fused layer patched by several file entries, each on its own rows (with its own rank, alpha, DoRA)."""

    parts: list[tuple[Slot, WeightPatch]]
    rows: int  # the fused layer's output features
    in_features: int

    def __post_init__(self) -> None:
        self.out_features, self.in_numel = self.rows, self.in_features
        if any(patch.bias is not None for _, patch in self.parts):
            self.bias = torch.zeros(self.rows)
            for slot, patch in self.parts:
                if patch.bias is not None:
                    self.bias[slot.start:slot.start + slot.rows] += patch.bias.float().roll(slot.roll, 0)

    def delta(self, shape: torch.Size) -> Tensor:
        total = torch.zeros(shape)
        for slot, patch in self.parts:
            total[slot.start:slot.start + slot.rows] += patch.delta((slot.rows, *shape[1:])).roll(slot.roll, 0)
        return total

    def patched(self, weight: Tensor, strength: float) -> Tensor:
        """Each part patches its rows as a layer of its own would be (DoRA renormalises within its rows)."""
        out = weight.float().clone()
        for slot, patch in self.parts:
            out[slot.start:slot.start + slot.rows] = patch.patched(slot.part(out), strength).roll(slot.roll, 0)
        return out


# diffusers' name inside transformer_blocks.N -> BFL's inside double_blocks.N, with the part's index in the fused
# q, k, v for the attention projections.
_DOUBLE: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None), "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
}
# single_transformer_blocks.N -> single_blocks.N; part 3 of linear1 is the MLP input (mlp_hidden rows).
_SINGLE: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
_OUTER = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
}


def diffusers_spellings(name: str) -> list[str]:
    """The spellings ComfyUI reads: PEFT's (`transformer.` prefix), DiffSynth's (none), and the flattened names of
    OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS files (`lycoris_`)."""
    flat = name.replace(".", "_")
    return [f"transformer.{name}", name, "lora_transformer_" + flat, "lycoris_" + flat]


def _diffusers_targets(model: Flux) -> dict[str, str | Slot]:
    """diffusers' layer names -> our layer path (a whole layer) or a Slot."""
    c = model.config
    h, mlp = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
    targets: dict[str, str | Slot] = dict(_OUTER)
    if not c.guidance_embed:
        targets = {k: v for k, v in targets.items() if not v.startswith("guidance_in")}
    targets["norm_out.linear"] = Slot("final_layer.adaLN_modulation.1", 0, 2 * h, roll=h)
    for blocks, table, ours, count in (("transformer_blocks", _DOUBLE, "double_blocks", c.depth),
                                       ("single_transformer_blocks", _SINGLE, "single_blocks",
                                        c.depth_single_blocks)):
        for i in range(count):
            for theirs, (path, part) in table.items():
                path = f"{ours}.{i}.{path}"
                targets[f"{blocks}.{i}.{theirs}"] = path if part is None else Slot(
                    path, part * h, mlp if part == 3 else h)
    return targets


def _bfl_slots(model: Flux) -> dict[str, Slot]:
    """BFL-named parts: a single block's `linear1_qkv` (its q, k, v rows; ComfyUI reads it)."""
    h = model.config.hidden_size
    return {f"diffusion_model.single_blocks.{i}.linear1_qkv": Slot(f"single_blocks.{i}.linear1", 0, 3 * h)
            for i in range(model.config.depth_single_blocks)}


def transformer_index(model: nn.Module, targets: dict[str, str | Slot],
                      layers: tuple[type[nn.Module], ...] = (nn.Linear,)) -> dict[str, str]:
    """Every name a LoRA file may give a whole layer of a transformer -> its path: kohya's (`lora_unet_` + the path
    in the model file's layout, flattened), the model file's own (`diffusion_model.`), LyCORIS', and diffusers' for
    the layers diffusers does not split (`targets`: diffusers' names -> a path, or the Slot of a split part)."""
    index: dict[str, str] = {}
    for path, layer in model.named_modules():
        if isinstance(layer, layers):
            flat = path.replace(".", "_")
            index.update({"lora_unet_" + flat: path, "lycoris_" + flat: path, "diffusion_model." + path: path})
    for name, target in targets.items():
        if isinstance(target, str):
            index.update(dict.fromkeys(diffusers_spellings(name), target))
    return index


def diffusers_slots(targets: dict[str, str | Slot]) -> dict[str, Slot]:
    """Every spelling of diffusers' names for the parts of fused layers (`targets`' Slots) -> their slots."""
    return {spelling: target for name, target in targets.items() if isinstance(target, Slot)
            for spelling in diffusers_spellings(name)}


def flux_index(model: Flux) -> dict[str, str]:
    """Every name a LoRA file may give a whole layer of a Flux transformer (BFL's names) -> its path."""
    return transformer_index(model, _diffusers_targets(model))


def flux_slots(model: Flux) -> dict[str, Slot]:
    """Names of the parts of fused layers (and of diffusers' swapped final modulation) -> their slots."""
    return {**_bfl_slots(model), **diffusers_slots(_diffusers_targets(model))}


def flux_text_index(encoder: nn.Module) -> dict[str, str]:
    """A FluxTextEncoder's CLIP-L layers by kohya's Flux names (`lora_te1_`, sd-scripts' CLIP-L prefix) and
    diffusers' (`text_encoder.`), and its T5's (sd-scripts' `lora_te3_`, OneTrainer's `lora_te2_`, diffusers'
    `text_encoder_2.`: ldm.lora_t5)."""
    index = t5_index(encoder.t5xxl, "t5xxl", ("lora_te3_", "lora_te2_"), "text_encoder_2.")
    for name, clip in encoder.clip_l.encoders.items():
        for path, layer in clip.text_model.named_modules():
            if isinstance(layer, nn.Linear | nn.LayerNorm):
                hf, ours = "text_model." + path, f"clip_l.encoders.{name}.text_model.{path}"
                index["lora_te1_" + hf.replace(".", "_")] = ours
                index["text_encoder." + hf] = ours
    return index


@dataclass
class SlotParts:
    """The slot patches matched to one fused layer, gathered before they become its SlicedWeight."""

    parts: dict[str, list[tuple[Slot, WeightPatch]]] = field(default_factory=dict)

    def add(self, slot: Slot, patch: WeightPatch) -> None:
        self.parts.setdefault(slot.path, []).append((slot, patch))

    def merged(self, module: nn.Module, whole: dict[str, WeightPatch]) -> dict[str, WeightPatch]:
        """`whole` with each sliced layer's patch; a whole-layer patch of the same layer is kept as one more part."""
        merged = dict(whole)
        for path, parts in self.parts.items():
            rows, in_features = module.get_submodule(path).weight.shape[:2]
            if path in merged:
                parts = [(Slot(path, 0, rows), merged[path]), *parts]
            merged[path] = SlicedWeight(parts, rows, in_features)
        return merged
