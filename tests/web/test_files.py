"""GET /view and POST /upload/image: reading and writing stay inside their folders; uploads are checked."""

import io
import os
import struct
import zlib

import pytest
from aiohttp import FormData
from PIL import Image


def png_bytes(color=(255, 0, 0), size=(4, 4), fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def form(data, filename="cat.png", **fields):
    body = FormData()
    body.add_field("image", data, filename=filename, content_type="image/png")
    for key, value in fields.items():
        body.add_field(key, value)
    return body


async def test_upload_then_view(client, paths):
    resp = await client.post("/upload/image", data=form(png_bytes()))
    assert resp.status == 200
    assert await resp.json() == {"name": "cat.png", "subfolder": "", "type": "input"}
    assert (paths.input / "cat.png").read_bytes() == png_bytes()
    view = await client.get("/view", params={"filename": "cat.png", "type": "input"})
    assert view.status == 200 and view.headers["Content-Type"] == "image/png"
    assert await view.read() == png_bytes()


async def test_upload_never_overwrites_silently(client, paths):
    await client.post("/upload/image", data=form(png_bytes((1, 2, 3))))
    same = await (await client.post("/upload/image", data=form(png_bytes((1, 2, 3))))).json()
    assert same["name"] == "cat.png"  # identical content: the existing file is reused
    other = await (await client.post("/upload/image", data=form(png_bytes((9, 9, 9))))).json()
    assert other["name"] == "cat (1).png"
    third = await (await client.post("/upload/image", data=form(png_bytes((8, 8, 8))))).json()
    assert third["name"] == "cat (2).png"
    replaced = await (await client.post("/upload/image", data=form(png_bytes((7, 7, 7)), overwrite="true"))).json()
    assert replaced["name"] == "cat.png"
    assert (paths.input / "cat.png").read_bytes() == png_bytes((7, 7, 7))


async def test_upload_into_subfolder_and_temp(client, paths):
    body = await (await client.post("/upload/image", data=form(png_bytes(), subfolder="a/b", type="temp"))).json()
    assert body == {"name": "cat.png", "subfolder": "a/b", "type": "temp"}
    assert (paths.temp / "a" / "b" / "cat.png").is_file()


@pytest.mark.parametrize("filename, stored", [
    ("../../evil.png", "evil.png"),
    ("/etc/evil.png", "evil.png"),
    ("..\\..\\evil.png", "evil.png"),
    (".hidden.png", "hidden.png"),
    ("a:b|c.png", "a_b_c.png"),
    ("noext", "noext.png"),
    ("page.html", "page.html.png"),
])
async def test_upload_file_names_are_sanitised(client, paths, filename, stored):
    body = await (await client.post("/upload/image", data=form(png_bytes(), filename=filename))).json()
    assert body["name"] == stored
    assert (paths.input / stored).is_file()


@pytest.mark.parametrize("subfolder", ["../x", "/tmp", "a/../../x", "..\\x", "a\x00b"])
async def test_upload_subfolder_traversal_is_refused(client, subfolder, tmp_path):
    resp = await client.post("/upload/image", data=form(png_bytes(), subfolder=subfolder))
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_path"
    assert not (tmp_path.parent / "x").exists()


async def test_upload_through_symlink_out_is_refused(client, paths, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    paths.input.mkdir(parents=True)
    os.symlink(outside, paths.input / "link")
    resp = await client.post("/upload/image", data=form(png_bytes(), subfolder="link"))
    assert resp.status == 400
    assert list(outside.iterdir()) == []


async def test_non_image_and_oversized_uploads(make_app, aiohttp_client, paths):
    client = await aiohttp_client(make_app(max_upload_bytes=10_000))
    resp = await client.post("/upload/image", data=form(b"<script>alert(1)</script>", filename="x.png"))
    assert resp.status == 415 and (await resp.json())["error"]["type"] == "not_an_image"
    resp = await client.post("/upload/image", data=form(png_bytes()[:30], filename="cut.png"))
    assert resp.status == 415
    big = png_bytes(size=(300, 300), fmt="BMP")
    resp = await client.post("/upload/image", data=form(big, filename="big.bmp"))
    assert resp.status == 413
    assert not paths.input.exists() or list(paths.input.iterdir()) == []


async def test_upload_error_shapes(client):
    resp = await client.post("/upload/image", json={"image": "x"})
    assert resp.status == 400
    body = FormData()
    body.add_field("other", b"x", filename="x.png")
    resp = await client.post("/upload/image", data=body)
    assert resp.status == 400 and "image" in (await resp.json())["error"]["message"]
    resp = await client.post("/upload/image", data=form(png_bytes(), type="models"))
    assert resp.status == 400


async def test_decompression_bomb_is_refused(make_app, aiohttp_client):
    client = await aiohttp_client(make_app(max_image_pixels=100))
    resp = await client.post("/upload/image", data=form(png_bytes(size=(20, 20))))
    assert resp.status == 413


def png_header(width, height):
    """A PNG that declares its size and holds no pixels: enough for Pillow to read the size."""
    def chunk(kind, data=b""):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT") + chunk(b"IEND"))


async def test_an_image_past_pillows_own_limit_is_too_large_not_undecodable(client):
    resp = await client.post("/upload/image", data=form(png_header(20000, 20000)))
    assert resp.status == 413 and (await resp.json())["error"]["type"] == "image_too_large"


@pytest.mark.parametrize("subfolder, says", [
    ("../x", "subfolder must not contain '..'"),
    ("/etc", "subfolder must be relative, not an absolute path"),
    ("a" * 300, "subfolder has a name longer than 255 bytes"),
    ("d/" * 2000, "subfolder is longer than 1024 characters"),
])
async def test_upload_subfolder_problems_name_the_subfolder(client, subfolder, says):
    resp = await client.post("/upload/image", data=form(png_bytes(), subfolder=subfolder))
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == says


async def test_upload_into_a_subfolder_that_is_a_file_is_refused(client, paths):
    paths.input.mkdir(parents=True)
    (paths.input / "taken.png").write_bytes(png_bytes())
    resp = await client.post("/upload/image", data=form(png_bytes(), subfolder="taken.png"))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_path" and "taken.png" in error["message"]


async def test_an_overlong_form_field_is_named(client):
    resp = await client.post("/upload/image", data=form(png_bytes(), overwrite="x" * 5000))
    assert resp.status == 413
    assert (await resp.json())["error"]["message"].startswith("the field 'overwrite' is larger")


async def test_a_long_name_in_a_wide_script_is_stored(client, paths):
    # 200 CJK characters are 600 bytes, more than a file name may hold: once an unhandled ENAMETOOLONG (500).
    body = await (await client.post("/upload/image", data=form(png_bytes(), filename="猫" * 200 + ".png"))).json()
    assert body["name"] == "猫" * 65 + ".png" and (paths.input / body["name"]).is_file()


async def test_a_nul_in_the_multipart_file_name_is_a_bad_request(client):
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\x00.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png_bytes() + b"\r\n--b--\r\n")
    resp = await client.post("/upload/image", data=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert resp.status == 400


@pytest.fixture
def files(paths, tmp_path):
    paths.output.mkdir(parents=True)
    (paths.output / "ok.png").write_bytes(png_bytes())
    (paths.output / "sub").mkdir()
    (paths.output / "sub" / "in.png").write_bytes(png_bytes())
    (paths.output / "page.html").write_text("<script>alert(1)</script>")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", paths.output / "link.txt")
    return paths


@pytest.mark.parametrize("query", [
    "filename=../secret.txt",
    "filename=secret.txt&subfolder=..",
    "filename=%2e%2e/secret.txt",
    "filename=%2e%2e%2fsecret.txt",
    "filename=..%5csecret.txt",
    "filename=..\\secret.txt",
    f"filename={'/' * 2}etc/passwd",
    "filename=/etc/passwd",
    "filename=secret.txt&subfolder=/tmp",
    "filename=secret.txt&subfolder=sub/../..",
    "filename=link.txt",
    "filename=ok.png%00.txt",
    "filename=C:/Windows/win.ini",
    f"filename={'a' * 300}.png",  # longer than a file name may be: once an unhandled OSError (500)
    f"filename={'a' * 5000}.png",
])
async def test_view_traversal_is_refused(client, files, query):
    resp = await client.get(f"/view?{query}")
    assert resp.status in (400, 404), query
    assert "secret" not in await resp.text()
    assert (await resp.json())["error"]["type"] in ("invalid_path", "not_found")


async def test_view_serves_files_and_downloads_the_rest(client, files):
    assert (await client.get("/view?filename=ok.png")).status == 200
    assert (await client.get("/api/view?filename=in.png&subfolder=sub&type=output")).status == 200
    page = await client.get("/view?filename=page.html")
    assert page.headers["Content-Type"] == "application/octet-stream"
    assert page.headers["Content-Disposition"].startswith("attachment")
    assert (await client.get("/view?filename=missing.png")).status == 404
    assert (await client.get("/view")).status == 400
    assert (await client.get("/view?filename=ok.png&type=models")).status == 400


@pytest.mark.parametrize("raw, clean", [
    ("a\x01b.png", "a_b.png"), ("..", "upload"), ("x" * 300 + ".png", "x" * 196 + ".png"),
    ("dir\\..\\n.png", "n.png"), ("%2e%2e%2fa.png", "a.png"),
    ("猫" * 200 + ".png", "猫" * 65 + ".png"),  # 3 bytes a character: cut by bytes, never mid-character
])
def test_clean_filename(raw, clean):
    from web.paths import clean_filename

    assert clean_filename(raw) == clean
