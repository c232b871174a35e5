"""The KSampler entry point: seeds, img2img, two-stage runs, inpainting masks, progress, interrupts."""

from __future__ import annotations

import time

import pytest
import torch

from ldm.sampling import (
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    DiscreteSchedule,
    SamplingInterrupted,
    compute_sigmas,
    get_sigmas,
    sample,
)
from ldm.sampling.ksampler import SAMPLERS
from ldm.sampling.noise import (
    BrownianTreeNoiseSampler,
    PrefetchingNoiseSampler,
    prepare_noise,
    seeded_noise_sampler,
    step_noise_seed,
)

SCHEDULE = DiscreteSchedule()


class CountingUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.calls = 0

    def forward(self, x, t, context, y=None):
        self.calls += 1
        return 0.3 * torch.tanh(self.conv(x)) + 0.5 * x + context.mean() + t[:, None, None, None] / 5000


POS = [(torch.full((1, 77, 8), 0.1), {})]
NEG = [(torch.full((1, 77, 8), -0.1), {})]


def run(latent=None, unet=None, **kwargs):
    args = dict(
        seed=42, steps=10, cfg=6.0, sampler_name="euler", scheduler="normal", positive=POS, negative=NEG
    )
    args.update(kwargs)
    latent = torch.zeros(2, 4, 8, 8) if latent is None else latent
    return sample(unet or CountingUNet(), SCHEDULE, latent, **args)


@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
def test_every_sampler_runs_and_is_reproducible(sampler_name):
    a = run(sampler_name=sampler_name, steps=4)
    assert torch.isfinite(a).all() and a.shape == (2, 4, 8, 8)
    assert torch.equal(a, run(sampler_name=sampler_name, steps=4))
    assert not torch.equal(a, run(sampler_name=sampler_name, steps=4, seed=43))


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_runs(scheduler):
    assert torch.isfinite(run(scheduler=scheduler, steps=3)).all()


def test_denoise_zero_returns_the_input_unchanged():
    latent = torch.randn(1, 4, 8, 8)
    unet = CountingUNet()
    assert torch.equal(run(latent, unet, denoise=0.0), latent)
    assert unet.calls == 0


def test_partial_denoise_spreads_the_steps_over_the_lower_range():
    sigmas = compute_sigmas(SCHEDULE, "normal", 10, denoise=0.5)
    assert len(sigmas) == 11 and sigmas[-1] == 0
    assert torch.equal(sigmas, compute_sigmas(SCHEDULE, "normal", 20)[-11:])
    latent = torch.randn(1, 4, 8, 8)
    assert (run(latent, denoise=0.3) - latent).abs().mean() < (run(latent) - latent).abs().mean()


def test_two_stage_run_with_leftover_noise_equals_one_run():
    unet = CountingUNet()
    full = run(unet=unet, steps=12)
    first = run(unet=unet, steps=12, end_step=5, return_leftover_noise=True)
    second = run(first, unet=unet, steps=12, start_step=5, add_noise=False)
    assert torch.allclose(second, full, atol=1e-5)


def test_end_step_without_leftover_noise_finishes_at_sigma_zero():
    seen = []
    run(steps=12, end_step=5, sampler_name="euler_ancestral", callback=lambda i, n, x0: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(5)]
    previews = []
    finished = run(steps=12, end_step=5, callback=lambda i, n, x0: previews.append(x0))
    assert torch.allclose(finished, previews[-1], atol=1e-5)  # an Euler step to sigma 0 lands on x0
    previews.clear()
    leftover = run(
        steps=12, end_step=5, return_leftover_noise=True, callback=lambda i, n, x0: previews.append(x0)
    )
    assert not torch.allclose(leftover, previews[-1], atol=1e-2)


def test_start_step_past_the_end_returns_the_input():
    latent = torch.randn(1, 4, 8, 8)
    assert torch.equal(run(latent, steps=10, start_step=10), latent)


