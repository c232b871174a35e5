"""The sampling run in progress (`ldm.sampling.ksampler.sample` opens one around its sampler): the run's levels, for
models that read them (MeanFlow models are told where each step ends); the level and step of the model call in
progress, which the sampler records before each call (context windows shift with the step); and a place for the run's
state of model wrappers (EasyCache's cache), so that a model kept between runs holds nothing of one.

A context variable, not an attribute of the model: the same cached model may be sampled by several runs, one after
another or nested (a sampler inside a node the sampler runs), and each reads its own run."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

RTOL = 1e-4  # a call's level matches a run's level within this (ComfyUI's set_step)


@dataclass
class SamplingRun:
    sigmas: Tensor  # the run's levels, on the CPU
    state: dict[Any, Any] = field(default_factory=dict)  # per-run state, keyed by what owns it
    level: float | None = None  # the level of the model call in progress, None before one or when not known
    step: int = 0  # the index among `sigmas` of the last call's level that was one of them
    _levels: list[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._levels = self.sigmas.tolist()

    def record(self, level: float | None) -> None:
        """A model call at `level` (None: not known on the host): its step is the index of that level among the
        run's (ComfyUI's set_step matches the sampler's sigma against its sample_sigmas); a level between them (a
        multistep sampler's substep, a flow SDE sampler's moved first level) keeps the last step."""
        self.level = level
        if level is None:
            return
        for index, known in enumerate(self._levels):
            if math.isclose(known, level, rel_tol=RTOL):
                self.step = index
                return


_RUN: ContextVar[SamplingRun | None] = ContextVar("loom_sampling_run", default=None)


def current_run() -> SamplingRun | None:
    """The sampling run in progress, None outside one (a model called directly)."""
    return _RUN.get()


def run_sigmas() -> Tensor | None:
    """The levels of the sampling run in progress, None outside one."""
    run = current_run()
    return None if run is None else run.sigmas


@contextmanager
def sampling_run(sigmas: Tensor) -> Iterator[SamplingRun]:
    """A run over the levels `sigmas` for the duration of the block."""
    token = _RUN.set(run := SamplingRun(sigmas.detach().cpu()))
    try:
        yield run
    finally:
        _RUN.reset(token)
