"""Context windows (ldm/sampling/context_windows.py): the window schedules against a literal transcription of
ComfyUI's (comfy/context_windows.py: create_windows_*, ordered_halving, apply_freenoise), the fuse weights, and a
windowed model against a step-by-step transcription of ComfyUI's execute (windows, causal anchor frame, retained
indices, weighted sums or the running "relative" average) on a small real module that mixes frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ldm.sampling.context_windows import (
    ContextWindows,
    context_windows,
    freenoise,
    fuse_weights,
    ordered_halving,
    windowed_unet,
)
from ldm.sampling.flow import SD3FlowSchedule
from ldm.sampling.ksampler import sample
from ldm.sampling.noise import model_noise
from ldm.sampling.run import sampling_run
from ldm.sampling.schedules import DiscreteSchedule

# --- A literal transcription of ComfyUI's schedule functions, its step-by-step list mutations kept. ---


def ref_halving(val: int) -> float:
    return int(f"{val:064b}"[::-1], 2) / (1 << 64)


def ref_looped(num_frames, length, overlap, stride, step, closed_loop):
    windows = []
    if num_frames < length:
        windows.append(list(range(num_frames)))
        return windows
    stride = min(stride, int(np.ceil(np.log2(num_frames / length))) + 1)
    for context_step in 1 << np.arange(stride):
        pad = int(round(num_frames * ref_halving(step)))
        for j in range(int(ref_halving(step) * context_step) + pad,
                       num_frames + pad + (0 if closed_loop else -overlap), length * context_step - overlap):
            windows.append([e % num_frames for e in range(j, j + length * context_step, context_step)])
    return windows


def ref_roll(window, num_frames):
    prev = -1
    for i, val in enumerate(window):
        val = val % num_frames
        if val < prev:
            return True, i
        prev = val
    return False, -1


def ref_to_end(window, num_frames):
    start = window[0]
    for i in range(len(window)):
        window[i] = ((window[i] - start) + num_frames) % num_frames
    delta = num_frames - window[-1] - 1
    for i in range(len(window)):
        window[i] = window[i] + delta


def ref_standard(num_frames, length, overlap, stride, step):
    windows = []
    if num_frames <= length:
        windows.append(list(range(num_frames)))
        return windows
    stride = min(stride, int(np.ceil(np.log2(num_frames / length))) + 1)
    for context_step in 1 << np.arange(stride):
        pad = int(round(num_frames * ref_halving(step)))
        for j in range(int(ref_halving(step) * context_step) + pad, num_frames + pad - overlap,
                       length * context_step - overlap):
            windows.append([e % num_frames for e in range(j, j + length * context_step, context_step)])
    delete = []
    i = 0
    while i < len(windows):
        rolls, at = ref_roll(windows[i], num_frames)
        if rolls:
            val = windows[i][at]
            ref_to_end(windows[i], num_frames)
            if val not in windows[(i + 1) % len(windows)]:
                windows.insert(i + 1, list(range(val, val + length)))
        for j in range(0, i):
            if windows[i] == windows[j]:
                delete.append(i)
                break
        i += 1
    for i in reversed(delete):
        windows.pop(i)
    return windows


def ref_static(num_frames, length, overlap):
    windows = []
    if num_frames <= length:
        return [list(range(num_frames))]
    for start in range(0, num_frames, length - overlap):
        if start + length >= num_frames:
            start = start - (start + length - num_frames)
            windows.append(list(range(start, start + length)))
            break
        windows.append(list(range(start, start + length)))
    return windows


def ref_batched(num_frames, length):
    if num_frames <= length:
        return [list(range(num_frames))]
    return [list(range(s, min(s + length, num_frames))) for s in range(0, num_frames, length)]


def ref_freenoise(noise, dim, length, overlap, seed):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    frames, delta = noise.shape[dim], length - overlap
    for start in range(0, frames - length, delta):
        place = start + length
        actual = min(delta, frames - place)
        if actual <= 0:
            break
        idx = torch.randperm(actual, generator=generator, device="cpu") + start
        source = [slice(None)] * noise.ndim
        source[dim] = idx
        target = [slice(None)] * noise.ndim
        target[dim] = slice(place, place + actual)
        noise[tuple(target)] = noise[tuple(source)]
    return noise


CASES = [(f, n, o) for f in (1, 5, 7, 12, 16, 17, 24, 33) for n in (1, 3, 4, 8, 16) for o in (0, 1, 2, 3)
         if o < n]


def test_ordered_halving() -> None:
    assert [ordered_halving(i) for i in range(6)] == [0.0, 0.5, 0.25, 0.75, 0.125, 0.625]


def test_hand_checked_windows() -> None:
    assert context_windows("standard_static", 7, 3, 1) == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    assert context_windows("standard_static", 8, 3, 1) == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [5, 6, 7]]
    assert context_windows("batched", 7, 3, 1) == [[0, 1, 2], [3, 4, 5], [6]]
    assert context_windows("standard_uniform", 7, 3, 1, step=0) == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    # step 1: shifted by half the video (pad 4 of 7 frames, rounded), the wrapping window moved back to the end
    # step 1: shifted by 4 (half of 7 frames, rounded); [6, 0, 1] wraps: moved back to [4, 5, 6] (then dropped as
    # a repeat) and [0, 1, 2] inserted, the next window not holding frame 0
    assert context_windows("standard_uniform", 7, 3, 1, step=1) == [[4, 5, 6], [0, 1, 2], [1, 2, 3]]
    assert context_windows("looped_uniform", 7, 3, 1, step=1) == [[4, 5, 6], [6, 0, 1], [1, 2, 3]]
    assert context_windows("looped_uniform", 7, 3, 1, step=0, closed_loop=True) == [
        [0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 0, 1]]


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("step", [0, 1, 2, 3, 5, 8])
def test_schedules_match_comfyuis(stride: int, step: int) -> None:
    for frames, length, overlap in CASES:
        assert context_windows("standard_static", frames, length, overlap) == ref_static(frames, length, overlap)
        assert context_windows("batched", frames, length, overlap) == ref_batched(frames, length)
        assert context_windows("standard_uniform", frames, length, overlap, stride, step) == ref_standard(
            frames, length, overlap, stride, step), (frames, length, overlap)
        for closed in (False, True):
            assert context_windows("looped_uniform", frames, length, overlap, stride, step, closed) == ref_looped(
                frames, length, overlap, stride, step, closed), (frames, length, overlap, closed)


def test_fuse_weights() -> None:
    assert fuse_weights("pyramid", [0, 1, 2, 3], 8, 1).tolist() == [1, 2, 2, 1]
    assert fuse_weights("pyramid", [0, 1, 2, 3, 4], 8, 1).tolist() == [1, 2, 3, 2, 1]
    assert fuse_weights("relative", [0], 8, 1).tolist() == [1]
    assert fuse_weights("flat", [2, 3, 4], 8, 1).tolist() == [1, 1, 1]
    first, middle, last = ([0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7])
    ramp = torch.linspace(1e-37, 1, 3)
    assert torch.equal(fuse_weights("overlap-linear", first, 8, 3), torch.cat([torch.ones(1), ramp.flip(0)]))
    assert torch.equal(fuse_weights("overlap-linear", last, 8, 3), torch.cat([ramp, torch.ones(1)]))
    # both ramps over a short window: the ramp down written last, over the ramp up
    middle_weights = torch.ones(4)
    middle_weights[:3] = ramp
    middle_weights[-3:] = ramp.flip(0)
    assert torch.equal(fuse_weights("overlap-linear", middle, 8, 3), middle_weights)
    assert fuse_weights("overlap-linear", middle, 8, 0).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("frames,length,overlap", [(17, 5, 2), (9, 4, 1), (4, 6, 2), (30, 16, 4)])
def test_freenoise_matches_comfyuis(frames: int, length: int, overlap: int) -> None:
    noise = torch.randn(1, 3, frames, 2, 2, generator=torch.Generator().manual_seed(0))
    expected = ref_freenoise(noise.clone(), 2, length, overlap, 123)
    got = freenoise(noise, 2, length, overlap, 123)
    assert torch.equal(got, expected)
    assert not torch.equal(got, noise) or frames <= length
    assert torch.equal(got.narrow(2, 0, min(length, frames)), noise.narrow(2, 0, min(length, frames)))


class FrameMixer(nn.Module):
    """A small real model over [B, C, T, H, W]: a temporal convolution (so frames see their neighbours, and a
    window's edges differ from the whole video's), the timestep and a mean over the frames (so every window sees
    only its own frames), a prompt term, and an optional per-frame mask."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))
        self.calls: list[int] = []

    def forward(self, x, timesteps, context, y=None, denoise_mask=None):
        self.calls.append(x.shape[2])
        if y is not None:
            x = torch.cat([x, y], dim=1)
        out = self.conv(x) + x[:, :1].mean(dim=2, keepdim=True) * timesteps.reshape(-1, 1, 1, 1, 1)
        out = out + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
        if denoise_mask is not None:
            out = out * (1 + denoise_mask)
        return out


