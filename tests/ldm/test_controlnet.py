"""ControlNet against diffusers' ControlNetModel on identical weights, files in both layouts, and the
Control that the Apply ControlNet nodes attach to a conditioning."""

from __future__ import annotations

import dataclasses
import math

import pytest
import safetensors.torch
import torch

from ldm.checkpoint import CheckpointError
from ldm.controlnet import (
    Control,
    ControlNet,
    _from_diffusers,
    controlnet_shape,
    load_controlnet,
    prepare_hint,
    save_controlnet,
)
from ldm.presets import PRESETS, make_checkpoint, make_controlnet, randomize_
from ldm.sampling.schedules import DiscreteSchedule, sigma_at_percent
from ldm.unet import UNetModel, sdxl_adm
from tests.ldm.diffusers_reference import diffusers_unet, rel_err

# The families' standard head layouts (what a file without our metadata is read with), at tiny widths.
CONFIGS = {
    "sd1": dataclasses.replace(PRESETS["tiny-sd1"][2], num_heads=8),
    "sdxl": dataclasses.replace(PRESETS["tiny-sdxl"][2], model_channels=64, num_head_channels=64),
}


def _randomize_all_(module: torch.nn.Module, seed: int) -> None:
    """Every weight random, the zero convolutions too (released ControlNets have trained, non-zero ones)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 0.3 if param.ndim == 1 else min(0.2, param[0].numel() ** -0.5)
            param.copy_(torch.randn(param.shape, generator=generator) * scale + (1.0 if "norm" in name and
                                                                                   name.endswith("weight") else 0.0))


def _inputs(config, batch: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, size, size, generator=g)
    hint = torch.rand(batch, 3, size * 8, size * 8, generator=g)
    t = torch.tensor([20.0, 600.0][:batch])
    context = torch.randn(batch, 7, config.context_dim, generator=g)
    pooled, y, extra = None, None, {}
    if config.adm_in_channels:
        pooled = torch.randn(batch, config.adm_in_channels - 6 * 256, generator=g)
        y = sdxl_adm(pooled, width=1024, height=768, crop_w=16, crop_h=32)
        time_ids = torch.tensor([[768, 1024, 32, 16, 768, 1024]] * batch, dtype=torch.float32)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return x, hint, t, context, y, extra


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_controlnet_and_controlled_unet_match_diffusers(family):
    from diffusers import ControlNetModel

    config = CONFIGS[family]
    unet = randomize_(UNetModel(config), torch.Generator().manual_seed(0)).eval()
    reference_unet = diffusers_unet(config, unet.state_dict())
    reference = ControlNetModel.from_unet(reference_unet).eval()
    _randomize_all_(reference, seed=1)

    # diffusers' names -> ours, then the shape read back from the weights alone.
    state = _from_diffusers(reference.state_dict())
    detected_family, detected, hint_channels, widths = controlnet_shape(state)
    assert (detected_family, detected, hint_channels, widths) == (family, config, 3, (16, 32, 96, 256))
    ours = ControlNet(detected).eval()
    ours.load_state_dict(state, strict=True)

    x, hint, t, context, y, extra = _inputs(config)
    with torch.no_grad():
        residuals = ours(x, hint, t, context, y=y)
        down, mid = reference(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False,
                              **extra)
        assert len(residuals) == len(down) + 1
        for a, b in zip(residuals, [*down, mid], strict=True):
            assert rel_err(a, b) < 1e-4
        controlled = unet(x, t, context, y, control=residuals)
        expected = reference_unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid, **extra).sample
        assert rel_err(controlled, expected) < 1e-4
        assert rel_err(controlled, unet(x, t, context, y)) > 1e-2  # the control does change the output


def test_files_in_ldm_and_diffusers_layouts_load_to_the_same_model(tmp_path):
    from diffusers import ControlNetModel

    config = CONFIGS["sd1"]
    reference = ControlNetModel.from_unet(diffusers_unet(config, UNetModel(config).state_dict()))
    _randomize_all_(reference, seed=2)
    diffusers_file = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, diffusers_file)
    ldm_state = _from_diffusers(reference.state_dict())
    prefixed = tmp_path / "control_sd15_test.safetensors"  # the 1.0 releases keep the training prefix
    safetensors.torch.save_file({f"control_model.{k}": v.contiguous() for k, v in ldm_state.items()}, prefixed)
    plain = save_controlnet(tmp_path / "plain.safetensors", load_controlnet(prefixed).model)

    x, hint, t, context, y, _ = _inputs(config)
    outputs = []
    for path in (diffusers_file, prefixed, plain):
        loaded = load_controlnet(path)
        assert loaded.family == "sd1" and not loaded.unused_keys
        with torch.no_grad():
            outputs.append(loaded.model(x, hint, t, context))
    for other in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs[0], other, strict=True))


def test_a_tiny_controlnet_file_fits_the_tiny_checkpoint_of_its_preset(tmp_path):
    from ldm.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(make_checkpoint("tiny-sdxl", tmp_path / "c.safetensors"))
    loaded = load_controlnet(make_controlnet("tiny-sdxl", tmp_path / "cn.safetensors"))
    assert loaded.family == "sdxl" and loaded.model.config == checkpoint.unet.config  # heads from the metadata
    assert loaded.model.dtype == torch.float32  # stored in fp16, loaded in the dtype asked for


def test_files_that_are_not_controlnets_say_what_they_are(tmp_path):
    checkpoint = make_checkpoint("tiny-sd1", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: not a ControlNet"):
        load_controlnet(checkpoint)
    # T2I-Adapters load here (tests/ldm/test_t2i_adapter.py), but for the style adapter.
    adapter = tmp_path / "t2iadapter_style_sd14v1.safetensors"
    safetensors.torch.save_file({"style_embedding": torch.zeros(1, 8, 4)}, adapter)
    with pytest.raises(CheckpointError,
                       match=r"a T2I-Adapter style model \(.*\), not a ControlNet: put it in models/style_models"):
        load_controlnet(adapter)
    flux = tmp_path / "flux_canny.safetensors"
    safetensors.torch.save_file({"controlnet_x_embedder.weight": torch.zeros(2),
                                 "input_hint_block.0.weight": torch.zeros(1)}, flux)
    with pytest.raises(CheckpointError, match="flux_canny.safetensors: an incomplete Flux ControlNet: no weight"):
        load_controlnet(flux)


def test_hint_is_cropped_at_the_centre_to_the_latent_aspect_then_resized():
    image = torch.arange(4 * 8, dtype=torch.float32).reshape(1, 1, 4, 8)
    out = prepare_hint(image, 4, 4)  # 2:1 -> 1:1 keeps the middle 4 columns
    assert torch.equal(out, image[..., 2:6])
    assert prepare_hint(image, 8, 16).shape[-2:] == (8, 16)
    # An odd difference trims the same from both sides (ComfyUI's rounding): 9 columns to 4 keeps 2..6.
    odd = torch.arange(4 * 9, dtype=torch.float32).reshape(1, 1, 4, 9)
    assert torch.equal(prepare_hint(odd, 4, 5), odd[..., 2:7])


class _Recorder(torch.nn.Module):
    """A stand-in ControlNet: residuals of ones times the hint's mean, and the calls it got."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.time_embed = [self]  # for `dtype`
        self.global_average_pooling = False
        self.calls = []

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x, hint, timesteps, context, y=None):
        self.calls.append(hint)
        return [torch.ones_like(x) * hint.mean(), torch.ones_like(x) * 2]


