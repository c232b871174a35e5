"""Video areas (ConditioningSetAreaPercentageVideo's ("percentage", temporal, height, width, z, y, x)) through the
sampler: a prompt limited to some frames of a 5-D latent acts as it would on those frames sampled alone."""

from __future__ import annotations

import pytest
import torch

from ldm.sampling.cond_jobs import entry_job
from ldm.sampling.flow import SD3FlowSchedule
from ldm.sampling.ksampler import sample
from tests.ldm.test_video_sampling import PerPixel

WHOLE = (torch.full((1, 5, 8), 1.0), {})
NEGATIVE = [(torch.full((1, 5, 8), -1.0), {})]


def video_area(temporal: float, z: float, height: float = 1.0, y: float = 0.0, strength: float = 0.7) -> tuple:
    return (torch.full((1, 5, 8), 3.0),
            {"area": ("percentage", temporal, height, 1.0, z, y, 0.0), "strength": strength})


def run(latent: torch.Tensor, positive: list) -> torch.Tensor:
    return sample(PerPixel(), SD3FlowSchedule(5.0), latent, seed=3, steps=4, cfg=2.5, sampler_name="euler",
                  positive=positive, negative=NEGATIVE, prediction="flow", add_noise=False)


def frames_as_batch(video: torch.Tensor, frames: slice) -> torch.Tensor:
    return video[0, :, frames].movedim(1, 0)  # [1, C, T, h, w] -> [t, C, h, w]


def as_batch(positive: list, count: int) -> list:
    return [(embedding.repeat(count, 1, 1), options) for embedding, options in positive]


def test_a_temporal_area_acts_on_its_frames_only():
    """Frames 2..3 of 4 get both prompts (blended by strength), frames 0..1 the whole-video prompt alone."""
    video = torch.randn(1, 4, 4, 8, 10, generator=torch.Generator().manual_seed(0))
    out = run(video, [WHOLE, video_area(temporal=0.5, z=0.5)])
    before = run(frames_as_batch(video, slice(0, 2)), as_batch([WHOLE], 2))
    both_whole = [WHOLE, (video_area(0.5, 0.5)[0], {"strength": 0.7})]
    during = run(frames_as_batch(video, slice(2, 4)), as_batch(both_whole, 2))
    torch.testing.assert_close(frames_as_batch(out, slice(0, 2)), before)
    torch.testing.assert_close(frames_as_batch(out, slice(2, 4)), during)
    assert not torch.allclose(before, run(frames_as_batch(video, slice(0, 2)), as_batch(both_whole, 2)))


def test_a_box_over_some_frames_is_the_picture_area_on_those_frames():
    """Frames 1..2, lower half: on those frames as a batch of pictures it is ConditioningSetAreaPercentage's area."""
    video = torch.randn(1, 4, 4, 8, 10, generator=torch.Generator().manual_seed(1))
    out = run(video, [WHOLE, video_area(temporal=0.5, z=0.25, height=0.5, y=0.5)])
    picture_area = (video_area(0.5, 0.25)[0], {"area": ("percentage", 0.5, 1.0, 0.5, 0.0), "strength": 0.7})
    during = run(frames_as_batch(video, slice(1, 3)), as_batch([WHOLE, picture_area], 2))
    torch.testing.assert_close(frames_as_batch(out, slice(1, 3)), during)
    for frame in (0, 3):
        alone = run(frames_as_batch(video, slice(frame, frame + 1)), [WHOLE])
        torch.testing.assert_close(frames_as_batch(out, slice(frame, frame + 1)), alone)
    plain = run(video, [WHOLE])
    torch.testing.assert_close(out[:, :, 1:3, :4], plain[:, :, 1:3, :4])  # the upper half: outside the box
    assert not torch.allclose(out[:, :, 1:3, 4:], plain[:, :, 1:3, 4:])


def comfy_feather(size: int, starts_inside: bool, ends_inside: bool) -> list[float]:
    """ComfyUI's fade of a multi-dimensional area along one axis: over min(8, size // 4) steps from each inner edge."""
    weights = [1.0] * size
    rr = min(8, size // 4)
    for t in range(rr):
        if starts_inside:
            weights[t] *= (t + 1) / rr
        if ends_inside:
            weights[size - 1 - t] *= (t + 1) / rr
    return weights


@pytest.mark.parametrize("temporal, z, frames", [(0.5, 0.25, (4, 12)), (0.75, 0.0, (0, 12)), (0.5, 0.5, (8, 16)),
                                                 (0.2, 0.9, (14, 16))])
def test_a_temporal_area_fades_over_its_inner_end_frames(temporal, z, frames):
    latent = torch.zeros(1, 4, 16, 8, 8)
    job = entry_job(0, torch.ones(1, 5, 8), video_area(temporal, z, strength=2.0)[1], latent, feather=8)
    assert (job.frames.start, job.frames.stop) == frames and job.region[1:] == (job.frames, slice(0, 8), slice(0, 8))
    size = frames[1] - frames[0]
    expected = 2.0 * torch.tensor(comfy_feather(size, frames[0] != 0, frames[1] < 16))
    assert job.weight.shape == (1, 1, size, 8, 8)
    torch.testing.assert_close(job.weight[0, 0, :, 3, 3], expected)


def test_areas_outside_the_frames_add_nothing_and_an_image_is_one_frame():
    video, image = torch.zeros(1, 4, 6, 8, 8), torch.zeros(1, 4, 8, 8)
    assert entry_job(0, torch.ones(1, 5, 8), video_area(0.5, 1.0)[1], video, feather=8) is None
    assert entry_job(0, torch.ones(1, 5, 8), video_area(1.0, 0.75)[1], image, feather=8) is None
    job = entry_job(0, torch.ones(1, 5, 8), video_area(0.3, 0.0, height=0.5, y=0.5)[1], image, feather=8)
    picture = entry_job(0, torch.ones(1, 5, 8), {"area": ("percentage", 0.5, 1.0, 0.5, 0.0), "strength": 0.7},
                        image, feather=8)
    assert job.frames is None and job.region == picture.region and torch.equal(job.weight, picture.weight)