def ref_execute(model, x, t, context, windows, fuse, overlap, causal, cond_retain, latent_retain, channels,
                inputs):
    """ComfyUI's IndexListContextHandler.execute for one model call, transcribed: window by window."""
    frames = x.shape[2]
    final, counts, biases = None, torch.zeros(1, 1, frames, 1, 1), [0.0] * frames
    if fuse == "relative":
        counts = torch.ones(1, 1, frames, 1, 1)

    def get_tensor(full, idx, retain):
        window = full[:, :, idx]
        if retain:
            window[:, :, retain] = full[:, :, retain]
        return window

    for window in windows:
        idx = ([window[0] - 1] if causal and window[0] >= 1 else []) + list(window)
        sub_x = torch.cat([get_tensor(x[:, :channels], idx, latent_retain),
                           get_tensor(x[:, channels:], idx, cond_retain)], dim=1)
        sub_inputs = {k: get_tensor(v, idx, cond_retain) for k, v in inputs.items()}
        out = model(sub_x, t, context, **sub_inputs)
        if len(idx) > len(window):
            out = out[:, :, 1:]
        if final is None:
            final = torch.zeros(out.shape[0], out.shape[1], frames, *out.shape[3:])
        if fuse == "relative":
            for pos, i in enumerate(window):
                bias = max(1e-2, 1 - abs(i - (window[0] + window[-1]) / 2) / ((window[-1] - window[0] + 1e-2) / 2))
                total = biases[i]
                final[:, :, i] = final[:, :, i] * (total / (total + bias)) + out[:, :, pos] * (bias / (total + bias))
                biases[i] = total + bias
        else:
            if fuse == "pyramid":
                n = len(window)
                m = n // 2 if n % 2 == 0 else (n + 1) // 2
                w = (list(range(1, m + 1)) + list(range(m, 0, -1)) if n % 2 == 0
                     else list(range(1, m)) + [m] + list(range(m - 1, 0, -1)))
                w = torch.Tensor(w)
            elif fuse == "flat":
                w = torch.ones(len(window))
            else:
                w = torch.ones(len(window))
                if min(window) > 0:
                    w[:overlap] = torch.linspace(1e-37, 1, overlap)
                if max(window) < frames - 1:
                    w[-overlap:] = torch.linspace(1, 1e-37, overlap)
            w = w.reshape(1, 1, -1, 1, 1)
            final[:, :, window] += out * w
            counts[:, :, window] += w
    return final if fuse == "relative" else final / counts


