"""The small ComfyUI core nodes of nodes/sd/misc_core.py (multi-GPU device pickers, Painter, Curve Editor and Image
Histogram, Ideogram 4's scheduler, JoyImage's guidance rescale, Mochi's empty latent, the text overlay), run through
the executor and checked against independent transcriptions of ComfyUI's arithmetic, with their declarations and
bad input."""

import logging
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.ui_format import ui_to_api
from ldm.presets import make_checkpoint
from ldm.sampling.model_patches import CfgArgs
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.misc_core import Curve, GuidanceRescale, render_text_layer

SYSTEM_FONT = Path("/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("misc_core")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=3)
    return root


@pytest.fixture
def engine(root):
    set_paths(FolderPaths(base=root))
    try:
        yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    finally:
        set_paths(FolderPaths())


def run(engine, graph, keep):
    result = engine.run(parse_api(graph), outputs=list(keep), keep=keep)
    assert result.ok, result.error
    return result


def refused(engine, graph, node, match):
    with pytest.raises(WorkflowInvalid, match=match):
        engine.run(parse_api(graph), outputs=[node], keep=[node])


def info(name):
    return builtin_registry().get(name).object_info()


# --- Declarations -------------------------------------------------------------------------------------------------


def test_declarations_follow_comfyui():
    split = info("MultiGPU_WorkUnits")
    assert (split["display_name"], split["category"]) == ("MultiGPU CFG Split", "advanced/multigpu")
    assert split["input"]["required"]["max_gpus"] == ["INT", {"default": 2, "min": 1, "max": 2**64 - 1, "step": 1}]
    for name, socket, kind, choices in (("SelectModelDevice", "model", "MODEL", ["default", "cpu"]),
                                        ("SelectCLIPDevice", "clip", "CLIP", ["default", "cpu"]),
                                        ("SelectVAEDevice", "vae", "VAE", ["default"])):
        declared = info(name)
        assert declared["category"] == "advanced/multigpu" and declared["output"] == [kind]
        assert declared["input_order"]["required"] == [socket, "device"]
        assert declared["input"]["required"]["device"][0] == choices

    painter = info("Painter")
    assert (painter["display_name"], painter["category"]) == ("Painter", "image")
    assert painter["input_order"] == {"required": ["mask", "width", "height", "bg_color"], "optional": ["image"]}
    assert painter["input"]["required"]["mask"] == ["STRING", {"default": "", "image_upload": True,
                                                               "socketless": True, "widgetType": "PAINTER"}]
    assert painter["input"]["required"]["width"][1] == {"default": 512, "min": 64, "max": 4096, "step": 64,
                                                        "socketless": True, "hidden": True}
    assert painter["input"]["required"]["bg_color"] == ["COLOR", {"default": "#000000", "socketless": True}]
    assert painter["output"] == ["IMAGE", "MASK"] and painter["output_name"] == ["IMAGE", "MASK"]

    curve = info("CurveEditor")
    assert (curve["display_name"], curve["category"]) == ("Curve Editor", "utils")
    assert curve["input"]["required"]["curve"] == ["CURVE", {"default": {"points": [[0.0, 0.0], [1.0, 1.0]],
                                                                         "interpolation": "monotone_cubic"},
                                                             "socketless": True}]
    assert curve["input"]["optional"]["histogram"][0] == "HISTOGRAM"
    assert curve["output"] == ["CURVE"] and curve["output_name"] == ["curve"]
    assert info("ImageHistogram")["output_name"] == ["rgb", "luminance", "red", "green", "blue"]

    ideogram = info("Ideogram4Scheduler")
    assert (ideogram["display_name"], ideogram["category"]) == ("Ideogram 4 Scheduler", "model/sampling/schedulers")
    assert ideogram["input_order"] == {"required": ["steps", "width", "height", "mu", "std"],
                                       "optional": ["full_denoise"]}
    assert ideogram["input"]["required"]["steps"][1] == {"default": 48, "min": 1, "max": 200, "step": 1}
    assert ideogram["input"]["required"]["std"][1] == {"default": 1.5, "min": 0.1, "max": 5.0, "step": 0.05}
    assert ideogram["output"] == ["SIGMAS"]

    assert info("JoyImageGuidanceRescale")["category"] == "model/patch"
    mochi = info("EmptyMochiLatentVideo")
    assert mochi["category"] == "latent/video"
    assert mochi["input"]["required"]["length"][1] == {"default": 25, "min": 7, "max": 16384, "step": 6}

    overlay = info("TextOverlay")
    assert (overlay["display_name"], overlay["category"]) == ("Draw Text Overlay", "text")
    assert overlay["input_order"]["required"] == ["images", "text", "font", "font_size", "color", "position",
                                                  "align", "outline"]
    assert overlay["input"]["required"]["font_size"][1]["default"] == 5.0
    assert overlay["input"]["required"]["color"] == ["COLOR", {"default": "#ffffff", "tooltip": "Color of the text.",
                                                               "socketless": True}]
    assert overlay["output_name"] == ["images"]


def test_editor_files_give_the_socketless_widgets_their_values():
    curve = {"points": [[0, 0], [0.5, 0.8], [1, 1]], "interpolation": "linear"}
    document = {"links": [], "nodes": [
        {"id": 1, "type": "Painter", "widgets_values": ["painter-1-2.png [input]", 640, 448, "#102030"],
         "inputs": [], "outputs": []},
        {"id": 2, "type": "CurveEditor", "widgets_values": [curve], "inputs": [], "outputs": []},
        {"id": 3, "type": "TextOverlay", "widgets_values": ["hi", "Roboto/Roboto-Regular.ttf", 6.5, "#ff0000",
                                                            "bottom", "center", False], "inputs": [], "outputs": []},
        {"id": 4, "type": "SelectModelDevice", "widgets_values": ["gpu:1"], "inputs": [], "outputs": []}]}
    api = ui_to_api(document, builtin_registry())
    assert api["1"]["inputs"] == {"mask": "painter-1-2.png [input]", "width": 640, "height": 448,
                                  "bg_color": "#102030"}
    assert api["2"]["inputs"] == {"curve": curve}
    assert api["3"]["inputs"] == {"text": "hi", "font": "Roboto/Roboto-Regular.ttf", "font_size": 6.5,
                                  "color": "#ff0000", "position": "bottom", "align": "center", "outline": False}
    assert api["4"]["inputs"] == {"device": "gpu:1"}


# --- Multi-GPU ----------------------------------------------------------------------------------------------------


def test_device_pickers_pass_their_values_through_on_one_device(engine, caplog):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "2": {"class_type": "MultiGPU_WorkUnits", "inputs": {"model": ["1", 0], "max_gpus": 4}},
             "3": {"class_type": "SelectModelDevice", "inputs": {"model": ["2", 0], "device": "cpu"}},
             "4": {"class_type": "SelectCLIPDevice", "inputs": {"clip": ["1", 1], "device": "gpu:1"}},
             "5": {"class_type": "SelectVAEDevice", "inputs": {"vae": ["1", 2], "device": "default"}}}
    with caplog.at_level(logging.INFO, logger="nodes.sd.misc_core"):
        values = run(engine, graph, keep=["1", "3", "4", "5"]).values
    model, clip, vae = values["1"]
    assert values["3"][0] is model and values["4"][0] is clip and values["5"][0] is vae
    assert "device 'gpu:1' is not chosen per CLIP" in caplog.text
    assert "device 'cpu' is not chosen per model" in caplog.text


