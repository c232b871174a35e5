"""Token Merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"): the
bipartite soft matching of a layer's tokens, and the UNet patch that merges self-attention's queries."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.attention import CrossAttention
from ldm.lora import shallow_copy


@dataclass(frozen=True)
class TokenMerge:
    """One matching of N tokens, in two sets: the sources A and the destinations B. `merge` takes [batch, N, C]
    to N - r tokens (the kept sources, then the destinations with r sources averaged into them); `unmerge` takes
    those back to N, each merged source getting its destination's value."""

    src: Tensor  # [Na] positions of A's tokens
    dst: Tensor  # [Nb] positions of B's tokens
    kept: Tensor  # [batch, Na - r] the sources left as they are (indices into A)
    merged: Tensor  # [batch, r] the sources merged away (indices into A)
    into: Tensor  # [batch, r] the destination of each merged source (indices into B)
    tokens: int  # N

    def merge(self, x: Tensor) -> Tensor:
        a, b = x[:, self.src], x[:, self.dst]
        channels = x.shape[-1]
        kept = a.gather(1, _spread(self.kept, channels))
        merged = a.gather(1, _spread(self.merged, channels))
        b = b.scatter_reduce(1, _spread(self.into, channels), merged, reduce="mean")
        return torch.cat([kept, b], dim=1)

    def unmerge(self, x: Tensor) -> Tensor:
        batch, _, channels = x.shape
        kept, b = x[:, :self.kept.shape[1]], x[:, self.kept.shape[1]:]
        out = x.new_zeros(batch, self.tokens, channels)
        out[:, self.dst] = b
        out.scatter_(1, _spread(self.src[self.kept], channels), kept)
        out.scatter_(1, _spread(self.src[self.merged], channels), b.gather(1, _spread(self.into, channels)))
        return out


def _spread(index: Tensor, channels: int) -> Tensor:
    """[batch, n] token indices as a gather/scatter index over [batch, n, channels]."""
    return index[..., None].expand(-1, -1, channels)


def bipartite_soft_matching(metric: Tensor, height: int, width: int, r: int, dst_cell: Tensor,
                            stride: tuple[int, int] = (2, 2)) -> TokenMerge | None:
    """ToMe for SD's matching of `metric` [batch, height * width, C] (tomesd's
    `bipartite_soft_matching_random2d`), or None where nothing is merged (r = 0, a grid one token wide).

    1. Partition: the grid is cut into regions of `stride` (sy, sx) tokens; in each, the token at `dst_cell`
       ([height // sy, width // sx] ints below sy * sx, row-major within the region) goes to B, the others
       to A, and so do the tokens of the partial regions at the bottom and right edges.
    2. Bipartite graph: each token of A is linked to its most similar token of B (cosine similarity).
    3. The r links of highest similarity are kept: those tokens of A are merged into their B tokens.
    """
    sy, sx = stride
    if r <= 0 or height == 1 or width == 1:
        return None
    rows, cols = height // sy, width // sx
    is_dst = dst_cell[..., None] == torch.arange(sy * sx, device=dst_cell.device)  # [rows, cols, sy * sx]
    is_dst = is_dst.reshape(rows, cols, sy, sx).transpose(1, 2).reshape(rows * sy, cols * sx)
    grid = torch.ones(height, width, dtype=torch.long, device=metric.device)  # 0: B, 1: A
    grid[:rows * sy, :cols * sx] = (~is_dst).long()
    # B's positions first, then A's, each in raster order; a sort, so that nothing is read back to the host.
    order = grid.flatten().argsort(stable=True)
    dst, src = order[:rows * cols], order[rows * cols:]

    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric[:, src] @ metric[:, dst].transpose(-1, -2)  # [batch, Na, Nb]
    best, into = similarity.max(dim=-1)

    ranked = best.argsort(dim=-1, descending=True)
    r = min(r, src.numel())
    merged, kept = ranked[:, :r], ranked[:, r:]
    return TokenMerge(src, dst, kept, merged, into.gather(1, merged), height * width)


_MASK = 2**31 - 1  # hashes stay below 2^31, so that a product with a 31-bit constant fits in int64


def draw_cells(timesteps: Tensor, salt: int, count: int, cells: int) -> Tensor:
    """`count` pseudo-random ints below `cells`, a function of the step's timestep and of `salt` alone: an integer
    hash (xor-shift and multiply rounds) computed on the timestep's device, with nothing read back to the host,
    so a captured CUDA graph replays it with each step's timestep; the same on every device."""
    step = (timesteps.reshape(-1)[:1].float() * 1000).round().long()
    x = (torch.arange(count, device=timesteps.device) + salt * 1_000_003 + step * 7_654_321) & _MASK
    for _ in range(3):
        x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK
    return (x >> 8) % cells


class TokenMerging:
    """ToMe for SD as ComfyUI's TomePatchModel sets it up: in each self-attention layer whose tokens are the whole
    latent's (the transformers at full resolution, max_downsample 1: SD1's and SD2's first level; SDXL has none
    there), `ratio` of the tokens are merged for the queries, with the layer's input as the similarity metric;
    keys and values still see every token, and the attention output is unmerged. Each region of 2 x 2 tokens has
    its destination drawn from the step's timestep and the layer (see `draw_cells`), where tomesd and ComfyUI
    draw from torch's global generator: a workflow gives the same image every time, and CUDA graphs replay it.

    As an input-block patch, it notes the latent's size and the timestep at the start of each UNet pass."""

    after_skip = False

    def __init__(self, ratio: float):
        self.ratio = ratio
        self._size = (0, 0)
        self._timesteps: Tensor | None = None

    def __call__(self, h: Tensor, index: int, timesteps: Tensor) -> Tensor:
        if index == 0:  # the first block's output has the latent's size
            self._size, self._timesteps = (h.shape[-2], h.shape[-1]), timesteps
        return h

    def matching(self, x: Tensor, layer: int) -> TokenMerge | None:
        height, width = self._size
        r = int(x.shape[1] * self.ratio)
        if x.shape[1] != height * width or self._timesteps is None or r <= 0 or height < 2 or width < 2:
            return None
        cells = draw_cells(self._timesteps, layer, (height // 2) * (width // 2), 4)
        return bipartite_soft_matching(x, height, width, r, cells.reshape(height // 2, width // 2))

    def patch(self, unet: nn.Module) -> nn.Module:
        """A copy of `unet` whose self-attention layers merge tokens (a second patch replaces the first's ratio).
        It reads nothing on the host, so it keeps the UNet's `cuda_graphs_safe`."""
        copy = shallow_copy(unet)
        copy.input_block_patches = (*getattr(unet, "input_block_patches", ()), self)
        layers = [m for name, m in copy.named_modules() if isinstance(m, CrossAttention) and name.endswith("attn1")]
        for index, layer in enumerate(layers):
            layer.token_merge = functools.partial(self.matching, layer=index)
        return copy
