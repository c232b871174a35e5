"""Wan22FunControlToVideo, WanPhantomSubjectToVideo and WanTrackToVideo on tiny Wan files: their declarations, the
conditioning they make (against ComfyUI's arithmetic, transcribed here), what the sampler gives the model for it, the
model's handling of subject frames and reference images (against the plain model run on the longer video), and
whole runs."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import UNET_PREFIX, write_safetensors
from ldm.wan_files import TINY_WAN, WAN21_MEAN, WAN21_STD, random_wan, tiny_wan_config, write_tiny_wan
from ldm.wan_presets import make_wan_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

WIDTH, HEIGHT, FRAMES = 64, 48, 9
LATENT = (3, HEIGHT // 8, WIDTH // 8)
MEAN, STD = (torch.tensor(v).reshape(1, -1, 1, 1, 1) for v in (WAN21_MEAN, WAN21_STD))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_extra")
    make_wan_files(root / "models", seed=3, dtype=torch.float32)
    write_tiny_wan(root / "models" / "diffusion_models" / "wan2.2_fun_control-tiny.safetensors", "fun_control",
                   seed=6, dtype=torch.float32)
    (root / "input").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "input" / "start.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths))
    set_paths(FolderPaths())


def base(unet: str) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl-tiny.safetensors", "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae-tiny.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a cat on a sofa"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry"}},
        "7": {"class_type": "EmptyImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1,
                                                     "color": 0x3070B0}},
        "8": {"class_type": "EmptyImage", "inputs": {"width": 80, "height": 40, "batch_size": 1, "color": 0xD04020}},
        "9": {"class_type": "LoadImage", "inputs": {"image": "start.png"}},
    }


def sampler(positive: list, negative: list, latent: list) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 3, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": positive, "negative": negative, "latent_image": latent, "denoise": 1.0}}


def common(length: int = FRAMES) -> dict:
    return {"positive": ["5", 0], "negative": ["6", 0], "vae": ["3", 0], "width": WIDTH, "height": HEIGHT,
            "length": length, "batch_size": 1}


def run(engine, doc: dict, keep: tuple[str, ...]) -> list:
    result = engine.run(parse_api(doc), outputs=list(keep), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k] for k in keep]


def error(engine, doc: dict, node: str) -> str:
    result = engine.run(parse_api(doc), outputs=[node])
    assert not result.ok
    return str(result.error)


def loaded_model(engine, unet: str):
    return run(engine, base(unet), ("1",))[0][0]


# --- declarations -------------------------------------------------------------------------------------------------


def test_declarations_are_comfyuis(engine) -> None:
    info = {name: engine.registry.get(name).object_info()
            for name in ("Wan22FunControlToVideo", "WanPhantomSubjectToVideo", "WanTrackToVideo")}
    sizes = ["width", "height", "length", "batch_size"]
    assert info["Wan22FunControlToVideo"]["input_order"] == {
        "required": ["positive", "negative", "vae", *sizes], "optional": ["ref_image", "control_video"]}
    assert info["WanPhantomSubjectToVideo"]["input_order"] == {
        "required": ["positive", "negative", "vae", *sizes], "optional": ["images"]}
    assert info["WanTrackToVideo"]["input_order"] == {
        "required": ["positive", "negative", "vae", "tracks", *sizes, "temperature", "topk", "start_image"],
        "optional": ["clip_vision_output"]}
    assert info["WanPhantomSubjectToVideo"]["output"] == ["CONDITIONING", "CONDITIONING", "CONDITIONING", "LATENT"]
    assert info["WanPhantomSubjectToVideo"]["output_name"] == ["positive", "negative_text", "negative_img_text",
                                                               "latent"]
    for name in info:
        assert info[name]["category"] == "conditioning/video_models"
        length = info[name]["input"]["required"]["length"][1]
        assert (length["default"], length["min"], length["step"]) == (81, 1, 4)
    track = info["WanTrackToVideo"]["input"]["required"]
    assert track["tracks"] == ["STRING", {"default": "[]", "multiline": True}]
    assert track["temperature"][1] == {"default": 220.0, "min": 1.0, "max": 1000.0, "step": 0.1, "advanced": True}
    assert track["topk"][1] == {"default": 2, "min": 1, "max": 10, "step": 1, "advanced": True}


# --- Wan22FunControlToVideo ---------------------------------------------------------------------------------------


def fun_control_doc(reference: bool = True) -> dict:
    doc = base("wan2.2_fun_control-tiny.safetensors")
    doc["10"] = {"class_type": "EmptyImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": FRAMES,
                                                        "color": 0x808020}}
    doc["11"] = {"class_type": "Wan22FunControlToVideo", "inputs": {
        **common(), "control_video": ["10", 0], **({"ref_image": ["9", 0]} if reference else {})}}
    doc["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["3", 0]}}
    doc["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["9", 0], "vae": ["3", 0]}}
    doc["14"] = sampler(["11", 0], ["11", 1], ["11", 2])
    return doc


def test_fun_control_22_carries_control_mask_index_and_reference(engine) -> None:
    (positive, negative, latent), (control,), (reference,) = run(engine, fun_control_doc(), ("11", "12", "13"))
    options = positive[0][1]
    concat = options["concat_latent_image"]
    assert concat.shape == (1, 32, *LATENT) and latent["samples"].shape == (1, 16, *LATENT)
    torch.testing.assert_close(concat[:, :16], control["samples"])
    torch.testing.assert_close(concat[:, 16:], MEAN.expand(1, 16, *LATENT))  # no start image: the latent zero
    assert options["concat_mask"].shape == (1, 4, *LATENT) and options["concat_mask"].eq(1).all()
    assert options["concat_mask_index"] == 16
    assert len(options["reference_latents"]) == 1
    torch.testing.assert_close(options["reference_latents"][0], reference["samples"])
    assert negative[0][1]["reference_latents"][0] is options["reference_latents"][0]


def test_fun_control_22_model_inputs_put_the_mask_between_control_and_image(engine) -> None:
    from nodes.sd.wan import wan_inputs

    model = loaded_model(engine, "wan2.2_fun_control-tiny.safetensors")
    (positive, _, latent), (control,), (reference,) = run(engine, fun_control_doc(), ("11", "12", "13"))
    _, (entries,) = wan_inputs(model, latent, positive)
    options = entries[0][1]
    # ComfyUI's concat_cond: normalised control, 1 - mask (all 0: nothing known), normalised image part (zero)
    expected = torch.cat([(control["samples"] - MEAN) / STD, torch.zeros(1, 4, *LATENT), torch.zeros(1, 16, *LATENT)],
                         dim=1)
    torch.testing.assert_close(options["concat"], expected)
    torch.testing.assert_close(options["ref_latents"].latents[0], ((reference["samples"] - MEAN) / STD)[:, :, 0])


def test_a_reference_image_is_one_frame_before_the_video() -> None:
    """With ref_conv set to the patch embedding's weights on the latent's 16 channels, the reference's tokens are
    those of a first frame holding the reference (the other channels 0): the model with a reference is the model
    on that longer video, its first frame dropped."""
    model = random_wan(tiny_wan_config("fun_control"), seed=2)
    with torch.no_grad():
        model.ref_conv.weight.copy_(model.patch_embedding.weight[:, :16, 0])
        model.ref_conv.bias.copy_(model.patch_embedding.bias)
    x, reference = torch.randn(1, 52, 3, 6, 8), torch.randn(1, 16, 6, 8)
    context, t = torch.randn(1, 7, 32), torch.tensor([0.6])
    frame = torch.cat([reference, torch.zeros(1, 36, 6, 8)], dim=1)[:, :, None]
    with torch.no_grad():
        longer = model(torch.cat([frame, x], dim=2), t, context)[:, :, 1:]
        torch.testing.assert_close(model(x, t, context, reference_latent=reference), longer)
        assert (model(x, t, context) - longer).abs().max() > 1e-4


def test_fun_control_22_samples_and_the_reference_changes_the_video(engine) -> None:
    with_reference = run(engine, fun_control_doc(), ("14",))[0][0]["samples"]
    without = run(engine, fun_control_doc(reference=False), ("14",))[0][0]["samples"]
    assert with_reference.shape == (1, 16, *LATENT) and torch.isfinite(with_reference).all()
    assert (with_reference - without).abs().max() > 1e-4


def test_a_reference_image_for_a_model_without_ref_conv_is_refused(engine) -> None:
    doc = fun_control_doc()
    doc["1"]["inputs"]["unet_name"] = "wan2.1_i2v-tiny.safetensors"
    assert "has no reference image input (ref_conv)" in error(engine, doc, "14")


# --- WanPhantomSubjectToVideo -------------------------------------------------------------------------------------


def phantom_doc() -> dict:
    doc = base("wan2.1_t2v-tiny.safetensors")
    doc["10"] = {"class_type": "ImageBatch", "inputs": {"image1": ["9", 0], "image2": ["8", 0]}}
    doc["11"] = {"class_type": "WanPhantomSubjectToVideo", "inputs": {**common(), "images": ["10", 0]}}
    # each subject alone, fitted as the node fits them (ImageBatch already brought the second to the first's size)
    doc["12"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["10", 0], "batch_index": 0, "length": 1}}
    doc["13"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["10", 0], "batch_index": 1, "length": 1}}
    doc["14"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["3", 0]}}
    doc["15"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["13", 0], "vae": ["3", 0]}}
    doc["16"] = sampler(["11", 0], ["11", 2], ["11", 3])
    return doc


def test_phantom_puts_each_subject_as_a_frame_and_zeros_in_the_image_negative(engine) -> None:
    (positive, negative_text, negative_img_text, latent), (first,), (second,) = run(
        engine, phantom_doc(), ("11", "14", "15"))
    subjects = positive[0][1]["time_dim_concat"]
    torch.testing.assert_close(subjects, torch.cat([first["samples"], second["samples"]], dim=2))
    assert subjects.shape == (1, 16, 2, *LATENT[1:]) and latent["samples"].shape == (1, 16, *LATENT)
    torch.testing.assert_close(negative_text[0][1]["time_dim_concat"], subjects)
    torch.testing.assert_close(negative_img_text[0][1]["time_dim_concat"], MEAN.expand(1, 16, 2, *LATENT[1:]))
    assert negative_text[0][0] is negative_img_text[0][0]  # both the negative prompt


def test_phantom_without_images_passes_the_prompts_through(engine) -> None:
    doc = phantom_doc()
    del doc["11"]["inputs"]["images"]
    (positive, negative_text, negative_img_text, _), (text,), (negative,) = run(engine, doc, ("11", "5", "6"))
    assert positive is text and negative_text is negative and negative_img_text is negative


def test_phantom_subject_frames_are_the_model_on_the_longer_video(engine) -> None:
    from nodes.sd.wan import wan_inputs

    model = loaded_model(engine, "wan2.1_t2v-tiny.safetensors")
    positive, _, _, latent = run(engine, phantom_doc(), ("11",))[0]
    _, (entries,) = wan_inputs(model, latent, positive)
    subjects = entries[0][1]["ref_latents"].latents[0]
    torch.testing.assert_close(subjects, (positive[0][1]["time_dim_concat"] - MEAN) / STD)
    unet = model.unet.float()
    x, context, t = torch.randn(1, 16, *LATENT), torch.randn(1, 7, 32), torch.tensor([0.4])
    with torch.no_grad():
        longer = unet(torch.cat([x, subjects], dim=2), t, context)[:, :, :LATENT[0]]
        torch.testing.assert_close(unet(x, t, context, ref_latents=entries[0][1]["ref_latents"]), longer)


def test_phantom_samples_and_the_subjects_change_the_video(engine) -> None:
    doc = phantom_doc()
    subject = run(engine, doc, ("16",))[0][0]["samples"]
    doc["16"] = sampler(["5", 0], ["6", 0], ["11", 3])
    plain = run(engine, doc, ("16",))[0][0]["samples"]
    assert subject.shape == (1, 16, *LATENT) and torch.isfinite(subject).all()
    assert (subject - plain).abs().max() > 1e-4


def test_phantom_subjects_for_an_image_to_video_model_are_refused(engine) -> None:
    doc = phantom_doc()
    doc["1"]["inputs"]["unet_name"] = "wan2.1_i2v-tiny.safetensors"
    assert "is not a text-to-video Wan model" in error(engine, doc, "16")


# --- WanTrackToVideo (ATI) ----------------------------------------------------------------------------------------

TRACKS = [[{"x": 10 + 2 * i, "y": 12 + i} for i in range(30)],  # shorter than 121: padded, invisible after
          [{"x": 50 - i % 7, "y": 30} for i in range(140)]]  # longer: cut to 121


def comfy_track_steps(tracks: list, width: int, height: int, frames: int) -> torch.Tensor:
    """ComfyUI's pad_pts and process_tracks, transcribed: [frames + 1, N, 4]."""
    arrays = []
    for track in tracks:
        pts = np.array([[p["x"], p["y"], 1] for p in track], dtype=np.float32)
        pts = np.vstack([pts, np.zeros((121 - len(pts), 3), np.float32)]) if len(pts) < 121 else pts[:121]
        arrays.append(pts.reshape(121, 1, 3))
    t = torch.from_numpy(np.stack(arrays)).float().permute(1, 0, 2, 3)
    xy, vis = t[..., :2], t[..., 2:3]
    xy = (xy - torch.tensor([width, height]).float() / 2) / min(width, height) * 2
    vis = vis * 2 - 1
    trange = torch.linspace(-1, 1, 121).view(-1, 1, 1, 1).expand(*vis.shape)
    out = torch.cat([trange, xy, vis], dim=-1).view(121, -1, 4)
    a, b = 120 // math.gcd(120, frames), frames // math.gcd(120, frames)
    return torch.cat([out[:1], torch.repeat_interleave(out[1:], b, dim=0)[1::a]])


