"""Where user data lives: model folders, input/, output/, temp/; and listing the files in them."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

# Shipped with the project: the demo checkpoint and example input images.
ASSETS = Path(__file__).resolve().parent.parent / "assets"

MODEL_KINDS = {
    "checkpoints": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "vae": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "loras": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "embeddings": (".safetensors", ".pt", ".bin"),
    "configs": (".yaml",),
    "controlnet": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "upscale_models": (".safetensors", ".pt", ".pth", ".bin"),
    # UNet-only and text-encoder files; "unet" and "clip" are ComfyUI's older names for the same folders.
    "diffusion_models": (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"),
    "unet": (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"),
    "text_encoders": (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"),
    "clip": (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"),
    # Image encoders (CLIP vision) and T2I-Adapter style models.
    "clip_vision": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "style_models": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    # A1111 hypernetworks: torch.save'd dicts (int keys), which safetensors cannot hold.
    "hypernetworks": (".pt", ".pth", ".ckpt", ".bin"),
    # PhotoMaker ID encoders: TencentARC's photomaker-v1.bin, or safetensors conversions.
    "photomaker": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    # GLIGEN grounding models (gligen_sd14_textbox_pruned.safetensors).
    "gligen": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    # Model patches (ModelPatchLoader): DiffSynth's Qwen-Image and alibaba-pai's Z-Image Fun ControlNets.
    "model_patches": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    # Latent upscale models (LatentUpscaleModelLoader): Lightricks' LTX-2 spatial upscalers.
    "latent_upscale_models": (".safetensors",),
    # Frame interpolation models (FrameInterpolationModelLoader): RIFE 4.x and FILM.
    "frame_interpolation": (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".pkl"),
    # TrueType / OpenType fonts (TextOverlay's font choices).
    "fonts": (".ttf", ".otf", ".ttc", ".otc"),
}


@dataclass
class FolderPaths:
    """The folders of one engine instance. Folders are created when first written to."""

    base: Path = field(default_factory=Path.cwd)
    models_dirs: list[Path] = field(default_factory=list)
    extra_model_paths: dict[str, list[Path]] = field(default_factory=dict)
    # Extra folders searched before the project's own (an extra_model_paths.yaml section with is_default).
    first_model_paths: dict[str, list[Path]] = field(default_factory=dict)
    output_dir: Path | None = None
    input_dir: Path | None = None
    temp_dir: Path | None = None
    # Models shipped with the project (the demo checkpoint), searched last; None hides them.
    bundled_models: Path | None = ASSETS / "models"
    # list_models' answers, each with the modification times of the folders it read (see there).
    _listings: dict[tuple, tuple[dict[str, int | None], list[str]]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @property
    def output(self) -> Path:
        return self.output_dir or self.base / "output"

    @property
    def input(self) -> Path:
        return self.input_dir or self.base / "input"

    @property
    def temp(self) -> Path:
        return self.temp_dir or self.base / "temp"

    def model_dirs(self, kind: str) -> list[Path]:
        """Extra folders marked as the default first, then user folders, then other extra paths, then the
        models bundled with the project."""
        roots = [*self.models_dirs, self.base / "models"]
        extra = self.extra_model_paths.get(kind, [])
        bundled = [self.bundled_models / kind] if self.bundled_models else []
        return self.first_model_paths.get(kind, []) + [root / kind for root in roots] + extra + bundled

    def seed_input_examples(self) -> None:
        """Create input/ with the example images the bundled workflows use, if it does not exist."""
        if self.input.exists() or not (ASSETS / "inputs").is_dir():
            return
        self.input.mkdir(parents=True)
        for example in (ASSETS / "inputs").iterdir():
            shutil.copy2(example, self.input / example.name)

    def list_models(self, kind: str) -> list[str]:
        """Relative file names (with sub-folders) of the models of one kind, sorted, without duplicates.

        Every queued workflow lists the folders its combo inputs name, so the answer is kept with the
        modification time of each folder it walked: a file added, removed or renamed anywhere below
        changes its folder's time, and only then is the tree walked again.
        """
        folders = self.model_dirs(kind)
        key = (kind, tuple(folders))
        cached = self._listings.get(key)
        if cached is not None and all(_mtime(folder) == seen for folder, seen in cached[0].items()):
            return list(cached[1])
        suffixes = MODEL_KINDS.get(kind, (".safetensors",))
        mtimes: dict[str, int | None] = {}
        names: set[str] = set()
        for folder in folders:
            mtimes[str(folder)] = _mtime(str(folder))
            for directory, _, files in os.walk(folder, followlinks=True):
                mtimes[directory] = _mtime(directory)
                names.update(
                    Path(directory, name).relative_to(folder).as_posix()
                    for name in files
                    if Path(name).suffix.lower() in suffixes and os.path.isfile(os.path.join(directory, name))
                )
        listing = sorted(names)
        self._listings[key] = (mtimes, listing)
        return list(listing)

    def find_model(self, kind: str, name: str) -> Path | None:
        """The file a combo value names, or None. Names never escape the model folders."""
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            return None
        for folder in self.model_dirs(kind):
            candidate = folder / name
            if candidate.is_file():
                return candidate
        return None

    def load_extra_paths(self, config_file: Path) -> None:
        """Read `{"checkpoints": ["/other/tool/models/Stable-diffusion"], "loras": [...]}` (JSON), or ComfyUI's
        `extra_model_paths.yaml` (a .yaml or .yml file) as it is."""
        if Path(config_file).suffix.lower() in (".yaml", ".yml"):
            self._load_comfyui_yaml(Path(config_file))
            return
        data = json.loads(Path(config_file).read_text())
        if not isinstance(data, dict):
            raise ValueError("expected an object of model kind -> list of folders")
        for kind, folders in data.items():
            folders = [folders] if isinstance(folders, str) else folders
            if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
                raise ValueError(f"{kind!r} must be a folder or a list of folders, not {json.dumps(folders)}")
            base = Path(config_file).parent
            self.extra_model_paths.setdefault(kind, []).extend((base / Path(f).expanduser()) for f in folders)

    def _load_comfyui_yaml(self, config_file: Path) -> None:
        """ComfyUI's format: named sections, each an optional `base_path` (relative to the file's folder) and
        model kinds whose values are one folder or several on separate lines, relative to `base_path`."""
        import yaml

        try:
            data = yaml.safe_load(config_file.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"not valid YAML: {' '.join(str(exc).split())}") from None
        if data is None:
            return
        if not isinstance(data, dict) or not all(isinstance(v, dict | None) for v in data.values()):
            raise ValueError("expected ComfyUI's layout: sections (a111:, comfyui:, ...) of model kind: folder(s)")
        for section, entries in data.items():
            entries = dict(entries or {})
            base = entries.pop("base_path", None)
            # ComfyUI searches an is_default section's folders before its own models/ folder.
            target = self.first_model_paths if entries.pop("is_default", False) else self.extra_model_paths
            root = config_file.parent
            if base is not None:
                root = root / Path(os.path.expandvars(str(base))).expanduser()
            for kind, value in entries.items():
                if not isinstance(value, str):
                    raise ValueError(f"{section}.{kind} must be a folder or folders on separate lines, not {value!r}")
                folders = [line.strip() for line in value.splitlines() if line.strip()]
                target.setdefault(kind, []).extend(root / Path(f).expanduser() for f in folders)


def _mtime(folder: str) -> int | None:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


_paths = FolderPaths()


def get_paths() -> FolderPaths:
    """The folders of this process (configured once at start-up by the CLI or the server)."""
    return _paths


def input_where() -> str:
    """The input folder as an error names it: relative to the base folder, else its last two parts (an answer may go
    to a remote client, which has no business knowing where the server's files are)."""
    paths = get_paths()
    try:
        return paths.input.relative_to(paths.base).as_posix() or "."
    except ValueError:
        return f".../{paths.input.parent.name}/{paths.input.name}"


def input_files(suffixes: tuple[str, ...] | frozenset[str] | set[str]) -> list[str]:
    """The files in the input folder (and its sub-folders) whose suffixes, lower-cased, are among `suffixes`: their
    paths there, sorted, as a loader node's combo lists them."""
    folder = get_paths().input
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in suffixes)


