"""LoRA: name mapping (checked against diffusers), patching maths, no mutation of the base, family checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from ldm.lora import (
    LoraError,
    apply_lora,
    check_lora_family,
    diffusers_unet_blocks,
    diffusers_unet_name,
    load_lora,
    lora_family,
    unmatched_lora_keys,
)
from ldm.presets import PRESETS, randomize_
from ldm.unet import UNetModel
from tests.ldm.diffusers_reference import diffusers_unet


def _unet(preset: str) -> UNetModel:
    return randomize_(UNetModel(PRESETS[preset][2]), torch.Generator().manual_seed(0)).eval()


def _pair(target: torch.Tensor, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    down_shape = (rank, *target.shape[1:])
    up_shape = (target.shape[0], rank) + (1, 1) * (target.ndim == 4)
    return torch.randn(down_shape, generator=g), torch.randn(up_shape, generator=g)


def _write_lora(path: Path, model: nn.Module, names: dict[str, str], style: str, rank: int = 4,
                alpha: float | None = 2.0) -> Path:
    """A LoRA file patching model layers `names` (file name -> layer path) in the given key style."""
    g = torch.Generator().manual_seed(9)
    tensors = {}
    for file_name, layer in names.items():
        down, up = _pair(model.get_submodule(layer).weight, rank, g)
        if style == "kohya":
            tensors.update({f"{file_name}.lora_down.weight": down, f"{file_name}.lora_up.weight": up})
            if alpha is not None:
                tensors[f"{file_name}.alpha"] = torch.tensor(alpha)
        elif style == "peft":
            tensors.update({f"{file_name}.lora_A.weight": down, f"{file_name}.lora_B.weight": up})
        else:
            tensors.update({f"{file_name}.lora.down.weight": down, f"{file_name}.lora.up.weight": up})
    safetensors.torch.save_file(tensors, path)
    return path


SD1_TARGETS = {
    "kohya-ldm": {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q":
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_1_1_proj_in": "input_blocks.1.1.proj_in",
        "lora_unet_output_blocks_2_0_in_layers_2": "output_blocks.2.0.in_layers.2",
        "lora_unet_time_embed_0": "time_embed.0",
    },
    "kohya-diffusers": {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_down_blocks_0_attentions_0_proj_in": "input_blocks.1.1.proj_in",
        "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_2":
            "output_blocks.1.1.transformer_blocks.0.ff.net.2",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0":
            "middle_block.1.transformer_blocks.0.attn2.to_out.0",
        "lora_unet_up_blocks_1_resnets_1_conv_shortcut": "output_blocks.3.0.skip_connection",
    },
    "peft": {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
            "input_blocks.3.1.transformer_blocks.0.attn2.to_k",
        "unet.up_blocks.0.upsamplers.0.conv": "output_blocks.1.2.conv",
    },
}


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sdxl"])
def test_diffusers_names_point_at_the_same_weights(preset: str) -> None:
    ours = _unet(preset)
    reference = dict(diffusers_unet(ours.config, ours.state_dict()).named_modules())
    blocks = diffusers_unet_blocks(ours.config)
    layers = [(p, m) for p, m in ours.named_modules() if isinstance(m, nn.Linear | nn.Conv2d | nn.GroupNorm)]
    for path, layer in layers:
        name = diffusers_unet_name(path, blocks)
        assert name in reference, (path, name)
        theirs = reference[name].weight
        assert torch.equal(layer.weight.reshape(theirs.shape), theirs), path


@pytest.mark.parametrize("style", list(SD1_TARGETS))
def test_patch_is_w_plus_scaled_up_down_and_base_is_untouched(tmp_path: Path, style: str) -> None:
    base = _unet("tiny-sd1")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    targets = SD1_TARGETS[style]
    file_style = "peft" if style == "peft" else "kohya"
    lora = load_lora(_write_lora(tmp_path / "l.safetensors", base, targets, file_style))
    patched = apply_lora(base, lora, strength=0.7)
    scale = 0.7 * (2.0 / 4 if file_style == "kohya" else 1.0)
    patched_params = dict(patched.named_parameters())
    patched_names = {layer + ".weight" for layer in targets.values()}
    for name, param in base.named_parameters():
        assert torch.equal(param, before[name])  # the base is never changed
        if name in patched_names:
            weight = lora.weights[next(f for f, layer in targets.items() if layer + ".weight" == name)]
            delta = (weight.up.flatten(1) @ weight.down.flatten(1)).reshape(param.shape)
            expected = before[name] + scale * delta
            torch.testing.assert_close(patched_params[name], expected)
            assert patched_params[name] is not param
        else:
            assert patched_params[name] is param  # untouched tensors are shared, not copied
    assert unmatched_lora_keys(lora, base) == []


def test_with_and_without_lora_in_any_order(tmp_path: Path) -> None:
    base = _unet("tiny-sd1")
    lora = load_lora(_write_lora(tmp_path / "l.safetensors", base, SD1_TARGETS["kohya-ldm"], "kohya"))
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        plain = base(x, t, ctx)
        patched = apply_lora(base, lora, 1.0)
        with_lora = patched(x, t, ctx)
        assert torch.equal(base(x, t, ctx), plain)
        assert (with_lora - plain).abs().max() > 1e-4
        assert torch.equal(apply_lora(base, lora, 1.0)(x, t, ctx), with_lora)
        assert torch.equal(patched(x, t, ctx), with_lora)


def test_conv_lora_with_a_spatial_down_kernel(tmp_path: Path) -> None:
    base = _unet("tiny-sd1")
    layer = "input_blocks.1.0.in_layers.2"
    target = base.get_submodule(layer).weight
    down, up = torch.randn(2, target.shape[1], 3, 3), torch.randn(target.shape[0], 2, 1, 1)
    path = tmp_path / "locon.safetensors"
    safetensors.torch.save_file({"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": down,
                                 "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": up,
                                 "lora_unet_input_blocks_1_0_in_layers_2.alpha": torch.tensor(1.0)}, path)
    patched = apply_lora(base, load_lora(path), 1.0)
    expected = target + 0.5 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    torch.testing.assert_close(patched.get_submodule(layer).weight, expected)


def test_unmatched_and_unknown_keys_are_reported(tmp_path: Path) -> None:
    base = _unet("tiny-sd1")
    path = _write_lora(tmp_path / "l.safetensors", base, SD1_TARGETS["kohya-ldm"], "kohya")
    tensors = safetensors.torch.load_file(path)
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 4)
    tensors["lora_unet_some_layer.hada_w1_a"] = torch.zeros(2, 2)
    tensors["lora_unet_half_pair.lora_down.weight"] = torch.zeros(2, 2)
    safetensors.torch.save_file(tensors, path)
    assert unmatched_lora_keys(load_lora(path), base) == [
        "lora_unet_half_pair.lora_down.weight", "lora_unet_no_such_layer.lora_down.weight",
        "lora_unet_no_such_layer.lora_up.weight", "lora_unet_some_layer.hada_w1_a"]


def test_wrong_family_is_rejected(tmp_path: Path) -> None:
    sd1, sdxl = _unet("tiny-sd1"), _unet("tiny-sdxl")
    lora = load_lora(_write_lora(tmp_path / "sd1.safetensors", sd1, SD1_TARGETS["peft"], "peft"))
    with pytest.raises(LoraError, match="sd1.safetensors does not fit this model"):
        apply_lora(sdxl, lora)
    # Real-size LoRAs say their family by their cross-attention width.
    path = tmp_path / "xl.safetensors"
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    safetensors.torch.save_file({f"{key}.lora_down.weight": torch.zeros(4, 2048),
                                 f"{key}.lora_up.weight": torch.zeros(640, 4)}, path)
    xl = load_lora(path)
    assert lora_family(xl) == "sdxl" and lora_family(lora) is None
    check_lora_family(xl, "sdxl")
    with pytest.raises(LoraError, match="xl.safetensors is a SDXL LoRA; it does not fit a SD1 model"):
        check_lora_family(xl, "sd1")


def test_text_encoder_lora(tmp_path: Path) -> None:
    text_encoders = pytest.importorskip("ldm.text_encoders")
    te = text_encoders.build_text_encoder(text_encoders.random_text_encoder_config("tiny-sdxl"))
    te.init_random_weights(0)
    targets = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            "encoders.clip_l.text_model.encoder.layers.0.self_attn.q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc2": "encoders.clip_g.text_model.encoder.layers.1.mlp.fc2",
    }
    lora = load_lora(_write_lora(tmp_path / "te.safetensors", te, targets, "kohya"))
    before = {k: v.clone() for k, v in te.state_dict().items()}
    patched = apply_lora(te, lora, 1.0)
    for file_name, layer in targets.items():
        w = lora.weights[file_name]
        torch.testing.assert_close(patched.get_submodule(layer).weight,
                                   before[layer + ".weight"] + 0.5 * w.up @ w.down)
    assert all(torch.equal(v, before[k]) for k, v in te.state_dict().items())
    assert unmatched_lora_keys(lora, _unet("tiny-sdxl"), te) == []
    tokens_out = te.encode(["a cat"]).cond
    assert not torch.equal(patched.encode(["a cat"]).cond, tokens_out)
    assert lora_family(lora) == "sdxl"
