"""LoRA files (kohya and diffusers/PEFT layouts): reading, matching to our modules, patching copies."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import load_state_dict, read_shapes
from ldm.quant import dequantized_weight
from ldm.unet import UNetConfig, UNetModel


class LoraError(ValueError):
    """A LoRA that does not fit the model it is applied to."""


@dataclass
class LoraWeight:
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """alpha/rank * up @ down, in fp32, shaped like the weight it patches (no alpha: scale 1)."""
        scale = self.alpha / self.rank if self.alpha is not None else 1.0
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * scale).reshape(shape)


@dataclass
class Lora:
    weights: dict[str, LoraWeight]  # by module name as the file writes it, e.g. lora_unet_..._to_q
    unknown_keys: list[str] = field(default_factory=list)  # tensors that are not plain LoRA pairs
    path: Path | None = None
    sources: dict[str, list[str]] = field(default_factory=dict)  # module name -> its keys in the file


_PARTS = [(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
          (".lora_B.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
          (".alpha", "alpha")]


def load_lora(path: str | Path) -> Lora:
    """Read a LoRA file, grouping its tensors per patched module; other tensors land in unknown_keys. A file
    with no LoRA pair at all (a checkpoint or an upscaler put among the LoRAs) is refused."""
    lora = lora_from_state_dict(load_state_dict(path), Path(path))
    if not lora.weights:
        raise LoraError(f"{Path(path).name} holds no LoRA weights (lora_down/lora_up or lora_A/lora_B pairs): "
                        "it is not a LoRA file")
    return lora


def peek_lora(path: str | Path) -> Lora | None:
    """A LoRA's layout (names and shapes, meta tensors, no alphas) from a .safetensors header alone."""
    shapes = read_shapes(path)
    return None if shapes is None else lora_from_state_dict(shapes, Path(path))


