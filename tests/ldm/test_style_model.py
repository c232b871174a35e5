"""The T2I-Adapter style model: a TencentARC-layout file read and run, checked against TencentARC's StyleAdapter
computation written out here step by step (its `forward`: style tokens appended to the CLIP tokens, ln_pre, CLIP
residual attention blocks in sequence-first layout with QuickGELU MLPs, ln_post of the style tokens, @ proj)."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from ldm.checkpoint import CheckpointError
from ldm.style_model import StyleAdapter, StyleAdapterConfig, load_style_model


def _file(path, width: int = 32, context_dim: int = 24, tokens: int = 8, layers: int = 3, seed: int = 0):
    """A random style model in TencentARC's layout: their initialisation of the tokens and projection (randn
    scaled by width^-0.5), every other weight random too; saved as they ship it (a pickled state dict)."""
    generator = torch.Generator().manual_seed(seed)
    model = StyleAdapter(StyleAdapterConfig(width, context_dim, layers, tokens))
    sd = {}
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        norm = ".ln_" in f".{name}" and name.endswith("weight")  # a LayerNorm's scale
        sd[name] = 1 + 0.1 * noise if norm else noise * (width**-0.5 if name in ("style_embedding", "proj") else 0.1)
    torch.save(sd, path)
    return sd


def _tencentarc(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int = 8) -> torch.Tensor:
    """StyleAdapter.forward of TencentARC/T2I-Adapter (ldm/modules/encoders/adapter.py), op by op."""
    width = x.shape[-1]
    tokens = sd["style_embedding"].shape[1]
    x = torch.cat([x, sd["style_embedding"] + torch.zeros(x.shape[0], tokens, width)], dim=1)
    x = F.layer_norm(x, (width,), sd["ln_pre.weight"], sd["ln_pre.bias"])
    x = x.permute(1, 0, 2)  # NLD -> LND, as nn.MultiheadAttention's default layout wants
    layers = len({k.split(".")[1] for k in sd if k.startswith("transformer_layes.")})
    for i in range(layers):
        p = f"transformer_layes.{i}."
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        length, batch, dim = q.shape[0], q.shape[1], width // heads
        q, k, v = (t.reshape(length, batch * heads, dim).transpose(0, 1) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim), dim=-1)
        attended = (weights @ v).transpose(0, 1).reshape(length, batch, width)
        x = x + F.linear(attended, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)
    x = F.layer_norm(x[:, -tokens:, :], (width,), sd["ln_post.weight"], sd["ln_post.bias"])
    return x @ sd["proj"]


def test_the_style_tokens_are_tencentarcs_computation(tmp_path):
    sd = _file(tmp_path / "t2iadapter_style_tiny.pth")
    loaded = load_style_model(tmp_path / "t2iadapter_style_tiny.pth")
    assert loaded.unused_keys == []
    assert loaded.model.config == StyleAdapterConfig(width=32, context_dim=24, layers=3, tokens=8)
    hidden = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(1))  # a ViT's 16 patches + class
    with torch.no_grad():
        ours = loaded.model(hidden)
    expected = _tencentarc(sd, hidden)
    assert ours.shape == (2, 8, 24)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the tokens depend on the image


def test_other_files_and_other_widths_are_refused_by_name(tmp_path):
    safetensors.torch.save_file({"redux_up.weight": torch.zeros(4, 4)}, tmp_path / "flux1-redux-dev.safetensors")
    with pytest.raises(CheckpointError, match="redux-dev.safetensors: incomplete Flux Redux model: no redux_up.bias"):
        load_style_model(tmp_path / "flux1-redux-dev.safetensors")
    safetensors.torch.save_file({"conv_in.weight": torch.zeros(4, 4)}, tmp_path / "t2iadapter_canny.safetensors")
    with pytest.raises(CheckpointError, match="t2iadapter_canny.safetensors: not a style model this engine knows"):
        load_style_model(tmp_path / "t2iadapter_canny.safetensors")
    sd = _file(tmp_path / "style.pth")
    torch.save({k: v for k, v in sd.items() if "transformer_layes.2.mlp" not in k}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="cut.pth: the style model is missing"):
        load_style_model(tmp_path / "cut.pth")
    model = load_style_model(tmp_path / "style.pth").model
    with pytest.raises(ValueError, match="takes a 32-wide CLIP vision output .* given a 48-wide one"):
        model(torch.zeros(1, 17, 48))