def test_multigpu_split_refuses_zero_gpus(engine):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "2": {"class_type": "MultiGPU_WorkUnits", "inputs": {"model": ["1", 0], "max_gpus": 0}}}
    refused(engine, graph, "2", "max_gpus")


# --- Ideogram 4 scheduler ----------------------------------------------------------------------------------------


def ideogram4_reference(steps, width, height, mu, std):
    """Transcription with the standard library: float32 quantiles, the normal's inverse CDF, the logistic
    function, the clamp to log-SNR [-15, 18], sigma = 1 - t (float32), high to low."""
    normal = statistics.NormalDist()
    mean = mu + 0.5 * math.log(width * height / 512**2)
    t_min, t_max = 1 / (1 + math.exp(9.0)), 1 / (1 + math.exp(-7.5))
    sigmas = []
    for u in np.linspace(0, 1, steps + 1, dtype=np.float32).astype(np.float64):
        z = -math.inf if u <= 0 else math.inf if u >= 1 else normal.inv_cdf(u)
        t = 1 - 1 / (1 + math.exp(-(mean + std * z))) if math.isfinite(z) else (0.0 if z > 0 else 1.0)
        sigmas.append(1 - np.float32(min(max(t, t_min), t_max)))
    return np.array(sigmas[::-1], dtype=np.float32)


