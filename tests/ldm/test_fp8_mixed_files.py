"""ComfyUI's "mixed precision" fp8 files (each quantized layer's `.weight_scale` beside a `.comfy_quant` format tag,
the other layers in bf16), as Comfy-Org's newer *_fp8mixed files hold them: every transformer loader descales them
as it does the older "scaled fp8" spelling (`.scale_weight`). They loaded with the raw fp8 values as weights before,
off by the scale (up to ~1500x), with only an "unused keys" warning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.checkpoint import CheckpointError
from ldm.qwen_image_files import load_qwen_image_unet, write_tiny_qwen_image
from ldm.t5 import descaled_fp8, scaling_keys


def _tag(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def _quantized(sd: dict[str, torch.Tensor], per_row: bool = False) -> dict[str, torch.Tensor]:
    """`sd` with its block matrices in fp8 e4m3 and their scales and tags, the rest as it was."""
    out = {}
    for key, value in sd.items():
        if key.startswith("transformer_blocks.") and key.endswith(".weight") and value.ndim == 2:
            peak = value.float().abs().amax(dim=1) if per_row else value.float().abs().max()
            scale = (peak / 448).clamp_min(1e-12)
            out[key] = (value.float() / (scale[:, None] if per_row else scale)).to(torch.float8_e4m3fn)
            out[key.removesuffix("weight") + "weight_scale"] = scale
            out[key.removesuffix("weight") + "comfy_quant"] = _tag("float8_e4m3fn")
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("per_row", [False, True])
def test_a_mixed_precision_qwen_image_file_loads_descaled(tmp_path, per_row) -> None:
    source = write_tiny_qwen_image(tmp_path / "q.safetensors", seed=1, dtype=torch.float32)
    mixed = tmp_path / "q_fp8mixed.safetensors"
    with safe_open(str(source), "pt") as f:
        save_file(_quantized(load_file(source), per_row), mixed, f.metadata())
    got = load_qwen_image_unet(mixed, dtype=torch.float32)
    want = load_qwen_image_unet(source, dtype=torch.float32).unet.state_dict()
    key = "transformer_blocks.0.attn.to_q.weight"
    weights = got.unet.state_dict()
    assert (weights[key] - want[key]).abs().max() <= want[key].abs().max() / 8  # fp8's 3-bit mantissa, not 447x off
    torch.testing.assert_close(weights[key], want[key], rtol=0.07, atol=want[key].abs().max().item() / 32)
    assert not [k for k in got.unused_keys if k.endswith(("weight_scale", "comfy_quant"))]


def test_packed_formats_are_refused_by_name() -> None:
    sd = {"a.weight": torch.zeros(4, 4, dtype=torch.uint8), "a.weight_scale": torch.ones(()),
          "a.comfy_quant": _tag("nvfp4")}
    with pytest.raises(CheckpointError, match="a is quantized as nvfp4, which Loom cannot read"):
        descaled_fp8(sd)


def test_scaling_keys_cover_both_spellings() -> None:
    sd = {"a.weight": torch.zeros(1), "a.weight_scale": torch.ones(()), "a.input_scale": torch.ones(()),
          "a.comfy_quant": _tag("float8_e4m3fn"), "b.weight": torch.zeros(1), "b.scale_weight": torch.ones(()),
          "b.scale_input": torch.ones(()), "scaled_fp8": torch.zeros(0)}
    assert scaling_keys(sd) == set(sd) - {"a.weight", "b.weight"}
