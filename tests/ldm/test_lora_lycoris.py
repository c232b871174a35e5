"""LyCORIS files (LoCon with Tucker mid, LoHa, LoKr, full diffs, DoRA) and diffusers' older LoRA layouts.

Each kind's weight change is checked against the LyCORIS library's own functions (lycoris-lora, the
reference implementation of these formats) on the same tensors; DoRA's strength blend against ComfyUI's rule.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from ldm.lora import (
    FullWeight,
    LohaWeight,
    LokrWeight,
    LoraError,
    LoraWeight,
    apply_lora,
    load_lora,
    lora_family,
    match_lora,
    peek_lora,
    unmatched_lora_keys,
)
from ldm.presets import PRESETS, randomize_
from ldm.text_encoders import build_text_encoder, random_text_encoder_config
from ldm.unet import UNetModel

lycoris = pytest.importorskip("lycoris.functional")

CONV = "input_blocks.1.0.in_layers.2"  # a 3x3 conv, 32 -> 32 channels
LINEAR = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # 32 -> 32, no bias
FF_OUT = "input_blocks.1.1.transformer_blocks.0.ff.net.2"  # 128 -> 32, with bias
NORM = "input_blocks.1.0.in_layers.0"  # GroupNorm(32, 32)
KOHYA = {path: "lora_unet_" + path.replace(".", "_") for path in (CONV, LINEAR, FF_OUT, NORM)}


@pytest.fixture(scope="module")
def unet() -> UNetModel:
    return randomize_(UNetModel(PRESETS["tiny-sd1"][2]), torch.Generator().manual_seed(0)).eval()


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))) * 0.1


def _write(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "lycoris.safetensors"
    safetensors.torch.save_file(tensors, path)
    return path


def _patched_weight(unet, tmp_path, tensors, path, strength=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    patched = apply_lora(unet, load_lora(_write(tmp_path, tensors)), strength)
    return unet.get_submodule(path).weight.detach(), patched.get_submodule(path).weight.detach()


def test_locon_with_a_tucker_mid_matches_lycoris(unet, tmp_path):
    rank, alpha = 4, 2.0
    down, mid, up = _randn(rank, 32, 1, 1), _randn(rank, rank, 3, 3, seed=1), _randn(32, rank, 1, 1, seed=2)
    name = KOHYA[CONV]
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up,
               f"{name}.alpha": torch.tensor(alpha)}
    base, patched = _patched_weight(unet, tmp_path, tensors, CONV, strength=0.7)
    expected = lycoris.locon.diff_weight(down, up, mid, gamma=alpha / rank, backend="torch")
    torch.testing.assert_close(patched, base + 0.7 * expected.reshape(base.shape), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_matches_lycoris_on_a_conv(unet, tmp_path, tucker):
    rank, alpha = 4, 3.0
    name = KOHYA[CONV]
    if tucker:  # factors [rank, dim] around [rank, rank, 3, 3] cores
        w = [_randn(rank, 32, seed=i) for i in range(4)]
        t1, t2 = _randn(rank, rank, 3, 3, seed=5), _randn(rank, rank, 3, 3, seed=6)
        tensors = {f"{name}.hada_t1": t1, f"{name}.hada_t2": t2}
    else:  # up [out, rank], down [rank, in*3*3]
        w = [_randn(32, rank, seed=0), _randn(rank, 32 * 9, seed=1), _randn(32, rank, seed=2),
             _randn(rank, 32 * 9, seed=3)]
        t1 = t2 = None
        tensors = {}
    tensors |= {f"{name}.hada_w1_a": w[0], f"{name}.hada_w1_b": w[1], f"{name}.hada_w2_a": w[2],
                f"{name}.hada_w2_b": w[3], f"{name}.alpha": torch.tensor(alpha)}
    base, patched = _patched_weight(unet, tmp_path, tensors, CONV)
    # LyCORIS's argument order: (w1 down, w1 up, w2 down, w2 up, t1, t2)
    expected = lycoris.loha.diff_weight(w[1], w[0], w[3], w[2], t1, t2, gamma=alpha / rank, backend="torch")
    torch.testing.assert_close(patched, base + expected.reshape(base.shape), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["w1 whole, w2 low-rank", "both low-rank", "both whole", "w2 tucker conv",
                                    "w2 whole conv"])
def test_lokr_matches_lycoris(unet, tmp_path, layout):
    rank, alpha = 2, 4.0
    conv = "conv" in layout
    path = CONV if conv else FF_OUT  # FF_OUT: 32 out = 4 * 8, 128 in = 8 * 16
    name = KOHYA[path]
    w1 = w1a = w1b = w2 = w2a = w2b = t2 = None
    if conv:
        w1 = _randn(4, 4)
        if "tucker" in layout:
            w2a, w2b, t2 = _randn(rank, 8, seed=1), _randn(rank, 8, seed=2), _randn(rank, rank, 3, 3, seed=3)
        else:
            w2 = _randn(8, 8, 3, 3, seed=1)
    else:
        if layout.startswith("w1 whole") or layout == "both whole":
            w1 = _randn(4, 8)
        else:
            w1a, w1b = _randn(4, rank, seed=1), _randn(rank, 8, seed=2)
        if layout == "both whole":
            w2 = _randn(8, 16, seed=3)
        else:
            w2a, w2b = _randn(8, rank, seed=4), _randn(rank, 16, seed=5)
    parts = {"lokr_w1": w1, "lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2": w2, "lokr_w2_a": w2a, "lokr_w2_b": w2b,
             "lokr_t2": t2}
    tensors = {f"{name}.{part}": t for part, t in parts.items() if t is not None} | {f"{name}.alpha":
                                                                                      torch.tensor(alpha)}
    base, patched = _patched_weight(unet, tmp_path, tensors, path)
    # LyCORIS scales by gamma / rank when a factor is low-rank; a file of whole factors is applied at scale 1.
    gamma = alpha if (w1a is not None or w2a is not None) else 1.0
    if t2 is not None:  # the trained scale, alpha / rank (ComfyUI's); lycoris.functional divides by w2a.shape[1]
        gamma *= w2a.shape[1] / rank
    expected = lycoris.lokr.diff_weight(w1, w1a, w1b, w2, w2a, w2b, t2, gamma=gamma, backend="torch")
    torch.testing.assert_close(patched, base + expected.reshape(base.shape), atol=1e-6, rtol=1e-5)


def test_full_weight_and_bias_differences_and_norm_layers(unet, tmp_path):
    diff, diff_b = _randn(32, 128), _randn(32, seed=1)
    w_norm, b_norm = _randn(32, seed=2), _randn(32, seed=3)
    tensors = {f"{KOHYA[FF_OUT]}.diff": diff, f"{KOHYA[FF_OUT]}.diff_b": diff_b,
               f"{KOHYA[NORM]}.w_norm": w_norm, f"{KOHYA[NORM]}.b_norm": b_norm}
    patched = apply_lora(unet, load_lora(_write(tmp_path, tensors)), 0.5)
    for path, (dw, db) in {FF_OUT: (diff, diff_b), NORM: (w_norm, b_norm)}.items():
        old, new = unet.get_submodule(path), patched.get_submodule(path)
        torch.testing.assert_close(new.weight, old.weight + 0.5 * dw)
        torch.testing.assert_close(new.bias, old.bias + 0.5 * db)
    assert unet.get_submodule(FF_OUT).bias is not patched.get_submodule(FF_OUT).bias  # the base is untouched


def test_dora_on_the_output_axis_matches_lycoris_and_strength_blends_as_comfyui(unet, tmp_path):
    rank, alpha = 4, 4.0
    name = KOHYA[FF_OUT]
    down, up = _randn(rank, 128), _randn(32, rank, seed=1)
    magnitude = torch.rand(32, 1, generator=torch.Generator().manual_seed(2)) + 0.5
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha),
               f"{name}.dora_scale": magnitude}
    base, full = _patched_weight(unet, tmp_path, tensors, FF_OUT)
    merged = base + lycoris.locon.diff_weight(down, up, None, gamma=alpha / rank, backend="torch")
    expected = lycoris.general.weight_decompose(merged, magnitude, 1.0, wd_on_out=True, backend="torch")
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full.norm(dim=1, keepdim=True), magnitude, atol=1e-5, rtol=1e-4)
    _, half = _patched_weight(unet, tmp_path, tensors, FF_OUT, strength=0.5)
    torch.testing.assert_close(half, base + 0.5 * (full - base), atol=1e-6, rtol=1e-5)  # ComfyUI's blend


def test_dora_on_the_input_axis(unet, tmp_path):
    name = KOHYA[FF_OUT]
    down, up = _randn(4, 128), _randn(32, 4, seed=1)
    magnitude = torch.rand(1, 128, generator=torch.Generator().manual_seed(2)) + 0.5  # kohya's [1, in]
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.dora_scale": magnitude}
    base, patched = _patched_weight(unet, tmp_path, tensors, FF_OUT)
    merged = base + up @ down
    expected = lycoris.general.weight_decompose(merged, magnitude, 1.0, wd_on_out=False, backend="torch")
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(patched.norm(dim=0, keepdim=True), magnitude, atol=1e-5, rtol=1e-4)


def test_diffusers_attention_processor_and_text_encoder_layouts(unet, tmp_path):
    """diffusers' older LoRA files: `attn1.processor.to_q_lora.up.weight`, `to_out_lora` for `to_out.0`, and the
    text encoder's `lora_linear_layer`; PEFT files without the `unet.` prefix."""
    g = torch.Generator().manual_seed(4)
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0."
    tensors = {}
    for name in (prefix + "attn1.processor.to_q_lora", prefix + "attn2.processor.to_out_lora"):
        tensors |= {f"{name}.down.weight": torch.randn(4, 32, generator=g),
                    f"{name}.up.weight": torch.randn(32, 4, generator=g)}
    tensors["down_blocks.0.attentions.0.proj_in.lora_A.weight"] = torch.randn(4, 32, generator=g)
    tensors["down_blocks.0.attentions.0.proj_in.lora_B.weight"] = torch.randn(32, 4, generator=g)
    encoder = build_text_encoder(random_text_encoder_config("tiny-sd1"))
    encoder.init_random_weights(0)
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
    tensors |= {f"{te}.down.weight": torch.randn(4, 32, generator=g),
                f"{te}.up.weight": torch.randn(32, 4, generator=g)}
    lora = load_lora(_write(tmp_path, tensors))
    assert not lora.unknown_keys
    matched = match_lora(unet, lora)
    assert set(matched) == {LINEAR, "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0", "input_blocks.1.1.proj_in"}
    assert unmatched_lora_keys(lora, unet) == [f"{te}.down.weight", f"{te}.up.weight"]
    assert unmatched_lora_keys(lora, unet, encoder) == []
    q_proj = "encoders.clip_l.text_model.encoder.layers.0.self_attn.q_proj"
    torch.testing.assert_close(apply_lora(encoder, lora).get_submodule(q_proj).weight,
                               encoder.get_submodule(q_proj).weight + tensors[f"{te}.up.weight"]
                               @ tensors[f"{te}.down.weight"])


