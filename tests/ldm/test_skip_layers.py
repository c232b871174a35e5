"""Skip-layer guidance: the skipped MMDiT against diffusers' SD3Transformer2DModel(skip_layers=...), a whole run against
StableDiffusion3Pipeline(skip_guidance_layers=...), Flux's skipped blocks against a Flux without them, and ComfyUI's
step window and rescaling written out."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from ldm.flux import Flux
from ldm.sampling import prepare_noise, sample
from ldm.sampling.flow import SD3FlowSchedule
from ldm.sampling.model_patches import CfgArgs, SamplingPatches
from ldm.skip_layers import SkipLayerGuidance, SkipLayers, check_layers, parse_layers
from tests.ldm.flux_reference import TINY, random_flux
from tests.ldm.mmdit_reference import TINY_SD3, diffusers_twin, random_mmdit
from tests.ldm.test_mmdit import inputs

DEEP_SD3 = dataclasses.replace(TINY_SD3, depth=4)


def test_parse_layers_reads_every_number() -> None:
    assert parse_layers("7, 8, 9") == (7, 8, 9)
    assert parse_layers("[1;2]  10") == (1, 2, 10) and parse_layers("") == ()


@pytest.mark.parametrize("layers", [(1,), (0, 2), (3,)])
def test_skipped_mmdit_matches_diffusers_skip_layers(layers: tuple[int, ...]) -> None:
    model = random_mmdit(DEEP_SD3)
    reference = diffusers_twin(model)
    x, sigma, context, pooled = inputs(DEEP_SD3, 4)
    skipped = SkipLayers(layers)(model)
    with torch.no_grad():
        ours, plain = skipped(x, sigma, context, pooled), model(x, sigma, context, pooled)
        expected = reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                             timestep=sigma * 1000, skip_layers=list(layers), return_dict=False)[0]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().mean() > 1e-3  # the skip changed something; the model itself is untouched
    assert all(type(block).__name__ == "JointBlock" for block in model.joint_blocks)
    assert [type(b).__name__ for b in skipped.joint_blocks].count("SkippedJointBlock") == len(layers)


def _flux_without(model: Flux, double: int | None, single: int | None) -> Flux:
    """A Flux of one block fewer in a list, the others' weights re-indexed: what skipping that block computes."""
    c = model.config
    config = dataclasses.replace(c, depth=c.depth - (double is not None),
                                 depth_single_blocks=c.depth_single_blocks - (single is not None))
    smaller = Flux(config)
    sd = {}
    for key, value in model.state_dict().items():
        kind, _, rest = key.partition(".")
        if kind in ("double_blocks", "single_blocks"):
            index, _, leaf = rest.partition(".")
            dropped = double if kind == "double_blocks" else single
            if dropped is not None and int(index) >= dropped:
                if int(index) == dropped:
                    continue
                key = f"{kind}.{int(index) - 1}.{leaf}"
        sd[key] = value
    smaller.load_state_dict(sd, strict=True)
    return smaller.eval()


@pytest.mark.parametrize(("double", "single"), [(0, None), (None, 1), (1, 0)])
def test_skipped_flux_blocks_equal_a_flux_without_them(double: int | None, single: int | None) -> None:
    config = dataclasses.replace(TINY, depth=3, depth_single_blocks=3)
    model = random_flux(config)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 4, 6, generator=generator)
    context = torch.randn(1, 5, config.context_dim, generator=generator)
    y = torch.cat([torch.randn(1, config.vec_in_dim, generator=generator), torch.tensor([[3.5]])], dim=1)
    sigma = torch.tensor([0.6])
    skip = SkipLayers(() if double is None else (double,), () if single is None else (single,))
    with torch.no_grad():
        ours = skip(model)(x, sigma, context, y)
        expected = _flux_without(model, double, single)(x, sigma, context, y)
        plain = model(x, sigma, context, y)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().mean() > 1e-3


def test_out_of_range_and_non_transformers_are_refused() -> None:
    from ldm.unet import UNetConfig, UNetModel

    model = random_mmdit(DEEP_SD3)
    assert check_layers(model, (3,), (5, 6)) is None  # SD3 has no single-stream blocks: ignored, as in ComfyUI
    with pytest.raises(ValueError, match="joint blocks 4, 7 are out of range; this model has 4 joint blocks"):
        SkipLayers((1, 4, 7))(model)
    flux = random_flux()
    assert "single-stream block 2 is out of range; this model has 2" in check_layers(flux, (1,), (2,))
    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, transformer_depth=(0,),
                                num_heads=1, context_dim=None))
    assert "needs a diffusion transformer (SD3 or Flux); this model (UNetModel)" in check_layers(unet, (1,), ())