@pytest.mark.parametrize("schedule", ["standard_static", "standard_uniform", "looped_uniform", "batched"])
@pytest.mark.parametrize("fuse", ["pyramid", "relative", "flat", "overlap-linear"])
@pytest.mark.parametrize("causal", [True, False])
def test_windowed_model_matches_comfyuis_execute(schedule: str, fuse: str, causal: bool) -> None:
    torch.manual_seed(0)
    module = FrameMixer(6, 4).eval()
    x = torch.randn(2, 5, 11, 3, 2)  # 4 latent channels, then 1 of conditioning (an image-to-video model's)
    y = torch.randn(2, 1, 11, 3, 2)
    mask = torch.rand(1, 1, 11, 3, 2).expand(2, -1, -1, -1, -1)
    context = torch.randn(2, 5, 8)
    t = torch.tensor([0.7, 0.7])
    settings = ContextWindows(schedule, fuse, 4, 2, causal_window_fix=causal, cond_retain_index_list=(0,),
                              latent_retain_index_list=(1,), latent_channels=4)
    windowed = windowed_unet(module, settings)
    windows = context_windows(schedule, 11, 4, 2)
    with torch.no_grad():
        got = windowed(x, t, context, y=y, denoise_mask=mask)
        expected = ref_execute(module, x, t, context, windows, fuse, 2, causal, [0], [1], 4,
                               {"y": y, "denoise_mask": mask})
    assert got.shape == (2, 4, 11, 3, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        plain = module(x, t, context, y=y, denoise_mask=mask)
    assert not torch.allclose(got, plain, atol=1e-3)  # the windows see less than the whole video


def test_a_window_covering_the_latent_is_the_plain_model_bit_for_bit() -> None:
    torch.manual_seed(1)
    module = FrameMixer(4, 4).eval()
    x, context, t = torch.randn(1, 4, 6, 3, 3), torch.randn(1, 3, 8), torch.tensor([0.4])
    for length in (6, 7, 40):
        windowed = windowed_unet(module, ContextWindows("standard_uniform", "pyramid", length, 2))
        with torch.no_grad():
            assert torch.equal(windowed(x, t, context), module(x, t, context))
    assert module.calls.count(6) == 6 and set(module.calls) == {6}


def test_uniform_windows_follow_the_sampling_step() -> None:
    """Called by hand within a run (no sampler records the level), the step is the index of the call's timestep
    among the run's levels mapped through the node's schedule; a level between them keeps the last step."""
    module = FrameMixer(4, 4).eval()
    schedule = SD3FlowSchedule(3.0)
    settings = ContextWindows("looped_uniform", "flat", 3, 1, causal_window_fix=False, schedule=schedule)
    windowed = windowed_unet(module, settings)
    x, context = torch.randn(1, 4, 7, 2, 2), torch.randn(1, 3, 8)
    levels = [1.0, 0.8, 0.5, 0.2]

    def timestep(sigma):
        return torch.tensor([float(schedule.unet_timestep(schedule.sigma_to_t_scalar(sigma)))])

    with sampling_run(torch.tensor([*levels, 0.0])), torch.no_grad():
        for step, sigma in enumerate(levels):
            module.calls.clear()
            windowed(x, timestep(sigma), context)
            assert len(module.calls) == len(context_windows("looped_uniform", 7, 3, 1, step=step))
            assert settings.step(timestep(sigma)) == step
        assert settings.step(timestep(0.35)) == 3  # a substep: the last step found


def test_windows_follow_the_samplers_steps_on_a_schedule_changed_after_the_node() -> None:
    """The node saw SD's schedule; a later ModelSamplingDiscrete (v, zero terminal SNR) samples with another, whose
    levels map to other timesteps: the windows still shift with the sampler's steps, as the sampler records each
    call's level on the run (with cfg 1, one call per window: each call's length is its window's, plus the causal
    frame before a window that does not start at 0)."""
    torch.manual_seed(2)
    module = FrameMixer(4, 4).eval()
    windowed = windowed_unet(module, ContextWindows("standard_uniform", "flat", 3, 1, schedule=DiscreteSchedule()))
    schedule = DiscreteSchedule().zero_terminal_snr()
    with torch.no_grad():
        sample(windowed, schedule, torch.randn(1, 4, 7, 2, 2), seed=1, steps=3, cfg=1.0, sampler_name="euler",
               positive=[(torch.randn(1, 3, 8), {})], negative=[], prediction="v")
    expected = [len(w) + (w[0] >= 1) for step in range(3) for w in context_windows("standard_uniform", 7, 3, 1,
                                                                                    step=step)]
    assert module.calls == expected == [3, 4, 4, 4, 3, 4, 4, 4, 3]


def test_a_run_records_the_step_of_each_level() -> None:
    """A call's step is its level's index among the run's; a level between them keeps the last; none is unknown."""
    with sampling_run(torch.tensor([14.6, 3.0, 0.5, 0.0])) as run:
        assert (run.step, run.level) == (0, None)
        run.record(3.0 * (1 + 1e-6))
        assert (run.step, run.level) == (1, 3.0 * (1 + 1e-6))
        run.record(1.2)
        assert run.step == 1
        run.record(0.5)
        run.record(None)
        assert (run.step, run.level) == (2, None)


def test_initial_noise_is_freenoise_when_asked() -> None:
    noise = torch.randn(1, 4, 13, 2, 2)
    module = FrameMixer(4, 4)
    plain = windowed_unet(module, ContextWindows("standard_static", "pyramid", 5, 2))
    shuffled = windowed_unet(module, ContextWindows("standard_static", "pyramid", 5, 2, freenoise=True))
    assert model_noise(module, noise, 7) is noise
    assert model_noise(plain, noise, 7) is noise
    assert torch.equal(model_noise(shuffled, noise, 7), ref_freenoise(noise.clone(), 2, 5, 2, 7))


def test_refusals() -> None:
    module = FrameMixer(4, 4)
    with pytest.raises(ValueError, match="context_overlap"):
        ContextWindows("standard_static", "pyramid", 4, 4)
    with pytest.raises(ValueError, match="context_schedule"):
        ContextWindows("uniform", "pyramid", 4, 1)
    with pytest.raises(ValueError, match="dim 2"):
        windowed_unet(module, ContextWindows("standard_static", "pyramid", 1, 0, dim=0))(
            torch.randn(2, 4, 3, 2, 2), torch.ones(2), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="cond_retain_index_list"):
        windowed_unet(module, ContextWindows("standard_static", "flat", 3, 1, cond_retain_index_list=(5,)))(
            torch.randn(1, 4, 7, 2, 2), torch.ones(1), torch.randn(1, 3, 8))
