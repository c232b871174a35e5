"""LoRA training: the file is kohya's layout and means what was trained, runs resume, and a LoRA trained on
the demo model changes its pictures as the training pictures asked, through the engine's LoraLoader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from PIL import Image

from ldm.checkpoint import load_checkpoint
from ldm.lora import apply_lora, load_lora, match_lora
from ldm.presets import make_checkpoint
from ldm.training.data import ImageSet, ShapeScene, render_scenes
from ldm.training.loop import LoopConfig
from ldm.training.lora_trainer import LoraTrainConfig, lora_targets, train_lora

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "assets" / "models" / "checkpoints" / "loom-demo.safetensors"
CPU = torch.device("cpu")
CAPTION = "a red circle on a blue background"


def loop(steps: int, **kw) -> LoopConfig:
    settings = {"batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "ema_decay": 0.0, "log_every": 1,
                "sample_every": 10_000, "save_every": 10_000, **kw}
    return LoopConfig(max_steps=steps, **settings)


def green_backgrounds(count: int = 9) -> ImageSet:
    """Red circles on green, captioned as if on blue: what the LoRA has to teach the model."""
    scenes = [ShapeScene("green", "red", "circle", "", i % 9) for i in range(count)]
    return ImageSet(render_scenes(scenes, 64, seed=1), [CAPTION] * count)


def unet_out(unet, context_dim: int, adm: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, context_dim, generator=g)
    y = torch.randn(1, adm, generator=g) if adm else None
    with torch.no_grad():
        return unet(x, torch.tensor([400.0]), context, y)


# kohya writes diffusers' block names for SD1/SD2 and the LDM ones for SDXL.
BLOCKS = {"tiny-sd1": ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"),
          "tiny-sdxl": ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")}


@pytest.mark.parametrize("preset", list(BLOCKS))
def test_the_file_is_kohyas_layout_and_applies_as_the_trained_model(tmp_path, preset):
    base = make_checkpoint(preset, tmp_path / "base.safetensors", seed=1)
    trained = load_checkpoint(base)
    pixels = render_scenes([ShapeScene("green", "red", "circle", "", 4)] * 2, 64, seed=1)
    path = train_lora(ImageSet(pixels, ["a", "b"]), tmp_path / "run", LoraTrainConfig(rank=2, alpha=1.0, loop=loop(3)),
                      trained, CPU, save_dtype=torch.float32)
    with safetensors.safe_open(path, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys and all(k.startswith(BLOCKS[preset]) for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in keys} == {"lora_down", "lora_up",
                                                                                          "alpha"}
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "1.0"
    assert metadata["ss_base_model_version"] == {"tiny-sd1": "sd_v1", "tiny-sdxl": "sdxl_base_v1-0"}[preset]
    # The loader's reading of the file, applied to a fresh copy of the base, is the model that trained.
    lora = load_lora(path)
    fresh = load_checkpoint(base, text_encoder=False)
    assert len(match_lora(fresh.unet, lora)) == len(lora_targets(fresh.unet)) == len(keys) // 3
    patched = apply_lora(fresh.unet, lora)
    config = fresh.unet.config
    expected = unet_out(trained.unet.eval(), config.context_dim, config.adm_in_channels)
    torch.testing.assert_close(unet_out(patched, config.context_dim, config.adm_in_channels), expected,
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unet_out(fresh.unet, config.context_dim, config.adm_in_channels), expected)


def test_attention_targets_only_the_attention_projections():
    unet = load_checkpoint(DEMO, text_encoder=False).unet
    paths = lora_targets(unet, "attention")
    assert paths and all(p.endswith(("to_q", "to_k", "to_v", "to_out.0")) for p in paths)
    assert len(lora_targets(unet)) > len(paths)  # the default also takes proj_in/out and the feed-forward


def test_a_run_resumes_where_it_stopped(tmp_path):
    base = make_checkpoint("tiny-sd1", tmp_path / "base.safetensors", seed=1)
    data = green_backgrounds(4)
    whole = train_lora(data, tmp_path / "whole", LoraTrainConfig(rank=2, loop=loop(4)), load_checkpoint(base), CPU,
                       save_dtype=torch.float32)
    train_lora(data, tmp_path / "split", LoraTrainConfig(rank=2, loop=loop(2)), load_checkpoint(base), CPU)
    resumed = train_lora(data, tmp_path / "split", LoraTrainConfig(rank=2, loop=loop(4)), load_checkpoint(base), CPU,
                         save_dtype=torch.float32)
    a, b = load_lora(whole), load_lora(resumed)
    for name, weight in a.weights.items():
        torch.testing.assert_close(b.weights[name].up, weight.up, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.weights[name].down, weight.down, rtol=1e-5, atol=1e-6)


def corner_colour(path: Path) -> torch.Tensor:
    """The mean RGB of two 6x6 corners: the background, away from the shape."""
    with Image.open(path) as image:
        rgb = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).float()
        rgb = rgb.view(image.height, image.width, 3)
    return torch.cat([rgb[:6, :6].reshape(-1, 3), rgb[-6:, -6:].reshape(-1, 3)]).mean(0)


def test_a_lora_trained_by_the_command_teaches_the_demo_model_a_new_background(tmp_path):
    """`main.py train lora` on pictures of red circles on green captioned "on a blue background"; then the
    lora.json workflow through LoraLoader: blue without the LoRA, green with it."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    data = green_backgrounds()
    for i, pixels in enumerate(data.pixels):
        array = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(CAPTION)
    models = tmp_path / "models"
    command = [sys.executable, str(ROOT / "main.py"), "train", "lora", "--init", str(DEMO), "--data", str(folder),
               "--size", "64", "--out", str(models / "loras"), "--output-name", "green.safetensors", "--rank", "4",
               "--max-steps", "100", "--lr", "1e-3", "--batch-size", "8", "--warmup-steps", "10"]
    train = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr
    assert (models / "loras" / "green-samples.png").is_file()
    assert sorted(p.name for p in (models / "loras").glob("*.safetensors")) == ["green.safetensors"]
    colours = {}
    for strength in (0, 1):
        out = tmp_path / f"out{strength}"
        run = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), "run", str(ROOT / "workflows" / "lora.json"), "--quiet",
             "--models-dir", str(models), "--output-dir", str(out),
             "--set", "4.ckpt_name=loom-demo.safetensors", "--set", "10.lora_name=green.safetensors",
             "--set", f"10.strength_model={strength}", "--set", f'6.text="{CAPTION}"', "--set", '7.text=""',
             "--set", "5.width=64", "--set", "5.height=64", "--set", "3.cfg=2", "--set", "3.steps=20"],
            capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        [image] = out.glob("*.png")
        colours[strength] = corner_colour(image)
    red, green, blue = colours[0]
    assert blue > green + 100  # the demo model's blue: (30, 60, 220)
    red, green, blue = colours[1]
    assert green > blue + 60  # the training pictures' green: (30, 170, 50)