def input_file(name: str) -> Path | None:
    """The file a loader node names by its path in the input folder; None when there is no such file, or the name
    leads outside the folder ("../x", an absolute path, a link out)."""
    root = get_paths().input.resolve()
    path = (root / name).resolve()
    return path if path.is_file() and path.is_relative_to(root) else None


def set_paths(paths: FolderPaths) -> None:
    global _paths
    _paths = paths


def output_prefix_problem(prefix: object) -> str | None:
    """Why a save node's `filename_prefix` cannot be used (it must name a file inside the output folder), or
    None; a prefix that is not a constant string (a link) is checked when it is used."""
    if not isinstance(prefix, str):
        return None
    path = Path(prefix.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.name:
        return f"filename_prefix {prefix!r} must be a relative name inside the output folder"
    return None


@contextmanager
def new_output_file(root: Path, prefix: str, suffix: str) -> Iterator[tuple[Path, BinaryIO, str]]:
    """Create the first free PREFIX_NNNNN_SUFFIX under `root` (exclusively, so concurrent savers never share a
    name) and give its path, its open binary handle and the sub-folder the prefix names ('' for none). The
    handle is closed at the end; if the body fails, the file is removed, so no half-written file stays."""
    problem = output_prefix_problem(prefix)
    if problem:
        raise ValueError(problem)
    prefix_path = Path(prefix.replace("\\", "/"))
    folder = (root / prefix_path.parent).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    name = prefix_path.name
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)_{re.escape(suffix)}$")
    counter = max((int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))), default=0) + 1
    subfolder = prefix_path.parent.as_posix() if prefix_path.parent != Path(".") else ""
    while True:
        path = folder / f"{name}_{counter:05}_{suffix}"
        try:
            handle = open(path, "xb")
            break
        except FileExistsError:
            counter += 1
    try:
        with handle:
            yield path, handle, subfolder
    except BaseException:
        path.unlink(missing_ok=True)
        raise
