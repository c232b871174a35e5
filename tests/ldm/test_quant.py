"""fp8 weight storage: smaller weights, images close to full precision, LoRA still applies."""

import copy

import pytest
import torch

from ldm.lora import Lora, LoraWeight, apply_lora
from ldm.presets import PRESETS, build_preset
from ldm.quant import FP8, FP8_SKIP, Fp8Conv2d, Fp8Linear, fp8_skip, is_fp8, quantize_, quantize_fp8_, weight_bytes
from ldm.sampling import DiscreteSchedule, sample
from ldm.unet import UNetModel


@pytest.fixture(scope="module")
def tiny():
    _, prediction, unet, vae, te = build_preset("tiny-sd1", seed=0)
    return prediction, unet, vae, te


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def txt2img(unet, vae, te, prediction: str, seed: int) -> torch.Tensor:
    with torch.inference_mode():
        positive = [(te.encode(["a red circle on a blue background"]).cond, {})]
        negative = [(te.encode([""]).cond, {})]
        z = sample(unet, DiscreteSchedule(), torch.zeros(1, 4, 8, 8), seed=seed, steps=10, cfg=7.5,
                   sampler_name="euler", scheduler="normal", positive=positive, negative=negative,
                   prediction=prediction)
        return ((vae.decode(z / vae.scaling_factor) + 1) / 2).clamp(0, 1)


def test_fp8_shrinks_linear_and_conv_weights_and_keeps_the_sensitive_layers(tiny):
    _, unet, _, _ = tiny
    quantized = quantize_fp8_(copy.deepcopy(unet))
    assert weight_bytes(quantized) < 0.5 * weight_bytes(unet)  # fp32 -> fp8 but for the kept layers
    layers = dict(quantized.named_modules())
    assert isinstance(layers["input_blocks.3.0.in_layers.2"], Fp8Conv2d)
    assert isinstance(layers["input_blocks.3.1.transformer_blocks.0.attn1.to_q"], Fp8Linear)
    assert is_fp8(layers["middle_block.1.proj_in"]) and is_fp8(layers["output_blocks.0.0.in_layers.2"])
    # The embeddings, first and last convolutions, and the blocks at full latent resolution stay.
    for name in ("time_embed.0", "input_blocks.0.0", "out.2", "input_blocks.1.0.in_layers.2",
                 "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.2.0.op",
                 "output_blocks.3.1.proj_out", "output_blocks.2.0.skip_connection"):
        assert layers[name].weight.dtype == torch.float32, name
    assert quantized.dtype == torch.float32  # the compute dtype
    every_block = quantize_fp8_(copy.deepcopy(unet), skip=FP8_SKIP)
    assert is_fp8(every_block.get_submodule("input_blocks.1.0.in_layers.2"))


@pytest.mark.parametrize(("preset", "kept"), [
    ("sd15", ("input_blocks.1", "input_blocks.2", "input_blocks.3", "output_blocks.9", "output_blocks.10",
              "output_blocks.11")),
    ("sdxl", ("input_blocks.1", "input_blocks.2", "input_blocks.3", "output_blocks.6", "output_blocks.7",
              "output_blocks.8")),
])
def test_the_blocks_at_full_latent_resolution_are_kept_in_the_real_layouts(preset, kept):
    with torch.device("meta"):
        unet = UNetModel(PRESETS[preset][2])
    skip = fp8_skip(unet)
    blocks = [f"input_blocks.{i}" for i in range(len(unet.input_blocks))] + \
             [f"output_blocks.{i}" for i in range(len(unet.output_blocks))]
    assert [b for b in blocks if skip.search(b + ".0.x")] == ["input_blocks.0", *kept]
    assert fp8_skip(torch.nn.Linear(2, 2)) is FP8_SKIP


def test_fp8_images_stay_within_30_db_of_full_precision(tiny):
    prediction, unet, vae, te = tiny
    unet8, te8 = quantize_fp8_(copy.deepcopy(unet)), quantize_fp8_(copy.deepcopy(te))
    assert te8.encoders["clip_l"].text_model.encoder.layers[0].mlp.fc1.weight.dtype == FP8
    for seed in (0, 1):
        full, small = txt2img(unet, vae, te, prediction, seed), txt2img(unet8, vae, te8, prediction, seed)
        assert psnr(full, small) > 30.0


def test_fp8_runs_in_bf16(tiny):
    _, unet, _, _ = tiny
    bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    quantized = quantize_fp8_(copy.deepcopy(bf16))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 77, 32)
    with torch.inference_mode():
        expected, out = bf16(x, t, c), quantized(x, t, c)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert float((out - expected).norm() / expected.norm()) < 0.3


def test_a_lora_patches_an_fp8_layer_in_full_precision(tiny):
    _, unet, _, _ = tiny
    quantized = quantize_fp8_(copy.deepcopy(unet), FP8_SKIP)
    path = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_" + path.replace(".", "_")
    lora = Lora({name: LoraWeight(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), alpha=4.0)})
    patched = apply_lora(quantized, lora, 1.0)
    layer, base = patched.get_submodule(path), quantized.get_submodule(path)
    assert is_fp8(base) and layer.weight.dtype == torch.float32
    expected = base.dequantized_weight() + lora.weights[name].delta(base.weight.shape)
    torch.testing.assert_close(layer.weight, expected)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, expected))


def test_int8_needs_torchao(tiny):
    pytest.importorskip("torchao")
    _, unet, _, _ = tiny
    assert weight_bytes(quantize_(copy.deepcopy(unet), "int8")) < weight_bytes(unet)


def test_unknown_weights_dtype():
    with pytest.raises(ValueError, match="unknown weights dtype"):
        quantize_(torch.nn.Linear(2, 2), "fp4")
