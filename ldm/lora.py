"""LoRA files: reading, matching to our modules, patching copies.

Besides plain LoRA pairs (kohya's `lora_down`/`lora_up`, diffusers' and PEFT's `lora_A`/`lora_B` and their older
attention-processor and text-encoder layouts), the LyCORIS kinds people download are read as ComfyUI and the
LyCORIS library read them: LoCon (conv kernels, with an optional Tucker `lora_mid`), LoHa (Hadamard product of two
low-rank products), LoKr (Kronecker product), full-weight differences (`diff`, `diff_b`, `w_norm`, `b_norm`), each
optionally with DoRA's magnitude vector (`dora_scale`). Flux's names, and diffusers' parts of its fused layers, are
ldm.lora_flux's; SD3's ldm.lora_sd3's; Wan's ldm.lora_wan's; LTX-Video's ldm.lora_ltxv's; Qwen-Image's
ldm.lora_qwen_image's.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ldm.checkpoint import load_state_dict, read_shapes
from ldm.flux import Flux
from ldm.quant import dequantized_weight
from ldm.unet import UNetConfig, UNetModel

if TYPE_CHECKING:
    from ldm.lora_flux import Slot


class LoraError(ValueError):
    """A LoRA that does not fit the model it is applied to."""


# --- weight patches ---------------------------------------------------------------------------------

@dataclass
class WeightPatch:
    """What a LoRA file changes in one layer. `delta` gives the change at strength 1, in fp32, shaped like the
    weight; `out_features` and `in_numel` (per output channel) are known from shapes alone, for matching."""

    alpha: float | None = field(default=None, kw_only=True)
    dora_scale: Tensor | None = field(default=None, kw_only=True)  # DoRA: the magnitude per output or input channel
    bias: Tensor | None = field(default=None, kw_only=True)  # a change of the layer's bias (LyCORIS diff_b, b_norm)

    out_features: int = field(init=False)
    in_numel: int = field(init=False)

    def delta(self, shape: torch.Size) -> Tensor:
        raise NotImplementedError

    def scaled(self, rank: int | None) -> float:
        """alpha / rank, the scale of a low-rank product (1 without an alpha)."""
        return self.alpha / rank if self.alpha is not None and rank else 1.0

    def patched(self, weight: Tensor, strength: float) -> Tensor:
        """The patched weight, in fp32. With DoRA, W + d is renormalised to dora_scale per channel (the merged
        weight's norm, as LyCORIS and the paper take it; ComfyUI's older code took the original weight's for
        per-output-channel magnitudes) and strength blends towards that result, as ComfyUI does."""
        base = weight.float()
        delta = self.delta(weight.shape).to(base.device)
        if self.dora_scale is None:
            return base + strength * delta
        merged = base + delta
        magnitude = self.dora_scale.float().to(base.device)
        if magnitude.shape[0] == merged.shape[0] and magnitude[0].numel() == 1:  # one magnitude per output channel
            norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
        else:  # per input channel (kohya's layout, [1, in, ...], the one ComfyUI reads)
            norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (merged.dim() - 2))
        decomposed = merged * (magnitude.reshape(norm.shape) / norm)
        return base + strength * (decomposed - base)


def _tucker(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """A conv kernel from a Tucker core [r, r, kh, kw] and its factors left [r, out] and right [r, in]."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core.float(), left.float(), right.float())


@dataclass
class LoraWeight(WeightPatch):
    """A low-rank pair, W + alpha/rank * up @ down (LoCon: conv kernels; with `mid`, a Tucker-decomposed kernel)."""

    down: Tensor  # [rank, in] or [rank, in, kh, kw] ([rank, in, 1, 1] with mid)
    up: Tensor  # [out, rank] or [out, rank, 1, 1]
    mid: Tensor | None = field(default=None, kw_only=True)  # [rank, rank, kh, kw]

    def __post_init__(self) -> None:
        self.out_features = self.up.shape[0]
        self.in_numel = self.down[0].numel() * (self.mid[0, 0].numel() if self.mid is not None else 1)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> Tensor:
        if self.mid is not None:
            product = _tucker(self.mid, self.up.flatten(1).T, self.down.flatten(1))
        else:
            product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * self.scaled(self.rank)).reshape(shape)