def test_control_strength_range_and_chain():
    first, second = _Recorder(), _Recorder()
    hint = torch.ones(1, 3, 16, 16)
    earlier = Control(first, hint, strength=0.5, sigma_range=(10.0, 1.0))
    later = Control(second, hint * 0.5, strength=2.0, previous=earlier)
    x, t, context = torch.zeros(4, 4, 2, 2), torch.zeros(4), torch.zeros(4, 7, 8)
    both = later.residuals(x, 5.0, t, context, None, repeats=2)
    assert torch.allclose(both[0], torch.full_like(x, 0.5 * 1.0 + 2.0 * 0.5)) and torch.allclose(both[1], x + 5.0)
    assert first.calls[0].shape == (4, 3, 16, 16)  # the hint resized to 8x the latent and batched
    only_later = later.residuals(x, 12.0, t, context, None)  # above the earlier one's range
    assert torch.allclose(only_later[1], x + 4.0)
    assert Control(first, hint, strength=0.0).residuals(x, 5.0, t, context, None) is None


def test_hint_batches_cycle_over_the_latent_batch_in_each_copy():
    recorder = _Recorder()
    hints = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(2)])
    Control(recorder, hints).residuals(torch.zeros(6, 4, 1, 1), 1.0, torch.zeros(6), torch.zeros(6, 7, 8), None,
                                       repeats=2)
    assert recorder.calls[0][:, 0, 0, 0].tolist() == [0, 1, 0, 0, 1, 0]


