"""How a transformer family's single files are told apart, read from their headers and loaded (Z-Image, Lumina 2,
Qwen-Image, FLUX.2, HiDream): the prefix the weights sit under (bare, as Comfy-Org ships them, or ComfyUI's
`model.diffusion_model.`), whether a file holds the family's transformer, its family from the header alone, and the
transformer with the keys it left unused."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import UNET_PREFIX, CheckpointError, StateDict, metadata_ints
from ldm.t5 import descaled_fp8, scaling_keys

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
    axes_key: str | None = None

    def prefix(self, sd: Mapping[str, Any]) -> str | None:
        """The prefix the weights sit under ("" or ComfyUI's), None if the state dict holds none."""
        return next((p for p in (UNET_PREFIX, "") if self.probe(sd, p)), None)

    def family(self, weights: StateDict, metadata: dict[str, str] | None = None, name: str = "") -> F:
        """The family of the weights (bare or prefixed); a CheckpointError naming `name` for weights it cannot run."""
        prefix = self.prefix(weights)
        try:
            if prefix is None:
                raise ValueError(f"not {self.what}")
            axes = metadata_ints(metadata or {}, self.axes_key) if self.axes_key else None
            return self.make(weights, axes, prefix)
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

    def load(self, path: Path, build: Callable[[F], nn.Module], what: str, device: torch.device | str,
             dtype: torch.dtype, refusal: Callable[[StateDict], str],
             ignored: Callable[[StateDict, str], Iterable[str]] = lambda sd, prefix: (),
             convert: Callable[[StateDict], StateDict] = lambda weights: weights
             ) -> tuple[F, nn.Module, list[str], dict[str, str]]:
        """(family, transformer, unused keys, metadata) of one of the family's files: the transformer `build(family)`
        makes (`what`, in errors) on `device` in `dtype`, fp8, scaled fp8 and mixed-precision weights cast (times
        their scales) as they load, then renamed by `convert` (another layout's names to the transformer's); the
        file's keys it does not use, beside the scales and `ignored(sd, prefix)`. A file without the family's
        weights raises CheckpointError naming it with `refusal(sd)`."""
        sd = ckpt.load_state_dict(path)
        prefix = self.prefix(sd)
        if prefix is None:
            raise CheckpointError(f"{path.name}: {refusal(sd)}")
        metadata = ckpt.read_metadata(path)
        family = self.family(sd, metadata, path.name)
        weights = convert(descaled_fp8({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}))
        model = ckpt._materialize(lambda: build(family), weights, what, path, device, dtype)
        expected = set(model.state_dict())
        skipped = {*scaling_keys(sd), *ignored(sd, prefix)}
        unused = [prefix + k for k in weights if k not in expected and prefix + k not in skipped]
        unused += [k for k in sd if not k.startswith(prefix) and k not in skipped]
        return family, model, sorted(unused), metadata
