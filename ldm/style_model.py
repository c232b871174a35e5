"""The T2I-Adapter style model (Mou et al. 2023, "T2I-Adapter", section 3.3): an image prompt as extra tokens.

TencentARC's `StyleAdapter` (t2iadapter_style_sd14v1, and CoAdapter's coadapter-style-sd15v1): learnt style
tokens are appended to a CLIP ViT-L/14's last hidden state (all its tokens, before the final LayerNorm), a few
CLIP-style transformer blocks (pre-LayerNorm, QuickGELU) run over the whole sequence, and the style tokens'
outputs, normalised and projected to the text encoder's width, are appended to the prompt's embedding. Module
names follow the file's keys (`transformer_layes` sic). The head count is not in the weights: the released
models use 8.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _indices, _materialize, load_state_dict

HEADS = 8


@dataclass(frozen=True)
class StyleAdapterConfig:
    width: int  # the CLIP vision tower's (1024: ViT-L/14)
    context_dim: int  # the text encoder's (768: SD1)
    layers: int = 3
    tokens: int = 8
    heads: int = HEADS


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """CLIP's transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class StyleAdapter(nn.Module):
    def __init__(self, config: StyleAdapterConfig) -> None:
        super().__init__()
        self.config = c = config
        self.style_embedding = nn.Parameter(torch.zeros(1, c.tokens, c.width))
        self.transformer_layes = nn.Sequential(*[ResidualAttentionBlock(c.width, c.heads) for _ in range(c.layers)])
        self.ln_pre = nn.LayerNorm(c.width)
        self.ln_post = nn.LayerNorm(c.width)
        self.proj = nn.Parameter(torch.zeros(c.width, c.context_dim))

    def forward(self, hidden: Tensor) -> Tensor:
        """A CLIP vision tower's last hidden state [B, tokens, width] -> style tokens [B, tokens, context_dim]."""
        if hidden.shape[-1] != self.config.width:
            raise ValueError(f"the style model takes a {self.config.width}-wide CLIP vision output (ViT-L/14's is "
                             f"1024) and was given a {hidden.shape[-1]}-wide one: encode the image with the CLIP "
                             "vision model it was trained with")
        dtype = self.proj.dtype
        style = self.style_embedding.expand(hidden.shape[0], -1, -1)
        x = self.ln_pre(torch.cat([hidden.to(dtype), style], dim=1))
        x = self.transformer_layes(x)
        return self.ln_post(x[:, -self.config.tokens:]) @ self.proj


@dataclass
class LoadedStyleModel:
    model: nn.Module  # a StyleAdapter, or an ldm.flux_redux.ReduxImageEncoder
    unused_keys: list[str]
    path: Path


def style_adapter_config(sd: StateDict) -> StyleAdapterConfig:
    _, tokens, width = sd["style_embedding"].shape
    return StyleAdapterConfig(width=width, context_dim=sd["proj"].shape[1], tokens=tokens,
                              layers=len(_indices(list(sd), r"transformer_layes\.(\d+)\.")))


def load_style_model(path: str | Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> LoadedStyleModel:
    """A style model file (TencentARC's `.pth`, or the same keys in safetensors; Flux Redux's, `ldm.flux_redux`);
    another kind of file raises CheckpointError saying what it is."""
    from ldm.flux_redux import is_redux, load_redux

    path = Path(path)
    sd = load_state_dict(path)
    if is_redux(sd):
        return LoadedStyleModel(*load_redux(sd, path, device, dtype), path)
    if "style_embedding" not in sd:
        raise CheckpointError(f"{path.name}: not a style model this engine knows: no style_embedding weight (the "
                              "T2I-Adapter style model, t2iadapter_style_sd14v1 or coadapter-style-sd15v1, has one) "
                              "nor redux_up (Flux Redux's)")
    try:
        config = style_adapter_config(sd)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path.name}: incomplete T2I-Adapter style model ({e})") from None
    model = _materialize(lambda: StyleAdapter(config), sd, "style model", path, device, dtype)
    expected = model.state_dict().keys()
    return LoadedStyleModel(model, sorted(k for k in sd if k not in expected), path)
