"""Audio-video latents packed for the sampler (`ldm.sampling.av_latent`): the packing ComfyUI's pack_latents does,
the parts' noise drawn in turn from one generator (ComfyUI's prepare_noise of a NestedTensor), the parts' masks,
and the model wrapper that hands a model its parts."""

from __future__ import annotations

import torch

from ldm.sampling.av_latent import AUDIO_MASK, AUDIO_SAMPLES, PackedParts, pack, packed_mask, shapes_of, unpack
from ldm.sampling.noise import prepare_noise


def _parts(batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 4, 2, 3, 5, generator=g), torch.randn(batch, 8, 7, 16, generator=g)]


def test_pack_lays_each_items_parts_one_after_the_other():
    video, audio = _parts()
    x = pack([video, audio])
    assert x.shape == (2, 1, 4 * 2 * 3 * 5 + 8 * 7 * 16)
    assert torch.equal(x[1, 0, :120], video[1].flatten()) and torch.equal(x[1, 0, 120:], audio[1].flatten())
    back = unpack(x, shapes_of([video, audio]))
    assert torch.equal(back[0], video) and torch.equal(back[1], audio)


def test_noise_is_drawn_part_by_part_from_one_generator():
    video, audio = _parts()
    shapes = shapes_of([video, audio])
    noise = prepare_noise(pack([video, audio]), 42, parts=shapes)
    g = torch.manual_seed(42)  # ComfyUI seeds the CPU generator so, then draws the video's noise, then the audio's
    expected = pack([torch.randn(video.shape, generator=g), torch.randn(audio.shape, generator=g)])
    assert torch.equal(noise, expected)
    picked = prepare_noise(pack([video[:1], audio[:1]]), 42, batch_index=[1], parts=shapes)
    g = torch.manual_seed(42)  # batch_index: each part's items drawn one by one, the asked one kept
    drawn_video = [torch.randn(1, *shapes[0], generator=g) for _ in range(2)]
    drawn_audio = [torch.randn(1, *shapes[1], generator=g) for _ in range(2)]
    assert torch.equal(picked, pack([drawn_video[1], drawn_audio[1]]))


def test_a_part_without_a_mask_is_denoised_whole():
    video, audio = _parts(batch=1)
    latent = {"samples": video, AUDIO_SAMPLES: audio}
    assert packed_mask(latent) is None
    mask = torch.ones(1, 1, 2, 1, 1)
    mask[:, :, 0] = 0.0  # the first frame kept
    packed = packed_mask({**latent, "noise_mask": mask})
    video_mask, audio_mask = unpack(packed, shapes_of([video, audio]))
    assert not video_mask[:, :, 0].any() and video_mask[:, :, 1].eq(1).all() and audio_mask.eq(1).all()
    packed = packed_mask({**latent, AUDIO_MASK: torch.zeros(1, 1, 1, 1)})  # a given soundtrack kept whole
    video_mask, audio_mask = unpack(packed, shapes_of([video, audio]))
    assert video_mask.eq(1).all() and not audio_mask.any()


def test_packed_parts_hands_the_model_its_parts_and_masks_at_the_calls_batch():
    video, audio = _parts(batch=1)
    shapes = shapes_of([video, audio])
    seen = {}

    def model(parts, timesteps, context, denoise_masks=None, **kwargs):
        seen.update(parts=parts, masks=denoise_masks, kwargs=kwargs)
        return [parts[0] * 2, parts[1] * 3]

    mask = pack([torch.zeros_like(video), torch.ones_like(audio)])
    wrapped = PackedParts(model, shapes, mask)
    x = pack([video, audio]).repeat(2, 1, 1)  # the positive and negative prompts' rows
    out = wrapped(x, torch.tensor([0.5, 0.5]), torch.zeros(2, 3, 4), y=None)
    assert torch.equal(out, pack([video.repeat(2, 1, 1, 1, 1) * 2, audio.repeat(2, 1, 1, 1) * 3]))
    assert [m.shape[0] for m in seen["masks"]] == [2, 2] and not seen["masks"][0].any()
    assert seen["kwargs"] == {"y": None}
