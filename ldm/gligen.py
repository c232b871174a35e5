"""GLIGEN (Li et al. 2023): grounding tokens from (phrase, box) pairs, and the gated self-attention that feeds them
to the UNet's transformer blocks.

A GLIGEN file in ComfyUI's layout (models/gligen, e.g. gligen_sd14_textbox_pruned.safetensors) holds one "fuser"
per UNet transformer block, keyed `input_blocks.N.1.transformer_blocks.K.fuser.*` (and `middle_block.1...`,
`output_blocks.N.1...`), and the `position_net.*` that turns each phrase's pooled text embedding and its box
(Fourier features) into a grounding token. Up to 30 objects; the unused slots are null objects, masked out to the
position net's learnt null features. A grounded UNet is a shallow copy whose transformer blocks run their fuser
after self-attention, before cross-attention: `x += tanh(alpha_attn) * attn(norm1([x, objs]))[:, :n]`, then
`x += tanh(alpha_dense) * ff(norm2(x))`, for the whole run.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.attention import BasicTransformerBlock, FeedForward, attention
from ldm.lora import shallow_copy

MAX_OBJECTS = 30
FOURIER_FREQS = 8
_FUSER = re.compile(r"^((?:input_blocks|output_blocks)\.\d+|middle_block)"
                    r"\.(\d+\.transformer_blocks\.\d+)\.fuser\.(.+)$")

# One grounded phrase as GLIGENTextboxApply stores it: (pooled text embedding [1, D] or [D], and the box's
# height, width, top and left in latent pixels, image pixels // 8).
Phrase = tuple[Tensor, float, float, float, float]


class GligenError(ValueError):
    """A GLIGEN file that is not one, or one that does not fit the model or the prompt it is used with."""


def fourier_features(boxes: Tensor, freqs: int = FOURIER_FREQS, temperature: float = 100.0) -> Tensor:
    """[B, N, 4] boxes -> [B, N, freqs * 8]: per frequency, the sines of the four coordinates, then their cosines."""
    bands = temperature ** (torch.arange(freqs, device=boxes.device, dtype=boxes.dtype) / freqs)
    angles = bands[:, None] * boxes[..., None, :]  # [B, N, freqs, 4]
    return torch.stack([angles.sin(), angles.cos()], dim=-2).flatten(-3)


class PositionNet(nn.Module):
    """GLIGEN's text-box grounding tokenizer: MLP(phrase embedding, Fourier features of the box), with learnt null
    features standing in for both where an object slot is empty."""

    def __init__(self, in_dim: int, out_dim: int, freqs: int = FOURIER_FREQS):
        super().__init__()
        self.freqs = freqs
        position_dim = freqs * 2 * 4
        self.linears = nn.Sequential(nn.Linear(in_dim + position_dim, 512), nn.SiLU(), nn.Linear(512, 512),
                                     nn.SiLU(), nn.Linear(512, out_dim))
        self.null_positive_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(position_dim))

    def forward(self, embeddings: Tensor, boxes: Tensor, masks: Tensor) -> Tensor:
        """`embeddings` [B, N, in_dim], `boxes` [B, N, 4] (x1, y1, x2, y2 as fractions), `masks` [B, N] (1: an
        object) -> grounding tokens [B, N, out_dim]."""
        masks = masks[..., None]
        position = torch.lerp(self.null_position_feature, fourier_features(boxes, self.freqs), masks)
        positive = torch.lerp(self.null_positive_feature, embeddings, masks)
        return self.linears(torch.cat([positive, position], dim=-1))


class GatedSelfAttention(nn.Module):
    """A fuser: self-attention over the visual tokens and the grounding tokens together, kept for the visual ones,
    and a feed-forward, each added through a tanh gate. Its heads are those of the block it is put in."""

    def __init__(self, query_dim: int, context_dim: int):
        super().__init__()
        self.linear = nn.Linear(context_dim, query_dim)
        self.attn = nn.Module()
        for name in ("to_q", "to_k", "to_v"):
            setattr(self.attn, name, nn.Linear(query_dim, query_dim, bias=False))
        self.attn.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))
        self.ff = FeedForward(query_dim)
        self.norm1 = nn.LayerNorm(query_dim)
        self.norm2 = nn.LayerNorm(query_dim)
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_dense = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, objs: Tensor, heads: int) -> Tensor:
        n = x.shape[1]
        objs = self.linear(objs.to(x.dtype)).expand(x.shape[0], -1, -1)
        h = self.norm1(torch.cat([x, objs], dim=1))
        a = self.attn
        out = a.to_out(attention(a.to_q(h), a.to_k(h), a.to_v(h), heads))[:, :n]
        x = x + torch.tanh(self.alpha_attn) * out
        return x + torch.tanh(self.alpha_dense) * self.ff(self.norm2(x))


class Gligen(nn.Module):
    """A loaded GLIGEN: its position net, and its fusers with the names of the UNet blocks they belong to
    (`input_blocks.1.1.transformer_blocks.0`, ...)."""

    def __init__(self, position_net: PositionNet, fusers: dict[str, GatedSelfAttention]):
        super().__init__()
        self.position_net = position_net
        self.block_names = tuple(fusers)
        self.fusers = nn.ModuleList(fusers.values())

    @property
    def phrase_dim(self) -> int:
        """Width of the pooled phrase embedding the position net takes."""
        return self.position_net.null_positive_feature.shape[0]

    def tokens(self, phrases: Sequence[Phrase], height: int, width: int) -> Tensor:
        """The grounding tokens [1, 30, D] of `phrases` for a latent (or latent area) of `height` x `width`;
        the slots past the phrases are null objects."""
        if len(phrases) > MAX_OBJECTS:
            raise GligenError(f"GLIGEN grounds at most {MAX_OBJECTS} boxes per prompt; this one has {len(phrases)}")
        weight = self.position_net.null_positive_feature
        embeddings = torch.zeros(1, MAX_OBJECTS, self.phrase_dim, device=weight.device, dtype=weight.dtype)
        boxes = torch.zeros(1, MAX_OBJECTS, 4, device=weight.device, dtype=weight.dtype)
        masks = torch.zeros(1, MAX_OBJECTS, device=weight.device, dtype=weight.dtype)
        for i, (pooled, h, w, top, left) in enumerate(phrases):
            pooled = pooled.reshape(-1)
            if pooled.shape[0] != self.phrase_dim:
                raise GligenError(f"a phrase embedding is {pooled.shape[0]} wide; this GLIGEN model takes "
                                  f"{self.phrase_dim} (the text encoder does not fit it)")
            embeddings[0, i] = pooled.to(weight)
            boxes[0, i] = torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height])
            masks[0, i] = 1.0
        return self.position_net(embeddings, boxes, masks)


def load_gligen(state: dict[str, Tensor]) -> Gligen:
    """A GLIGEN model from a state dict in ComfyUI's layout (see the module docstring)."""
    if "position_net.null_positive_feature" not in state or "position_net.linears.4.weight" not in state:
        raise GligenError("not a GLIGEN text-box model: no position_net.* weights")
    by_block: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if (m := _FUSER.match(key)) is not None:
            by_block.setdefault(f"{m[1]}.{m[2]}", {})[m[3]] = value
    if not by_block:
        raise GligenError("not a GLIGEN model: no transformer_blocks.*.fuser.* weights")
    fusers = {}
    for name, weights in by_block.items():
        if "linear.weight" not in weights:
            raise GligenError(f"GLIGEN fuser {name} has no linear.weight")
        fuser = GatedSelfAttention(*weights["linear.weight"].shape)
        missing, unexpected = fuser.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise GligenError(f"GLIGEN fuser {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        fusers[name] = fuser
    position_net = PositionNet(state["position_net.null_positive_feature"].shape[0],
                               state["position_net.linears.4.weight"].shape[0])
    missing, unexpected = position_net.load_state_dict(
        {k.removeprefix("position_net."): v for k, v in state.items() if k.startswith("position_net.")}, strict=False)
    if missing or unexpected:
        raise GligenError(f"GLIGEN position net: missing {missing[:3]}, unexpected {unexpected[:3]} (only text-box "
                          "models are supported)")
    return Gligen(position_net, fusers).eval()


def load_gligen_file(path: str | Path) -> Gligen:
    from ldm.checkpoint import load_state_dict

    return load_gligen(load_state_dict(path))


def grounded_unet(unet: nn.Module, gligen: Gligen, phrases: Sequence[Phrase], height: int, width: int) -> nn.Module:
    """A copy of `unet` whose transformer blocks run their GLIGEN fuser, with the grounding tokens of `phrases`
    for a latent (area) of `height` x `width`, after self-attention. The GLIGEN weights move to the UNet's
    device and are held by the copy; in another dtype than the UNet's, the copy holds a converted copy of them,
    so that the loaded (cached) model stays as it was loaded."""
    blocks = {name: m for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}
    if set(blocks) != set(gligen.block_names):
        raise GligenError(f"this GLIGEN model has fusers for {len(gligen.block_names)} transformer blocks, and the "
                          f"model's UNet has {len(blocks)} others; it was made for another model")
    for name, fuser in zip(gligen.block_names, gligen.fusers, strict=True):
        width_here = blocks[name].norm1.normalized_shape[0]
        if fuser.linear.out_features != width_here:
            raise GligenError(f"this GLIGEN model is for a UNet {fuser.linear.out_features} wide at {name}; the "
                              f"model's is {width_here} (it was made for another model)")
    weight = unet.time_embed[0].weight
    gligen.to(weight.device)
    if next(gligen.parameters()).dtype != weight.dtype:
        gligen = copy.deepcopy(gligen).to(dtype=weight.dtype)
    with torch.no_grad():
        tokens = gligen.tokens(phrases, height, width)
    grounded = shallow_copy(unet)
    grounded.gligen = gligen  # a submodule: the copy's moves take the fusers along
    for name, fuser in zip(gligen.block_names, gligen.fusers, strict=True):
        block = grounded.get_submodule(name)
        block.fuser = functools.partial(fuser, objs=tokens, heads=block.attn1.heads)
    grounded.cuda_graphs_safe = False  # the tokens are per prompt; this copy runs eagerly
    return grounded
