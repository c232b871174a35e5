"""LoRA extraction: a LoRA file from a model difference (a fine-tune minus its base, ModelMergeSubtract's
output), as ComfyUI's LoraSave makes it.

Each weight difference of two or more dimensions becomes the low-rank pair closest to it (the truncated SVD, the
singular values folded into `up`), its entries clamped to the 99th percentile of the pair's values as ComfyUI
does, which keeps rare large entries from dominating; or, as a "full_diff" file, the whole difference (`.diff`).
Norm weights and biases go in as whole differences (`.diff`, `.diff_b`) when asked for. Layers that did not
change are left out. Names: the UNet's under `diffusion_model.` (ComfyUI's own), the text encoders' kohya's
(`lora_te_`, `lora_te1_`/`lora_te2_`), which LoraLoader, ComfyUI and A1111 read.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.flux import Flux
from ldm.flux2 import Flux2
from ldm.lora_families import _index
from ldm.quant import dequantized_weight
from ldm.unet import UNetModel

CLAMP_QUANTILE = 0.99
LORA_TYPES = ("standard", "full_diff")


def extract_pair(diff: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(up, down) of the rank-`rank` approximation of `diff` [out, in(, kh, kw)], shaped as a LoRA file holds
    them ([out, rank(, 1, 1)], [rank, in(, kh, kw)])."""
    out_dim, in_dim = diff.shape[:2]
    rank = min(rank, out_dim, in_dim)
    u, s, vh = torch.linalg.svd(diff.float().flatten(1), full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), CLAMP_QUANTILE)
    up, down = up.clamp(-high, high), down.clamp(-high, high)
    if diff.ndim == 4:
        return up.reshape(out_dim, rank, 1, 1), down.reshape(rank, *diff.shape[1:])
    return up, down


def _names(module: nn.Module) -> dict[str, str]:
    """Layer path -> the name to write it under."""
    unet = isinstance(module, UNetModel | Flux | Flux2)  # written under BFL's names for Flux, which ComfyUI reads
    return {path: name for name, path in _index(module).items()
            if name.startswith("diffusion_model." if unet else "lora_te")}


@torch.no_grad()
def extract_lora(module: nn.Module, rank: int, lora_type: str = "standard",
                 bias_diff: bool = True) -> dict[str, Tensor]:
    """The LoRA tensors (fp16) of `module`, a UNet or text encoder whose weights are differences."""
    if lora_type not in LORA_TYPES:
        raise ValueError(f"lora_type must be one of {', '.join(LORA_TYPES)}, not {lora_type!r}")
    tensors: dict[str, Tensor] = {}
    for path, name in _names(module).items():
        layer = module.get_submodule(path)
        weight = dequantized_weight(layer).detach()
        if not weight.any():
            pass
        elif weight.ndim >= 2 and lora_type == "standard":
            up, down = extract_pair(weight, rank)
            tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = up, down
        elif lora_type == "full_diff" or bias_diff:  # a whole difference (a standard file's norms: if asked)
            tensors[f"{name}.diff"] = weight
        bias = getattr(layer, "bias", None)
        if bias_diff and bias is not None and bias.any():
            tensors[f"{name}.diff_b"] = bias.detach()
    return {key: value.contiguous().to("cpu", torch.float16) for key, value in tensors.items()}