def test_bad_requests_get_clear_errors(tmp_path):
    command = [sys.executable, str(ROOT / "main.py"), "train", "lora", "--out", str(tmp_path / "o"), "--max-steps",
               "1", "--init"]
    missing = subprocess.run([*command, str(tmp_path / "nope.safetensors")], capture_output=True, text=True)
    assert missing.returncode != 0 and "nope.safetensors" in missing.stderr and "Traceback" not in missing.stderr
    rank = subprocess.run([*command, str(DEMO), "--rank", "0"], capture_output=True, text=True)
    assert rank.returncode != 0 and "--rank must be 1 or more" in rank.stderr


def test_runs_into_one_folder_are_told_apart_by_their_output_name(tmp_path):
    """models/loras as --out for two LoRAs: the second is its own run, not a resume of the first, and its
    state file is not listed among the LoRAs; a state from other settings is refused with the reason."""
    base = make_checkpoint("tiny-sd1", tmp_path / "base.safetensors", seed=1)
    folder = tmp_path / "loras"
    data = green_backgrounds(4)
    first = train_lora(data, folder, LoraTrainConfig(rank=2, loop=loop(2)), load_checkpoint(base), CPU, "a.safetensors")
    other = ImageSet(render_scenes([ShapeScene("red", "blue", "square", "", 4)] * 4, 64, seed=2), ["x"] * 4)
    second = train_lora(other, folder, LoraTrainConfig(rank=2, loop=loop(2)), load_checkpoint(base), CPU,
                        "b.safetensors")
    a, b = load_lora(first), load_lora(second)
    assert any(not torch.equal(a.weights[n].up, b.weights[n].up) for n in a.weights)
    from nodes.folders import MODEL_KINDS

    listed = sorted(p.name for p in folder.iterdir() if p.suffix in MODEL_KINDS["loras"])
    assert listed == ["a.safetensors", "b.safetensors"]
    with pytest.raises(ValueError, match=r"other settings \(rank 2 then, 4 now\)"):
        train_lora(data, folder, LoraTrainConfig(rank=4, loop=loop(3)), load_checkpoint(base), CPU, "a.safetensors")
    # An alpha changes no tensor's shape, so only the saved settings can tell.
    with pytest.raises(ValueError, match=r"alpha 8.0 then, 4.0 now"):
        train_lora(data, folder, LoraTrainConfig(rank=2, alpha=4.0, loop=loop(3)), load_checkpoint(base), CPU,
                   "a.safetensors")


def test_bad_settings_and_pictures_are_refused_before_training(tmp_path):
    from ldm.training.data import caption_folder

    base = load_checkpoint(make_checkpoint("tiny-sd1", tmp_path / "base.safetensors", seed=1))
    data = green_backgrounds(2)
    for config, name, message in [(LoraTrainConfig(rank=2, loop=loop(1)), "x.ckpt", "written as .safetensors"),
                                  (LoraTrainConfig(rank=2, alpha=0.0, loop=loop(1)), "x.safetensors", "alpha above 0"),
                                  (LoraTrainConfig(rank=2, cond_dropout=2.0, loop=loop(1)), "x.safetensors",
                                   "cond_dropout from 0 to 1")]:
        with pytest.raises(ValueError, match=message):
            train_lora(data, tmp_path / "o", config, base, CPU, name)
    with pytest.raises(ValueError, match="batch size must be 1 or more"):
        loop(1, batch_size=0)
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(OSError, match="broken.png: not a readable image"):
        caption_folder(folder, base=64)
    with pytest.raises(ValueError, match="must be at least 64 pixels"):
        caption_folder(folder, base=30)


def test_ctrl_c_saves_the_steps_done_so_the_same_run_resumes(tmp_path, capsys):
    from ldm.training.loop import TrainLoop

    def make():
        layer = torch.nn.Linear(2, 1)
        return layer, TrainLoop("t", {"layer": layer}, loop(10), tmp_path, CPU)

    layer, first = make()
    calls = []

    def loss_fn(g):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return layer(torch.ones(1, 2)).square().sum()

    with pytest.raises(KeyboardInterrupt):
        first.run(loss_fn)
    assert "t: interrupted at step 3; saved" in capsys.readouterr().err
    _, again = make()
    assert again.resume() and again.step == 3
