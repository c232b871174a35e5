"""Flux's edit models in the library: Kontext's reference tokens, Fill's and Depth/Canny's wider inputs, against
diffusers' FluxTransformer2DModel and FluxKontextPipeline with the same weights and noise, and the placement rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ldm.flux import flux_config_from_state_dict
from ldm.flux_variants import References, edit_kind, fold_mask, reference_placements
from ldm.sampling import prepare_noise, sample
from ldm.sampling.flow import FlowSchedule
from tests.ldm.flux_reference import TINY, diffusers_twin, random_flux
from tests.ldm.test_flux_sampling import DEV_SCHEDULER

FILL = dataclasses.replace(TINY, in_channels=384)
CONTROL = dataclasses.replace(TINY, in_channels=128)


def prompt(seed: int, text: int = 5, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, text, TINY.context_dim, generator=generator)
    pooled = torch.randn(batch, TINY.vec_in_dim, generator=generator)
    return context, pooled


def diffusers_forward(reference, parts: list[torch.Tensor], ids: list[torch.Tensor], context, pooled, sigma,
                      guidance, tokens: int) -> torch.Tensor:
    """diffusers' transformer on the packed `parts` (concatenated along the sequence) at positions `ids`; the first
    `tokens` outputs."""
    with torch.no_grad():
        out = reference(hidden_states=torch.cat(parts, dim=1), encoder_hidden_states=context,
                        pooled_projections=pooled, timestep=sigma, guidance=guidance, img_ids=torch.cat(ids),
                        txt_ids=torch.zeros(context.shape[1], 3), return_dict=False)[0]
    return out[:, :tokens]


def pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def ids(h: int, w: int, index: int = 0) -> torch.Tensor:
    grid = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    grid[:, 0] = index
    return grid


def test_reference_tokens_match_diffusers_transformer() -> None:
    model = random_flux()
    reference = diffusers_twin(model)
    generator = torch.Generator().manual_seed(1)
    x, ref = torch.randn(2, 16, 6, 8, generator=generator), torch.randn(1, 16, 4, 6, generator=generator)
    context, pooled = prompt(2, batch=2)
    sigma, guidance = torch.tensor([0.7, 0.3]), torch.tensor([3.5, 2.0])
    with torch.no_grad():
        ours = model(x, sigma, context, torch.cat([pooled, guidance[:, None]], dim=1), ref_latents=[ref])
        plain = model(x, sigma, context, torch.cat([pooled, guidance[:, None]], dim=1))
    expected = diffusers_forward(reference, [pack(x), pack(ref).expand(2, -1, -1)], [ids(6, 8), ids(4, 6, 1)],
                                 context, pooled, sigma, guidance, 12)
    expected = FluxPipeline._unpack_latents(expected, 48, 64, 8)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the reference is attended to
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("config", "extra"), [(FILL, 80), (CONTROL, 16)], ids=["fill", "control"])
def test_wider_inputs_match_diffusers_transformer(config, extra: int) -> None:
    model = random_flux(config)
    reference = diffusers_twin(model)
    generator = torch.Generator().manual_seed(3)
    x, concat = torch.randn(1, 16, 6, 8, generator=generator), torch.randn(1, extra, 6, 8, generator=generator)
    context, pooled = prompt(4)
    with torch.no_grad():
        ours = model(torch.cat([x, concat], dim=1), torch.tensor([0.5]), context,
                     torch.cat([pooled, torch.tensor([[3.5]])], dim=1))
        # diffusers' pipelines pack each part alone and join them along the token width (FluxFillPipeline: the
        # latent, the masked image, the mask; FluxControlPipeline: the latent, the control image).
        parts = [pack(x)] + ([pack(concat[:, :16]), pack(concat[:, 16:])] if extra == 80 else [pack(concat)])
        out = reference(hidden_states=torch.cat(parts, dim=2), encoder_hidden_states=context,
                        pooled_projections=pooled, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                        img_ids=ids(6, 8), txt_ids=torch.zeros(5, 3), return_dict=False)[0]
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(out, 48, 64, 8), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=f"takes {16 + extra} input channels: a 16-channel latent and {extra}"):
        model(x, torch.tensor([0.5]), context, pooled)
    with pytest.raises(ValueError, match="reference latents .* cannot go to a Flux model"):
        model(torch.cat([x, concat], dim=1), torch.tensor([0.5]), context, pooled, ref_latents=[x])


def test_kinds_and_config_from_state_dict() -> None:
    assert [edit_kind(c.in_channels, c.out_channels) for c in (TINY, FILL, CONTROL)] == [None, "fill", "control"]
    for config in (FILL, CONTROL):
        found = flux_config_from_state_dict(random_flux(config).state_dict(), axes_dim=config.axes_dim)
        assert found == config and found.latent_channels == 16 and found.input_channels == config.in_channels // 4
    with pytest.raises(ValueError, match="takes 96 values per patch .* no other kind"):
        edit_kind(96, 64)


def test_reference_placements_follow_comfyuis_methods() -> None:
    sizes = [(4, 6), (6, 4)]  # latent pixels; the noisy latent is 3 x 4 patches
    # offset: index 1, the second reference below the first (the block grows where it stays squarest).
    assert reference_placements(sizes, 3, 4, "offset") == [(1, 0, 0), (1, 2, 0)]
    assert reference_placements([(4, 6), (4, 2)], 3, 4, "offset") == [(1, 0, 0), (1, 2, 0)]
    assert reference_placements([(6, 4), (4, 4)], 3, 4, "offset") == [(1, 0, 0), (1, 0, 2)]
    assert reference_placements(sizes, 3, 4, "index") == [(1, 0, 0), (2, 0, 0)]
    # uxo: index 0, diagonally past the noisy latent (6 x 8 latent pixels), then past each reference.
    assert reference_placements(sizes, 3, 4, "uxo") == [(0, 3, 4), (0, 5, 7)]
    with pytest.raises(ValueError, match="unknown reference latent method 'uno'"):
        reference_placements(sizes, 3, 4, "uno")


def test_fold_mask_is_diffusers_fill_layout() -> None:
    mask = torch.arange(2 * 16 * 24, dtype=torch.float32).reshape(2, 1, 16, 24)
    folded = fold_mask(mask)
    assert folded.shape == (2, 64, 2, 3)
    # Channel 8 * i + j of latent pixel (r, c) is the pixel (8r + i, 8c + j).
    assert folded[1, 8 * 3 + 5, 1, 2] == mask[1, 0, 8 + 3, 16 + 5]
    expected = mask[:, 0].view(2, 2, 8, 3, 8).permute(0, 2, 4, 1, 3).reshape(2, 64, 2, 3)  # diffusers' own steps
    assert torch.equal(folded, expected)


@pytest.mark.parametrize("steps", [1, 4])
def test_kontext_run_matches_diffusers_pipeline(steps: int) -> None:
    model = random_flux()
    context, pooled = prompt(5, text=7)
    reference_latent = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(6))
    mu = calculate_shift(3 * 4)
    y = torch.cat([pooled, torch.tensor([[2.5]])], dim=1)
    positive = [(context, {"y": y, "ref_latents": References((reference_latent,))})]
    with torch.no_grad():
        ours = sample(model, FlowSchedule(mu), torch.zeros(1, 16, 6, 8), seed=9, steps=steps, cfg=1.0,
                      sampler_name="euler", scheduler="simple", positive=positive, negative=positive,
                      prediction="flow")

    noise = prepare_noise(torch.zeros(1, 16, 6, 8), 9)
    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), vae=None,
                               text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                               transformer=diffusers_twin(model))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # a 16-channel `image` is taken as the reference's (scaled) latent as it is
        packed = pipe(image=reference_latent, prompt_embeds=context, pooled_prompt_embeds=pooled, height=48, width=64,
                      num_inference_steps=steps, guidance_scale=2.5, output_type="latent", latents=pack(noise),
                      max_area=48 * 64, _auto_resize=False).images
    expected = FluxPipeline._unpack_latents(packed, 48, 64, 8)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("negative_refs", [True, False], ids=["batched", "apart"])
def test_cfg_with_references_per_side(negative_refs: bool) -> None:
    """Positive and negative each reach the model with their own references: batched into one call when their
    shapes match, in two calls when only one side has any."""
    model = random_flux()
    (context, pooled), (neg_context, neg_pooled) = prompt(7), prompt(8)
    generator = torch.Generator().manual_seed(10)
    ref, neg_ref = torch.randn(1, 16, 4, 4, generator=generator), torch.randn(1, 16, 4, 4, generator=generator)
    y, neg_y = (torch.cat([p, torch.tensor([[3.0]])], dim=1) for p in (pooled, neg_pooled))
    positive = [(context, {"y": y, "ref_latents": References((ref,), "index")})]
    negative = [(neg_context, {"y": neg_y, **({"ref_latents": References((neg_ref,), "index")} if negative_refs
                                               else {})})]
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    with torch.no_grad():  # one euler step from sigma 1: x0 = noise - guided velocity
        ours = sample(model, FlowSchedule(1.0), torch.zeros(1, 16, 4, 6), seed=2, steps=1, cfg=2.5,
                      sampler_name="euler", scheduler="simple", positive=positive, negative=negative,
                      prediction="flow")
        hook.remove()
        noise = prepare_noise(torch.zeros(1, 16, 4, 6), 2)
        one = torch.tensor([1.0])
        cond = model(noise, one, context, y, ref_latents=References((ref,), "index"))
        uncond = model(noise, one, neg_context, neg_y, **({"ref_latents": [neg_ref]} if negative_refs else {}))
    assert calls == ([2] if negative_refs else [1, 1])
    torch.testing.assert_close(ours, noise - (uncond + 2.5 * (cond - uncond)), rtol=1e-5, atol=1e-5)


def test_tiny_variant_files_have_the_edit_models_widths() -> None:
    from ldm.flux_presets import tiny_flux_config

    widths = {v: (tiny_flux_config(v).in_channels, tiny_flux_config(v).edit_kind) for v in ("kontext", "fill", "canny")}
    assert widths == {"kontext": (64, None), "fill": (384, "fill"), "canny": (128, "control")}
    with pytest.raises(ValueError, match="variant must be one of dev, schnell, kontext, fill, depth, canny"):
        tiny_flux_config("redux")
