"""POST /upload/mask, as ComfyUI's mask editor and inpainting scripts send it: the upload's alpha becomes the alpha of
the image `original_ref` names, saved under the upload's name, and LoadImage reads it back as the mask."""

import io
import json

import torch
from aiohttp import FormData
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from nodes.sd.image import LoadImage


def _png(image: Image.Image, **text: str) -> bytes:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _mask_upload(mask: bytes, ref: object, filename: str = "clipspace-mask-123.png", **fields: str) -> FormData:
    body = FormData()
    body.add_field("image", mask, filename=filename, content_type="image/png")
    body.add_field("original_ref", ref if isinstance(ref, str) else json.dumps(ref))
    for key, value in fields.items():
        body.add_field(key, value)
    return body


def _cat() -> Image.Image:
    return Image.new("RGB", (6, 4), (200, 100, 50))


def _alpha() -> Image.Image:
    """An RGBA mask upload: opaque left half, transparent right half (the part to repaint)."""
    mask = Image.new("RGBA", (6, 4), (0, 0, 0, 255))
    for x in range(3, 6):
        for y in range(4):
            mask.putpixel((x, y), (0, 0, 0, 0))
    return mask


async def test_mask_goes_onto_the_original_and_loads_as_the_mask(client, paths):
    paths.input.mkdir(parents=True, exist_ok=True)
    (paths.input / "cat.png").write_bytes(_png(_cat(), workflow='{"nodes": []}'))
    resp = await client.post("/upload/mask", data=_mask_upload(
        _png(_alpha()), {"filename": "cat.png", "subfolder": "", "type": "input"}, subfolder="clipspace"))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"name": "clipspace-mask-123.png", "subfolder": "clipspace", "type": "input"}
    with Image.open(paths.input / "clipspace" / "clipspace-mask-123.png") as saved:
        assert saved.mode == "RGBA" and saved.text["workflow"] == '{"nodes": []}'  # the original's chunks stay
        assert saved.getpixel((0, 0)) == (200, 100, 50, 255) and saved.getpixel((5, 3)) == (200, 100, 50, 0)
    image, mask = LoadImage().execute("clipspace/clipspace-mask-123.png")
    assert image.shape == (1, 4, 6, 3)
    torch.testing.assert_close(mask, torch.tensor([[0.0] * 3 + [1.0] * 3] * 4).unsqueeze(0))


async def test_comfyuis_annotated_name_and_an_output_image(client, paths):
    paths.output.mkdir(parents=True, exist_ok=True)
    (paths.output / "result.png").write_bytes(_png(_cat()))
    resp = await client.post("/upload/mask", data=_mask_upload(_png(_alpha()), {"filename": "result.png [output]"}))
    assert resp.status == 200, await resp.text()
    with Image.open(paths.input / "clipspace-mask-123.png") as saved:
        assert saved.getpixel((5, 0))[3] == 0


async def test_bad_mask_uploads_are_refused_clearly(client, paths):
    paths.input.mkdir(parents=True, exist_ok=True)
    (paths.input / "cat.png").write_bytes(_png(_cat()))
    cases = [
        (_mask_upload(_png(_alpha()), "not json"), 400, "original_ref"),
        (_mask_upload(_png(_alpha()), {"subfolder": ""}), 400, "original_ref"),
        (_mask_upload(_png(_alpha()), {"filename": "dog.png", "type": "input"}), 404, "no image 'dog.png' in input"),
        (_mask_upload(_png(_alpha()), {"filename": "../../etc/passwd", "type": "input"}), 400, "invalid_path"),
        (_mask_upload(_png(Image.new("RGBA", (3, 3))), {"filename": "cat.png", "type": "input"}), 400,
         "the mask is 3x3 but the image it is for, 'cat.png', is 6x4"),
        (_mask_upload(b"not an image", {"filename": "cat.png", "type": "input"}), 415, "not_an_image"),
    ]
    for body, status, says in cases:
        resp = await client.post("/upload/mask", data=body)
        assert resp.status == status and says in await resp.text(), (status, await resp.text())
    assert sorted(p.name for p in paths.input.iterdir()) == ["cat.png"]  # nothing was written
