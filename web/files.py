"""Routes for user files: GET /view (read input/output/temp), POST /upload/image and /upload/mask (write input/).

/upload/image takes audio and video files too (checked with PyAV), as ComfyUI's editor posts LoadAudio's and
LoadVideo's uploads there."""

from __future__ import annotations

import asyncio
import io
import json
import mimetypes
import os
import re
from pathlib import Path

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from nodes.sd.audio import AUDIO_SUFFIXES, VIDEO_SUFFIXES
from web.http import json_error
from web.paths import UnsafePath, clean_filename, safe_folder, safe_join
from web.state import STATE, ServerState

routes = web.RouteTableDef()

FOLDER_TYPES = ("output", "input", "temp")
# Served inline; anything else is sent as a download so that a stored file never runs as a page here.
INLINE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "video/mp4", "video/webm",
                "audio/wav", "audio/x-wav", "audio/mpeg", "audio/flac", "audio/ogg", "audio/mp4", "audio/aac",
                "audio/webm", "audio/x-aiff", "application/json", "text/plain"}
# Audio types by suffix, where the platform's MIME table may lack them (an <audio> player needs the right one).
AUDIO_TYPES = {".flac": "audio/flac", ".opus": "audio/ogg", ".ogg": "audio/ogg", ".mp3": "audio/mpeg",
               ".wav": "audio/wav", ".m4a": "audio/mp4", ".aac": "audio/aac", ".weba": "audio/webm",
               ".aif": "audio/x-aiff", ".aiff": "audio/x-aiff"}
FORMAT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff"}


def _root(state: ServerState, kind: str) -> Path:
    if kind not in FOLDER_TYPES:
        raise json_error(400, "invalid_request", f"type must be one of {', '.join(FOLDER_TYPES)}, not {kind!r}")
    return {"output": state.paths.output, "input": state.paths.input, "temp": state.paths.temp}[kind]


