"""Reading a workflow from a file or text in any supported format (API, UI, or a PNG, WEBP, MP4 or WebM that
carries one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graph.document import DocumentError, Graph, parse_api
from graph.ui_format import is_ui_format, ui_to_api
from nodes.registry import NodeRegistry

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MATROSKA_SIGNATURE = b"\x1a\x45\xdf\xa3"  # WebM's (and MKV's) EBML header


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


def _webp_text(path: Path) -> dict[str, str]:
    """The "key:json" EXIF strings ComfyUI's SaveAnimatedWEBP writes (tag 0x0110 the prompt, then down)."""
    from PIL import Image

    with Image.open(path) as image:
        exif = image.getexif()
    found = {}
    for value in exif.values():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and ":" in value:
            key, _, text = value.partition(":")
            found[key] = text
    return found


def read_png_workflow(path: Path, raw: bytes | None = None) -> Any:
    """The workflow embedded in a PNG's tEXt (or an animated PNG's `comf`) chunks, or a WEBP's EXIF: the
    API-format `prompt`, else the editor `workflow`."""
    from PIL import Image

    kind = "WEBP" if raw is not None and raw[8:12] == b"WEBP" else "PNG"
    if kind == "WEBP":
        text = _webp_text(path)
    else:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or image.info)
        if raw is not None and "prompt" not in text and "workflow" not in text:
            text = _comf_chunks(raw)
    return _workflow_in(text, path, kind)


def read_video_workflow(path: Path, raw: bytes) -> Any:
    """The workflow in an MP4's or WebM's container metadata, where ComfyUI's SaveVideo and SaveWEBM (and
    Loom's) put the API-format `prompt` and the editor `workflow`. Matroska's tag names come back upper-cased."""
    import av

    kind = "WebM" if raw.startswith(MATROSKA_SIGNATURE) else "MP4"
    try:
        with av.open(str(path)) as container:
            text = {key.lower(): value for key, value in container.metadata.items()}
    except av.error.FFmpegError as exc:
        raise DocumentError(f"{path}: cannot read this {kind}: {exc}") from None
    return _workflow_in(text, path, kind)


def _workflow_in(text: dict[str, str], path: Path, kind: str) -> Any:
    """The API-format `prompt` of a file's embedded strings, else the editor `workflow`."""
    for key in ("prompt", "workflow"):
        if isinstance(text.get(key), str):
            try:
                return json.loads(text[key])
            except json.JSONDecodeError:
                raise DocumentError(f"{path}: the {kind}'s '{key}' entry is not valid JSON") from None
    raise DocumentError(f"{path}: this {kind} carries no workflow (no 'prompt' or 'workflow' entry)")


def load_workflow_data(path: str | Path) -> Any:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read: {exc.strerror}") from None
    if raw.startswith(PNG_SIGNATURE) or (raw.startswith(b"RIFF") and raw[8:12] == b"WEBP"):
        return read_png_workflow(path, raw)
    if raw[4:8] == b"ftyp" or raw.startswith(MATROSKA_SIGNATURE):
        return read_video_workflow(path, raw)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DocumentError(f"{path}: not valid JSON: {exc}") from None


def load_workflow(path: str | Path, registry: NodeRegistry) -> Graph:
    return graph_from_data(load_workflow_data(path), registry)
