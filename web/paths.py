"""Turning user-supplied folder and file names into paths that can never leave their root folder."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

MAX_NAME = 200  # bytes (UTF-8) in a cleaned file name: room for " (12)" and ".part" within 255
MAX_PATH = 1024  # characters in a subfolder or filename given by a client
MAX_PART = 255  # bytes in one path component, as most file systems allow
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')


class UnsafePath(ValueError):
    """A name that tries to leave its folder (`..`, absolute, a symlink out, odd characters)."""


def _parts(name: str, what: str) -> list[str]:
    if "\x00" in name or "\\" in name:
        raise UnsafePath(f"{what} must not contain NUL or backslash characters")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafePath(f"{what} must be relative, not an absolute path")
    if len(name) > MAX_PATH:
        raise UnsafePath(f"{what} is longer than {MAX_PATH} characters")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"{what} must not contain '..'")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_PART for p in parts):
        raise UnsafePath(f"{what} has a name longer than {MAX_PART} bytes")
    return parts


def safe_join(root: Path, subfolder: str, filename: str) -> Path:
    """`root/subfolder/filename`, resolved; raises UnsafePath if it would lie outside `root`.

    Symlinks are followed before the check, so a link that points out of `root` is refused too.
    """
    name = _parts(filename, "filename")
    if not name:
        raise UnsafePath("filename is empty")
    return _inside(root, _parts(subfolder, "subfolder") + name)


def safe_folder(root: Path, subfolder: str) -> Path:
    """`root/subfolder`, resolved (`root` itself for an empty one), with the checks of `safe_join`."""
    return _inside(root, _parts(subfolder, "subfolder"))


def _inside(root: Path, parts: list[str]) -> Path:
    base = root.resolve()
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise UnsafePath("the path leaves its folder")
    return target


def clean_filename(name: str, fallback: str = "upload") -> str:
    """A plain file name from a client's: no folders, no control or reserved characters, no leading dot."""
    name = unicodedata.normalize("NFC", unquote(name)).replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("_", name).strip().lstrip(".").strip()
    if len(name.encode()) > MAX_NAME:
        stem, dot, ext = name.rpartition(".")
        if dot and len(ext) < 10:
            name = _cut(stem, MAX_NAME - len(ext.encode()) - 1) + dot + ext
        else:
            name = _cut(name, MAX_NAME)
    return name or fallback


def _cut(text: str, limit: int) -> str:
    """The longest start of `text` that is at most `limit` bytes in UTF-8 (never half a character)."""
    return text.encode()[:limit].decode("utf-8", "ignore")
