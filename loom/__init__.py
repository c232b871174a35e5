"""Loom's Python API: the simple calls of the original Stable Diffusion scripts, run through the engine."""

from loom.pipeline import Pipeline

__all__ = ["Pipeline"]