def _args(seed: int) -> CfgArgs:
    g = torch.Generator().manual_seed(seed)
    x, cond, uncond = (torch.randn(2, 16, 4, 4, generator=g) for _ in range(3))
    return CfgArgs(x, torch.tensor([0.5, 0.5]), cond, uncond, 4.0)


def test_guidance_formula_window_and_rescaling_as_comfyui_writes_them() -> None:
    args = _args(1)
    denoised = args.uncond + 4.0 * (args.cond - args.uncond)
    skipped = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(9))
    calls = []

    def predict(transform, at=None, negative=False):
        calls.append((transform, at, negative))
        return skipped

    skip = SkipLayers((1,))
    out = SkipLayerGuidance(skip, 3.0, sigma_start=0.5, sigma_end=0.2)(args, denoised, predict)
    torch.testing.assert_close(out, denoised + 3.0 * (args.cond - skipped))
    assert calls == [(skip, None, False)]  # the positive prompt, at the call's own latent
    rescaled = SkipLayerGuidance(skip, 3.0, 0.9, 0.49, rescaling_scale=0.7)(args, denoised, predict)
    factor = 0.7 * args.cond.std() / out.std() + 0.3
    torch.testing.assert_close(rescaled, out * factor)
    # Outside (sigma_end, sigma_start] (the start included, the end not: ComfyUI's `sigma > sigma_end and sigma <=
    # sigma_start`), or at scale 0, nothing is predicted or changed.
    for patch in (SkipLayerGuidance(skip, 3.0, 0.49, 0.1), SkipLayerGuidance(skip, 3.0, 0.9, 0.51),
                  SkipLayerGuidance(skip, 3.0, 0.9, 0.5), SkipLayerGuidance(skip, 0.0, 1.0, 0.0)):
        assert patch(args, denoised, predict) is denoised
    assert len(calls) == 2


STEPS, CFG, SCALE = 8, 4.0, 2.5  # 8 divides SD3's 1000 levels: `simple` then takes diffusers' levels exactly


def test_whole_run_matches_stable_diffusion_3_pipeline() -> None:
    """euler over SD3's shifted levels with cfg and skip-layer guidance on blocks 1 and 2, against diffusers'
    pipeline with the same transformer, prompt embeddings and noise. diffusers picks the steps by index (i > N *
    start and i < N * stop); ComfyUI's rule, kept here, by level (sigma_end < sigma <= sigma_start): at 0.2 to 0.7
    both cover steps 2 to 5 of 8 (the levels of `simple` are shift(1 - i / N))."""
    model = random_mmdit(DEEP_SD3)
    generator = torch.Generator().manual_seed(5)
    context, negative = (torch.randn(1, 7, DEEP_SD3.context_dim, generator=generator) for _ in range(2))
    pooled, negative_pooled = (torch.randn(1, DEEP_SD3.adm_in_channels, generator=generator) for _ in range(2))
    schedule = SD3FlowSchedule(3.0)
    patch = SkipLayerGuidance(SkipLayers((1, 2)), SCALE, schedule.sigma_at_percent(0.2),
                              schedule.sigma_at_percent(0.7))
    latent = torch.zeros(1, 16, 6, 8)
    with torch.no_grad():
        ours = sample(model, schedule, latent, seed=11, steps=STEPS, cfg=CFG, sampler_name="euler",
                      scheduler="simple", positive=[(context, {"y": pooled})],
                      negative=[(negative, {"y": negative_pooled})], prediction="flow",
                      patches=SamplingPatches(post_cfg=(patch,)))
        plain = sample(model, schedule, latent, seed=11, steps=STEPS, cfg=CFG, sampler_name="euler",
                       scheduler="simple", positive=[(context, {"y": pooled})],
                       negative=[(negative, {"y": negative_pooled})], prediction="flow")
    pipe = StableDiffusion3Pipeline(transformer=diffusers_twin(model), scheduler=FlowMatchEulerDiscreteScheduler(
        shift=3.0), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(prompt_embeds=context, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                        negative_pooled_prompt_embeds=negative_pooled, height=48, width=64,
                        num_inference_steps=STEPS, sigmas=[1 - i / STEPS for i in range(STEPS)],
                        guidance_scale=CFG, latents=prepare_noise(latent, 11), output_type="latent",
                        skip_guidance_layers=[1, 2], skip_layer_guidance_scale=SCALE,
                        skip_layer_guidance_start=0.2, skip_layer_guidance_stop=0.7).images
    assert expected.std() > 0.1 and (ours - plain).abs().mean() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
