"""Step previews: a cheap linear latent-to-RGB projection, encoded as a small JPEG websocket frame."""

from __future__ import annotations

import io
import queue
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ldm.latent_preview import SD1_RGB_MAP, LatentPreview, apply_rgb_map

PREVIEW_IMAGE = 1  # binary frame type: preview image
JPEG = 1
MAX_SIDE = 512


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def preview_rgb(value: Any, rgb_map: np.ndarray | None = None) -> np.ndarray | None:
    """An HxWx3 uint8 picture of a latent [B, C, h, w] or [B, C, T, h, w] (first of the batch, first frame) or
    an image [B, H, W, 3]. A latent goes through `rgb_map` [C + 1, 3] (ldm.latent_preview: fitted to the model's
    VAE), else, having 4 channels, SD1's table; other widths with no map show in grey. A LatentPreview brings its
    own map."""
    if isinstance(value, LatentPreview):
        value, rgb_map = value.latent, value.rgb_map
    array = _to_numpy(value)
    if array.ndim == 5:  # a video latent [B, C, T, h, w]: its first frame
        array = array[:, :, 0]
    if array.ndim == 4 and array.shape[-1] == 3 and array.shape[1] != 3:
        rgb = np.clip(array[0], 0.0, 1.0)
    elif array.ndim == 4:
        if rgb_map is None and array.shape[1] == SD1_RGB_MAP.shape[0] - 1:
            rgb_map = SD1_RGB_MAP
        if rgb_map is not None and rgb_map.shape == (array.shape[1] + 1, 3):
            rgb = apply_rgb_map(array[0], rgb_map)
        else:
            grey = array[0].mean(axis=0)[..., None]
            rgb = np.repeat((grey - grey.min()) / (np.ptp(grey) or 1.0), 3, axis=-1)
    else:
        return None
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def encode_preview(value: Any, rgb_map: np.ndarray | None = None) -> bytes | None:
    """The binary websocket frame of REFERENCE.md section 5 (type 1, JPEG), or None if not previewable."""
    rgb = preview_rgb(value, rgb_map)
    if rgb is None or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return None
    image = Image.fromarray(rgb)
    scale = max(1, min(8, MAX_SIDE // max(image.size)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return struct.pack(">II", PREVIEW_IMAGE, JPEG) + buffer.getvalue()


class Throttle:
    """Lets at most one event through per `interval` seconds."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self._last = 0.0

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


class PreviewEncoder:
    """Encodes one run's step previews on a thread of its own, so that the sampling loop never waits.

    `submit(value)` is called on the sampling thread with a latent or image batch. It keeps the first
    item: a copy on the CPU, or on CUDA a non-blocking copy into pinned host memory with an event
    recorded after it, so the loop neither synchronises with the GPU nor encodes a JPEG. The thread
    waits for that copy, encodes the frame and hands it to `deliver`. `close()` waits until every
    submitted preview is delivered, so that no frame arrives after the run's end. Submissions are
    throttled by the caller (`Throttle`), so at most a few are ever waiting.
    """

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self._deliver = deliver
        self._queue: queue.SimpleQueue[tuple[Any, Any, np.ndarray | None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, value: Any) -> None:
        """Queue a preview: a latent or image batch, or a LatentPreview (a latent with its RGB map)."""
        rgb_map = None
        if isinstance(value, LatentPreview):
            value, rgb_map = value.latent, value.rgb_map
        event = None
        if hasattr(value, "detach"):  # a torch tensor, without importing torch here
            first = value.detach()[:1]
            if first.is_cuda:
                import torch

                host = torch.empty(first.shape, dtype=first.dtype, pin_memory=True)
                host.copy_(first, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host = first.clone()  # the sampler may reuse its buffers
        else:
            host = np.array(value, dtype=np.float32)[:1]
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="loom-previews", daemon=True)
            self._thread.start()
        self._queue.put((host, event, rgb_map))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            host, event, rgb_map = item
            if event is not None:
                event.synchronize()  # this thread waits for the copy, not the sampling loop
            frame = encode_preview(host, rgb_map)
            if frame is not None:
                self._deliver(frame)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
