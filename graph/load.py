"""Reading a workflow from a file or text in any supported format (API, UI, or a PNG, WEBP, MP4, WebM, FLAC, Opus or
MP3 that carries one)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from graph.document import DocumentError, Graph, parse_api
from graph.ui_format import is_ui_format, ui_to_api
from nodes.registry import NodeRegistry

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MATROSKA_SIGNATURE = b"\x1a\x45\xdf\xa3"  # WebM's (and MKV's) EBML header
# Which embedded entry wins when a file carries both: what runs (the CLI's choice), or what the editor draws, with
# its layout (the editor's, as ComfyUI's).
PROMPT_FIRST = ("prompt", "workflow")
WORKFLOW_FIRST = ("workflow", "prompt")


def graph_from_data(data: Any, registry: NodeRegistry) -> Graph:
    """Detect the format of decoded JSON and return the graph."""
    if is_ui_format(data):
        return parse_api(ui_to_api(data, registry))
    embedded = _embedded_text(data)
    if embedded is not None:
        return graph_from_data(embedded, registry)
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        return parse_api(data["prompt"])  # the body of POST /prompt, saved to a file
    return parse_api(data)


def _embedded_text(data: Any) -> Any:
    """A PNG's text chunks saved as JSON ({"prompt": "<json>", "workflow": "<json>"}, as PNG-info tools and
    ComfyUI_frontend's example fixtures write them): the decoded prompt, else the workflow; None for other data."""
    if not isinstance(data, dict) or not (set(data) & {"prompt", "workflow"}) or set(data) - {"prompt", "workflow"}:
        return None
    for key in ("prompt", "workflow"):
        if isinstance(data.get(key), str):
            try:
                return json.loads(data[key])
            except json.JSONDecodeError:
                raise DocumentError(f"the '{key}' entry is not valid JSON") from None
    return None


def _comf_chunks(raw: bytes) -> dict[str, str]:
    """The `comf` chunks of an animated PNG (ComfyUI's SaveAnimatedPNG writes "key\\0json" there, after
    the image data, where Pillow does not read text)."""
    found, at = {}, len(PNG_SIGNATURE)
    while at + 8 <= len(raw):
        length, kind = int.from_bytes(raw[at:at + 4], "big"), raw[at + 4:at + 8]
        if kind == b"comf":
            key, _, value = raw[at + 8:at + 8 + length].partition(b"\0")
            found[key.decode("latin-1")] = value.decode("latin-1")
        at += 12 + length
    return found


def _webp_text(raw: bytes) -> dict[str, str]:
    """The "key:json" EXIF strings ComfyUI's SaveAnimatedWEBP writes (tag 0x0110 the prompt, then down)."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        exif = image.getexif()
    found = {}
    for value in exif.values():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and ":" in value:
            key, _, text = value.partition(":")
            found[key] = text
    return found


def file_kind(raw: bytes) -> str | None:
    """The kind of file, by its first bytes, that can carry a workflow in its metadata (PNG, WEBP, MP4, WebM, FLAC,
    Opus or Ogg, MP3); None for any other (JSON, say)."""
    if raw.startswith(PNG_SIGNATURE):
        return "PNG"
    if raw.startswith(b"RIFF") and raw[8:12] == b"WEBP":
        return "WEBP"
    if raw[4:8] == b"ftyp":
        return "MP4"
    if raw.startswith(MATROSKA_SIGNATURE):
        return "WebM"
    if raw.startswith(b"fLaC"):
        return "FLAC"
    if raw.startswith(b"OggS"):
        return "Opus" if raw[28:36] == b"OpusHead" else "Ogg"
    # An ID3v2 tag, else an MPEG audio frame: 11 sync bits, then a version and a layer that are not "reserved".
    if raw.startswith(b"ID3") or (len(raw) > 1 and raw[0] == 0xFF and raw[1] & 0xE0 == 0xE0
                                  and raw[1] & 0x18 != 0x08 and raw[1] & 0x06 != 0):
        return "MP3"
    return None


def read_png_workflow(raw: bytes, name: str = "", keys: tuple[str, ...] = PROMPT_FIRST) -> Any:
    """The workflow embedded in a PNG's tEXt (or an animated PNG's `comf`) chunks, or a WEBP's EXIF."""
    from PIL import Image, UnidentifiedImageError

    kind = "WEBP" if raw[8:12] == b"WEBP" else "PNG"
    try:
        if kind == "WEBP":
            text = _webp_text(raw)
        else:
            with Image.open(io.BytesIO(raw)) as image:
                text = dict(getattr(image, "text", {}) or image.info)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DocumentError(f"{_where(name)}cannot read this {kind}: {exc}") from None
    if kind == "PNG" and "prompt" not in text and "workflow" not in text:
        text = _comf_chunks(raw)
    return _workflow_in(text, name, kind, keys)