@pytest.mark.parametrize(("steps", "width", "height", "mu", "std"), [(48, 1024, 1024, 0.0, 1.5),
                                                                     (7, 768, 1344, 0.5, 1.75)])
def test_ideogram4_scheduler_matches_the_logit_normal_schedule(engine, steps, width, height, mu, std):
    inputs = {"steps": steps, "width": width, "height": height, "mu": mu, "std": std}
    graph = {"1": {"class_type": "Ideogram4Scheduler", "inputs": inputs},
             "2": {"class_type": "Ideogram4Scheduler", "inputs": {**inputs, "full_denoise": True}}}
    values = run(engine, graph, keep=["1", "2"]).values
    sigmas, full = values["1"][0], values["2"][0]
    expected = ideogram4_reference(steps, width, height, mu, std)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=0, atol=2e-7)
    assert sigmas[-1] == pytest.approx(1 - 1 / (1 + math.exp(-7.5)), abs=1e-7)  # about 5.5e-4, not 0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert full[-1] == 0 and torch.equal(full[:-1], sigmas[:-1])


def test_ideogram4_scheduler_refuses_out_of_range_steps(engine):
    graph = {"1": {"class_type": "Ideogram4Scheduler", "inputs": {"steps": 0, "width": 1024, "height": 1024,
                                                                  "mu": 0.0, "std": 1.5}}}
    refused(engine, graph, "1", "steps")


# --- JoyImage guidance rescale -------------------------------------------------------------------------------------


def test_guidance_rescale_transcribes_comfyui_on_noise_predictions():
    generator = torch.Generator().manual_seed(0)
    x, cond_x0, uncond_x0 = (torch.randn(2, 4, 3, 5, generator=generator) for _ in range(3))
    guided = GuidanceRescale()(CfgArgs(x=x, sigma=torch.ones(2), cond=cond_x0, uncond=uncond_x0, cfg=4.5))
    # numpy, per latent position: comb = u + s (c - u) on eps = x - x0, scaled to |c| over the channels
    c, u = (x - cond_x0).numpy(), (x - uncond_x0).numpy()
    comb = u + 4.5 * (c - u)
    scale = np.sqrt((c**2).sum(1, keepdims=True)) / np.maximum(np.sqrt((comb**2).sum(1, keepdims=True)), 1e-6)
    np.testing.assert_allclose(guided.numpy(), x.numpy() - comb * scale, rtol=1e-5, atol=1e-5)
    # the guided noise has the positive one's norm at every position
    np.testing.assert_allclose(np.linalg.norm(x.numpy() - guided.numpy(), axis=1), np.linalg.norm(c, axis=1),
                               rtol=1e-5)
    alone = GuidanceRescale()(CfgArgs(x=x, sigma=torch.ones(2), cond=cond_x0, uncond=None, cfg=1.0))
    assert alone is cond_x0