def test_noise_mask_keeps_the_unmasked_region():
    latent = torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0  # pixel-space mask, repaint the middle
    out = run(latent, noise_mask=mask, sampler_name="dpmpp_2m", denoise=0.8)
    keep = torch.nn.functional.interpolate(mask[:, None], size=(8, 8), mode="bilinear") == 0
    keep = keep.expand_as(latent)
    assert torch.equal(out[keep], latent[keep])
    assert not torch.allclose(out[~keep], latent[~keep])


def test_callback_reports_each_step_with_a_preview():
    seen = []
    run(steps=7, sampler_name="heun", callback=lambda i, n, x0: seen.append((i, n, x0.shape)))
    assert seen == [(i, 7, (2, 4, 8, 8)) for i in range(7)]


def test_interrupt_stops_a_long_run_within_one_step():
    unet = CountingUNet()
    steps_done = []

    def interrupt() -> bool:
        return len(steps_done) >= 3

    with pytest.raises(SamplingInterrupted):
        run(unet=unet, steps=1000, callback=lambda i, n, x0: steps_done.append(i), interrupt=interrupt)
    assert steps_done[-1] == 2 and unet.calls <= 4


def test_v_prediction_runs():
    assert torch.isfinite(run(prediction="v", sampler_name="dpmpp_2m_sde", scheduler="karras")).all()


def test_batch_index_gives_the_same_noise_as_the_full_batch():
    full = run(torch.zeros(3, 4, 8, 8), sampler_name="euler")
    picked = run(torch.zeros(1, 4, 8, 8), sampler_name="euler", batch_index=[2])
    assert torch.allclose(picked[0], full[2], atol=1e-6)


def test_unknown_sampler_is_rejected():
    with pytest.raises(ValueError, match="unknown sampler"):
        run(sampler_name="nope")


