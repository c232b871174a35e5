"""Video latents [B, C, frames, h, w] through the sampler: prompts over areas, noise masks and CFG act on every frame
as they act on a batch of pictures."""

from __future__ import annotations

import torch

from ldm.sampling.flow import SD3FlowSchedule
from ldm.sampling.ksampler import sample


class PerPixel(torch.nn.Module):
    """A toy flow model acting on each latent pixel alone, so a video's frames and a batch of pictures agree."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y=None, **_) -> torch.Tensor:
        shape = (-1, *[1] * (x.ndim - 1))
        return 0.3 * x + context.mean(dim=(1, 2)).reshape(shape) + 0.01 * t.reshape(shape)


def _frames_as_batch(video: torch.Tensor) -> torch.Tensor:
    return video[0].movedim(1, 0)  # [1, C, T, h, w] -> [T, C, h, w]


def test_video_latent_samples_like_a_batch_of_its_frames() -> None:
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(1, 4, 3, 8, 10, generator=generator)
    positive = [(torch.full((1, 5, 8), 1.0), {}),
                (torch.full((1, 5, 8), 3.0), {"area": (4, 6, 2, 3), "strength": 0.7})]
    negative = [(torch.full((1, 5, 8), -1.0), {})]
    mask = torch.zeros(8, 10)
    mask[:, 5:] = 1.0
    kwargs = dict(seed=3, steps=4, cfg=2.5, sampler_name="euler", positive=positive, negative=negative,
                  prediction="flow", add_noise=False, noise_mask=mask)
    schedule = SD3FlowSchedule(5.0)
    out_video = sample(PerPixel(), schedule, video, **kwargs)
    positive_batch = [(e.repeat(3, 1, 1), o) for e, o in positive]
    negative_batch = [(e.repeat(3, 1, 1), o) for e, o in negative]
    out_batch = sample(PerPixel(), schedule, _frames_as_batch(video),
                       **{**kwargs, "positive": positive_batch, "negative": negative_batch})
    assert out_video.shape == video.shape
    torch.testing.assert_close(_frames_as_batch(out_video), out_batch)
    # the mask kept the left half of every frame, and the area prompt changed only its box on the right
    torch.testing.assert_close(out_video[..., :5], video[..., :5])
    assert not torch.allclose(out_video[..., 5:], video[..., 5:])


def test_video_latent_noise_has_the_latent_shape_and_seed() -> None:
    video = torch.zeros(2, 4, 3, 4, 4)
    kwargs = dict(seed=7, steps=2, cfg=1.0, sampler_name="euler", positive=[(torch.ones(1, 5, 8), {})],
                  negative=[(torch.ones(1, 5, 8), {})], prediction="flow")
    first = sample(PerPixel(), SD3FlowSchedule(3.0), video, **kwargs)
    again = sample(PerPixel(), SD3FlowSchedule(3.0), video, **kwargs)
    other = sample(PerPixel(), SD3FlowSchedule(3.0), video, **{**kwargs, "seed": 8})
    assert first.shape == video.shape
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first[:, :, 0], first[:, :, 1])  # each frame has its own noise
