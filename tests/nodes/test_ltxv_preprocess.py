"""LTXVPreprocess: each picture through a one-frame H.264 video (libx264 at the given CRF) and back, as LTX-Video's
start frames looked in training; its declaration is ComfyUI's."""

from __future__ import annotations

import torch

from nodes.registry import builtin_registry
from nodes.sd.ltxv import LTXVPreprocess


def _pictures() -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, 65), torch.linspace(0, 1, 97), indexing="ij")
    first = torch.stack([x, y, 0.5 + 0.4 * torch.sin(12 * x * y)], -1)
    return torch.stack([first, first.flip(1)])


def test_declaration_is_comfyuis() -> None:
    info = builtin_registry().get("LTXVPreprocess").object_info()
    assert info["display_name"] == "LTXV Preprocess" and info["category"] == "video/preprocessors"
    compression = info["input"]["required"]["img_compression"][1]
    assert (compression["default"], compression["min"], compression["max"]) == (35, 0, 100)
    assert info["output"] == ["IMAGE"] and info["output_name"] == ["output_image"]


def test_pictures_come_back_as_decoded_video_frames() -> None:
    pictures = _pictures()
    node = LTXVPreprocess.__new__(LTXVPreprocess)
    (light,) = node.execute(pictures, 5)
    (heavy,) = node.execute(pictures, 45)
    assert light.shape == heavy.shape == (2, 64, 96, 3)  # sides cut to even numbers for 4:2:0 colour
    assert torch.allclose((light * 255).round(), light * 255, atol=1e-3)  # 8-bit levels, as decoded
    target = pictures[:, :64, :96]
    light_error, heavy_error = (light - target).abs().mean(), (heavy - target).abs().mean()
    assert 0 < light_error < heavy_error < 0.1  # more compression, further from the picture; still the picture
    assert torch.equal(node.execute(pictures, 45)[0], heavy)  # the encoder is deterministic
    assert node.execute(pictures, 0)[0] is pictures  # 0: untouched, as ComfyUI
