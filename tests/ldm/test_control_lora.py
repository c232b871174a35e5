"""Control-LoRA: a file derived exactly from a full ControlNet and a tiny SDXL-shaped UNet (full-rank up/down
factors of ControlNet minus UNet, whole weights for the rest, in Stability's key layout) gives that ControlNet's
residuals on that UNet, and the same offsets on another; truncated files, fp8 and bf16 bases, caching per base."""

from __future__ import annotations

import copy
import dataclasses
import gc
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ldm.checkpoint import CheckpointError
from ldm.control_lora import ControlLora, shape_mismatch
from ldm.controlnet import Control, ControlNet, load_controlnet, unet_weights
from ldm.lora import shallow_copy
from ldm.lora_extract import extract_pair
from ldm.presets import PRESETS, randomize_
from ldm.quant import FP8, quantize_fp8_
from ldm.unet import UNetModel, sdxl_adm
from tests.ldm.diffusers_reference import rel_err

CONFIG = PRESETS["tiny-sdxl"][2]  # num_head_channels 16: not SDXL's standard 64, so the heads must come from the UNet


def exact_pair(diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-rank (up, down) with up @ down == diff (to float precision), shaped as Stability's files hold them."""
    u, s, vh = torch.linalg.svd(diff.double().flatten(1), full_matrices=False)
    up, down = (u * s).float(), vh.float()
    if diff.ndim == 4:
        return up.reshape(*up.shape, 1, 1), down.reshape(-1, *diff.shape[1:])
    return up, down


def control_lora_tensors(controlnet: dict, unet: dict, rank: int | None = None,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """What Stability's ControlLoraSave writes: for each weight the UNet shares with two or more dimensions, the
    `.up`/`.down` factors of their difference (exact, or truncated to `rank` as the released files are); the
    rest whole; the `lora_controlnet` marker."""
    tensors = {"lora_controlnet": torch.tensor([])}
    for key, weight in controlnet.items():
        own = unet.get(key)
        if own is not None and weight.ndim >= 2:
            diff = weight.float() - own.float()
            up, down = exact_pair(diff) if rank is None else extract_pair(diff, rank)
            name = key.removesuffix(".weight")
            tensors[f"{name}.up"], tensors[f"{name}.down"] = up.to(dtype), down.to(dtype)
        else:
            tensors[key] = weight.to(dtype)
    return {k: v.contiguous() for k, v in tensors.items()}


def random_controlnet(unet: UNetModel, seed: int) -> ControlNet:
    """A ControlNet trained away from `unet`: its encoder is the UNet's plus noise, the rest random."""
    controlnet = randomize_(ControlNet(unet.config), torch.Generator().manual_seed(seed)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    own = unet.state_dict()
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(own[name] + noise if name in own else param + noise)
    return controlnet


def unet(seed: int, config=CONFIG) -> UNetModel:
    return randomize_(UNetModel(config), torch.Generator().manual_seed(seed)).eval()


def inputs(config=CONFIG, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    hint = torch.rand(batch, 3, 64, 64, generator=g)
    t = torch.tensor([20.0, 600.0][:batch])
    context = torch.randn(batch, 7, config.context_dim, generator=g)
    y = sdxl_adm(torch.randn(batch, config.adm_in_channels - 6 * 256, generator=g), width=1024, height=768)
    return x, hint, t, context, y


def residuals(model, dtype=torch.float32) -> list[torch.Tensor]:
    x, hint, t, context, y = inputs()
    with torch.no_grad():
        return [r.float() for r in model(x.to(dtype), hint, t, context.to(dtype), y=y.to(dtype))]


def assert_close(got: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert rel_err(a, b) < tolerance


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = unet(0)
    controlnet = random_controlnet(base, seed=1)
    path = tmp_path_factory.mktemp("control_lora") / "control-lora-canny-rank128.safetensors"
    safetensors.torch.save_file(control_lora_tensors(controlnet.state_dict(), base.state_dict()), path)
    return base, controlnet, path


def test_the_file_has_stabilitys_layout(setup):
    _, _, path = setup
    keys = safetensors.torch.load_file(path).keys()
    for key in ("lora_controlnet", "input_blocks.1.0.in_layers.2.up", "input_blocks.1.0.in_layers.2.down",
                "input_blocks.1.0.in_layers.0.weight", "label_emb.0.0.up", "time_embed.0.bias",
                "input_hint_block.0.weight", "zero_convs.0.0.weight", "middle_block_out.0.weight"):
        assert key in keys
    assert "input_blocks.1.0.in_layers.2.weight" not in keys and "output_blocks.0.0.in_layers.2.up" not in keys


def test_an_exact_control_lora_on_its_base_is_the_full_controlnet(setup):
    base, controlnet, path = setup
    loaded = load_controlnet(path)
    lora = loaded.model
    assert isinstance(lora, ControlLora) and loaded.family == "sdxl" and not loaded.unused_keys
    made = lora.controlnet(base)
    assert made.config == base.config  # the heads are the UNet's, which the weights do not tell
    assert_close(residuals(made), residuals(controlnet), 1e-5)
    # Through a Control, as the sampler runs it: the ControlLora runs the ControlNet it made.
    x, hint, t, context, y = inputs()
    with torch.no_grad():
        got = Control(lora, hint, strength=0.7).residuals(x, 1.0, t, context, y)
        expected = Control(controlnet, hint, strength=0.7).residuals(x, 1.0, t, context, y)
    assert_close(got, expected, 1e-5)


def test_on_another_base_it_is_that_base_plus_the_same_offsets(setup):
    base, controlnet, path = setup
    other = unet(5)
    lora = load_controlnet(path).model
    theirs, mine, full = other.state_dict(), base.state_dict(), controlnet.state_dict()
    expected = ControlNet(other.config).eval()
    expected.load_state_dict({k: theirs[k] + (v - mine[k]) if k in mine and v.ndim >= 2 else v
                              for k, v in full.items()})
    got = residuals(lora.controlnet(other))
    assert_close(got, residuals(expected), 1e-5)
    assert min(rel_err(a, b) for a, b in zip(got, residuals(controlnet), strict=True)) > 1e-2  # the base matters


def test_made_once_per_base_weights_and_let_go_with_them(setup):
    base, _, path = setup
    lora = load_controlnet(path).model
    made = lora.controlnet(base)
    assert lora.controlnet(base) is made
    assert lora.controlnet(shallow_copy(base)) is made  # a copy patching only the forward (FreeU) shares its weights
    decoder_only = shallow_copy(base)  # a LoRA that changes only the decoder leaves the ControlNet as it was
    layer = decoder_only.output_blocks[0][0].in_layers[2]
    layer._parameters["weight"] = torch.nn.Parameter(layer.weight + 1)
    assert lora.controlnet(decoder_only) is made
    patched = shallow_copy(base)  # one that changes the encoder makes another
    layer = patched.input_blocks[1][0].in_layers[2]
    layer._parameters["weight"] = torch.nn.Parameter(layer.weight + 0.01)
    other = lora.controlnet(patched)
    assert other is not made
    torch.testing.assert_close(other.input_blocks[1][0].in_layers[2].weight,
                               made.input_blocks[1][0].in_layers[2].weight + 0.01)
    assert lora.cache_size() > sum(t.numel() * 4 for t in other.state_dict().values())
    del patched, layer
    gc.collect()
    assert lora._made is None  # the base went: so did the ControlNet made from it
    with pytest.raises(RuntimeError, match="none was made"):
        residuals(lora)


def test_a_bf16_base_makes_a_bf16_controlnet(setup):
    base, controlnet, path = setup
    lora = load_controlnet(path).model
    half = copy.deepcopy(base).to(torch.bfloat16)
    made = lora.controlnet(half)
    assert made.dtype == torch.bfloat16
    key = "input_blocks.1.0.in_layers.2"
    up, down = (safetensors.torch.load_file(path)[f"{key}.{part}"] for part in ("up", "down"))
    offset = (up.flatten(1) @ down.flatten(1)).reshape(32, 32, 3, 3)
    expected = (half.state_dict()[f"{key}.weight"].float() + offset).bfloat16()  # summed in fp32, rounded once
    torch.testing.assert_close(made.state_dict()[f"{key}.weight"], expected, rtol=0, atol=0)
    assert_close(residuals(made, torch.bfloat16), residuals(controlnet), 5e-2)


def test_an_fp8_base_is_dequantized_layer_by_layer(setup):
    base, controlnet, path = setup
    quantized = quantize_fp8_(copy.deepcopy(base))
    layer = quantized.input_blocks[3][0].in_layers[2]  # a layer at a lower level: stored in fp8
    assert layer.weight.dtype == FP8
    made = load_controlnet(path).model.controlnet(quantized)
    assert all(t.dtype == torch.float32 for t in made.state_dict().values())
    key = "input_blocks.3.0.in_layers.2.weight"
    offset = controlnet.state_dict()[key] - base.state_dict()[key]
    torch.testing.assert_close(made.state_dict()[key], layer.dequantized_weight() + offset)
    # The same as the full ControlNet on the fp8 model's weights, made whole.
    weights = unet_weights(quantized)
    mine = base.state_dict()
    expected = ControlNet(base.config).eval()
    expected.load_state_dict({k: weights[k] + (v - mine[k]) if k in mine and v.ndim >= 2 else v
                              for k, v in controlnet.state_dict().items()})
    assert_close(residuals(made), residuals(expected), 1e-5)
    assert "input_blocks.3.0.in_layers.2.weight_scale" not in weights  # the scales are no weights of their own


def test_a_truncated_fp16_file_loads_and_runs(setup, tmp_path):
    base, controlnet, _ = setup
    path = tmp_path / "control-lora-canny-rank4.safetensors"
    tensors = control_lora_tensors(controlnet.state_dict(), base.state_dict(), rank=4, dtype=torch.float16)
    assert tensors["input_blocks.1.0.in_layers.2.up"].shape == (32, 4, 1, 1)
    assert tensors["input_blocks.1.0.in_layers.2.down"].shape == (4, 32, 3, 3)
    safetensors.torch.save_file(tensors, path)
    made = load_controlnet(path).model.controlnet(base)
    key = "input_blocks.1.0.in_layers.2"
    up, down = tensors[f"{key}.up"].float(), tensors[f"{key}.down"].float()
    offset = (up.flatten(1) @ down.flatten(1)).reshape(32, 32, 3, 3)
    torch.testing.assert_close(made.state_dict()[f"{key}.weight"], base.state_dict()[f"{key}.weight"] + offset)
    got = residuals(made)
    assert all(r.isfinite().all() for r in got)
    assert [r.shape for r in got] == [r.shape for r in residuals(controlnet)]
    assert rel_err(got[-1], residuals(controlnet)[-1]) > 1e-4  # rank 4 is an approximation


def test_the_diff_loader_path_makes_it_from_the_given_unet(setup):
    base, controlnet, path = setup
    loaded = load_controlnet(path, base=unet_weights(base))
    assert isinstance(loaded.model, ControlNet) and loaded.family == "sdxl" and not loaded.unused_keys
    assert_close(residuals(loaded.model), residuals(controlnet), 1e-5)


def test_a_control_lora_for_another_width_is_refused_with_both(tmp_path):
    wide = unet(0, dataclasses.replace(CONFIG, model_channels=64))
    path = tmp_path / "control-lora-wide.safetensors"
    safetensors.torch.save_file(control_lora_tensors(random_controlnet(wide, 2).state_dict(), wide.state_dict()),
                                path)
    lora = load_controlnet(path).model
    assert lora.config.model_channels == 64
    with pytest.raises(CheckpointError, match="control-lora-wide.safetensors does not fit this UNet: the Control-LoRA "
                                              "was made for a UNet with model_channels 64, and this one has 32"):
        lora.controlnet(unet(0))


def test_broken_files_say_what_is_wrong(setup, tmp_path):
    _, _, path = setup
    tensors = safetensors.torch.load_file(path)
    del tensors["input_blocks.1.0.in_layers.2.down"]
    safetensors.torch.save_file(tensors, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match=r"half.safetensors: input_blocks.1.0.in_layers.2.up has no "
                                              r"input_blocks.1.0.in_layers.2.down"):
        load_controlnet(tmp_path / "half.safetensors")
    safetensors.torch.save_file({"lora_controlnet": torch.tensor([])}, tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="empty.safetensors: not a ControlNet"):
        load_controlnet(tmp_path / "empty.safetensors")


def test_the_full_size_sdxl_layout_is_read_as_sdxls_encoder():
    """control-lora-canny-rank128's layout for the real SDXL shape, in empty (meta) tensors: no memory needed."""
    config = PRESETS["sdxl"][2]
    with torch.device("meta"):
        unet_shapes = UNetModel(config).state_dict()
        controlnet = ControlNet(config).state_dict()
    tensors = {"lora_controlnet": torch.tensor([])}
    for key, weight in controlnet.items():
        if key in unet_shapes and weight.ndim >= 2:
            rank = min(128, weight.shape[0], weight[0].numel())
            name = key.removesuffix(".weight")
            tensors[f"{name}.up"] = torch.empty(weight.shape[0], rank, *[1] * (weight.ndim - 2), device="meta")
            tensors[f"{name}.down"] = torch.empty(rank, *weight.shape[1:], device="meta")
        else:
            tensors[key] = weight
    lora = ControlLora(tensors, Path("control-lora-canny-rank128.safetensors"))
    assert lora.family == "sdxl" and lora.config == dataclasses.replace(config, out_channels=config.in_channels)
    assert (lora.hint_channels, lora.widths) == (3, (16, 32, 96, 256)) and not lora.unused_keys()
    assert shape_mismatch(lora.config, config) is None  # it fits any SDXL fine-tune
    assert shape_mismatch(lora.config, PRESETS["sdxl-refiner"][2]) == ("the Control-LoRA was made for a UNet with "
                                                                       "model_channels 320, and this one has 384")
