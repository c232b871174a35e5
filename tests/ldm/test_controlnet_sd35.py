"""Stability AI's SD3.5 Large ControlNets: a tiny file in their layout loaded and run against diffusers'
SD3ControlNetModel (use_pos_embed=False, no text stream, the pooled prompt kept) built from the same file by
diffusers' conversion (scripts/convert_sd3_controlnet_to_diffusers.py), the hint's kinds against diffusers' VAE, and a
whole run against StableDiffusion3ControlNetPipeline."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, StableDiffusion3ControlNetPipeline

from ldm.checkpoint import CheckpointError
from ldm.controlnet import load_controlnet, peek_controlnet_family
from ldm.controlnet_sd3 import HINT_LATENT_SCALE, SD3Control
from ldm.controlnet_sd35 import HINT_LATENT_SHIFT, SD35ControlNet
from ldm.sampling import prepare_noise, sample
from ldm.sampling.flow import SD3FlowSchedule
from tests.ldm.mmdit_reference import TINY_SD35_LARGE, diffusers_twin, random_mmdit
from tests.ldm.test_controlnet_sd3 import tiny_vae
from tests.ldm.test_mmdit import inputs

MODEL = dataclasses.replace(TINY_SD35_LARGE, depth=4)  # 4 blocks, 4 heads 8 wide; the ControlNet has 2 blocks


def stability_file(path, config=MODEL, blocks: int = 2, control_type: int | None = 0, seed: int = 0):
    """A random SD3.5 Large ControlNet in Stability's key layout (the released files' names and shapes, scaled)."""
    h, generator = config.hidden_size, torch.Generator().manual_seed(seed)
    shapes = {"pos_embed_input.proj.weight": (h, config.in_channels, config.patch_size, config.patch_size),
              "pos_embed_input.proj.bias": (h,),
              "time_text_embed.timestep_embedder.linear_1.weight": (h, 256),
              "time_text_embed.timestep_embedder.linear_1.bias": (h,),
              "time_text_embed.timestep_embedder.linear_2.weight": (h, h),
              "time_text_embed.timestep_embedder.linear_2.bias": (h,),
              "time_text_embed.text_embedder.linear_1.weight": (h, config.adm_in_channels),
              "time_text_embed.text_embedder.linear_1.bias": (h,),
              "time_text_embed.text_embedder.linear_2.weight": (h, h),
              "time_text_embed.text_embedder.linear_2.bias": (h,)}
    for i in range(blocks):
        shapes.update({f"controlnet_blocks.{i}.weight": (h, h), f"controlnet_blocks.{i}.bias": (h,)})
        for name, shape in (("attn.qkv", (3 * h, h)), ("attn.proj", (h, h)), ("mlp.fc1", (4 * h, h)),
                            ("mlp.fc2", (h, 4 * h)), ("adaLN_modulation.1", (6 * h, h))):
            shapes[f"transformer_blocks.{i}.{name}.weight"] = shape
            shapes[f"transformer_blocks.{i}.{name}.bias"] = shape[:1]
    sd = {k: torch.randn(shape, generator=generator) * 0.1 for k, shape in shapes.items()}
    if control_type is not None:
        sd["control_type"] = torch.tensor(float(control_type))
    safetensors.torch.save_file(sd, path)
    return path


def diffusers_controlnet(path, config=MODEL, blocks: int = 2) -> SD3ControlNetModel:
    """diffusers' model for the file, as its conversion script builds it (there 19 blocks of 38 64-wide heads)."""
    original = safetensors.torch.load_file(path)
    state = {k: original[k] for k in original if k.startswith(("controlnet_blocks.", "pos_embed_input.",
                                                                 "time_text_embed."))}
    for i in range(blocks):
        b = f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            q, k, v = torch.chunk(original[f"{b}attn.qkv.{leaf}"], 3, dim=0)
            state.update({f"{b}attn.to_q.{leaf}": q, f"{b}attn.to_k.{leaf}": k, f"{b}attn.to_v.{leaf}": v})
            for ours, theirs in (("attn.proj", "attn.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"),
                                 ("adaLN_modulation.1", "norm1.linear")):
                state[f"{b}{theirs}.{leaf}"] = original[f"{b}{ours}.{leaf}"]
    model = SD3ControlNetModel(
        patch_size=config.patch_size, in_channels=config.in_channels, num_layers=blocks,
        attention_head_dim=config.hidden_size // config.num_heads, num_attention_heads=config.num_heads,
        joint_attention_dim=None, caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.adm_in_channels, out_channels=config.out_channels, pos_embed_max_size=None,
        pos_embed_type=None, use_pos_embed=False, force_zeros_for_pooled_projection=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_file_loads_and_matches_sd3_controlnet_model(tmp_path) -> None:
    path = stability_file(tmp_path / "sd3.5_large_controlnet_blur.safetensors")
    loaded = load_controlnet(path)
    assert loaded.family == "sd3" and peek_controlnet_family(path) == "sd3" and loaded.unused_keys == []
    assert isinstance(loaded.model, SD35ControlNet) and loaded.model.hint_kind == "blur"
    mmdit = random_mmdit(MODEL, seed=3)
    control = SD3Control(loaded.model, torch.zeros(1, 3, 8, 8))
    assert control.fit(mmdit, SD3FlowSchedule()) is None and loaded.model.config.num_heads == 4
    assert control.model_kwargs["base"] is mmdit
    reference = diffusers_controlnet(path)
    reference.pos_embed = reference._get_pos_embed_from_transformer(diffusers_twin(mmdit))
    x, sigma, context, pooled = inputs(MODEL, 1, h=6, w=10)
    hint = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = loaded.model(x, hint, sigma, context, pooled, **control.model_kwargs)
        expected = reference(hidden_states=x, controlnet_cond=hint, pooled_projections=pooled,
                             timestep=sigma * 1000, return_dict=False)[0]
        zero_pooled = loaded.model(x, hint, sigma, context, torch.zeros_like(pooled), base=mmdit)
    assert len(ours) == 2 and expected[0].abs().mean() > 0.05
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (ours[1] - zero_pooled[1]).abs().mean() > 1e-3  # the pooled prompt is used, not zeroed
    control.release()
    assert "base" not in control.model_kwargs


@pytest.mark.parametrize(("control_type", "kind", "prepare"), [
    (0, "blur", lambda a: a * 2 - 1), (1, "canny", lambda a: a * 127.5 + 0.5), (2, "depth", lambda a: 1 - 2 * a),
    (None, None, lambda a: a * 2 - 1)])
def test_hint_is_prepared_for_its_kind_and_encoded_with_the_shift(tmp_path, control_type, kind, prepare) -> None:
    loaded = load_controlnet(stability_file(tmp_path / "cn.safetensors", control_type=control_type))
    assert loaded.model.hint_kind == kind and loaded.unused_keys == []
    vae, reference = tiny_vae()
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = (reference.encode(prepare(image)).latent_dist.mean - HINT_LATENT_SHIFT) * HINT_LATENT_SCALE
    torch.testing.assert_close(loaded.model.hint_latents(vae, image, 6, 8), expected, rtol=1e-5, atol=1e-5)


def test_refusals(tmp_path) -> None:
    sd = safetensors.torch.load_file(stability_file(tmp_path / "full.safetensors"))
    del sd["time_text_embed.text_embedder.linear_1.weight"]
    safetensors.torch.save_file(sd, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="cut.safetensors: an incomplete SD3.5 Large ControlNet: no weight "
                                              "'y_embedder.mlp.0.weight'"):
        load_controlnet(tmp_path / "cut.safetensors")
    loaded = load_controlnet(tmp_path / "full.safetensors")
    wider = random_mmdit(dataclasses.replace(MODEL, hidden_size=64))
    assert "made for an SD3 model with hidden_size 32, and this one has 64" in SD3Control(
        loaded.model, torch.zeros(1, 3, 8, 8)).fit(wider, SD3FlowSchedule())
    # The prompt's width is not the ControlNet's business: it has no text stream.
    other_t5 = random_mmdit(dataclasses.replace(MODEL, context_dim=24))
    assert SD3Control(loaded.model, torch.zeros(1, 3, 8, 8)).fit(other_t5, SD3FlowSchedule()) is None


STEPS, CFG, STRENGTH = 4, 3.0, 0.8


def test_whole_run_matches_stable_diffusion_3_controlnet_pipeline(tmp_path) -> None:
    """euler, cfg and a blur ControlNet at strength 0.8 acting from a quarter of the run (steps 1 to 3 of 4 by both
    rules); diffusers' pipeline lends the ControlNet the transformer's patch embedding itself."""
    path = stability_file(tmp_path / "sd3.5_large_controlnet_blur.safetensors", seed=5)
    model = random_mmdit(MODEL, seed=4)
    net = load_controlnet(path).model
    vae, reference_vae = tiny_vae()
    generator = torch.Generator().manual_seed(6)
    image = torch.rand(1, 3, 48, 64, generator=generator)
    context, negative = (torch.randn(1, 7, MODEL.context_dim, generator=generator) for _ in range(2))
    pooled, negative_pooled = (torch.randn(1, MODEL.adm_in_channels, generator=generator) for _ in range(2))
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
        tokenizer_3=None, controlnet=diffusers_controlnet(path))
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
