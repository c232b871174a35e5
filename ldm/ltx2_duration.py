"""LTX 2.4's duration head: how long a prompt's shot naturally lasts, in seconds, read from what an LTX-2 model's
prompt connectors make of it, without sampling anything (ComfyUI's LTXVDurationPredictor, its model a MODEL_PATCH).

The head projects the video connector's tokens and the audio connector's tokens to one small width, adds each
stream's learned modality embedding, and pools the two sequences together with a few learned queries (one
multi-head cross-attention, 4 heads). The pooled queries, side by side, go through a GELU (tanh) MLP to one number,
the log of the duration. `seconds_to_num_frames` turns seconds into a frame count the LTX VAE takes (8 k + 1).

Files: the head alone, its keys bare, under `duration_head.`, or under `model.diffusion_model.duration_head.` (a
whole LTX 2.4 checkpoint holds one there; ComfyUI's ModelPatchLoader reads the head out of any of these). The
sizes come from the weights: the released head takes 4096-wide video and 2048-wide audio tokens (LTX-2.3's layout,
whose connectors are as wide as the streams) into 256, with one query.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize, check_fit, write_safetensors

# The prefixes a head's keys may carry, tried in this order (ComfyUI's normalize_state_dict).
PREFIXES = ("model.diffusion_model.duration_head.", "duration_head.")
_MARKER = "attention_pooler.query_tokens"
NUM_HEADS = 4  # not in the weights; ComfyUI and Lightricks build the pooler with 4


@dataclass(frozen=True)
class DurationHeadConfig:
    """Shape of a duration head (defaults: LTX 2.4's)."""

    video_dim: int = 4096
    audio_dim: int = 2048
    hidden: int = 256
    queries: int = 1
    heads: int = NUM_HEADS
    mlp_hidden: int = 256


class AttentionPooler(nn.Module):
    """Learned queries [queries, hidden] cross-attending to the tokens: [B, T, hidden] -> [B, queries, hidden]."""

    def __init__(self, hidden: int, queries: int, heads: int):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(queries, hidden))
        self.cross_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)

    def forward(self, tokens: Tensor) -> Tensor:
        queries = self.query_tokens.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        pooled, _ = self.cross_attn(queries, tokens, tokens, need_weights=False)
        return pooled


class DurationHead(nn.Module):
    def __init__(self, config: DurationHeadConfig = DurationHeadConfig()):
        super().__init__()
        self.config = c = config
        self.video_input_proj = nn.Linear(c.video_dim, c.hidden)
        self.video_modality_emb = nn.Parameter(torch.zeros(c.hidden))
        self.audio_input_proj = nn.Linear(c.audio_dim, c.hidden)
        self.audio_modality_emb = nn.Parameter(torch.zeros(c.hidden))
        self.attention_pooler = AttentionPooler(c.hidden, c.queries, c.heads)
        self.mlp_hidden = nn.Linear(c.hidden * c.queries, c.mlp_hidden)
        self.mlp_out = nn.Linear(c.mlp_hidden, 1)

    def forward(self, video: Tensor | None = None, audio: Tensor | None = None) -> Tensor:
        """Seconds [B] from the video connector's tokens [B, Tv, video_dim] and the audio connector's [B, Ta,
        audio_dim] (either may be left out, not both)."""
        groups = []
        if video is not None:
            groups.append(self.video_input_proj(video) + self.video_modality_emb)
        if audio is not None:
            groups.append(self.audio_input_proj(audio) + self.audio_modality_emb)
        if not groups:
            raise ValueError("the duration head needs the video tokens, the audio tokens or both")
        pooled = self.attention_pooler(torch.cat(groups, dim=1)).flatten(1)
        hidden = F.gelu(self.mlp_hidden(pooled), approximate="tanh")
        return self.mlp_out(hidden).squeeze(-1).exp()


def is_duration_head(sd: StateDict) -> bool:
    """Whether a state dict holds a duration head, by ComfyUI's test: a key `attention_pooler.query_tokens`, or
    one ending in `duration_head.attention_pooler.query_tokens`."""
    return _MARKER in sd or any(k.endswith("duration_head." + _MARKER) for k in sd)


