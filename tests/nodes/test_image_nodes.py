import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.sd.image import (
    ImagePadForOutpaint,
    ImageScale,
    ImageToMask,
    LoadImage,
    MaskToImage,
    PreviewImage,
    SaveImage,
    resize_image,
)
from nodes.sd.imageio import NotAnImageError, load_image_file
from nodes.sd.latent import EmptyLatentImage, LatentUpscale, SetLatentNoiseMask, slerp


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def run(cls, ctx=None, **inputs):
    node = cls()
    node.ctx = ctx or NodeContext()
    return node.execute(**inputs)


def test_save_image_numbers_files_and_embeds_workflow(folders):
    images = torch.rand(2, 16, 24, 3)
    ctx = NodeContext(extra={"prompt": {"1": {"class_type": "X", "inputs": {}}},
                             "extra_pnginfo": {"workflow": {"nodes": []}}})
    first = run(SaveImage, ctx, images=images, filename_prefix="cats/cat").ui["images"]
    second = run(SaveImage, ctx, images=images[:1], filename_prefix="cats/cat").ui["images"]
    assert [i["filename"] for i in first + second] == ["cat_00001_.png", "cat_00002_.png", "cat_00003_.png"]
    assert first[0] == {"filename": "cat_00001_.png", "subfolder": "cats", "type": "output"}
    with Image.open(folders.output / "cats" / "cat_00001_.png") as saved:
        assert saved.size == (24, 16)
        assert json.loads(saved.text["prompt"]) == {"1": {"class_type": "X", "inputs": {}}}
        assert json.loads(saved.text["workflow"]) == {"nodes": []}


def test_concurrent_saves_into_one_folder_never_share_a_name(folders):
    """Ray workers save into one shared output folder at once: each file gets its own number."""
    barrier = threading.Barrier(6)

    def save(value):
        barrier.wait()
        return run(SaveImage, images=torch.full((3, 8, 8, 3), value), filename_prefix="shared").ui["images"]

    with ThreadPoolExecutor(6) as pool:
        saved = [item["filename"] for items in pool.map(save, [i / 10 for i in range(6)]) for item in items]
    assert sorted(saved) == [f"shared_{n:05}_.png" for n in range(1, 19)]
    for name in saved:
        with Image.open(folders.output / name) as image:
            assert image.size == (8, 8)


@pytest.mark.parametrize("prefix", ["../escape", "/abs/x", "a/../../b"])
def test_save_image_refuses_prefixes_outside_output(folders, prefix):
    with pytest.raises(ValueError):
        run(SaveImage, images=torch.rand(1, 8, 8, 3), filename_prefix=prefix)


def test_preview_goes_to_temp(folders):
    ui = run(PreviewImage, images=torch.rand(1, 8, 8, 3)).ui["images"][0]
    assert ui["type"] == "temp" and (folders.temp / ui["filename"]).is_file()


def test_load_image_alpha_mask_and_exif(folders):
    folders.input.mkdir(parents=True)
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(folders.input / "a.png")
    image, mask = run(LoadImage, image="a.png")
    assert image.shape == (1, 2, 4, 3) and mask.shape == (1, 2, 4)
    assert mask[0, 0, 0] == 1.0 and mask[0, 1, 1] == 0.0
    # EXIF orientation 6 (rotate 90° clockwise to display) turns a 4x2 picture into 2x4.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (4, 2), (0, 255, 0)).save(folders.input / "r.jpg", exif=exif)
    image, mask = run(LoadImage, image="r.jpg")
    assert image.shape == (1, 4, 2, 3) and mask.abs().sum() == 0


def test_load_image_refuses_non_images(folders):
    folders.input.mkdir(parents=True)
    (folders.input / "fake.png").write_text("not an image")
    assert "not a readable image" in LoadImage.check_inputs({"image": "fake.png"})
    with pytest.raises(NotAnImageError):
        load_image_file(folders.input / "fake.png")


def test_load_image_refuses_an_image_larger_than_pillow_decodes(folders):
    """A 50 kB PNG whose header claims 20000 x 20000 pixels (beyond Pillow's decompression-bomb limit) is refused by
    name at validation and at load, not left to raise Pillow's own error (which the server answered with a 500)."""
    from PIL import Image

    folders.input.mkdir(parents=True)
    Image.new("1", (20000, 20000)).save(folders.input / "huge.png")
    assert "huge.png is too large to load" in LoadImage.check_inputs({"image": "huge.png"})
    with pytest.raises(NotAnImageError, match="huge.png is too large to load"):
        load_image_file(folders.input / "huge.png")


def test_image_scale_keeps_aspect_and_crops():
    image = torch.rand(1, 20, 40, 3)
    assert resize_image(image, 20, 0, "bilinear").shape == (1, 10, 20, 3)
    assert run(ImageScale, image=image, upscale_method="lanczos", width=10, height=10, crop="center")[0].shape == (
        1, 10, 10, 3)


def test_pad_for_outpaint_mask():
    image, mask = run(ImagePadForOutpaint, image=torch.zeros(1, 32, 32, 3), left=8, top=0, right=0, bottom=16,
                      feathering=4)
    assert image.shape == (1, 48, 40, 3) and mask.shape == (1, 48, 40)
    assert mask[0, 40, 20] == 1.0 and mask[0, :, :8].min() == 1.0  # new areas
    assert mask[0, 10, 30] == 0.0  # the original, away from padded edges
    assert 0 < mask[0, 10, 9] < 1  # feathered next to the left padding
    assert image[0, 0, 0, 0] == 0.5


def test_empty_latent_and_multiple_of_8():
    latent = run(EmptyLatentImage, width=64, height=32, batch_size=2)[0]["samples"]
    assert latent.shape == (2, 4, 4, 8)
    assert "multiple of 8" in EmptyLatentImage.check_inputs({"width": 65, "height": 64, "batch_size": 1})


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"])
def test_latent_upscale(method):
    latent = {"samples": torch.randn(1, 4, 8, 8), "noise_mask": torch.ones(1, 1, 8, 8)}
    out = run(LatentUpscale, samples=latent, upscale_method=method, width=128, height=96, crop="disabled")[0]
    assert out["samples"].shape == (1, 4, 12, 16) and "noise_mask" not in out


def test_slerp_endpoints_and_norm():
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(slerp(a, b, torch.tensor(0.0)), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, torch.tensor(1.0)), b, atol=1e-5)
    mid = slerp(a, b, torch.tensor(0.5))
    assert torch.allclose(mid.norm(dim=1), (a.norm(dim=1) + b.norm(dim=1)) / 2, atol=1e-4)


def test_set_latent_noise_mask_shape():
    out = run(SetLatentNoiseMask, samples={"samples": torch.zeros(1, 4, 8, 8)}, mask=torch.ones(64, 64))[0]
    assert out["noise_mask"].shape == (1, 1, 64, 64)


def test_image_to_mask_and_back():
    image = torch.rand(2, 5, 7, 3)
    (mask,) = ImageToMask().execute(image, "green")
    assert mask.shape == (2, 5, 7) and torch.equal(mask, image[..., 1])
    (grey,) = MaskToImage().execute(mask)
    assert grey.shape == (2, 5, 7, 3) and all(torch.equal(grey[..., c], mask) for c in range(3))
    (single,) = MaskToImage().execute(mask[0])  # a [H, W] mask, as some nodes make
    assert single.shape == (1, 5, 7, 3)
    with pytest.raises(ValueError, match="no alpha channel"):
        ImageToMask().execute(image, "alpha")
