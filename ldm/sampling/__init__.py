"""Noise schedules, the denoiser wrapper, guidance, samplers and the KSampler entry point."""

from ldm.sampling.denoiser import Conditioning, Denoiser
from ldm.sampling.guidance import CFGGuider, CondList
from ldm.sampling.ksampler import SAMPLER_ALIASES, SAMPLER_NAMES, SAMPLERS, SamplingInterrupted, compute_sigmas, sample
from ldm.sampling.noise import BrownianTreeNoiseSampler, prepare_noise, seeded_noise_sampler
from ldm.sampling.schedulers import SCHEDULER_NAMES, get_sigmas
from ldm.sampling.schedules import DiscreteSchedule

__all__ = [
    "SAMPLERS",
    "SAMPLER_ALIASES",
    "SAMPLER_NAMES",
    "SCHEDULER_NAMES",
    "BrownianTreeNoiseSampler",
    "CFGGuider",
    "CondList",
    "Conditioning",
    "Denoiser",
    "DiscreteSchedule",
    "SamplingInterrupted",
    "compute_sigmas",
    "get_sigmas",
    "prepare_noise",
    "sample",
    "seeded_noise_sampler",
]
