"""Published optimized step schedules (GITS for SD1.5, Optimal Stepsize for FLUX, Wan and Chroma) as noise levels."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import Tensor

from ldm.sampling.extra_schedules import loglinear_interp

# Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling" (GITS): schedules for SD1.5
# searched by dynamic programming for 2..20 steps, one table per cost coefficient (0.80..1.50 by 0.05), as the
# authors publish them (github.com/zju-pi/diff-sampler, gits-main). Kept as data beside the code.
GITS_LEVELS_FILE = Path(__file__).parent.parent / "data" / "gits_noise_levels.json"
GITS_COEFF_STEP = 0.05
GITS_COEFF_MIN = 0.80
GITS_COEFF_MAX = 1.50
GITS_MAX_TABLE_STEPS = 20

# Pei et al. 2025, "Optimal Stepsize for Diffusion Sampling" (OSS): the authors' searched noise levels (flow
# sigmas, falling to 0.001) for FLUX.1 (10 steps), Wan 2.1 (20 steps) and Chroma (40 steps), as published in
# their code (github.com/bebebe666/OptimalSteps).
OSS_NOISE_LEVELS: dict[str, tuple[float, ...]] = {
    "FLUX": (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001),
    "Wan": (1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96, 0.946, 0.927,
            0.902, 0.864, 0.776, 0.539, 0.208, 0.001),
    "Chroma": (0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943, 0.931, 0.917, 0.9, 0.881,
               0.858, 0.832, 0.802, 0.769, 0.731, 0.69, 0.646, 0.599, 0.55, 0.501, 0.451, 0.402, 0.355, 0.311, 0.27,
               0.232, 0.199, 0.169, 0.143, 0.12, 0.101, 0.084, 0.07, 0.058, 0.048, 0.001),
}
OSS_MODEL_TYPES = list(OSS_NOISE_LEVELS)


@functools.cache
def _gits_tables() -> dict[str, list[list[float]]]:
    with open(GITS_LEVELS_FILE, encoding="utf-8") as file:
        document = json.load(file)
    top, bottom = document["sigma_max"], document["sigma_min"]
    # The file keeps only each schedule's inner levels: all of them run from SD1's sigma_max to its sigma_min.
    return {coeff: [[top, *inner, bottom] for inner in rows] for coeff, rows in document["interior"].items()}


def gits_coeff_problem(coeff: float) -> str | None:
    """Why `coeff` names no published GITS table (None when it does)."""
    grid = round(coeff / GITS_COEFF_STEP)
    if not GITS_COEFF_MIN - 1e-9 <= coeff <= GITS_COEFF_MAX + 1e-9 or abs(coeff - grid * GITS_COEFF_STEP) > 1e-6:
        return (f"coeff {coeff} has no GITS schedule: the authors published them for {GITS_COEFF_MIN:.2f} to "
                f"{GITS_COEFF_MAX:.2f} in steps of {GITS_COEFF_STEP}")
    return None


def gits_noise_levels(coeff: float, steps: int) -> Tensor:
    """The published GITS levels (steps + 1, float64) for 2..20 steps; more steps stretch the 20-step schedule,
    log-linearly as Align Your Steps does, since only up to 20 were searched."""
    problem = gits_coeff_problem(coeff)
    if problem:
        raise ValueError(problem)
    if steps < 2:
        raise ValueError(f"GITS needs at least 2 steps, got {steps}")
    rows = _gits_tables()[f"{round(coeff / GITS_COEFF_STEP) * GITS_COEFF_STEP:.2f}"]
    levels = torch.tensor(rows[min(steps, GITS_MAX_TABLE_STEPS) - 2], dtype=torch.float64)
    return levels if steps <= GITS_MAX_TABLE_STEPS else loglinear_interp(levels, steps + 1)


def oss_noise_levels(model_type: str, steps: int) -> Tensor:
    """The OSS levels for `steps` steps (float64): the published ones at their own step count, else those
    log-linearly interpolated to steps + 1 levels."""
    if model_type not in OSS_NOISE_LEVELS:
        raise ValueError(f"unknown Optimal Steps model type {model_type!r}; expected one of {OSS_MODEL_TYPES}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    levels = torch.tensor(OSS_NOISE_LEVELS[model_type], dtype=torch.float64)
    return levels if len(levels) == steps + 1 else loglinear_interp(levels, steps + 1)


def denoise_tail(levels: Tensor, denoise: float) -> Tensor:
    """The last round(steps * denoise) steps of a schedule, ending in 0 (float32); denoise 0 gives no levels.

    This is how ComfyUI's table schedulers read denoise: fewer steps over the low-noise end of the same schedule,
    where BasicScheduler would instead stretch a new schedule over that range."""
    if denoise <= 0.0:
        return torch.zeros(0)
    steps = len(levels) - 1
    kept = steps if denoise >= 1.0 else round(steps * denoise)
    tail = levels[len(levels) - (kept + 1):].clone()
    tail[-1] = 0.0
    return tail.to(torch.float32)


def sigmas_gits(coeff: float, steps: int, denoise: float = 1.0) -> Tensor:
    """GITS (Chen et al. 2024) noise levels for SD1.5-like models, ending in 0."""
    return denoise_tail(gits_noise_levels(coeff, steps), denoise)


def sigmas_optimal_steps(model_type: str, steps: int, denoise: float = 1.0) -> Tensor:
    """Optimal Stepsize (Pei et al. 2025) noise levels for FLUX, Wan or Chroma, ending in 0."""
    return denoise_tail(oss_noise_levels(model_type, steps), denoise)