def sampled(engine, cfg, patched):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
             "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "5": {"class_type": "JoyImageGuidanceRescale", "inputs": {"model": ["1", 0]}},
             "6": {"class_type": "KSampler", "inputs": {
                 "model": ["5", 0] if patched else ["1", 0], "seed": 5, "steps": 3, "cfg": cfg,
                 "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                 "latent_image": ["4", 0], "denoise": 1.0}}}
    return run(engine, graph, keep=["6"]).values["6"][0]["samples"]


def test_joyimage_guidance_rescale_in_a_workflow(engine):
    # at cfg 1 the guided prediction is the positive one, rescaled by 1
    torch.testing.assert_close(sampled(engine, 1.0, True), sampled(engine, 1.0, False))
    plain, rescaled = sampled(engine, 6.0, False), sampled(engine, 6.0, True)
    assert (plain - rescaled).abs().max() > 1e-2  # the transcription above holds the arithmetic


# --- Mochi's empty latent -----------------------------------------------------------------------------------------


def test_empty_mochi_latent_video(engine):
    graph = {"1": {"class_type": "EmptyMochiLatentVideo", "inputs": {"width": 80, "height": 48, "length": 13,
                                                                     "batch_size": 2}}}
    samples = run(engine, graph, keep=["1"]).values["1"][0]["samples"]
    assert samples.shape == (2, 12, 3, 6, 10) and not samples.any()  # (13 - 1) // 6 + 1 frames, 1/8 the pixels
    graph["1"]["inputs"]["length"] = 5
    refused(engine, graph, "1", "length")


# --- Painter ------------------------------------------------------------------------------------------------------


def painting(root, name, size):
    """A random RGBA picture in input/, its alpha in three levels (0, half, full)."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    pixels[..., 3] = rng.choice(np.array([0, 128, 255], dtype=np.uint8), (size[1], size[0]))
    (root / "input").mkdir(exist_ok=True)
    Image.fromarray(pixels, "RGBA").save(root / "input" / name)
    return pixels


def test_painter_over_a_background_colour(engine, root):
    painting(root, "painter-7-1.png", (40, 24))  # another size: Lanczos-resized to the canvas
    graph = {"1": {"class_type": "Painter", "inputs": {"mask": "painter-7-1.png [input]", "width": 128, "height": 64,
                                                       "bg_color": "#ff8000"}}}
    result = run(engine, graph, keep=["1"])
    image, mask = result.values["1"]
    with Image.open(root / "input" / "painter-7-1.png") as picture:
        resized = np.asarray(picture.convert("RGBA").resize((128, 64), Image.Resampling.LANCZOS)) / 255.0
    alpha = resized[..., 3:]
    expected = resized[..., :3] * alpha + np.array([1.0, 128 / 255, 0.0]) * (1 - alpha)
    assert image.shape == (1, 64, 128, 3) and mask.shape == (1, 64, 128)
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(mask[0].numpy(), alpha[..., 0], atol=1e-6)
    assert result.outputs["1"]["images"][0]["type"] == "temp"


def test_painter_over_an_image_and_without_a_painting(engine, root):
    pixels = painting(root, "painter-8-1.png", (48, 16))
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 16, "batch_size": 2,
                                                          "color": 0x336699}},
             "2": {"class_type": "Painter", "inputs": {"image": ["1", 0], "mask": "painter-8-1.png",
                                                       "width": 512, "height": 512, "bg_color": "#000000"}},
             "3": {"class_type": "Painter", "inputs": {"image": ["1", 0], "mask": " ", "width": 512,
                                                       "height": 512, "bg_color": "#000000"}}}
    values = run(engine, graph, keep=["2", "3"]).values
    image, mask = values["2"]
    alpha = pixels[..., 3:] / 255.0
    expected = pixels[..., :3] / 255.0 * alpha + np.array([0x33, 0x66, 0x99]) / 255.0 * (1 - alpha)
    assert image.shape == (1, 16, 48, 3)  # the first image of the batch, at its own size
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(mask[0].numpy(), alpha[..., 0], atol=1e-6)
    bare, empty = values["3"]
    assert torch.allclose(bare[0], torch.tensor([0x33, 0x66, 0x99]) / 255.0) and not empty.any()


def test_painter_refuses_a_missing_painting(engine):
    graph = {"1": {"class_type": "Painter", "inputs": {"mask": "painter-missing.png [input]", "width": 64,
                                                       "height": 64, "bg_color": "#000000"}}}
    refused(engine, graph, "1", "Painter: image 'painter-missing.png' not found")


# --- Curves and histograms -----------------------------------------------------------------------------------------


def hermite_reference(points, x):
    """Monotone cubic Hermite interpolation (Fritsch and Carlson 1980), one x at a time, in plain Python."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    n = len(xs)
    d = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(n - 1)]
    m = [d[0]] + [0.0 if d[i - 1] * d[i] <= 0 else (d[i - 1] + d[i]) / 2 for i in range(1, n - 1)] + [d[-1]]
    for i in range(n - 1):
        if d[i] == 0:
            m[i] = m[i + 1] = 0.0
        elif (m[i] / d[i]) ** 2 + (m[i + 1] / d[i]) ** 2 > 9:
            tau = 3 / math.hypot(m[i] / d[i], m[i + 1] / d[i])
            m[i], m[i + 1] = tau * m[i], tau * m[i + 1]
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = max(k for k in range(n - 1) if xs[k] <= x)
    h = xs[i + 1] - xs[i]
    t = (x - xs[i]) / h
    return (ys[i] * (1 + 2 * t) * (1 - t) ** 2 + h * m[i] * t * (1 - t) ** 2
            + ys[i + 1] * t**2 * (3 - 2 * t) + h * m[i + 1] * t**2 * (t - 1))


def test_curve_editor_monotone_cubic_and_linear(engine):
    points = [[1.0, 1.0], [0.0, 0.05], [0.3, 0.1], [0.6, 0.9], [0.8, 0.92]]  # unsorted, as an editor may send
    graph = {"1": {"class_type": "CurveEditor", "inputs": {"curve": {"points": points}}},
             "2": {"class_type": "CurveEditor", "inputs": {"curve": {"points": points, "interpolation": "linear"}}},
             "3": {"class_type": "CurveEditor", "inputs": {"curve": {"__value__": [[0, 0], [1, 0.5]]}}}}
    values = run(engine, graph, keep=["1", "2", "3"]).values
    cubic, linear, bare = values["1"][0], values["2"][0], values["3"][0]
    assert isinstance(cubic, Curve) and cubic.points[0] == (0.0, 0.05) and cubic.interpolation == "monotone_cubic"
    xs = np.linspace(-0.1, 1.1, 121)
    ordered = sorted(points)
    np.testing.assert_allclose(cubic.interp_array(xs), [hermite_reference(ordered, x) for x in xs], atol=1e-12)
    assert np.all(np.diff(cubic.to_lut(512)) >= -1e-12)  # monotone data, monotone curve: no overshoot
    assert cubic.interp(0.6) == pytest.approx(0.9)
    along = np.interp(np.linspace(0, 1, 256), [p[0] for p in ordered], [p[1] for p in ordered])
    np.testing.assert_allclose(linear.to_lut(), along, atol=1e-12)
    assert bare.interpolation == "monotone_cubic" and bare.interp(0.5) == pytest.approx(0.25)


def test_image_histogram_feeds_the_curve_editor(engine):
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 10, "height": 12, "batch_size": 1,
                                                          "color": 0x4080C0}},
             "2": {"class_type": "ImageHistogram", "inputs": {"image": ["1", 0]}},
             "3": {"class_type": "CurveEditor", "inputs": {"curve": {"points": [[0, 0], [1, 1]]},
                                                           "histogram": ["2", 1]}}}
    result = run(engine, graph, keep=["2", "3"])
    rgb, luminance, red, green, blue = result.values["2"]
    assert red[0x40] == green[0x80] == blue[0xC0] == 120 and sum(red) == 120
    assert rgb[0x40] == rgb[0x80] == rgb[0xC0] == 40  # (120 + 0 + 0) // 3 at each level
    level = int(np.clip((0.2126 * 0x40 + 0.7152 * 0x80 + 0.0722 * 0xC0) / 255 * 255, 0, 255))
    assert luminance[level] == 120
    assert result.outputs["3"]["histogram"] == luminance