@pytest.mark.parametrize("sampler_name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_prefetched_brownian_noise_equals_direct_draws(sampler_name):
    sigmas = compute_sigmas(SCHEDULE, "normal", 6)
    positive = sigmas[sigmas > 0]
    tree = BrownianTreeNoiseSampler(torch.zeros(2, 4, 8, 8), float(positive.min()), float(positive.max()), 42)
    direct = run(sampler_name=sampler_name, steps=6, sampler_options={"noise_sampler": tree})
    assert torch.equal(run(sampler_name=sampler_name, steps=6), direct)


@pytest.mark.parametrize("sampler_name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "ddpm", "lcm"])
def test_step_noise_drawn_ahead_equals_direct_draws(sampler_name):
    direct = seeded_noise_sampler(torch.zeros(2, 4, 8, 8), step_noise_seed(42))
    assert torch.equal(run(sampler_name=sampler_name, steps=6),
                       run(sampler_name=sampler_name, steps=6, sampler_options={"noise_sampler": direct}))


def test_query_independent_draws_keep_their_order_beyond_the_queue_and_start_when_asked():
    drawn = []
    generator = torch.Generator().manual_seed(0)

    def draw(a, b):
        drawn.append(1)
        return torch.randn(3, generator=generator)

    ahead = PrefetchingNoiseSampler(draw, [(1.0, 0.5), (0.5, 0.25)], "cpu", torch.float64, by_query=False)
    time.sleep(0.05)
    assert drawn == []
    answers = [ahead(1.0, 0.5) for _ in range(4)]  # two drawn ahead, two more after them
    ahead.close()
    again = torch.Generator().manual_seed(0)
    expected = torch.stack([torch.randn(3, generator=again) for _ in range(4)]).double()
    assert torch.equal(torch.stack(answers), expected)


def test_prefetcher_answers_unexpected_queries_too():
    prefetcher = PrefetchingNoiseSampler(lambda a, b: torch.tensor([a, b]), [(1.0, 0.5), (0.5, 0.25)])
    assert prefetcher(0.7, 0.1).tolist() == pytest.approx([0.7, 0.1])
    assert prefetcher(1.0, 0.5).tolist() == [1.0, 0.5]
    prefetcher.close()


def test_prefetcher_draws_nothing_before_it_is_started_and_the_tree_is_built_at_the_first_draw():
    """The KSampler starts the draws as its first model call begins, so they overlap the model, not
    the set-up before it (a Brownian tree's walk holds the GIL much of the time)."""
    drawn = []
    prefetcher = PrefetchingNoiseSampler(lambda a, b: drawn.append((a, b)) or torch.tensor([a, b]), [(1.0, 0.5)])
    time.sleep(0.05)
    assert drawn == []
    prefetcher.start()
    prefetcher.start()  # once only
    assert prefetcher(1.0, 0.5).tolist() == [1.0, 0.5] and drawn == [(1.0, 0.5)]
    prefetcher.close()
    tree = BrownianTreeNoiseSampler(torch.zeros(1, 4, 8, 8), 0.03, 14.6, seed=1)
    assert tree._tree is None
    first = tree(14.6, 10.0)
    assert tree._tree is not None and torch.equal(BrownianTreeNoiseSampler(torch.zeros(1, 4, 8, 8), 0.03, 14.6, seed=1)(
        14.6, 10.0), first)


def test_prefetcher_draws_on_its_thread_and_converts_in_the_callers():
    """The background thread makes CPU tensors only: a CUDA copy from it could land inside a CUDA
    graph capture of the UNet. The caller's thread moves each answer to the device and dtype."""
    import threading

    threads = []

    def draw(a, b):
        threads.append(threading.current_thread())
        return torch.tensor([a, b], dtype=torch.float32)

    prefetcher = PrefetchingNoiseSampler(draw, [(1.0, 0.5)], "cpu", torch.float64)
    answer = prefetcher(1.0, 0.5)
    prefetcher.close()
    assert answer.dtype == torch.float64 and threads and threads[0] is not threading.current_thread()


def test_step_noise_is_not_a_copy_of_the_initial_noise():
    drawn = []
    noise = prepare_noise(torch.zeros(2, 4, 8, 8), 42)
    sampler = SAMPLERS["euler_ancestral"]

    def spy(model, x, sigmas, noise_sampler, **kwargs):
        drawn.append(noise_sampler(float(sigmas[0]), float(sigmas[1])))
        return sampler(model, x, sigmas, noise_sampler=noise_sampler, **kwargs)

    SAMPLERS["euler_ancestral"] = spy
    try:
        run(sampler_name="euler_ancestral", steps=3)
    finally:
        SAMPLERS["euler_ancestral"] = sampler
    assert abs(float((drawn[0] * noise).mean())) < 0.2


def test_comfyuis_gpu_noise_names_run_the_same_samplers():
    from ldm.sampling import SAMPLER_ALIASES

    schedule = DiscreteSchedule()
    cond = [(torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(2)), {})]

    def unet(x, t, context, y=None):
        return x * 0.3 + context.mean() * 0.1

    for alias, name in SAMPLER_ALIASES.items():
        runs = [sample(unet, schedule, torch.zeros(1, 4, 8, 8), seed=4, steps=5, cfg=3.0, sampler_name=sampler,
                       scheduler="karras", positive=cond, negative=cond) for sampler in (alias, name)]
        assert torch.equal(*runs), alias


@pytest.mark.parametrize("sampler_name", ["dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"])
def test_second_order_samplers_get_one_step_more_with_the_penultimate_level_dropped(sampler_name):
    """ComfyUI's KSampler rule for these four: still `steps` steps, the schedule of steps + 1 without its
    next-to-last level (so the last step jumps from a larger sigma to 0)."""
    longer = get_sigmas("karras", SCHEDULE, 5)
    sigmas = compute_sigmas(SCHEDULE, "karras", 4, sampler_name=sampler_name)
    assert torch.equal(sigmas, torch.cat([longer[:-2], longer[-1:]])) and len(sigmas) == 5
    half = compute_sigmas(SCHEDULE, "karras", 4, 0.5, sampler_name=sampler_name)
    longer = get_sigmas("karras", SCHEDULE, 9)
    assert torch.equal(half, torch.cat([longer[:-2], longer[-1:]])[-5:])
    assert torch.equal(compute_sigmas(SCHEDULE, "karras", 4, sampler_name="euler"), get_sigmas("karras", SCHEDULE, 4))

