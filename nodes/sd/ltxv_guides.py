"""LTX-Video keyframe guides in the SD node set (LTXVAddGuide, LTXVCropGuides)."""

NODES: list = []
