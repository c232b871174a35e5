"""Self-Attention Guidance: a whole DDIM run against diffusers' SAG pipeline (same weights, prompts embeddings and
noise), and its parts on their own: the blur against scipy, the recorded attention map, the mask's grid."""

from __future__ import annotations

import warnings

import pytest
import torch

from ldm.attention import attention, attention_with_map
from ldm.patches import AttentionRecorder
from ldm.presets import PRESETS, randomize_
from ldm.sampling import DiscreteSchedule, sample, samplers_ldm
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import CFGGuider
from ldm.sampling.model_patches import SamplingPatches, SelfAttentionGuidance, gaussian_blur
from ldm.unet import UNetModel

CONFIG = PRESETS["tiny-sd1"][2]


@pytest.fixture(scope="module")
def unet() -> UNetModel:
    return randomize_(UNetModel(CONFIG), torch.Generator().manual_seed(0)).eval()


def _prompts(seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 7, CONFIG.context_dim, generator=g), torch.randn(1, 7, CONFIG.context_dim, generator=g)


def test_a_ddim_run_matches_diffusers_sag_pipeline(unet):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        StableDiffusionSAGPipeline,
    )

    from tests.ldm.diffusers_reference import diffusers_unet

    reference = diffusers_unet(CONFIG, unet.state_dict()).eval()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1)
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionSAGPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=reference,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    positive, negative = _prompts()
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    steps, cfg, scale = 6, 5.0, 0.8
    with torch.no_grad():
        theirs = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, latents=noise.clone(),
                      num_inference_steps=steps, guidance_scale=cfg, sag_scale=scale, output_type="latent",
                      height=128, width=128).images

    schedule = DiscreteSchedule(alphas_cumprod=scheduler.alphas_cumprod)
    levels = [float(schedule.sigmas[t]) for t in scheduler.timesteps.tolist()]
    final = float(schedule.sigmas[0])  # set_alpha_to_one=False: the run ends at the first level of the table
    sigmas = torch.tensor([*levels, final])

    def ours(sag_scale: float) -> torch.Tensor:
        guider = CFGGuider(Denoiser(unet, schedule), [(positive, {})], [(negative, {})], cfg,
                           post_cfg=(SelfAttentionGuidance(sag_scale, blur_sigma=1.0),), module=unet)
        with torch.no_grad():
            x = samplers_ldm.sample_ddim(guider, noise * (1 + levels[0] ** 2) ** 0.5, sigmas)
        return x / (1 + final**2) ** 0.5  # back to diffusers' variance-preserving latent

    got, plain = ours(scale), ours(0.0)
    assert (got - plain).abs().max() > 20 * (got - theirs).abs().max()  # the guidance is what agrees
    torch.testing.assert_close(got, theirs, atol=2e-4, rtol=1e-3)


def test_blur_matches_scipy_with_mirrored_edges():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sigma in (0.5, 2.0):
        expected = ndimage.gaussian_filter(x.numpy(), sigma, axes=(2, 3), mode="mirror", truncate=4 / sigma)
        torch.testing.assert_close(gaussian_blur(x, sigma), torch.from_numpy(expected))
    assert torch.equal(gaussian_blur(x, 0.0), x)  # no blur at 0, not NaNs


def test_the_recorded_map_is_the_attention_of_the_middle_blocks_first_self_attention(unet):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 6, 32, generator=g) for _ in range(3))
    out, probs = attention_with_map(q, k, v, heads=4)
    torch.testing.assert_close(out, attention(q, k, v, heads=4), atol=1e-5, rtol=1e-5)
    assert probs.shape == (8, 6, 6) and torch.allclose(probs.sum(-1), torch.ones(8, 6))

    recorder = AttentionRecorder()
    copy = recorder(unet)
    x, t, context = torch.randn(1, 4, 13, 9, generator=g), torch.tensor([500.0]), _prompts()[1]
    with torch.no_grad():
        torch.testing.assert_close(copy(x, t, context), unet(x, t, context), atol=1e-5, rtol=1e-4)
    heads = unet.middle_block[1].transformer_blocks[0].attn1.heads
    assert recorder.size(13, 9, 35) == (7, 5)  # one stride-2 downsampling in the tiny UNet, rounding up
    assert recorder.size(13, 9, 12) == (4, 3)  # features resized on the way (Deep Shrink): the aspect decides
    assert recorder.probs.shape == (heads, 35, 35)
    assert unet.middle_block[1].transformer_blocks[0].attn1.recorder is None  # the original is left alone


def test_the_mask_blurs_only_where_attention_gathers():
    sag = SelfAttentionGuidance(1.0, blur_sigma=2.0)
    sag.recorder.downsamples = 1  # a 4x4 grid for an 8x8 latent
    probs = torch.full((2, 16, 16), 1 / 16)  # 2 heads, every token attended to equally: no mask
    probs[:, :, 5] += 0.5  # ...but token 5 (row 1, column 1 of the grid) gets more than its share
    probs /= probs.sum(-1, keepdim=True)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    degraded = sag.degrade(x0, probs)
    changed = (degraded - x0).abs().sum(1)[0] > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 2:4] = True
    assert torch.equal(changed, expected)
    torch.testing.assert_close(degraded[..., 2:4, 2:4], gaussian_blur(x0, 2.0)[..., 2:4, 2:4])


def test_sag_runs_the_negative_prompt_at_cfg_1_and_scale_0_changes_nothing(unet):
    positive, negative = _prompts()
    latent = torch.zeros(1, 4, 16, 16)
    common = dict(seed=3, steps=3, sampler_name="euler", positive=[(positive, {})], negative=[(negative, {})])

    def run(cfg, sag_scale):
        patches = SamplingPatches(post_cfg=(SelfAttentionGuidance(sag_scale, 2.0),), keep_negative=True)
        with torch.no_grad():
            return sample(unet, DiscreteSchedule(), latent, cfg=cfg, patches=patches, **common)

    with torch.no_grad():
        plain = sample(unet, DiscreteSchedule(), latent, cfg=4.0, **common)
    torch.testing.assert_close(run(4.0, 0.0), plain)
    assert (run(4.0, 0.7) - plain).abs().max() > 1e-3
    with torch.no_grad():
        positive_only = sample(unet, DiscreteSchedule(), latent, cfg=1.0, **common)
    assert (run(1.0, 0.7) - positive_only).abs().max() > 1e-3  # guided by the negative even at cfg 1
