"""Stable unCLIP: the noise augmentor and `y` against diffusers' StableUnCLIPImg2ImgPipeline parts (its image
normaliser, DDPMScheduler.add_noise and get_timestep_embedding), the UNet with that `y` against diffusers' UNet
with a projection class embedding, and the detection and loading of unCLIP checkpoints in the real key layout."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from ldm.checkpoint import CheckpointError, detect_family, load_checkpoint, peek_family, read_metadata
from ldm.presets import PRESETS, randomize_
from ldm.unclip import (
    MERGE_NOISE,
    NoiseAugmentor,
    load_noise_augmentor,
    make_unclip_checkpoint,
    squaredcos_cap_v2,
    unclip_adm,
)
from ldm.unet import UNetModel
from tests.ldm.diffusers_reference import diffusers_unet, rel_err

DIM = 16


def _diffusers_noising(mean: torch.Tensor, std: torch.Tensor):
    """`noise(embeds, level, noise)`: diffusers' StableUnCLIPImg2ImgPipeline.noise_image_embeddings, run on the
    pipeline's own components (a normaliser holding `mean`/`std`, the squaredcos_cap_v2 DDPMScheduler)."""
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    normalizer = StableUnCLIPImageNormalizer(embedding_dim=mean.shape[-1])
    normalizer.mean.data.copy_(mean)
    normalizer.std.data.copy_(std)
    parts = SimpleNamespace(image_normalizer=normalizer,
                            image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000,
                                                                  beta_schedule="squaredcos_cap_v2"))

    def noise(embeds: torch.Tensor, level: int, noise: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return StableUnCLIPImg2ImgPipeline.noise_image_embeddings(parts, embeds, level, noise=noise)

    return noise


def _augmentor_with_stats(seed: int) -> tuple[NoiseAugmentor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mean, std = torch.randn(1, DIM, generator=generator), 0.5 + torch.rand(1, DIM, generator=generator)
    augmentor = NoiseAugmentor(DIM)
    augmentor.data_mean.copy_(mean)
    augmentor.data_std.copy_(std)
    return augmentor, mean, std


@pytest.mark.parametrize("level", [0, 1, 300, 999])
def test_the_augmentor_noises_and_embeds_as_diffusers_stable_unclip(level):
    augmentor, mean, std = _augmentor_with_stats(0)
    generator = torch.Generator().manual_seed(level)
    embeds, noise = torch.randn(3, DIM, generator=generator), torch.randn(3, DIM, generator=generator)
    ours = augmentor(embeds, level, noise)
    theirs = _diffusers_noising(mean, std)(embeds, level, noise)
    assert ours.shape == (3, 2 * DIM)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-6)
    if level == 0:  # the first level keeps the embedding all but whole
        assert (ours[:, :DIM] - embeds).abs().max() < 0.05


def test_the_schedule_is_the_cosine_one_capped():
    betas = squaredcos_cap_v2()
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert betas[-1] == 0.999 and 0 < betas[0] < 1e-4
    assert torch.all(betas[1:] >= betas[:-1])


def test_y_from_image_prompts_is_comfyuis_sum_of_strength_scaled_noised_embeddings():
    augmentor, mean, std = _augmentor_with_stats(1)
    noising = _diffusers_noising(mean, std)
    generator = torch.Generator().manual_seed(5)
    one, two = torch.randn(1, DIM, generator=generator), torch.randn(2, DIM, generator=generator)
    seed = 42
    noise = torch.randn(1, DIM, generator=torch.Generator().manual_seed(seed - 10))  # ComfyUI's draw: seed - 10
    single = unclip_adm([(one, 0.7, 0.3)], augmentor, seed)
    torch.testing.assert_close(single, 0.7 * noising(one, round(999 * 0.3), noise), rtol=1e-5, atol=2e-6)
    # Three images (a batch of two is two prompts' worth): each noised to its level and scaled, summed; the
    # sum's embedding part noised again to the merge level, with that level's embedding.
    several = unclip_adm([(one, 0.7, 0.3), (two, -1.5, 0.0)], augmentor, seed)
    parts = [0.7 * noising(one, 300, noise), -1.5 * noising(two[:1], 0, noise), -1.5 * noising(two[1:], 0, noise)]
    summed = torch.stack(parts).sum(0)
    expected = noising(summed[:, :DIM], round(999 * MERGE_NOISE), noise)
    # diffusers' schedule is a float32 cumulative product, LDM's (ours) a float64 one: 1e-5 apart in the sum.
    torch.testing.assert_close(several, expected, rtol=1e-4, atol=2e-5)
    assert torch.equal(unclip_adm([(one, 0.7, 0.3)], augmentor, seed), single)  # seeded: the same again
    assert not torch.allclose(unclip_adm([(one, 0.7, 0.3)], augmentor, seed + 1), single)
    with pytest.raises(ValueError, match="the image embedding is 8 wide and this unCLIP model takes 16"):
        unclip_adm([(torch.zeros(1, 8), 1.0, 0.0)], augmentor, seed)


def test_the_unet_with_an_image_embedding_as_y_matches_diffusers_projection_class_embedding():
    config = dataclasses.replace(PRESETS["tiny-sd2"][2], adm_in_channels=2 * DIM)
    unet = randomize_(UNetModel(config), torch.Generator().manual_seed(3)).eval()
    with torch.no_grad():  # label_emb's weights large enough that y moves the output
        unet.label_emb[0][0].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    reference = diffusers_unet(config, unet.state_dict(), unclip=True)
    assert reference.config.class_embed_type == "projection"
    generator = torch.Generator().manual_seed(6)
    x, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    embeds = torch.randn(2, DIM, generator=generator)
    noise = torch.randn(2, DIM, generator=generator)
    augmentor, mean, std = _augmentor_with_stats(2)
    y = augmentor(embeds, 200, noise)
    torch.testing.assert_close(y, _diffusers_noising(mean, std)(embeds, 200, noise), rtol=1e-5, atol=2e-6)
    t = torch.tensor([500, 20])
    with torch.no_grad():
        ours = unet(x, t, context, y=y)
        theirs = reference(x, t, encoder_hidden_states=context, class_labels=y).sample
        without = unet(x, t, context, y=torch.zeros_like(y))
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(without, ours) > 1e-3  # the image embedding matters


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_unclip_checkpoint(tmp_path_factory.mktemp("unclip") / "tiny-unclip.safetensors", seed=1)


def test_an_unclip_checkpoint_is_told_from_sd2_and_sdxl_and_loads_with_its_augmentor(checkpoint):
    family = peek_family(checkpoint)
    assert (family.name, family.unclip, family.prediction) == ("sd2", True, "v")
    assert family.unet_config.adm_in_channels == 2 * DIM
    loaded = load_checkpoint(checkpoint)
    assert loaded.family == family
    assert loaded.unused_keys == []  # the image encoder's keys are ldm.clip_vision's (reported there)
    standard = NoiseAugmentor(DIM)
    for name, buffer in standard.state_dict().items():
        torch.testing.assert_close(loaded.noise_augmentor.state_dict()[name], buffer)
    # The released files' UNet alone: SD2's 1024-wide context tells it from SDXL's `y` models.
    def unet_shapes(context: int, adm: int) -> dict[str, torch.Tensor]:
        shapes = {k: v for k, v in safetensors.torch.load_file(checkpoint).items()
                  if k.startswith("model.diffusion_model.") or k.startswith("first_stage_model.")}
        for key in [k for k in shapes if k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_v.weight")]:
            shapes[key] = torch.empty(shapes[key].shape[0], context, device="meta")
        shapes["model.diffusion_model.label_emb.0.0.weight"] = torch.empty(128, adm, device="meta")
        return shapes

    metadata = read_metadata(checkpoint)
    assert detect_family(unet_shapes(1024, 2048), metadata).unclip
    assert not detect_family(unet_shapes(2048, 2816), metadata).unclip
    assert detect_family(unet_shapes(2048, 2816), metadata).name == "sdxl"


def test_the_augmentor_reads_saved_statistics_and_refuses_another_schedule(checkpoint):
    sd = safetensors.torch.load_file(checkpoint)
    mean, std = torch.randn(1, DIM), torch.rand(DIM) + 0.5
    augmentor, used = load_noise_augmentor({**sd, "noise_augmentor.data_mean": mean,
                                            "noise_augmentor.data_std": std}, DIM)
    assert torch.equal(augmentor.data_mean, mean) and torch.equal(augmentor.data_std, std[None])
    assert len(used) == 10 and all(k.startswith("noise_augmentor.") for k in used)
    linear = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000), 0)
    with pytest.raises(CheckpointError, match="the noise augmentor's schedule is not SD 2.1 unCLIP's"):
        load_noise_augmentor({**sd, "noise_augmentor.alphas_cumprod": linear}, DIM, "odd.safetensors")
    with pytest.raises(CheckpointError, match="data_mean holds 8 values; the UNet's image embedding is 16 wide"):
        load_noise_augmentor({**sd, "noise_augmentor.data_mean": torch.zeros(8)}, DIM)