def test_curve_editor_refuses_points_that_are_not_pairs(engine):
    graph = {"1": {"class_type": "CurveEditor", "inputs": {"curve": {"points": [[0, 0], "x"]}}}}
    refused(engine, graph, "1", "CurveEditor: curve points must be")


# --- Text overlay -------------------------------------------------------------------------------------------------


def overlay_graph(text, **options):
    inputs = {"text": text, "font": "default", "font_size": 10.0, "color": "#ffffff", "position": "top",
              "align": "left", "outline": True, **options}
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 160, "height": 96, "batch_size": 2, "color": 0}},
            "2": {"class_type": "TextOverlay", "inputs": {"images": ["1", 0], **inputs}}}


def changed_rows(images):
    return torch.nonzero(images.abs().amax(dim=(0, 2, 3)) > 0).flatten()


def test_text_overlay_draws_at_the_top_or_bottom_of_every_frame(engine):
    top = run(engine, overlay_graph("Hello Loom"), keep=["2"]).values["2"][0]
    bottom = run(engine, overlay_graph("Hello Loom", position="bottom", align="right"), keep=["2"]).values["2"][0]
    assert top.shape == (2, 96, 160, 3) and torch.equal(top[0], top[1])
    rows = changed_rows(top)
    assert rows.max() < 96 // 2 and top.max() > 0.99  # white text in the top half
    rows = changed_rows(bottom)
    assert rows.min() >= 96 // 2 and rows.max() <= 96 - 1
    assert changed_rows(bottom.transpose(1, 2)).min() > 160 // 3  # right-aligned
    # the same layer composited by hand: black frames, so the result is the layer's colour times its alpha
    rgb, alpha = render_text_layer(160, 96, "Hello Loom", "top", "left", "default", 10.0, (255, 255, 255, 255),
                                   (0, 0, 0, 255))
    torch.testing.assert_close(top[0], rgb * alpha)