@dataclass
class LohaWeight(WeightPatch):
    """LyCORIS LoHa: W + alpha/rank * (w1_a @ w1_b) * (w2_a @ w2_b), each product optionally Tucker-decomposed."""

    w1_a: Tensor  # [out, rank] ([rank, out] with Tucker cores)
    w1_b: Tensor  # [rank, in * kh * kw] ([rank, in] with Tucker cores)
    w2_a: Tensor
    w2_b: Tensor
    t1: Tensor | None = None  # [rank, rank, kh, kw]
    t2: Tensor | None = None

    def __post_init__(self) -> None:
        tucker = self.t1 is not None
        self.out_features = self.w1_a.shape[1] if tucker else self.w1_a.shape[0]
        self.in_numel = self.w1_b.shape[1] * (self.t1[0, 0].numel() if tucker else 1)

    def delta(self, shape: torch.Size) -> Tensor:
        if self.t1 is not None and self.t2 is not None:
            product = _tucker(self.t1, self.w1_a, self.w1_b) * _tucker(self.t2, self.w2_a, self.w2_b)
        else:
            product = (self.w1_a.float() @ self.w1_b.float()) * (self.w2_a.float() @ self.w2_b.float())
        return (product * self.scaled(self.w1_b.shape[0])).reshape(shape)


@dataclass
class LokrWeight(WeightPatch):
    """LyCORIS LoKr: W + scale * kron(w1, w2), each factor whole or a low-rank product (w2 optionally with a Tucker
    core). The scale is alpha/rank when a factor is low-rank, else 1 (the alpha of a whole-factor file is unused)."""

    w1: Tensor | None = None  # [out1, in1]
    w1_a: Tensor | None = None  # [out1, rank]
    w1_b: Tensor | None = None  # [rank, in1]
    w2: Tensor | None = None  # [out2, in2] or [out2, in2, kh, kw]
    w2_a: Tensor | None = None  # [out2, rank] ([rank, out2] with t2)
    w2_b: Tensor | None = None  # [rank, in2 * kh * kw] ([rank, in2] with t2)
    t2: Tensor | None = None  # [rank, rank, kh, kw]

    def __post_init__(self) -> None:
        out1, in1 = self.w1.shape[:2] if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])
        if self.w2 is not None:
            out2, in2 = self.w2.shape[0], self.w2[0].numel()
        elif self.t2 is not None:
            out2, in2 = self.w2_a.shape[1], self.w2_b.shape[1] * self.t2[0, 0].numel()
        else:
            out2, in2 = self.w2_a.shape[0], self.w2_b.shape[1]
        self.out_features, self.in_numel = out1 * out2, in1 * in2

    def delta(self, shape: torch.Size) -> Tensor:
        w1 = self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = _tucker(self.t2, self.w2_a, self.w2_b)
        else:
            w2 = self.w2_a.float() @ self.w2_b.float()
        w2 = w2.reshape(w2.shape[0], -1)  # kron of [o1, i1] and [o2, i2*kh*kw] lays out as [o1*o2, i1*i2, kh, kw]
        # The rank of a low-rank factor, w2's first where both are (ComfyUI's order; files give both one rank).
        rank = self.w2_b.shape[0] if self.w2_b is not None else self.w1_b.shape[0] if self.w1_b is not None else None
        return (torch.kron(w1, w2) * self.scaled(rank)).reshape(shape)


@dataclass
class FullWeight(WeightPatch):
    """A whole weight difference (LyCORIS full/`diff`, or `w_norm` for a norm layer); `diff` None changes only the
    bias."""

    diff: Tensor | None = None

    def __post_init__(self) -> None:
        source = self.diff if self.diff is not None else self.bias
        self.out_features = source.shape[0]
        self.in_numel = source[0].numel() if self.diff is not None else 1

    def delta(self, shape: torch.Size) -> Tensor:
        return self.diff.float().reshape(shape) if self.diff is not None else torch.zeros(shape)