@routes.get("/view")
async def view(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    filename = request.query.get("filename", "")
    if not filename:
        raise json_error(400, "invalid_request", "the 'filename' query parameter is required")
    root = _root(state, request.query.get("type", "output") or "output")
    try:
        path = safe_join(root, request.query.get("subfolder", ""), filename)
    except UnsafePath as exc:
        raise json_error(400, "invalid_path", str(exc)) from None
    try:
        found = path.is_file()
    except OSError:  # a name the file system cannot hold
        found = False
    if not found:
        raise json_error(404, "not_found", f"no file {filename!r} there")
    content_type = (AUDIO_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
                    or "application/octet-stream")
    inline = content_type in INLINE_TYPES
    headers = {
        "Content-Type": content_type if inline else "application/octet-stream",
        "Content-Disposition": f"{'inline' if inline else 'attachment'}; filename=\"{path.name}\"",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return web.FileResponse(path, headers=headers)


async def _read_limited(part: BodyPartReader, limit: int, what: str = "the upload") -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(256 * 1024):
        data.extend(chunk)
        if len(data) > limit:
            raise json_error(413, "file_too_large", f"{what} is larger than the limit of {limit} bytes")
    return bytes(data)


def _check_image(data: bytes, max_pixels: int) -> str:
    """The image format of `data`; raises if it does not decode (or is too large to decode safely)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise _too_large(max_pixels)
            fmt = image.format or ""
            image.load()
    except Image.DecompressionBombError:  # Pillow's own limit, met before ours when the image is huge
        raise _too_large(max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise json_error(415, "not_an_image", "the uploaded file is not an image that can be decoded") from None
    if fmt not in FORMAT_SUFFIX:
        raise json_error(415, "not_an_image", f"images of format {fmt or 'unknown'} are not accepted")
    return fmt


def _check_media(data: bytes, name: str) -> None:
    """Refuse an audio or video upload that PyAV cannot decode: it must hold an audio (or video) stream whose first
    frame decodes."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            streams = container.streams.audio or container.streams.video
            if not streams:
                raise json_error(415, "not_media", f"{name} holds no audio or video stream")
            if next(container.decode(streams[0]), None) is None:
                raise json_error(415, "not_media", f"{name} holds no audio or video frames")
    except (av.FFmpegError, ValueError, EOFError) as exc:
        raise json_error(415, "not_media", f"{name} is not audio or video that can be decoded: {exc}") from None


def _too_large(max_pixels: int) -> web.HTTPException:
    return json_error(413, "image_too_large", f"the image has more than {max_pixels} pixels")


def _write_unique(folder: Path, name: str, data: bytes, overwrite: bool) -> str:
    """Write `data` as `name` in `folder`; an existing different file is kept and `name (1)` is used."""
    stem, suffix = os.path.splitext(name)
    candidate, i = name, 0
    while True:
        path = folder / candidate
        if overwrite:
            tmp = folder / f".{candidate}.part"
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return candidate
        if path.is_file() and path.read_bytes() == data:
            return candidate  # the same file was uploaded before
        try:
            with open(path, "xb") as handle:  # never replace a file that appeared meanwhile
                handle.write(data)
            return candidate
        except FileExistsError:
            i += 1
            candidate = f"{stem} ({i}){suffix}"


async def _read_upload(request: web.Request, fields_wanted: tuple[str, ...]) -> tuple[bytes, str, dict[str, str]]:
    """The image of a multipart upload (field `image`), its file name, and the small fields named."""
    state = request.app[STATE]
    limit = state.config.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise json_error(413, "file_too_large", f"the upload is larger than the limit of {limit} bytes")
    if not request.content_type.startswith("multipart/"):
        raise json_error(400, "invalid_request", "send the image as multipart/form-data in a field named 'image'")
    fields: dict[str, str] = {}
    data: bytes | None = None
    original = ""
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "image":
                original = part.filename or ""
                data = await _read_limited(part, limit)
            elif part.name in fields_wanted:
                fields[part.name] = (await _read_limited(part, 4096, f"the field {part.name!r}")
                                     ).decode("utf-8", "replace")
    except (ValueError, AssertionError, UnicodeDecodeError, HttpProcessingError) as exc:
        raise json_error(400, "invalid_request", f"malformed multipart body: {exc}") from None
    if data is None:
        raise json_error(400, "invalid_request", "no file in the multipart field 'image'")
    return data, original, fields


def _folder(state: ServerState, kind: str, subfolder: str, create: bool = False) -> Path:
    """The folder `subfolder` of the input, output or temp folder, refused if it leaves it."""
    try:
        folder = safe_folder(_root(state, kind), subfolder)
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder
    except UnsafePath as exc:
        raise json_error(400, "invalid_path", str(exc)) from None
    except OSError as exc:  # a file of that name is in the way, or the file system refuses the name
        raise json_error(400, "invalid_path", f"subfolder {subfolder!r} cannot be a folder: {exc.strerror}") from None


@routes.post("/upload/image")
async def upload_image(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data, original, fields = await _read_upload(request, ("overwrite", "subfolder", "type"))
    kind = fields.get("type", "input") or "input"
    _root(state, kind)
    name = clean_filename(original, "image")
    if os.path.splitext(name)[1].lower() in (*AUDIO_SUFFIXES, *VIDEO_SUFFIXES):
        await asyncio.to_thread(_check_media, data, name)
    else:
        fmt = await asyncio.to_thread(_check_image, data, state.config.max_image_pixels)
        if os.path.splitext(name)[1].lower() not in (*FORMAT_SUFFIX.values(), ".jpeg", ".tif"):
            name += FORMAT_SUFFIX[fmt]
    subfolder = fields.get("subfolder", "")
    folder = _folder(state, kind, subfolder, create=True)
    overwrite = fields.get("overwrite", "").lower() in ("true", "1", "yes")
    stored = await asyncio.to_thread(_write_unique, folder, name, data, overwrite)
    return web.json_response({"name": stored, "subfolder": subfolder.strip("/"), "type": kind})


@routes.post("/upload/mask")
async def upload_mask(request: web.Request) -> web.Response:
    """ComfyUI's mask upload (its mask editor and inpainting scripts): the uploaded image's alpha channel becomes the
    alpha of the image `original_ref` names (JSON: filename, subfolder, type), saved as a PNG under the upload's own
    name with the original's text chunks (so its workflow stays). LoadImage reads that alpha as the mask."""
    state = request.app[STATE]
    data, original, fields = await _read_upload(request, ("overwrite", "subfolder", "type", "original_ref"))
    try:
        ref = json.loads(fields.get("original_ref", ""))
        ref_name = str(ref["filename"])
    except (ValueError, TypeError, KeyError):
        raise json_error(400, "invalid_request", "the field 'original_ref' must be JSON naming the image the mask is "
                         'for: {"filename": ..., "subfolder": ..., "type": "input"}') from None
    await asyncio.to_thread(_check_image, data, state.config.max_image_pixels)
    ref_kind = str(ref.get("type") or "output")
    annotated = re.fullmatch(r"(.+) \[(input|output|temp)\]", ref_name)  # ComfyUI's "name [input]" form
    if annotated:
        ref_name, ref_kind = annotated.groups()
    try:
        source = safe_join(_root(state, ref_kind), str(ref.get("subfolder") or ""), ref_name)
    except UnsafePath as exc:
        raise json_error(400, "invalid_path", str(exc)) from None
    if not source.is_file():
        raise json_error(404, "not_found", f"no image {ref_name!r} in {ref_kind} to apply the mask to")
    kind = fields.get("type", "input") or "input"
    subfolder = fields.get("subfolder", "")
    folder = _folder(state, kind, subfolder, create=True)
    name = os.path.splitext(clean_filename(original, "mask"))[0] + ".png"
    png = await asyncio.to_thread(_with_mask, source, data, state.config.max_image_pixels)
    overwrite = fields.get("overwrite", "").lower() in ("true", "1", "yes")
    stored = await asyncio.to_thread(_write_unique, folder, name, png, overwrite)
    return web.json_response({"name": stored, "subfolder": subfolder.strip("/"), "type": kind})


def _with_mask(source: Path, mask: bytes, max_pixels: int) -> bytes:
    """PNG bytes of the image at `source` with the alpha channel of the image `mask`, keeping its text chunks."""
    try:
        with Image.open(source) as image:
            if image.width * image.height > max_pixels:
                raise _too_large(max_pixels)
            info = PngInfo()
            for key, value in getattr(image, "text", {}).items():
                info.add_text(key, value)
            rgba = image.convert("RGBA")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise json_error(415, "not_an_image", f"the original image {source.name!r} cannot be decoded") from None
    with Image.open(io.BytesIO(mask)) as uploaded:
        alpha = uploaded.convert("RGBA").getchannel("A")
    if alpha.size != rgba.size:
        raise json_error(400, "invalid_request", f"the mask is {alpha.width}x{alpha.height} but the image it is for, "
                         f"{source.name!r}, is {rgba.width}x{rgba.height}")
    rgba.putalpha(alpha)
    out = io.BytesIO()
    rgba.save(out, format="PNG", compress_level=4, pnginfo=info)
    return out.getvalue()