def test_text_overlay_passes_empty_text_through_and_composites_rgba(engine):
    images = run(engine, overlay_graph("   "), keep=["1", "2"]).values
    assert images["2"][0] is images["1"][0]
    frames = torch.rand(1, 40, 60, 4, generator=torch.Generator().manual_seed(2))
    node = builtin_registry().get("TextOverlay")()
    (out,) = node.execute(frames, "Ab\\nCd", "default", 20.0, "#ff000080", "top", "center", False)
    rgb, alpha = render_text_layer(60, 40, "Ab\nCd", "top", "center", "default", 20.0, (255, 0, 0, 128),
                                   (0, 0, 0, 0))
    under, under_alpha = frames[..., :3], frames[..., 3:]
    out_alpha = alpha + (1 - alpha) * under_alpha
    expected = (rgb * alpha + (1 - alpha) * under * under_alpha) / out_alpha
    torch.testing.assert_close(out, torch.cat((expected.clamp(0, 1), out_alpha), dim=-1))
    assert 0.3 < alpha.max() <= 128 / 255 + 1e-6  # at most the colour's own transparency


def test_text_overlay_fonts_from_the_fonts_folder(engine, root, caplog):
    default = run(engine, overlay_graph("Font test"), keep=["2"]).values["2"][0]
    with caplog.at_level(logging.WARNING, logger="nodes.sd.misc_core"):
        missing = run(engine, overlay_graph("Font test", font="Roboto/Roboto-Regular.ttf"), keep=["2"]).values["2"][0]
    assert torch.equal(missing, default) and "Roboto/Roboto-Regular.ttf" in caplog.text
    if not SYSTEM_FONT.is_file():
        pytest.skip("no system TrueType font to copy")
    (root / "models" / "fonts").mkdir(parents=True, exist_ok=True)
    shutil.copy(SYSTEM_FONT, root / "models" / "fonts" / SYSTEM_FONT.name)
    assert builtin_registry().get("TextOverlay").inputs["font"].current_choices() == [SYSTEM_FONT.name, "default"]
    chosen = run(engine, overlay_graph("Font test", font=SYSTEM_FONT.name), keep=["2"]).values["2"][0]
    assert not torch.equal(chosen, default)