def test_the_shuffle_controlnet_is_known_by_its_name_and_averages_its_residuals(tmp_path):
    path = make_controlnet("tiny-sd1", tmp_path / "control_v11e_sd15_shuffle_fp16.safetensors")
    loaded = load_controlnet(path)
    assert loaded.model.global_average_pooling
    assert not load_controlnet(make_controlnet("tiny-sd1", tmp_path / "control_canny.safetensors")).model \
        .global_average_pooling
    config = loaded.model.config
    x, t, context = torch.randn(1, 4, 4, 4), torch.tensor([500.0]), torch.randn(1, 7, config.context_dim)
    with torch.no_grad():
        residuals = Control(loaded.model, torch.rand(1, 3, 32, 32)).residuals(x, 1.0, t, context, None)
    for residual in residuals:
        assert torch.allclose(residual, residual.mean(dim=(2, 3), keepdim=True).expand_as(residual))


def test_percent_of_the_schedule_to_sigma():
    sigmas = DiscreteSchedule().sigmas
    assert sigma_at_percent(0.0, sigmas) == math.inf and sigma_at_percent(1.0, sigmas) == 0.0
    assert sigma_at_percent(0.5, sigmas) == pytest.approx(math.exp(0.5 * (math.log(sigmas[499]) +
                                                                          math.log(sigmas[500]))), rel=1e-5)
    assert sigma_at_percent(0.2, sigmas) > sigma_at_percent(0.8, sigmas)


def test_prompts_sharing_a_control_take_one_model_call_and_others_two():
    from ldm.sampling.denoiser import Denoiser
    from ldm.sampling.guidance import CFGGuider

    calls = []

    def unet(x, t, context, y=None, control=None):
        calls.append((x.shape[0], control is not None))
        return torch.zeros_like(x)

    recorder = _Recorder()
    control = Control(recorder, torch.ones(1, 3, 16, 16))
    x, sigma = torch.zeros(1, 4, 2, 2), torch.tensor([2.0])
    context = torch.zeros(1, 7, 8)
    shared = CFGGuider(Denoiser(unet, DiscreteSchedule()), [(context, {"control": control})],
                       [(context, {"control": control})], cfg=7.5)
    shared(x, sigma)
    assert calls == [(2, True)] and recorder.calls[0].shape[0] == 2  # both prompts, one call, one ControlNet run
    calls.clear()
    positive_only = CFGGuider(Denoiser(unet, DiscreteSchedule()), [(context, {"control": control})],
                              [(context, {})], cfg=7.5)
    positive_only(x, sigma)
    assert sorted(calls) == [(1, False), (1, True)]


def test_an_inpainting_models_controlnet_sees_the_latent_without_the_extra_channels():
    from ldm.sampling.denoiser import Conditioning, Denoiser

    class ChannelRecorder(_Recorder):
        def forward(self, x, hint, timesteps, context, y=None):
            self.channels = x.shape[1]
            return super().forward(x, hint, timesteps, context, y)

    recorder = ChannelRecorder()
    seen = []

    def unet(x, t, context, y=None, control=None):
        seen.append((x.shape[1], control is not None))
        return x[:, :4]

    x = torch.randn(1, 4, 2, 2)
    cond = Conditioning(torch.zeros(1, 7, 8), control=Control(recorder, torch.ones(1, 3, 16, 16)),
                        concat=torch.ones(1, 5, 2, 2))
    Denoiser(unet, DiscreteSchedule()).at_level(x, 3.0, cond)
    assert seen == [(9, True)]  # the UNet gets the mask and masked image, with the residuals
    assert recorder.channels == 4  # and the ControlNet the latent alone