def lora_from_state_dict(sd: dict[str, torch.Tensor], path: Path | None = None) -> Lora:
    """Group a LoRA file's tensors per patched module (meta tensors give the layout without alphas)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, list[str]] = {}
    unknown = []
    for key, tensor in sd.items():
        suffix = next(((s, role) for s, role in _PARTS if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        name = key[: -len(suffix[0])]
        parts.setdefault(name, {})[suffix[1]] = tensor
        sources.setdefault(name, []).append(key)
    weights = {}
    for name, p in parts.items():
        if "down" in p and "up" in p:
            alpha = p.get("alpha")
            weights[name] = LoraWeight(p["down"], p["up"], None if alpha is None or alpha.is_meta else float(alpha))
        else:
            unknown += sources.pop(name)
    return Lora(weights, sorted(unknown), path, sources)


# --- names ----------------------------------------------------------------------------------------

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def diffusers_unet_blocks(config: UNetConfig) -> dict[str, str]:
    """LDM block path -> diffusers UNet2DConditionModel block path, for this UNet's shape."""
    n, levels = config.num_res_blocks, len(config.channel_mult)
    blocks = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
              "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
              "middle_block.2": "mid_block.resnets.1"}
    for level in range(levels):
        for j in range(n):
            block = 1 + level * (n + 1) + j
            blocks[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{j}"
            blocks[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
        if level < levels - 1:
            blocks[f"input_blocks.{(level + 1) * (n + 1)}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    for up in range(levels):
        has_attention = bool(config.transformer_depth[levels - 1 - up])
        for j in range(n + 1):
            blocks[f"output_blocks.{up * (n + 1) + j}.0"] = f"up_blocks.{up}.resnets.{j}"
            if has_attention:
                blocks[f"output_blocks.{up * (n + 1) + j}.1"] = f"up_blocks.{up}.attentions.{j}"
        upsample = f"output_blocks.{up * (n + 1) + n}.{2 if has_attention else 1}.conv"
        blocks[upsample] = f"up_blocks.{up}.upsamplers.0.conv"
    return blocks


def rename_path(path: str, blocks: dict[str, str], resnet: dict[str, str] = _RESNET) -> str | None:
    """`path` with its longest prefix found in `blocks` replaced by that prefix's entry (None if no prefix
    is there). Inside a diffusers ResNet block (`.resnets.` on either side), the rest is renamed by `resnet`:
    `_RESNET` from LDM names, its inverse towards them."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        if head in blocks:
            target = blocks[head]
            if rest and (".resnets." in target or ".resnets." in head):
                rest = resnet.get(rest, rest)
            return f"{target}.{rest}" if rest else target
    return None


def diffusers_unet_name(ldm_name: str, blocks: dict[str, str]) -> str | None:
    """The diffusers name of one of our UNet module paths (None if it has none)."""
    return rename_path(ldm_name, blocks)


def _index(module: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may use for a patchable layer of `module` -> its path in `module`."""
    index: dict[str, str] = {}
    if isinstance(module, UNetModel):
        blocks = diffusers_unet_blocks(module.config)
        for path, layer in module.named_modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                index["lora_unet_" + path.replace(".", "_")] = path
                diffusers = diffusers_unet_name(path, blocks)
                if diffusers:
                    index["lora_unet_" + diffusers.replace(".", "_")] = path
                    index["unet." + diffusers] = path
        return index
    encoders = getattr(module, "encoders", None)
    if not isinstance(encoders, nn.ModuleDict):
        raise TypeError(f"LoRA applies to a UNetModel or a TextEncoder, not {type(module).__name__}")
    two = len(encoders) == 2  # SDXL: CLIP-L is kohya's te1 / diffusers' text_encoder, bigG te2 / _2
    for i, (name, encoder) in enumerate(encoders.items()):
        kohya = f"lora_te{i + 1}_" if two else "lora_te_"
        diffusers = "text_encoder_2." if two and i else "text_encoder."
        for path, layer in encoder.text_model.named_modules():
            if isinstance(layer, nn.Linear):
                hf = "text_model." + path
                index[kohya + hf.replace(".", "_")] = f"encoders.{name}.text_model.{path}"
                index[diffusers + hf] = f"encoders.{name}.text_model.{path}"
    return index


# --- matching and patching ------------------------------------------------------------------------

def match_lora(module: nn.Module, lora: Lora) -> dict[str, LoraWeight]:
    """Layer path in `module` -> its LoRA weights, checking every matched shape."""
    index = _index(module)
    matched: dict[str, LoraWeight] = {}
    wrong = []
    for name, weight in lora.weights.items():
        path = index.get(name)
        if path is None:
            continue
        target = module.get_submodule(path).weight
        if weight.up.shape[0] != target.shape[0] or weight.down[0].numel() != target[0].numel():
            wrong.append(f"{name}: LoRA {tuple(weight.up.shape[:1]) + tuple(weight.down.shape[1:])}, "
                         f"model {tuple(target.shape)}")
        matched[path] = weight
    if wrong:
        source = lora.path.name if lora.path else "LoRA"
        raise LoraError(f"{source} does not fit this model ({len(wrong)} shape mismatches, e.g. "
                        f"{'; '.join(wrong[:3])}); it is probably for another model family")
    return matched


def unmatched_lora_keys(lora: Lora, *modules: nn.Module) -> list[str]:
    """File keys that patch nothing in any of `modules` (plus those not understood as LoRA at all)."""
    names = set().union(*(_index(m).keys() for m in modules if m is not None))
    return sorted(lora.unknown_keys + [k for name in lora.weights if name not in names
                                       for k in lora.sources.get(name, [])])


def shallow_copy(module: nn.Module) -> nn.Module:
    """New module objects all the way down, sharing every parameter and buffer tensor."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: shallow_copy(child) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


@torch.no_grad()
def apply_lora(module: nn.Module, lora: Lora, strength: float = 1.0) -> nn.Module:
    """A patched copy of `module` with W + strength * alpha/rank * up @ down on every matched layer.

    `module` itself is never changed: the copy shares all untouched tensors and gets new ones for
    the patched weights, so a cached base model stays right for workflows without the LoRA.
    """
    matched = match_lora(module, lora)
    if not matched or strength == 0:
        return module
    patched = shallow_copy(module)
    for path, weight in matched.items():
        layer = patched.get_submodule(path)
        base = dequantized_weight(layer)  # an fp8 layer's patched weight is stored in full precision
        new = base.float() + strength * weight.delta(base.shape).to(base.device)
        layer._parameters["weight"] = nn.Parameter(new.to(base.dtype), requires_grad=layer.weight.requires_grad)
    return patched


# --- family ---------------------------------------------------------------------------------------

_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def lora_family(lora: Lora) -> str | None:
    """The family a LoRA was trained for ("sd1", "sd2", "sdxl"), None when its keys do not tell."""
    names = lora.weights.keys()
    if any(n.startswith(("lora_te2_", "text_encoder_2.")) or "add_embedding" in n or "label_emb" in n
           for n in names):
        return "sdxl"
    for name, weight in lora.weights.items():
        if re.search(r"attn2[._]to_k$", name) and weight.down.shape[1] in _CONTEXT_FAMILY:
            return _CONTEXT_FAMILY[weight.down.shape[1]]
    return None


def check_lora_family(lora: Lora, family: str) -> None:
    """Raise LoraError when the LoRA is recognisably for another family than `family`."""
    found = lora_family(lora)
    if found is not None and found != family:
        source = lora.path.name if lora.path else "this LoRA"
        raise LoraError(f"{source} is a {found.upper()} LoRA; it does not fit a {family.upper()} model")