def comfy_patch(tracks: torch.Tensor, vid: torch.Tensor, temperature: float, topk: int) -> tuple:
    """ATI's patch_motion for one video, pixel by pixel (an independent transcription): (mask [4, T, H, W],
    feature [C, T, H, W])."""
    c, frames, h, w = vid.shape
    n = tracks.shape[1]
    m = min(h, w)
    xy, visible = tracks[:, :, 1:3], tracks[:, :, 3:].clamp(0, 1)
    starts = (xy[0] / torch.tensor([w / m, h / m])).clamp(-1, 1)
    xs, ys = torch.linspace(-w / m, w / m, w), torch.linspace(-h / m, h / m, h)
    point = torch.nn.functional.grid_sample(vid[:, :1].permute(1, 0, 2, 3), starts[None, None], mode="bilinear",
                                            padding_mode="zeros", align_corners=False)[0, :, 0]  # [C, N]
    mask, feature = torch.ones(frames, h, w), vid.clone()
    for f in range(1, frames):
        group = slice(1 + 4 * (f - 1), 1 + 4 * f)
        seen = visible[group].sum(0)  # [N, 1]
        at = (xy[group] * visible[group]).sum(0) / (seen + 1e-5)  # [N, 2]
        for i in range(h):
            for j in range(w):
                d = (at[:, 0] - xs[j]) ** 2 + (at[:, 1] - ys[i]) ** 2
                weights = torch.exp(-d * temperature) * seen[:, 0].clamp(0, 1)
                top = torch.sort(weights, descending=True).values[:min(topk, n)]
                index = torch.sort(weights, descending=True).indices[:min(topk, n)]
                total = top.sum()
                mask[f, i, j] = total
                feature[:, f, i, j] = (point[:, index] * top).sum(1) + vid[:, f, i, j] * (1 - total.clamp(0, 1))
    return mask[None].expand(4, -1, -1, -1), feature


