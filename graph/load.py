"""Reading a workflow from a file or text in any supported format (API, UI, or a PNG that carries one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graph.document import DocumentError, Graph, parse_api
from graph.ui_format import is_ui_format, ui_to_api
from nodes.registry import NodeRegistry

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def graph_from_data(data: Any, registry: NodeRegistry) -> Graph:
    """Detect the format of decoded JSON and return the graph."""
    if is_ui_format(data):
        return parse_api(ui_to_api(data, registry))
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        return parse_api(data["prompt"])  # the body of POST /prompt, saved to a file
    return parse_api(data)


def read_png_workflow(path: Path) -> Any:
    """The workflow embedded in a PNG's tEXt chunks: the API-format `prompt`, else the editor `workflow`."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or image.info)
    for key in ("prompt", "workflow"):
        if isinstance(text.get(key), str):
            try:
                return json.loads(text[key])
            except json.JSONDecodeError:
                raise DocumentError(f"{path}: the PNG's '{key}' chunk is not valid JSON") from None
    raise DocumentError(f"{path}: this PNG carries no workflow (no 'prompt' or 'workflow' text chunk)")


def load_workflow_data(path: str | Path) -> Any:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read: {exc.strerror}") from None
    if raw.startswith(PNG_SIGNATURE):
        return read_png_workflow(path)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DocumentError(f"{path}: not valid JSON: {exc}") from None


def load_workflow(path: str | Path, registry: NodeRegistry) -> Graph:
    return graph_from_data(load_workflow_data(path), registry)
