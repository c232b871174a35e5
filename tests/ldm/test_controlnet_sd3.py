"""SD3 ControlNets: a file in diffusers' SD3ControlNetModel layout (InstantX's) loaded and run against diffusers' model,
the MMDiT's use of its outputs against SD3Transformer2DModel(block_controlnet_hidden_states=...), and a whole run
against StableDiffusion3ControlNetPipeline with the same weights, hint image and noise."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, StableDiffusion3ControlNetPipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from ldm.checkpoint import CheckpointError
from ldm.controlnet import load_controlnet
from ldm.controlnet_sd3 import HINT_LATENT_SCALE, SD3Control, SD3ControlNet, encode_hint
from ldm.presets import randomize_
from ldm.sampling import prepare_noise, sample
from ldm.sampling.flow import SD3FlowSchedule
from ldm.sd3_presets import TINY_SD3_VAE
from ldm.vae import AutoencoderKL
from tests.ldm.mmdit_reference import TINY_SD3, diffusers_twin, random_mmdit
from tests.ldm.test_mmdit import inputs

BASE = dataclasses.replace(TINY_SD3, depth=4)


def diffusers_controlnet(config=BASE, blocks: int = 2, seed: int = 0) -> SD3ControlNetModel:
    """InstantX's architecture, tiny, every weight random (the released zero-initialised layers too)."""
    c = config
    model = SD3ControlNetModel(
        sample_size=c.pos_embed_max_size * c.patch_size, patch_size=c.patch_size, in_channels=c.in_channels,
        num_layers=blocks, attention_head_dim=c.hidden_size // c.num_heads, num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_dim, caption_projection_dim=c.hidden_size,
        pooled_projection_dim=c.adm_in_channels, out_channels=c.out_channels, pos_embed_max_size=c.pos_embed_max_size,
        qk_norm="rms_norm" if c.qk_norm else None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            scale = 1.0 if name.endswith("pos_embed") else 0.1
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale + ("norm_" in name))
    return model.eval()


def saved(model: SD3ControlNetModel, path) -> object:
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_file_loads_and_matches_sd3_controlnet_model(tmp_path) -> None:
    reference = diffusers_controlnet()
    loaded = load_controlnet(saved(reference, tmp_path / "instantx.safetensors"))
    assert loaded.family == "sd3" and loaded.unused_keys == [] and isinstance(loaded.model, SD3ControlNet)
    assert loaded.model.config.num_heads == 1  # not in the weights: 64-wide heads, until fitted to a model
    control = SD3Control(loaded.model, torch.zeros(1, 3, 8, 8))
    assert control.fit(random_mmdit(BASE), SD3FlowSchedule()) is None and loaded.model.config.num_heads == 2
    x, sigma, context, pooled = inputs(BASE, 1)
    hint = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = loaded.model(x, hint, sigma, context, pooled)
        expected = reference(hidden_states=x, controlnet_cond=hint, encoder_hidden_states=context,
                             pooled_projections=torch.zeros_like(pooled), timestep=sigma * 1000,
                             return_dict=False)[0]
    assert len(ours) == 2 and expected[0].abs().mean() > 0.1
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("depth", "outputs"), [(4, 2), (5, 2), (4, 3), (3, 1)])
def test_mmdit_adds_outputs_as_diffusers_does(depth: int, outputs: int) -> None:
    config = dataclasses.replace(TINY_SD3, depth=depth)
    model = random_mmdit(config)
    reference = diffusers_twin(model)
    x, sigma, context, pooled = inputs(config, 3)
    generator = torch.Generator().manual_seed(4)
    control = [torch.randn(2, 16, config.hidden_size, generator=generator) for _ in range(outputs)]
    with torch.no_grad():
        ours = model(x, sigma, context, pooled, control=control)
        plain = model(x, sigma, context, pooled)
        expected = reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                             timestep=sigma * 1000, block_controlnet_hidden_states=control, return_dict=False)[0]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().mean() > 1e-2


def test_refusals(tmp_path) -> None:
    sd = diffusers_controlnet().state_dict()
    del sd["pos_embed.pos_embed"]
    safetensors.torch.save_file(sd, tmp_path / "no_table.safetensors")
    with pytest.raises(CheckpointError, match="no_table.safetensors: an SD3 ControlNet without its position table"):
        load_controlnet(tmp_path / "no_table.safetensors")
    loaded = load_controlnet(saved(diffusers_controlnet(), tmp_path / "ok.safetensors"))
    wider = random_mmdit(dataclasses.replace(BASE, hidden_size=64, num_heads=4))
    assert "made for an SD3 model with hidden_size 32, and this one has 64" in SD3Control(
        loaded.model, torch.zeros(1, 3, 8, 8)).fit(wider, SD3FlowSchedule())
    with pytest.raises(ValueError, match="needs a VAE to encode its hint image"):
        SD3Control(loaded.model, torch.zeros(1, 3, 8, 8), source="ok")._hint(torch.zeros(1, 16, 4, 4), 1)


