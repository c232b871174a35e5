"""LoRA extraction (ComfyUI's LoraSave) from a model difference: a LoRA applied and then extracted again."""

from __future__ import annotations

import torch

from ldm.lora import Lora, LoraWeight, apply_lora, lora_from_state_dict
from ldm.lora_extract import extract_lora, extract_pair
from ldm.merge import subtract
from ldm.presets import PRESETS, randomize_
from ldm.unet import UNetModel

CONFIG = PRESETS["tiny-sd1"][2]
Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32
CONV = "input_blocks.1.0.in_layers.2"  # Conv 3x3 32 -> 32


def test_a_low_rank_difference_comes_back_as_its_pair():
    """At a fine-tune's scale (small differences, so that `up`'s entries are no larger than `down`'s), the clamp
    to the pair's 99th percentile costs little."""
    g = torch.Generator().manual_seed(0)
    diff = torch.randn(32, 3, generator=g) @ torch.randn(3, 32 * 9, generator=g) * 1e-3
    up, down = extract_pair(diff.reshape(32, 32, 3, 3), rank=8)
    assert up.shape == (32, 8, 1, 1) and down.shape == (8, 32, 3, 3)
    rebuilt = up.flatten(1) @ down.flatten(1)
    # Rank 3 within rank 8: exact but for the clamp of the pair's largest 1% of entries.
    assert ((rebuilt - diff).norm() / diff.norm()) < 0.1
    assert torch.linalg.matrix_rank(rebuilt, rtol=1e-4) == 3


def test_extracting_a_fine_tune_gives_a_lora_that_remakes_it():
    base = randomize_(UNetModel(CONFIG), torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    lora = Lora({f"diffusion_model.{Q}": LoraWeight(torch.randn(2, 32, generator=g) * 0.03,
                                                    torch.randn(32, 2, generator=g) * 0.03),
                 f"diffusion_model.{CONV}": LoraWeight(torch.randn(2, 32, 3, 3, generator=g) * 0.03,
                                                       torch.randn(32, 2, 1, 1, generator=g) * 0.03)})
    tuned = apply_lora(base, lora)
    diff = subtract(tuned, base)
    standard = extract_lora(diff, rank=4)
    assert sorted(standard) == sorted(f"diffusion_model.{p}.lora_{s}.weight" for p in (Q, CONV) for s in ("up", "down"))
    remade = apply_lora(base, lora_from_state_dict(standard))
    for path in (Q, CONV):
        target, got = tuned.get_submodule(path).weight, remade.get_submodule(path).weight
        change = target - base.get_submodule(path).weight
        assert ((got - target).norm() / change.norm()) < 0.15  # the quantile clamp, and fp16
    full = extract_lora(diff, rank=4, lora_type="full_diff")
    assert sorted(full) == sorted(f"diffusion_model.{p}.diff" for p in (Q, CONV))
    exact = apply_lora(base, lora_from_state_dict(full))
    torch.testing.assert_close(exact.get_submodule(Q).weight, tuned.get_submodule(Q).weight, atol=1e-4, rtol=1e-3)
