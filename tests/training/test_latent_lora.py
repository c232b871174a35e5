"""In-memory LoRA training on latents (ComfyUI's Train LoRA): the training targets against diffusers' DDPM scheduler,
the LoRA it returns applied by ldm.lora against the copy it trained, and the shared model left as it was."""

from __future__ import annotations

import pytest
import torch

from ldm.lora import apply_lora, lora_from_state_dict
from ldm.presets import build_preset
from ldm.quant import FP8, is_fp8, quantize_fp8_
from ldm.sampling.schedules import DiscreteSchedule
from ldm.training.latent_lora import (
    Example,
    LatentLoraConfig,
    attach_adapters,
    frozen_copy,
    noised,
    train_latent_lora,
)

FP32 = {"autocast": None, "lora_dtype": torch.float32, "grad_checkpointing": False}


@pytest.fixture(scope="module")
def unet():
    _, _, unet, _, _ = build_preset("tiny-sd1", seed=1, text_encoder=False)
    return unet.eval().requires_grad_(False)


def examples(count: int = 3, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(77, 32, generator=g)
    return [Example(torch.randn(4, 8, 8, generator=g), context) for _ in range(count)]


def unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([100.0, 700.0]), context)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_noised_inputs_and_targets_are_diffusers_ddpm(prediction, zero_snr):
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              rescale_betas_zero_snr=zero_snr)
    schedule = DiscreteSchedule().zero_terminal_snr() if zero_snr else DiscreteSchedule()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(64, 4, 8, 8, generator=g)
    draws = torch.Generator().manual_seed(1)
    x_in, timesteps, target = noised(schedule, prediction, latents, draws)
    # The same draws, in noised's order: the timesteps, then the noise.
    replay = torch.Generator().manual_seed(1)
    t = torch.randint(1000, (64,), generator=replay)
    noise = torch.randn(latents.shape, generator=replay)
    assert torch.equal(timesteps, t.float())
    # Zero SNR: diffusers' last alpha-bar is 0, ours 4.9e-8 (a finite sigma): 2.2e-4 of the latent apart there.
    tolerance = 1e-3 if zero_snr else 1e-4
    torch.testing.assert_close(x_in, reference.add_noise(latents, noise, t), rtol=tolerance, atol=tolerance)
    expected = noise if prediction == "eps" else reference.get_velocity(latents, noise, t)
    torch.testing.assert_close(target, expected, rtol=tolerance, atol=tolerance)


def test_the_lora_applied_by_ldm_lora_is_the_model_it_trained(unet):
    config = LatentLoraConfig(steps=3, lr=1e-2, rank=4, **FP32)
    tensors, losses = train_latent_lora(unet, examples(), DiscreteSchedule(), "eps", "sd1", config)
    assert len(losses) == 3
    # Every Linear, convolution and norm of the UNet is patched: weights by a pair or a difference, biases too.
    layers = [m for m in unet.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.GroupNorm |
                                                        torch.nn.LayerNorm)]
    lora = lora_from_state_dict(tensors)
    assert not lora.unknown_keys and len(lora.weights) == len(layers)
    assert sum(k.endswith(".diff_b") for k in tensors) == sum(m.bias is not None for m in layers)
    # The training copy, started from the trained tensors, against ldm.lora's merged weights.
    generator = torch.Generator().manual_seed(0)
    copy = frozen_copy(unet)
    attach_adapters(copy, config, generator, existing=lora)
    expected = unet_out(apply_lora(unet, lora, 1.0))
    torch.testing.assert_close(unet_out(copy), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert (expected - unet_out(unet)).abs().max() > 1e-3


def test_training_leaves_the_shared_unet_as_it_was(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    params = list(unet.parameters())
    train_latent_lora(unet, examples(), DiscreteSchedule(), "v", "sd1", LatentLoraConfig(steps=2, lr=1e-2))
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in params)
    assert type(unet.time_embed[0]) is torch.nn.Linear  # no parametrization class on the shared layers
    assert all("forward" not in vars(block) for block in unet.input_blocks)  # nor checkpointing wrappers


def test_an_fp8_unet_trains_as_its_dequantized_weights_would():
    quantized = quantize_fp8_(build_preset("tiny-sd1", seed=1, text_encoder=False)[2].eval().requires_grad_(False))
    reference = build_preset("tiny-sd1", seed=1, text_encoder=False)[2].eval().requires_grad_(False)
    fp8_layers = [name for name, module in quantized.named_modules() if is_fp8(module)]
    with torch.no_grad():
        for name in fp8_layers:
            reference.get_submodule(name).weight.copy_(quantized.get_submodule(name).dequantized_weight(torch.float32))
    config = LatentLoraConfig(steps=2, lr=1e-2, rank=2, **FP32)
    tensors, _ = train_latent_lora(quantized, examples(), DiscreteSchedule(), "eps", "sd1", config)
    expected, _ = train_latent_lora(reference, examples(), DiscreteSchedule(), "eps", "sd1", config)
    assert fp8_layers and all(quantized.get_submodule(name).weight.dtype == FP8 for name in fp8_layers)
    assert tensors.keys() == expected.keys()
    for key, tensor in tensors.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-4, atol=1e-6)


def test_bad_settings_are_refused(unet):
    with pytest.raises(ValueError, match="optimizer must be one of"):
        LatentLoraConfig(optimizer="Lion")
    with pytest.raises(ValueError, match="no latents"):
        train_latent_lora(unet, [], DiscreteSchedule(), "eps", "sd1", LatentLoraConfig())
    with pytest.raises(ValueError, match="eps- and v-prediction"):
        train_latent_lora(unet, examples(), DiscreteSchedule(), "edm", "sd1", LatentLoraConfig())
