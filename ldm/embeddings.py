"""Textual-inversion embeddings: the files A1111, ComfyUI and diffusers users have, as vectors by width.

Layouts read: A1111's .pt (`string_to_param["*"]`) and .safetensors (`emb_params`), SDXL's pair
(`clip_l` [n, 768] and `clip_g` [n, 1280]), and diffusers' `learned_embeds.bin` ({token: [768]}).
`.pt` and `.bin` files are read with torch's weights-only unpickler: no code in them runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

SUFFIXES = (".safetensors", ".pt", ".bin")


class EmbeddingError(ValueError):
    """An embedding file that cannot be used."""


def load_embedding(path: str | Path) -> dict[int, Tensor]:
    """An embedding file's vectors by width: {768: [n, 768]} for SD1, {1024: ...} for SD2, both CLIP widths
    of SDXL for its pair."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            data: dict = safetensors.torch.load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a broken or foreign file: one clear message, whatever the reader raised
        raise EmbeddingError(f"{path.name} is not a readable embedding file ({exc})") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name} is not an embedding file (it holds a {type(data).__name__})")
    if isinstance(data.get("string_to_param"), dict):
        tensors = list(data["string_to_param"].values())
    elif "emb_params" in data:
        tensors = [data["emb_params"]]
    else:  # SDXL's clip_l/clip_g, diffusers' {token: vector}, or one tensor under any name
        tensors = [value for value in data.values() if isinstance(value, Tensor)]
    vectors: dict[int, Tensor] = {}
    for tensor in tensors:
        tensor = tensor.detach().float().reshape(-1, tensor.shape[-1]) if tensor.ndim else tensor
        if tensor.ndim != 2 or tensor.shape[0] == 0:
            continue
        vectors[tensor.shape[-1]] = torch.cat([vectors[tensor.shape[-1]], tensor]) if tensor.shape[-1] in vectors \
            else tensor
    if not vectors:
        raise EmbeddingError(f"{path.name} holds no embedding vectors")
    counts = {t.shape[0] for t in vectors.values()}
    if len(counts) > 1:
        raise EmbeddingError(f"{path.name}: its encoders' vector counts differ ({sorted(counts)})")
    return vectors
