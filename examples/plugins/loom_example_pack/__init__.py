"""Loom example node pack: an image invert and a SWATCH socket type with two nodes (see docs/plugins.md)."""

from .nodes import NODES

WEB_DIRECTORY = "./js"

__all__ = ["NODES", "WEB_DIRECTORY"]
