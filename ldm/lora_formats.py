"""LoRA file formats: the patch kinds a LoRA file holds, their weight math, and reading a file into them.

Besides plain LoRA pairs (kohya's `lora_down`/`lora_up`, diffusers' and PEFT's `lora_A`/`lora_B` and their older
attention-processor and text-encoder layouts), the LyCORIS kinds people download are read as ComfyUI and the
LyCORIS library read them: LoCon (conv kernels, with an optional Tucker `lora_mid`), LoHa (Hadamard product of two
low-rank products), LoKr (Kronecker product), full-weight differences (`diff`, `diff_b`, `w_norm`, `b_norm`), each
optionally with DoRA's magnitude vector (`dora_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ldm.checkpoint import load_state_dict, read_shapes


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
