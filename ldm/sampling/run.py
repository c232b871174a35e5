"""The sampling run in progress (`ldm.sampling.ksampler.sample` opens one around its sampler): the run's levels, for
models that read them (MeanFlow models are told where each step ends), and a place for the run's state of model
wrappers (EasyCache's cache), so that a model kept between runs holds nothing of one.

A context variable, not an attribute of the model: the same cached model may be sampled by several runs, one after
another or nested (a sampler inside a node the sampler runs), and each reads its own run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class SamplingRun:
    sigmas: Tensor  # the run's levels, on the CPU
    state: dict[Any, Any] = field(default_factory=dict)  # per-run state, keyed by what owns it


_RUN: ContextVar[SamplingRun | None] = ContextVar("loom_sampling_run", default=None)


def current_run() -> SamplingRun | None:
    """The sampling run in progress, None outside one (a model called directly)."""
    return _RUN.get()


@contextmanager
def sampling_run(sigmas: Tensor) -> Iterator[SamplingRun]:
    """A run over the levels `sigmas` for the duration of the block."""
    token = _RUN.set(run := SamplingRun(sigmas.detach().cpu()))
    try:
        yield run
    finally:
        _RUN.reset(token)
