"""Qwen-Image-Edit in the SD node set: prompts encoded with their reference images."""

NODES: list = []