def test_family_and_shapes_from_the_header_alone(tmp_path):
    """A LoHa's family shows in its attn2.to_k input width (768: SD1) without reading the tensors."""
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    tensors = {f"{name}.hada_w1_a": _randn(320, 4), f"{name}.hada_w1_b": _randn(4, 768), f"{name}.hada_w2_a":
               _randn(320, 4), f"{name}.hada_w2_b": _randn(4, 768), f"{name}.alpha": torch.tensor(1.0)}
    peeked = peek_lora(_write(tmp_path, tensors))
    assert isinstance(peeked.weights[name], LohaWeight)
    assert lora_family(peeked) == "sd1"


def test_kinds_are_recognised_and_a_mismatch_is_named(unet, tmp_path):
    name = KOHYA[LINEAR]
    tensors = {f"{name}.lokr_w1": _randn(4, 4), f"{name}.lokr_w2": _randn(8, 16)}  # 32 x 64, the layer is 32 x 32
    lora = load_lora(_write(tmp_path, tensors))
    assert isinstance(lora.weights[name], LokrWeight)
    with pytest.raises(LoraError, match=r"\[32 out, 64 in\], model \(32, 32\)"):
        apply_lora(unet, lora)
    bad_dora = {f"{name}.lora_down.weight": _randn(4, 32), f"{name}.lora_up.weight": _randn(32, 4),
                f"{name}.dora_scale": _randn(1, 16)}
    with pytest.raises(LoraError, match=r"DoRA magnitudes \(1, 16\), model \(32, 32\)"):
        apply_lora(unet, load_lora(_write(tmp_path, bad_dora)))
    lone = {f"{name}.hada_w1_a": _randn(32, 4)}  # half a LoHa: reported, not applied
    assert load_lora(_write(tmp_path, lone | {f"{KOHYA[FF_OUT]}.diff": _randn(32, 128)})).unknown_keys == [
        f"{name}.hada_w1_a"]
    assert isinstance(load_lora(_write(tmp_path, {f"{name}.diff": _randn(32, 32)})).weights[name], FullWeight)
    pair = {f"{name}.lora_down.weight": _randn(4, 32), f"{name}.lora_up.weight": _randn(32, 4)}
    assert isinstance(load_lora(_write(tmp_path, pair)).weights[name], LoraWeight)