def read_media_workflow(raw: bytes, name: str = "", keys: tuple[str, ...] = PROMPT_FIRST) -> Any:
    """The workflow in a video's or an audio file's metadata, read with PyAV: where ComfyUI's (and Loom's) SaveVideo
    and SaveWEBM put the API-format `prompt` and the editor `workflow` (MP4 and Matroska tags), and SaveAudio,
    SaveAudioMP3 and SaveAudioOpus (FLAC's Vorbis comments, ID3, and the Opus stream's Vorbis comments). Keys come
    back in any case (Matroska's upper-cased)."""
    import av

    kind = file_kind(raw) or "media file"
    try:
        with av.open(io.BytesIO(raw)) as container:
            text = {key.lower(): value for key, value in container.metadata.items()}
            for stream in container.streams:  # Ogg keeps its comments on the stream, not the container
                for key, value in stream.metadata.items():
                    text.setdefault(key.lower(), value)
    except (av.error.FFmpegError, ValueError, EOFError) as exc:
        raise DocumentError(f"{_where(name)}cannot read this {kind}: {exc}") from None
    return _workflow_in(text, name, kind, keys)


def read_file_workflow(raw: bytes, name: str = "", keys: tuple[str, ...] = PROMPT_FIRST) -> Any:
    """The workflow a PNG, WEBP, video or audio file carries (see `file_kind`), the entry first in `keys` that it
    has; `name` (the file's path, say) starts each error message."""
    kind = file_kind(raw)
    if kind in ("PNG", "WEBP"):
        return read_png_workflow(raw, name, keys)
    if kind is not None:
        return read_media_workflow(raw, name, keys)
    raise DocumentError(f"{_where(name)}not a file that carries a workflow: PNG, WEBP, MP4, WebM, FLAC, Opus, Ogg or "
                        "MP3 are read")


def _where(name: str) -> str:
    return f"{name}: " if name else ""


def _workflow_in(text: dict[str, str], name: str, kind: str, keys: tuple[str, ...]) -> Any:
    """The first of `keys` among a file's embedded strings, decoded."""
    for key in keys:
        if isinstance(text.get(key), str):
            try:
                return json.loads(text[key])
            except json.JSONDecodeError:
                raise DocumentError(f"{_where(name)}the {kind}'s '{key}' entry is not valid JSON") from None
    raise DocumentError(f"{_where(name)}this {kind} carries no workflow (no 'prompt' or 'workflow' entry)")


def load_workflow_data(path: str | Path) -> Any:
    """A workflow file's decoded JSON, or the workflow (API-format `prompt` first) that an image, video or audio
    file carries."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read: {exc.strerror}") from None
    if file_kind(raw) is not None:
        return read_file_workflow(raw, str(path))
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DocumentError(f"{path}: not valid JSON: {exc}") from None


def load_workflow(path: str | Path, registry: NodeRegistry) -> Graph:
    return graph_from_data(load_workflow_data(path), registry)
