"""fp8 weights for the T5 family's encoders (Flux's and SD3's T5-XXL, Wan's UMT5-XXL): they encode, near the
full-precision result, with the feed-forward output layer kept in full precision as transformers keeps it."""

from __future__ import annotations

import torch

from ldm.quant import is_fp8, quantize_fp8_
from ldm.umt5 import load_wan_text_encoder, write_tiny_umt5


def test_fp8_umt5_encodes_near_its_full_precision_result(tmp_path) -> None:
    path = write_tiny_umt5(tmp_path / "umt5.safetensors")
    encoder = load_wan_text_encoder([path], dtype=torch.bfloat16).encoder
    reference = encoder.encode(["a fox running through snow"]).cond.float()
    quantize_fp8_(encoder)
    layers = dict(encoder.named_modules())
    assert any(is_fp8(layer) for name, layer in layers.items() if name.endswith("DenseReluDense.wi_0"))
    assert not any(is_fp8(layer) for name, layer in layers.items() if name.endswith("DenseReluDense.wo"))
    out = encoder.encode(["a fox running through snow"]).cond.float()
    assert out.shape == reference.shape and torch.isfinite(out).all()
    # fp8 keeps about 2 significant digits of each random weight: the states move by a few percent of their scale
    assert (out - reference).norm() / reference.norm() < 0.1