@dataclass
class Lora:
    weights: dict[str, WeightPatch]  # by module name as the file writes it, e.g. lora_unet_..._to_q
    unknown_keys: list[str] = field(default_factory=list)  # tensors that are not understood as LoRA weights
    path: Path | None = None
    sources: dict[str, list[str]] = field(default_factory=dict)  # module name -> its keys in the file
    # Modules whose tensors make no whole patch (half a LoHa, a pair without its up), or malformed ones: their
    # keys, which are in `unknown_keys` too.
    incomplete: dict[str, list[str]] = field(default_factory=dict)

    def incomplete_note(self, most: int = 3) -> str:
        """What the incomplete modules hold, e.g. `lora_unet_x (only .hada_w1_a, .hada_w1_b)`; "" for none."""
        return "; ".join(f"{name} (only {', '.join(k[len(name):] for k in keys)})"
                         for name, keys in list(self.incomplete.items())[:most])


# Key suffix -> role, longest first where one ends another. The low-rank pair's up/down come in several layouts.
_PARTS = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up", ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".hada_w1_a": "w1_a", ".hada_w1_b": "w1_b", ".hada_w2_a": "w2_a", ".hada_w2_b": "w2_b",
    ".hada_t1": "t1", ".hada_t2": "t2",
    ".lokr_w1": "k_w1", ".lokr_w1_a": "k_w1_a", ".lokr_w1_b": "k_w1_b", ".lokr_w2": "k_w2", ".lokr_w2_a": "k_w2_a",
    ".lokr_w2_b": "k_w2_b", ".lokr_t2": "k_t2",
    ".diff": "diff", ".w_norm": "diff", ".diff_b": "bias", ".b_norm": "bias", ".lora_B.bias": "up_bias",
    ".alpha": "alpha", ".dora_scale": "dora_scale",
}
_SUFFIXES = sorted(_PARTS, key=len, reverse=True)
# Suffixes only a LoRA file has (for telling LoRA files from other weights files).
LORA_SUFFIXES = tuple(s for s in _SUFFIXES if s not in (".alpha", ".diff", ".diff_b", ".dora_scale"))


def _split(key: str) -> tuple[str, str] | None:
    suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
    return None if suffix is None else (key[: -len(suffix)], _PARTS[suffix])


def _patch(p: dict[str, Tensor]) -> WeightPatch | None:
    """The patch one module's tensors make, None when they make none (a lone half of a pair)."""
    alpha = p.get("alpha")
    common = {"alpha": None if alpha is None or alpha.is_meta else float(alpha),
              "dora_scale": p.get("dora_scale"), "bias": p.get("bias")}
    if "up_bias" in p and "down" in p:  # PEFT's lora_B bias (diffusers' form of diff_b): scaled as its pair is
        common["bias"] = p["up_bias"] * (common["alpha"] / p["down"].shape[0] if common["alpha"] else 1.0)
    if "down" in p and "up" in p:
        return LoraWeight(p["down"], p["up"], mid=p.get("mid"), **common)
    if all(k in p for k in ("w1_a", "w1_b", "w2_a", "w2_b")):
        return LohaWeight(p["w1_a"], p["w1_b"], p["w2_a"], p["w2_b"], p.get("t1"), p.get("t2"), **common)
    k = {name[2:]: tensor for name, tensor in p.items() if name.startswith("k_")}
    if ("w1" in k or {"w1_a", "w1_b"} <= k.keys()) and ("w2" in k or {"w2_a", "w2_b"} <= k.keys()):
        return LokrWeight(**k, **common)
    if "diff" in p or "bias" in p:
        return FullWeight(p.get("diff"), **common)
    return None


def load_lora(path: str | Path) -> Lora:
    """Read a LoRA file, grouping its tensors per patched module; other tensors land in unknown_keys. A file
    with no LoRA pair at all (a checkpoint or an upscaler put among the LoRAs) is refused."""
    lora = lora_from_state_dict(load_state_dict(path), Path(path))
    if not lora.weights and lora.incomplete:
        raise LoraError(f"{Path(path).name} holds only incomplete or malformed LoRA weights, e.g. "
                        f"{lora.incomplete_note()}")
    if not lora.weights:
        raise LoraError(f"{Path(path).name} holds no LoRA weights (lora_down/lora_up or lora_A/lora_B pairs, "
                        "LyCORIS LoHa/LoKr/full weights): "
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
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        parts.setdefault(split[0], {})[split[1]] = tensor
        sources.setdefault(split[0], []).append(key)
    weights, incomplete = {}, {}
    for name, p in parts.items():
        try:
            patch = _patch(p)
        except (IndexError, RuntimeError):  # a factor of the wrong rank (dimensions) for its kind
            patch = None
        if patch is None:
            incomplete[name] = sorted(sources.pop(name))
            unknown += incomplete[name]
        else:
            weights[name] = patch
    return Lora(weights, sorted(unknown), path, sources, incomplete)


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


_PATCHABLE = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)  # norms: LyCORIS full-weight (w_norm) patches