def track_doc(tracks: str, length: int = FRAMES, batch_size: int = 1) -> dict:
    doc = base("wan2.1_i2v-tiny.safetensors")
    doc["10"] = {"class_type": "WanTrackToVideo", "inputs": {
        **common(length), "batch_size": batch_size, "tracks": tracks, "temperature": 3.0, "topk": 2,
        "start_image": ["9", 0]}}
    # the start video ComfyUI encodes: the image, then grey 0.5
    doc["15"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": WIDTH, "height": HEIGHT}}
    doc["16"] = {"class_type": "MaskToImage", "inputs": {"mask": ["15", 0]}}
    doc["11"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["16", 0], "amount": length - 1}}
    doc["12"] = {"class_type": "ImageBatch", "inputs": {"image1": ["9", 0], "image2": ["11", 0]}}
    doc["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["3", 0]}}
    doc["14"] = sampler(["10", 0], ["10", 1], ["10", 2])
    return doc


def test_track_steps_follow_comfyuis_resampling() -> None:
    from nodes.sd.wan import track_steps

    for length in (1, 9, 81, 33):
        expected = comfy_track_steps(TRACKS, WIDTH, HEIGHT, length - 1)
        assert expected.shape == (length, 2, 4)
        torch.testing.assert_close(track_steps(TRACKS, WIDTH, HEIGHT, length), expected)


def test_tracks_patch_the_start_latent_as_ati_does(engine) -> None:
    (positive, negative, latent), (start,) = run(engine, track_doc(json.dumps(TRACKS)), ("10", "13"))
    options = positive[0][1]
    vid = ((start["samples"] - MEAN) / STD)[0]
    mask, feature = comfy_patch(comfy_track_steps(TRACKS, WIDTH, HEIGHT, FRAMES - 1), vid, 3.0, 2)
    torch.testing.assert_close(options["concat_mask"], 1 - mask[None])
    torch.testing.assert_close(options["concat_latent_image"], feature[None] * STD + MEAN)
    # the later frames: known where the tracks weigh, free where they do not
    assert options["concat_mask"][0, :, 1:].min() < 0.5 and options["concat_mask"][0, :, 1:].max() > 0.99
    assert latent["samples"].shape == (1, 16, *LATENT) and negative[0][1]["concat_mask"] is options["concat_mask"]


def test_motion_patch_matches_the_transcription() -> None:
    from nodes.sd.wan import motion_patched, track_steps

    vid = torch.randn(16, 3, HEIGHT // 8, WIDTH // 8)
    weight, patched = motion_patched(track_steps(TRACKS, WIDTH, HEIGHT, FRAMES), vid, 3.0, 2)
    mask, feature = comfy_patch(comfy_track_steps(TRACKS, WIDTH, HEIGHT, FRAMES - 1), vid, 3.0, 2)
    torch.testing.assert_close(weight[None].expand(4, -1, -1, -1), mask)
    torch.testing.assert_close(patched, feature)


def test_track_batches_spread_over_the_latent_batch(engine) -> None:
    batches = [TRACKS, TRACKS[:1]]
    positive = run(engine, track_doc(json.dumps(batches), batch_size=3), ("10",))[0][0]
    mask = positive[0][1]["concat_mask"]
    assert mask.shape == (3, 4, *LATENT)
    single = run(engine, track_doc(json.dumps(TRACKS[:1])), ("10",))[0][0][0][1]["concat_mask"]
    both = run(engine, track_doc(json.dumps(TRACKS)), ("10",))[0][0][0][1]["concat_mask"]
    # ComfyUI's resize_list_to_batch_size: rows 0, 1, 2 take batches floor((i + 0.5) * 2 / 3) = 0, 1, 1
    torch.testing.assert_close(mask[:1], both)
    torch.testing.assert_close(mask[1:], single.expand(2, -1, -1, -1, -1))


def test_no_tracks_is_wan_image_to_video(engine) -> None:
    doc = track_doc("[]")
    doc["15"] = {"class_type": "WanImageToVideo", "inputs": {**common(), "start_image": ["9", 0]}}
    (positive, _, latent), (reference, _, reference_latent) = run(engine, doc, ("10", "15"))
    torch.testing.assert_close(positive[0][1]["concat_latent_image"], reference[0][1]["concat_latent_image"])
    torch.testing.assert_close(positive[0][1]["concat_mask"], reference[0][1]["concat_mask"])
    torch.testing.assert_close(latent["samples"], reference_latent["samples"])


def test_tracks_sample_with_an_image_to_video_model(engine) -> None:
    out = run(engine, track_doc(json.dumps(TRACKS)), ("14",))[0][0]["samples"]
    assert out.shape == (1, 16, *LATENT) and torch.isfinite(out).all()


@pytest.mark.parametrize(("tracks", "length", "message"), [
    ("[[{'x': 1}]]", FRAMES, "not a list of points"),
    ("{not json", FRAMES, "the tracks are not JSON"),
    ('{"x": 1, "y": 2}', FRAMES, "the tracks are a JSON list"),
    (json.dumps(TRACKS), 8, "give a length of 4n + 1 pictures"),
])
def test_bad_tracks_are_refused(engine, tracks: str, length: int, message: str) -> None:
    text = error(engine, track_doc(tracks, length=length), "10")
    assert "WanTrackToVideo" in text and message in text


def test_fun_control_file_round_trips_its_reference_input(tmp_path) -> None:
    from ldm.wan_files import load_wan_unet

    model = random_wan(dataclasses.replace(TINY_WAN, in_dim=52, ref_conv_in_dim=16), seed=4)
    path = tmp_path / "fun.safetensors"
    write_safetensors({UNET_PREFIX + k: v for k, v in model.state_dict().items()}, path, {"loom.wan_num_heads": "2"})
    loaded = load_wan_unet(path)
    assert loaded.family.unet_config.ref_conv_in_dim == 16 and not loaded.unused_keys
    torch.testing.assert_close(loaded.unet.ref_conv.weight, model.ref_conv.weight)