def head_prefix(sd: StateDict) -> str:
    """The first of `PREFIXES` that a key has ("" when none has one: the keys are bare)."""
    return next((prefix for prefix in PREFIXES if any(k.startswith(prefix) for k in sd)), "")


def normalize_state_dict(sd: StateDict) -> StateDict:
    """The head's weights with bare keys: those under `head_prefix`, stripped (the others left out)."""
    prefix = head_prefix(sd)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def duration_head_config(sd: StateDict) -> DurationHeadConfig:
    """The sizes of a head from its (bare-keyed) weights; the head count is ComfyUI's 4."""
    try:
        hidden, video_dim = sd["video_input_proj.weight"].shape
        _, audio_dim = sd["audio_input_proj.weight"].shape
        queries, _ = sd["attention_pooler.query_tokens"].shape
        mlp_hidden, _ = sd["mlp_hidden.weight"].shape
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not an LTX duration head: no weight {e} of the expected rank") from None
    if hidden % NUM_HEADS:
        raise CheckpointError(f"a duration head {hidden} wide does not split into {NUM_HEADS} attention heads")
    return DurationHeadConfig(video_dim=video_dim, audio_dim=audio_dim, hidden=hidden, queries=queries,
                              mlp_hidden=mlp_hidden)


def load_duration_head(sd: StateDict, path: str | Path, device: torch.device | str = "cpu") -> DurationHead:
    """A duration head from a state dict `is_duration_head` accepts, in float32 whatever the file's dtype (a few
    MB; ComfyUI keeps it in float32 too). Keys outside the head (a whole checkpoint's) are listed in its
    `unused_keys`."""
    path, prefix = Path(path), head_prefix(sd)
    head = normalize_state_dict(sd)
    try:
        config = duration_head_config(head)
        check_fit(lambda: DurationHead(config), head, config)
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = _materialize(lambda: DurationHead(config), head, "duration head", path, device, torch.float32)
    model.unused_keys = sorted(k for k in sd if not k.startswith(prefix))
    return model


def seconds_to_num_frames(seconds: float, frame_rate: float, min_seconds: float, max_seconds: float,
                          time_scale: int = 8) -> int:
    """A duration as a frame count on the VAE's causal grid (time_scale k + 1 frames): the frames it spans at
    `frame_rate`, clamped to [min_seconds, max_seconds]'s, rounded down onto the grid; where that falls below
    the minimum, the next grid count up instead (unless that passes the maximum, which then stands as it is).
    Rounding as Python's round, as ComfyUI's."""
    low = max(1, round(min_seconds * frame_rate))
    high = round(max_seconds * frame_rate)
    frames = max(low, min(round(seconds * frame_rate), high))
    on_grid = (frames - 1) // time_scale * time_scale + 1
    if on_grid >= low:
        return on_grid
    return min(math.ceil((low - 1) / time_scale) * time_scale + 1, high)


# --- tiny files ----------------------------------------------------------------------------------------------

def random_duration_head(config: DurationHeadConfig, seed: int = 0, seconds: float = 3.0) -> DurationHead:
    """A duration head with seeded random weights, each distinct; its output bias set so that predictions fall
    near `seconds`."""
    from ldm.flux_presets import distinct_random_

    head = distinct_random_(DurationHead(config).eval(), seed)
    with torch.no_grad():
        head.mlp_out.bias += math.log(seconds)
    return head


def write_tiny_duration_head(path: str | Path, video_dim: int, audio_dim: int, seed: int = 0,
                             prefix: str = PREFIXES[0], seconds: float = 3.0, **sizes: int) -> Path:
    """Write a random duration head for connectors of `video_dim` and `audio_dim` (16 wide, 2 queries, MLP 8;
    `sizes` changes those), its keys under `prefix`; returns the path."""
    config = dataclasses.replace(DurationHeadConfig(video_dim, audio_dim, hidden=16, queries=2, mlp_hidden=8),
                                 **sizes)
    weights = random_duration_head(config, seed, seconds).state_dict()
    path = Path(path)
    write_safetensors({prefix + k: v for k, v in weights.items()}, path, {"loom.seed": str(seed)})
    return path
