"""How a transformer family's single files are told apart and read from their headers (Z-Image, Lumina 2, Qwen-Image,
FLUX.2): the prefix the weights sit under (bare, as Comfy-Org ships them, or ComfyUI's `model.diffusion_model.`),
whether a file holds the family's transformer, and its family from the header alone."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ldm import checkpoint as ckpt
from ldm.checkpoint import UNET_PREFIX, CheckpointError, StateDict, metadata_ints

F = TypeVar("F")


@dataclass(frozen=True)
class SingleFileFamily(Generic[F]):
    """One family's rules: `probe(sd, prefix)` tells whether a state dict (or a header's shapes) holds its transformer
    under `prefix`; `make(weights, axes, prefix)` builds its family from the weights and the RoPE split Loom's files
    record under `axes_key` (None where absent), raising ValueError for weights it cannot run; `what` names the
    transformer in the refusal of other weights ("not {what}")."""

    what: str
    probe: Callable[[Mapping[str, Any], str], bool]
    make: Callable[[StateDict, Any, str], F]
    axes_key: str

    def prefix(self, sd: Mapping[str, Any]) -> str | None:
        """The prefix the weights sit under ("" or ComfyUI's), None if the state dict holds none."""
        return next((p for p in (UNET_PREFIX, "") if self.probe(sd, p)), None)

    def family(self, weights: StateDict, metadata: dict[str, str] | None = None, name: str = "") -> F:
        """The family of the weights (bare or prefixed); a CheckpointError naming `name` for weights it cannot run."""
        prefix = self.prefix(weights)
        try:
            if prefix is None:
                raise ValueError(f"not {self.what}")
            return self.make(weights, metadata_ints(metadata or {}, self.axes_key), prefix)
        except ValueError as e:
            raise CheckpointError(f"{name}: {e}" if name else str(e)) from None

    def is_file(self, path: str | Path) -> bool:
        """Whether a .safetensors file holds the transformer (bare or prefixed), from its header."""
        shapes = ckpt.shapes_or_none(path)
        return shapes is not None and self.prefix(shapes) is not None

    def peek(self, path: str | Path) -> F | None:
        """The family of a file from its header alone; None for other files and formats (a file on the family's
        layout that Loom cannot run raises CheckpointError)."""
        shapes = ckpt.shapes_or_none(path)
        if shapes is None or self.prefix(shapes) is None:
            return None
        return self.family(shapes, ckpt.read_metadata(path), Path(path).name)
