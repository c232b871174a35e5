"""Mask nodes. MASK is [B, H, W] floats in 0..1."""

from __future__ import annotations

from typing import Any

NODES: list[Any] = []
