"""Make the README's example pictures with the bundled demo model, through the Python API.

    .venv/bin/python scripts/readme_examples.py            # writes docs/images/*.png

Three rows, each input | output(s), upscaled 4x (nearest) so the 64 px pictures are readable:
txt2img for four prompts, img2img recolouring `assets/inputs/example.png`, and inpainting the
transparent hole of `assets/inputs/example_inpaint.png` with a prompted shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loom import Pipeline  # noqa: E402

CHECKPOINT = ROOT / "assets/models/checkpoints/loom-demo.safetensors"
INPUTS = ROOT / "assets/inputs"
SCALE = 4
TXT2IMG = ["a large yellow circle at the top left on a blue background",
           "a red square at the bottom right on a green background",
           "a large white triangle on a black background",
           "a purple circle on the right on a yellow background"]
IMG2IMG = ["a yellow circle on a blue background", "a green circle on a blue background"]
INPAINT = ["a large yellow triangle on a blue background", "a large white square on a blue background"]


def _big(image: Image.Image) -> Image.Image:
    return image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)


def _checkerboard(image: Image.Image) -> Image.Image:
    """An RGBA picture over a grey checkerboard, so its transparent hole shows."""
    board = Image.new("RGB", image.size, (200, 200, 200))
    draw = ImageDraw.Draw(board)
    for y in range(0, image.height, 4):
        for x in range((y // 4 % 2) * 4, image.width, 8):
            draw.rectangle((x, y, x + 3, y + 3), fill=(150, 150, 150))
    board.paste(image, mask=image.getchannel("A"))
    return board


def _row(pictures: list[Image.Image], labels: list[str]) -> Image.Image:
    tile = 64 * SCALE
    strip = Image.new("RGB", (len(pictures) * (tile + 8) - 8, tile + 18), "white")
    draw = ImageDraw.Draw(strip)
    for i, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
        strip.paste(_big(picture.convert("RGB")), (i * (tile + 8), 18))
        draw.text((i * (tile + 8) + 2, 3), label, fill="black")
    return strip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/images")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_checkpoint(CHECKPOINT, cpu=True)
    common = {"num_steps": 20, "guidance_scale": 3.0, "seed": args.seed}

    images = [pipe.sample(prompt, **common)[0] for prompt in TXT2IMG]
    _row(images, [f"{i + 1}" for i in range(len(images))]).save(args.out / "txt2img.png")

    source = Image.open(INPUTS / "example.png").convert("RGB")
    recoloured = [pipe.img2img(source, prompt, strength=0.6, **common) for prompt in IMG2IMG]
    _row([source, *recoloured], ["input", "yellow circle, 0.6", "green circle, 0.6"]).save(args.out / "img2img.png")

    holed = Image.open(INPUTS / "example_inpaint.png").convert("RGBA")
    mask = Image.eval(holed.getchannel("A"), lambda a: 255 - a)  # white where the picture is transparent
    filled = [pipe.inpaint(holed.convert("RGB"), mask, prompt, **common) for prompt in INPAINT]
    _row([_checkerboard(holed), *filled], ["input (hole)", "yellow triangle", "white square"]).save(
        args.out / "inpaint.png")
    print("\n".join(str(args.out / name) for name in ("txt2img.png", "img2img.png", "inpaint.png")))


if __name__ == "__main__":
    main()