def test_malformed_and_incomplete_files_are_named_clearly(unet, tmp_path):
    name = KOHYA[LINEAR]
    bad_rank = {f"{name}.hada_w1_a": _randn(32, 4), f"{name}.hada_w1_b": _randn(3, 32),  # rank 4 against 3
                f"{name}.hada_w2_a": _randn(32, 4), f"{name}.hada_w2_b": _randn(4, 32),
                f"{KOHYA[FF_OUT]}.lora_down.weight": _randn(4, 128), f"{KOHYA[FF_OUT]}.lora_up.weight": _randn(32, 4)}
    with pytest.raises(LoraError, match=r"1 of its 2 layers do not.*factors that do not fit together.*probably "
                                        r"damaged"):
        apply_lora(unet, load_lora(_write(tmp_path, bad_rank)))
    half = {f"{name}.hada_w1_a": _randn(32, 4), f"{name}.hada_w1_b": _randn(4, 32),
            f"{KOHYA[FF_OUT]}.diff": _randn(32, 128)}
    lora = load_lora(_write(tmp_path, half))
    assert list(lora.incomplete) == [name] and "(only .hada_w1_a, .hada_w1_b)" in lora.incomplete_note()
    only_half = {k: v for k, v in half.items() if "hada" in k}
    with pytest.raises(LoraError, match=r"holds only incomplete or malformed LoRA weights, e.g. .*hada_w1_a"):
        load_lora(_write(tmp_path, only_half))