def _diffusers_names(name: str) -> list[str]:
    """The names diffusers' LoRA layouts give a diffusers UNet layer: PEFT's with and without `unet.`, and the
    older attention-processor one (`attn1.processor.to_q`, `attn1.processor.to_out` for `attn1.to_out.0`)."""
    processor = re.sub(r"\.(to_[qkv]|to_out)(\.0)?$", r".processor.\1", name)
    return [f"{prefix}{n}" for prefix in ("unet.", "") for n in dict.fromkeys((name, processor))]


def _index(module: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may use for a patchable layer of `module` -> its path in `module`."""
    index: dict[str, str] = {}
    if isinstance(module, UNetModel):
        blocks = diffusers_unet_blocks(module.config)
        for path, layer in module.named_modules():
            if isinstance(layer, _PATCHABLE):
                flat = path.replace(".", "_")
                index.update({"lora_unet_" + flat: path, "lycoris_" + flat: path, "diffusion_model." + path: path})
                diffusers = diffusers_unet_name(path, blocks)
                if diffusers:
                    index["lora_unet_" + diffusers.replace(".", "_")] = path
                    index.update(dict.fromkeys(_diffusers_names(diffusers), path))
        return index
    from ldm import lora_flux, lora_sd3  # they build on this module
    from ldm.flux_text import FluxTextEncoder
    from ldm.mmdit import MMDiT
    from ldm.sd3_text import SD3TextEncoder

    chroma = _chroma_lora(module)  # Chroma: Flux's block names (ldm.chroma_lora)
    if chroma is not None:
        return chroma[0]

    if isinstance(module, Flux):
        return lora_flux.flux_index(module)
    if isinstance(module, FluxTextEncoder):
        return lora_flux.flux_text_index(module)
    if isinstance(module, MMDiT):
        return lora_sd3.sd3_index(module)
    if isinstance(module, SD3TextEncoder):
        return lora_sd3.sd3_text_index(module)
    from ldm import lora_ltxv, lora_qwen_image, lora_wan
    from ldm.ltxv import LTXVModel
    from ldm.qwen_image import QwenImageModel
    from ldm.wan import WanModel

    if isinstance(module, WanModel):
        return lora_wan.wan_index(module)
    if isinstance(module, LTXVModel):
        return lora_ltxv.ltxv_index(module)
    if isinstance(module, QwenImageModel):
        return lora_qwen_image.qwen_image_index(module)
    if takes_no_lora(module):
        return {}
    encoders = getattr(module, "encoders", None)
    if not isinstance(encoders, nn.ModuleDict):
        raise TypeError(f"LoRA applies to a diffusion model or a text encoder, not {type(module).__name__}")
    two = len(encoders) == 2  # SDXL: CLIP-L is kohya's te1 / diffusers' text_encoder, bigG te2 / _2
    for i, (name, encoder) in enumerate(encoders.items()):
        kohya = f"lora_te{i + 1}_" if two else "lora_te_"
        diffusers = "text_encoder_2." if two and i else "text_encoder."
        for path, layer in encoder.text_model.named_modules():
            if isinstance(layer, nn.Linear | nn.LayerNorm):
                hf = "text_model." + path
                index[kohya + hf.replace(".", "_")] = f"encoders.{name}.text_model.{path}"
                index[diffusers + hf] = f"encoders.{name}.text_model.{path}"
    return index


def takes_no_lora(module: nn.Module) -> bool:
    """Whether `module` is a text encoder no LoRA patches: Wan's UMT5, LTX-Video's T5 and Qwen-Image's Qwen2.5-VL
    (diffusers' loaders for those models patch their transformers alone, and so does Loom)."""
    from ldm.ltxv_text import LTXVTextEncoder
    from ldm.qwen_text import QwenImageTextEncoder
    from ldm.umt5 import WanTextEncoder

    return isinstance(module, WanTextEncoder | LTXVTextEncoder | QwenImageTextEncoder)


def _slots(module: nn.Module) -> dict[str, Slot]:
    """Names of parts of fused layers (a Flux or SD3 transformer's, in diffusers' layout) -> their slots."""
    from ldm import lora_flux, lora_sd3
    from ldm.mmdit import MMDiT

    if isinstance(module, MMDiT):
        return lora_sd3.sd3_slots(module)
    chroma = _chroma_lora(module)
    if chroma is not None:
        return chroma[1]
    return lora_flux.flux_slots(module) if isinstance(module, Flux) else {}


def _chroma_lora(module: nn.Module) -> tuple[dict[str, str], dict[str, Slot]] | None:
    """(index, slots) of a Chroma transformer or text encoder (`ldm.chroma_lora`); None for other modules."""
    from ldm import chroma_lora
    from ldm.chroma import Chroma
    from ldm.chroma_files import ChromaTextEncoder

    if isinstance(module, Chroma):
        return chroma_lora.chroma_index(module), chroma_lora.chroma_slots(module)
    if isinstance(module, ChromaTextEncoder):
        return chroma_lora.chroma_text_index(module), {}
    return None


# --- matching and patching ------------------------------------------------------------------------

def _misfit(patch: WeightPatch, weight: Tensor, bias: Tensor | None) -> str | None:
    """How `patch` does not fit a layer's `weight` and `bias` (None when it does)."""
    if isinstance(patch, FullWeight) and patch.diff is not None and patch.diff.shape != weight.shape:
        return f"weight {tuple(patch.diff.shape)}, model {tuple(weight.shape)}"
    if patch.out_features != weight.shape[0] or patch.in_numel != weight[0].numel():
        return f"[{patch.out_features} out, {patch.in_numel} in], model {tuple(weight.shape)}"
    if patch.bias is not None and (bias is None or patch.bias.shape != bias.shape):
        return f"bias {tuple(patch.bias.shape)}, model {'none' if bias is None else tuple(bias.shape)}"
    channels = weight.shape[:2] if weight.dim() > 1 else ()
    if patch.dora_scale is not None and patch.dora_scale.numel() not in channels:
        return f"DoRA magnitudes {tuple(patch.dora_scale.shape)}, model {tuple(weight.shape)}"
    try:  # its factors' inner sizes (ranks, Tucker cores): computed on shapes alone
        _on_meta(patch).delta(weight.shape)
    except RuntimeError as e:
        return f"factors that do not fit together ({str(e).splitlines()[0]})"
    return None


def _on_meta(patch: WeightPatch) -> WeightPatch:
    """The same patch with shape-only tensors."""
    tensors = {f.name: getattr(patch, f.name).to("meta") for f in fields(patch)
               if f.init and isinstance(getattr(patch, f.name), Tensor)}
    return replace(patch, **tensors)


def match_lora(module: nn.Module, lora: Lora) -> dict[str, WeightPatch]:
    """Layer path in `module` -> its patch, checking every matched shape."""
    from ldm import lora_flux

    index, slots = _index(module), _slots(module)
    matched: dict[str, WeightPatch] = {}
    sliced = lora_flux.SlotParts()
    wrong = []
    for name, patch in lora.weights.items():
        slot = slots.get(name)
        path = slot.path if slot else index.get(name)
        if path is None:
            continue
        layer, attr = _target(module, path)
        weight, bias = getattr(layer, attr), getattr(layer, "bias", None) if attr == "weight" else None
        if slot:
            # only shapes are checked: meta views, no copy of the rows
            weight, bias = slot.part(weight.to("meta")), None if bias is None else slot.part(bias.to("meta"))
        misfit = _misfit(patch, weight, bias)
        if misfit:
            wrong.append(f"{name}: LoRA {misfit}")
        if slot:
            sliced.add(slot, patch)
        else:
            matched[path] = patch
    count = len(matched) + sum(len(parts) for parts in sliced.parts.values())
    if wrong:
        source = lora.path.name if lora.path else "LoRA"
        why = ("it is probably for another model family" if len(wrong) * 2 > count
               else "the rest fit: the file is probably damaged")
        raise LoraError(f"{source} does not fit this model ({len(wrong)} of its {count} layers do not, e.g. "
                        f"{'; '.join(wrong[:3])}); {why}")
    return sliced.merged(module, matched)


def _target(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The layer at `path` and "weight", or, where `path` names a parameter of no layer of its own (Wan's
    `blocks.N.modulation`), its parent and the parameter's name."""
    try:
        return module.get_submodule(path), "weight"
    except AttributeError:
        parent, _, name = path.rpartition(".")
        return module.get_submodule(parent), name


def unmatched_lora_keys(lora: Lora, *modules: nn.Module) -> list[str]:
    """File keys that patch nothing in any of `modules` (plus those not understood as LoRA at all)."""
    names = set().union(*(_index(m).keys() | _slots(m).keys() for m in modules if m is not None))
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
    """A patched copy of `module` with W + strength * delta on every matched layer (see WeightPatch.patched).

    `module` itself is never changed: the copy shares all untouched tensors and gets new ones for
    the patched weights, so a cached base model stays right for workflows without the LoRA.
    """
    matched = match_lora(module, lora)
    if not matched or strength == 0:
        return module
    patched = shallow_copy(module)
    for path, patch in matched.items():
        layer, name = _target(patched, path)
        # an fp8 layer's patched weight is stored in full precision
        base = dequantized_weight(layer) if name == "weight" else getattr(layer, name)
        new = patch.patched(base, strength)
        layer._parameters[name] = nn.Parameter(new.to(base.dtype), requires_grad=getattr(layer, name).requires_grad)
        if patch.bias is not None:
            bias = layer.bias.float() + strength * patch.bias.float().to(layer.bias.device)
            layer._parameters["bias"] = nn.Parameter(bias.to(layer.bias.dtype), requires_grad=layer.bias.requires_grad)
    return patched


# --- family ---------------------------------------------------------------------------------------

_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# Block names only Flux has: BFL's (kohya's flattened, ComfyUI's dotted) and diffusers' single-stream blocks. A
# diffusers file of double blocks alone is told from SD3's by ldm.lora_sd3.transformer_family (or not at all).
_FLUX_NAME = re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d")


def lora_family(lora: Lora) -> str | None:
    """The family a LoRA was trained for ("sd1", "sd2", "sdxl", "flux", "sd3", "wan21", "wan22" or "wan": see
    ldm.lora_wan, "ltxv", "qwen_image"), None when its keys do not tell.
    (An SD3 file of CLIP-L/CLIP-G keys alone reads as SDXL: their names and widths are the same.)"""
    from ldm.lora_ltxv import ltxv_family
    from ldm.lora_qwen_image import qwen_image_family
    from ldm.lora_sd3 import transformer_family
    from ldm.lora_t5 import is_t5_name
    from ldm.lora_wan import wan_family

    names = lora.weights.keys()
    # Qwen-Image's before the transformer families: its diffusers attention names are Flux's too (see its module).
    named = wan_family(lora.weights) or ltxv_family(lora.weights) or qwen_image_family(lora.weights)
    if named is not None:
        return named
    if any(_FLUX_NAME.search(n) for n in names):
        return "flux"
    transformer = transformer_family(lora.weights)
    if transformer is not None:
        return transformer
    # A second CLIP is SDXL's; Flux's T5 goes by the same prefixes (OneTrainer's lora_te2_, diffusers' text_encoder_2.).
    if any((n.startswith(("lora_te2_", "text_encoder_2.")) and not is_t5_name(n)) or "add_embedding" in n
           or "label_emb" in n for n in names):
        return "sdxl"
    for name, weight in lora.weights.items():
        if re.search(r"attn2[._](processor[._])?to_k$", name) and weight.in_numel in _CONTEXT_FAMILY:
            return _CONTEXT_FAMILY[weight.in_numel]
    return None


def check_lora_family(lora: Lora, family: str) -> None:
    """Raise LoraError when the LoRA is recognisably for another family than `family`."""
    found = lora_family(lora)
    if found is not None and not family_fits(found, family):
        source = lora.path.name if lora.path else "this LoRA"
        raise LoraError(f"{source} is a {found.upper()} LoRA; it does not fit a {family.upper()} model")


def family_fits(found: str, family: str) -> bool:
    """Whether a LoRA of family `found` (`lora_family`) fits a model of `family`: the same family, Flux's on Chroma
    (which keeps Flux's block names), a Wan LoRA of an unreleased width on either Wan family."""
    return found == family or (found, family) == ("flux", "chroma") or (found == "wan" and family.startswith("wan"))