def tiny_vae() -> tuple[AutoencoderKL, DiffusersVAE]:
    """SD3's 16-channel VAE, tiny, and diffusers' with the same weights. Its log-variance is pinned at -30, so that
    the pipeline's posterior sample is its mean (Loom encodes with the mean, ComfyUI's encode too)."""
    ours = randomize_(AutoencoderKL(TINY_SD3_VAE), torch.Generator().manual_seed(8)).eval()
    with torch.no_grad():
        conv = ours.encoder.conv_out
        conv.weight[16:] = 0
        conv.bias[16:] = -30
    reference = DiffusersVAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
                             layers_per_block=1, latent_channels=16, scaling_factor=HINT_LATENT_SCALE,
                             shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    state = convert_ldm_vae_checkpoint(dict(ours.state_dict()), dict(reference.config))
    missing, unexpected = reference.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return ours, reference.eval()


STEPS, CFG, STRENGTH = 4, 3.0, 0.8


def test_whole_run_matches_stable_diffusion_3_controlnet_pipeline(tmp_path) -> None:
    """euler, cfg and a ControlNet at strength 0.8 acting from a quarter of the run: diffusers keeps it on step i
    when i / N >= start and (i + 1) / N <= end, ComfyUI (and Loom) while the level is in the range's levels; at
    0.25 to 1 both take steps 1 to 3 of 4."""
    model = random_mmdit(BASE)
    reference_net = diffusers_controlnet(blocks=2, seed=5)
    net = load_controlnet(saved(reference_net, tmp_path / "cn.safetensors")).model
    vae, reference_vae = tiny_vae()
    generator = torch.Generator().manual_seed(6)
    image = torch.rand(1, 3, 48, 64, generator=generator)
    context, negative = (torch.randn(1, 7, BASE.context_dim, generator=generator) for _ in range(2))
    pooled, negative_pooled = (torch.randn(1, BASE.adm_in_channels, generator=generator) for _ in range(2))
    schedule = SD3FlowSchedule(3.0)
    control = SD3Control(net, image, STRENGTH, vae=vae, percent_range=(0.25, 1.0))
    assert control.fit(model, schedule) is None
    latent = torch.zeros(1, 16, 6, 8)
    with torch.no_grad():
        ours = sample(model, schedule, latent, seed=11, steps=STEPS, cfg=CFG, sampler_name="euler",
                      scheduler="simple", positive=[(context, {"y": pooled, "control": control})],
                      negative=[(negative, {"y": negative_pooled, "control": control})], prediction="flow")
    pipe = StableDiffusion3ControlNetPipeline(
        transformer=diffusers_twin(model), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=reference_vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None, controlnet=reference_net)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(prompt_embeds=context, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                        negative_pooled_prompt_embeds=negative_pooled, height=48, width=64,
                        num_inference_steps=STEPS, sigmas=[1 - i / STEPS for i in range(STEPS)],
                        guidance_scale=CFG, latents=prepare_noise(latent, 11), output_type="latent",
                        control_image=image * 2 - 1, controlnet_conditioning_scale=STRENGTH,
                        control_guidance_start=0.25, control_guidance_end=1.0).images
    control.release()
    plain = sample(model, schedule, latent, seed=11, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="simple",
                   positive=[(context, {"y": pooled})], negative=[(negative, {"y": negative_pooled})],
                   prediction="flow")
    assert expected.std() > 0.1 and (ours - plain).abs().mean() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_hint_is_encoded_at_the_latents_size_without_the_shift() -> None:
    vae, reference = tiny_vae()
    image = torch.rand(1, 3, 40, 80, generator=torch.Generator().manual_seed(1))
    hint = encode_hint(vae, image, 6, 8)  # cropped at the centre to 4:3, resized to 48 x 64, then encoded
    cropped = torch.nn.functional.interpolate(image[..., 13:67], size=(48, 64), mode="nearest-exact")
    with torch.no_grad():
        expected = reference.encode(cropped * 2 - 1).latent_dist.mean * HINT_LATENT_SCALE
    assert hint.shape == (1, 16, 6, 8)
    torch.testing.assert_close(hint, expected, rtol=1e-5, atol=1e-5)