def test_text_overlay_refuses_a_colour_it_cannot_read(engine):
    refused(engine, overlay_graph("x", color="#12"), "2", "TextOverlay: color must be")


# --- Diffusers folders --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_folder(root):
    """The tiny SD1 checkpoint as a diffusers folder, each part renamed by diffusers' own conversions."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint

    from ldm.checkpoint import load_checkpoint, load_state_dict, read_metadata
    from tests.ldm.diffusers_reference import diffusers_unet
    from tests.ldm.test_parts import write

    path = root / "models" / "checkpoints" / "sd1.safetensors"
    sd, loaded = load_state_dict(path), load_checkpoint(path)
    folder = root / "models" / "diffusers" / "tiny" / "sd1"
    for part in ("unet", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    unet = {k.removeprefix("model.diffusion_model."): v.float() for k, v in sd.items()
            if k.startswith("model.diffusion_model.")}
    # the tiny model's metadata says its head count (4), which no released SD1 UNet has (8)
    write(folder / "unet" / "diffusion_pytorch_model.safetensors",
          diffusers_unet(loaded.family.unet_config, unet).state_dict(), read_metadata(path))
    levels = len(loaded.family.vae_config.ch_mult)
    vae = convert_ldm_vae_checkpoint(sd, {"down_block_types": ["DownEncoderBlock2D"] * levels,
                                          "up_block_types": ["UpDecoderBlock2D"] * levels})
    write(folder / "vae" / "diffusion_pytorch_model.safetensors", vae)
    write(folder / "text_encoder" / "model.safetensors", convert_ldm_clip_checkpoint(sd))
    (root / "models" / "diffusers" / "no-index").mkdir()
    other = root / "models" / "diffusers" / "sd3-like"
    (other / "transformer").mkdir(parents=True)
    (other / "model_index.json").write_text("{}")
    return folder


def txt2img(loader):
    return {"1": loader,
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "seed": 9, "steps": 3, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}}


def test_diffusers_loader_makes_the_checkpoints_image(engine, diffusers_folder):
    declared = info("DiffusersLoader")
    assert declared["category"] == "advanced/loaders/deprecated" and declared["output"] == ["MODEL", "CLIP", "VAE"]
    assert declared["input"]["required"]["model_path"][0] == ["sd3-like", "tiny/sd1"]  # not the folder without index
    from_folder = run(engine, txt2img({"class_type": "DiffusersLoader", "inputs": {"model_path": "tiny/sd1"}}),
                      keep=["5", "6"]).values
    from_checkpoint = run(engine, txt2img({"class_type": "CheckpointLoaderSimple",
                                           "inputs": {"ckpt_name": "sd1.safetensors"}}), keep=["5", "6"]).values
    assert torch.equal(from_folder["5"][0]["samples"], from_checkpoint["5"][0]["samples"])
    assert torch.equal(from_folder["6"][0], from_checkpoint["6"][0])


def test_diffusers_loader_refuses_what_it_cannot_load(engine, diffusers_folder):
    refused(engine, {"1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "no-index"}}}, "1",
            "model_path")
    result = engine.run(parse_api({"1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "sd3-like"}}}),
                        outputs=["1"], keep=["1"])
    assert not result.ok and "transformer/ folder" in str(result.error)
