"""The example workflows and the SD nodes end to end on tiny random-weight checkpoints."""

import json
import shutil
from pathlib import Path

import av
import pytest
import safetensors.torch
import torch
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import GraphNode, Link, parse_api
from graph.load import load_workflow
from graph.validate import validate
from ldm.ace_step15_presets import make_ace_step15_files
from ldm.controlnet_qwen_image import write_tiny_qwen_image_controlnet
from ldm.controlnet_z_image import write_tiny_z_image_fun_controlnet
from ldm.flux2_presets import make_flux2_files
from ldm.flux_presets import make_flux_files
from ldm.hidream_presets import make_hidream_files
from ldm.hunyuan_image21_files import make_hunyuan_image21_files
from ldm.hunyuan_video15_files import make_hunyuan_video15_files
from ldm.ltx2_files import make_ltx2_files
from ldm.ltxv_presets import make_ltxv_files
from ldm.lumina2_presets import make_lumina2_files
from ldm.presets import make_checkpoint, make_controlnet
from ldm.qwen_image_presets import make_qwen_image21_files, make_qwen_image_files
from ldm.sd3_presets import make_sd3_files
from ldm.stable_audio_presets import make_stable_audio_files
from ldm.upscale import RRDBNet
from ldm.wan_presets import make_wan_files
from ldm.z_image_files import TINY_Z_IMAGE
from ldm.z_image_presets import make_z_image_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
CHECKPOINTS = {"loom-demo.safetensors": "tiny-sd1", "sd_xl_base_1.0.safetensors": "tiny-sdxl",
               "sd2.safetensors": "tiny-sd2", "v1-5-pruned-emaonly.safetensors": "tiny-sd1",
               "sd_xl_refiner_1.0.safetensors": "tiny-sdxl-refiner"}
FAST = {"steps": 2}
# Tiny Flux parts under the names flux_txt2img.json loads (ComfyUI's usual file names).
FLUX_FILES = {"unet": "diffusion_models/flux1-dev.safetensors", "clip_l": "text_encoders/clip_l.safetensors",
              "t5xxl": "text_encoders/t5xxl_fp16.safetensors", "vae": "vae/ae.safetensors"}
# Tiny SD3.5 parts under the names sd3_txt2img.json loads; its clip_l.safetensors is Flux's, as a user's would be.
SD3_FILES = {"bare_checkpoint": "checkpoints/sd3.5_medium.safetensors", "clip_g": "text_encoders/clip_g.safetensors",
             "t5xxl": "text_encoders/t5xxl_fp8_e4m3fn.safetensors"}
# The tiny LTX-Video checkpoint under the name ltxv_t2v.json loads (its T5-XXL is Flux's tiny one, of the same width).
LTXV_CHECKPOINT = "checkpoints/ltx-video-2b-v0.9.5.safetensors"
# Tiny Z-Image parts under the names z_image_t2i.json loads; its ae.safetensors is Flux's, as a user's is.
Z_IMAGE_FILES = {"unet": "diffusion_models/z_image_turbo_bf16.safetensors",
                 "qwen3": "text_encoders/qwen_3_4b.safetensors"}
# Tiny Qwen-Image parts under the names qwen_image_t2i.json loads.
QWEN_FILES = {"unet": "diffusion_models/qwen_image_fp8_e4m3fn.safetensors",
              "qwen25vl": "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
              "vae": "vae/qwen_image_vae.safetensors",
              "layered_unet": "diffusion_models/qwen_image_layered_bf16.safetensors",  # qwen_image_layered.json's
              "layered_vae": "vae/qwen_image_layered_vae.safetensors"}
# The tiny all-in-one Lumina 2 checkpoint under the name lumina2_t2i.json loads.
LUMINA2_CHECKPOINT = "checkpoints/lumina_2.safetensors"
# Tiny FLUX.2 parts under the names flux2_klein_t2i.json and flux2_dev_t2i.json load, but for klein's Qwen3-4B:
# the real file is Z-Image's too (qwen_3_4b.safetensors), while the tiny ones differ in width and depth.
FLUX2_FILES = {"klein": "diffusion_models/flux-2-klein-base-4b.safetensors",
               "qwen3": "text_encoders/qwen_3_4b-klein.safetensors",
               "dev": "diffusion_models/flux2_dev_fp8mixed.safetensors",
               "mistral": "text_encoders/mistral_3_small_flux2_bf16.safetensors", "vae": "vae/flux2-vae.safetensors"}
# Per workflow: a smaller picture and fewer steps where the sizes are not an EmptyLatentImage's, and the tiny klein
# text encoder's name.
OVERRIDES = {"flux2_klein_t2i": {("2", "clip_name"): "qwen_3_4b-klein.safetensors", ("4", "value"): 128,
                                 ("5", "value"): 64, ("12", "steps"): 2},
             "hunyuan_video15_t2v": {("6", "width"): 64, ("6", "height"): 48, ("6", "length"): 9, ("9", "steps"): 2},
             "flux2_dev_t2i": {("6", "width"): 128, ("6", "height"): 64, ("9", "width"): 128, ("9", "height"): 64,
                               ("9", "steps"): 2}}
# Tiny HiDream-I1 parts under the names hidream_i1_dev_t2i.json loads (its ae.safetensors is Flux's, as a user's is).
HIDREAM_FILES = {"unet": "diffusion_models/hidream_i1_dev_bf16.safetensors",
                 "clip_l": "text_encoders/clip_l_hidream.safetensors",
                 "clip_g": "text_encoders/clip_g_hidream.safetensors",
                 "t5xxl": "text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors",
                 "llama": "text_encoders/llama_3.1_8b_instruct_fp8_scaled.safetensors"}
# Tiny Qwen-Image 2.1 parts under the names qwen_image21_t2i.json loads.
QWEN21_FILES = {"unet": "diffusion_models/qwen_image_2.1_bf16.safetensors",
                "qwen3vl": "text_encoders/qwen3vl_8b_bf16.safetensors",
                "vae": "vae/qwen_image_2.1_vae_bf16.safetensors"}
# Tiny ACE-Step 1.5 parts under the names ace_step15.json loads.
ACE_FILES = {"diffusion_model": "diffusion_models/acestep_v1.5_turbo.safetensors",
             "text_encoder": "text_encoders/qwen_0.6b_ace15.safetensors",
             "lm": "text_encoders/qwen_1.7b_ace15.safetensors", "vae": "vae/ace_1.5_vae.safetensors"}
# Tiny LTX-2 files under the names ltx2_t2v.json loads.
LTX2_FILES = {"checkpoint": "checkpoints/ltx-2-19b-dev.safetensors",
              "text_encoder": "text_encoders/gemma_3_12B_it.safetensors",
              "upscaler": "latent_upscale_models/ltx-2-spatial-upscaler-x2-1.0.safetensors"}
# Tiny HunyuanVideo 1.5 parts under the names hunyuan_video15_t2v.json loads; its Qwen2.5-VL file is Qwen-Image's, as
# a user's is.
HUNYUAN_VIDEO15_FILES = {"t2v": "diffusion_models/hunyuanvideo1.5_720p_t2v_fp16.safetensors",
                         "byt5": "text_encoders/byt5_small_glyphxl_fp16.safetensors",
                         "vae": "vae/hunyuanvideo15_vae_fp16.safetensors"}
# Tiny HunyuanImage 2.1 parts under the names hunyuan_image21_t2i.json loads (its text encoders are those above).
HUNYUAN_IMAGE21_FILES = {"unet": "diffusion_models/hunyuanimage2.1_bf16.safetensors",
                         "vae": "vae/hunyuan_image_2.1_vae_fp16.safetensors"}
# Tiny Wan 2.1 parts under the names wan_t2v.json loads.
WAN_FILES = {"t2v": "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors",
             "umt5xxl": "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "vae": "vae/wan_2.1_vae.safetensors"}


def write_lora(path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for key, (out, inp) in {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (32, 32),
                            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    safetensors.torch.save_file(tensors, path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("loom")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "loras").mkdir(parents=True)
    for name, preset in CHECKPOINTS.items():
        make_checkpoint(preset, root / "models" / "checkpoints" / name, seed=1)
    write_lora(root / "models" / "loras" / "example_lora.safetensors")
    make_controlnet("tiny-sd1", root / "models" / "controlnet" / "control_v11p_sd15_canny_fp16.safetensors", seed=1)
    (root / "models" / "upscale_models").mkdir(parents=True)
    torch.save(RRDBNet(nf=8, nb=1).state_dict(), root / "models" / "upscale_models" / "RealESRGAN_x4plus.pth")
    flux = make_flux_files(root / "flux-tiny", seed=1)
    for part, name in FLUX_FILES.items():
        (root / "models" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(flux[part], root / "models" / name)
    sd3 = make_sd3_files(root / "sd3-tiny", "sd3.5-medium", seed=1)
    for part, name in SD3_FILES.items():
        shutil.copy(sd3[part], root / "models" / name)
    shutil.copy(make_ltxv_files(root / "ltxv-tiny", seed=1)["checkpoint"], root / "models" / LTXV_CHECKPOINT)
    qwen = make_qwen_image_files(root / "qwen-tiny", seed=1)
    for part, name in QWEN_FILES.items():
        shutil.copy(qwen[part], root / "models" / name)
    union = "Qwen-Image-InstantX-ControlNet-Union.safetensors"  # qwen_image_controlnet.json's
    write_tiny_qwen_image_controlnet(root / "models" / "controlnet" / union, seed=1)
    shutil.copy(make_lumina2_files(root / "lumina2-tiny", seed=1)["checkpoint"], root / "models" / LUMINA2_CHECKPOINT)
    flux2 = make_flux2_files(root / "flux2-tiny", seed=1)
    for part, name in FLUX2_FILES.items():
        shutil.copy(flux2[part], root / "models" / name)
    z_image = make_z_image_files(root / "z-image-tiny", seed=1)
    for part, name in Z_IMAGE_FILES.items():
        shutil.copy(z_image[part], root / "models" / name)
    fun = "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"  # z_image_fun_controlnet.json's
    write_tiny_z_image_fun_controlnet(root / "models" / "model_patches" / fun, TINY_Z_IMAGE, seed=1)
    hidream = make_hidream_files(root / "hidream-tiny", seed=1)
    for part, name in HIDREAM_FILES.items():
        shutil.copy(hidream[part], root / "models" / name)
    stable_audio = make_stable_audio_files(root / "stable-audio-tiny", seed=1)
    shutil.copy(stable_audio["checkpoint"], root / "models" / "checkpoints" / "stable-audio-open-1.0.safetensors")
    shutil.copy(stable_audio["t5base"], root / "models" / "text_encoders" / "t5-base.safetensors")
    qwen21 = make_qwen_image21_files(root / "qwen21-tiny", seed=1)
    for part, name in QWEN21_FILES.items():
        shutil.copy(qwen21[part], root / "models" / name)
    ace = make_ace_step15_files(root / "ace-tiny", seed=1)
    for part, name in ACE_FILES.items():
        shutil.copy(ace[part], root / "models" / name)
    wan = make_wan_files(root / "wan-tiny", seed=1)
    for part, name in WAN_FILES.items():
        shutil.copy(wan[part], root / "models" / name)
    ltx2 = make_ltx2_files(root / "ltx2-tiny", seed=1)
    for part, name in LTX2_FILES.items():
        (root / "models" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ltx2[part], root / "models" / name)
    hunyuan_video15 = make_hunyuan_video15_files(root / "hv15-tiny", seed=1)
    for part, name in HUNYUAN_VIDEO15_FILES.items():
        shutil.copy(hunyuan_video15[part], root / "models" / name)
    hunyuan_image21 = make_hunyuan_image21_files(root / "hy21-tiny", seed=1)
    for part, name in HUNYUAN_IMAGE21_FILES.items():
        shutil.copy(hunyuan_image21[part], root / "models" / name)
    paths = FolderPaths(base=root)
    paths.seed_input_examples()
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base))


def load(name: str, registry, overrides=None):
    graph = load_workflow(WORKFLOWS / f"{name}.json", registry)
    for node in graph.nodes.values():
        if node.class_type in ("KSampler", "KSamplerAdvanced"):
            node.inputs.update(FAST)
        if node.class_type == "TextEncodeQwenImage21":
            node.inputs.update(resolution=128)
        if node.class_type in ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanImageLatent"):
            node.inputs.update(width=min(node.inputs["width"], 128), height=min(node.inputs["height"], 64))
        if node.class_type == "EmptyHunyuanLatentVideo":
            node.inputs.update(width=64, height=64, length=5)
        if node.class_type == "EmptyLTXVLatentVideo":
            node.inputs.update(width=64, height=64, length=9)
        if node.class_type == "LTXVScheduler":
            node.inputs.update(FAST)
        if node.class_type == "LTXVEmptyLatentAudio":
            node.inputs.update(frames_number=9)
        if node.class_type in ("EmptyLatentAudio", "EmptyAceStep1.5LatentAudio"):
            node.inputs.update(seconds=2.0)
        if node.class_type == "ImageScaleToMaxDimension":
            node.inputs.update(largest_size=64)
        if node.class_type == "TextEncodeAceStepAudio1.5":
            node.inputs.update(duration=2.0)
    for (nid, key), value in {**OVERRIDES.get(name, {}), **(overrides or {})}.items():
        graph.nodes[nid].inputs[key] = value
    return graph


@pytest.mark.parametrize("name", sorted(p.stem for p in WORKFLOWS.glob("*.json")))
def test_every_example_workflow_runs(engine, base, name):
    result = engine.run(load(name, engine.registry))
    assert result.ok, result.error
    if any("audio" in ui for ui in result.outputs.values()):  # Stable Audio's FLAC, ACE-Step's MP3: the prompt in it
        [[clip]] = [ui["audio"] for ui in result.outputs.values()]
        with av.open(str(base.output / clip["subfolder"] / clip["filename"])) as container:
            assert container.streams.audio[0].rate == (48000 if name == "ace_step15" else 44100)
            prompt = json.loads({k.lower(): v for k, v in container.metadata.items()}["prompt"])
        assert prompt == json.loads(json.dumps(load(name, engine.registry).to_api()))
        return
    [images] = [ui["images"] for ui in result.outputs.values()]
    path = base.output / images[0]["subfolder"] / images[0]["filename"]
    if path.suffix == ".mp4":  # SaveVideo: LTX-2's 9 frames of 128x128 with 24 kHz sound, HunyuanVideo 1.5's of 64x48
        with av.open(str(path)) as container:
            video = container.streams.video[0]
            size = (64, 48) if name == "hunyuan_video15_t2v" else (128, 128)
            assert (video.codec_context.width, video.codec_context.height) == size
            assert sum(1 for _ in container.decode(video)) == 9 and video.average_rate == 24
            if name == "ltx2_t2v":
                audio = container.streams.audio[0]
                assert audio.rate == 24000 and audio.channels == 2
            prompt = json.loads({k.lower(): v for k, v in container.metadata.items()}["prompt"])
        assert prompt == json.loads(json.dumps(load(name, engine.registry).to_api()))
        return
    with Image.open(path) as image:  # Qwen-Image-Layered's (the picture and its two layers) and 2.1's are RGBA
        assert image.mode == ("RGBA" if name in ("qwen_image_layered", "qwen_image21_t2i") else "RGB")
        assert min(image.size) >= 64
        assert len(images) == (3 if name == "qwen_image_layered" else len(images))
        if image.format == "WEBP":  # a video's frames (SaveAnimatedWEBP), the prompt in its EXIF Model tag
            assert image.n_frames in (5, 9)  # Wan's 1 + 4k pictures, LTX-Video's 1 + 8k
            prompt = json.loads(image.getexif()[0x0110].removeprefix("prompt:"))
        else:
            prompt = json.loads(image.text["prompt"])
        assert prompt == json.loads(json.dumps(load(name, engine.registry).to_api()))  # the workflow it came from


def test_seed_change_reruns_only_the_sampler_and_what_follows(engine):
    engine.run(load("txt2img", engine.registry))
    result = engine.run(load("txt2img", engine.registry, {("3", "seed"): 777}))
    assert result.executed == ["3", "8", "9"]
    assert set(result.cached) == {"4", "5", "6", "7"}
    loads = engine.services.models.loads
    engine.run(load("txt2img", engine.registry, {("6", "text"): "a green square"}))
    assert engine.services.models.loads == loads  # a new prompt re-encodes, but never reloads the file


def test_img2img_with_denoise_0_is_the_vae_round_trip(engine, base):
    graph = load("img2img", engine.registry, {("3", "denoise"): 0.0})
    graph.nodes["9"].class_type = "PreviewImage"
    del graph.nodes["9"].inputs["filename_prefix"]
    result = engine.run(graph, keep=["4", "8", "11"])
    assert result.ok
    decoded = result.values["8"][0]
    node = engine.registry.get("VAEDecode")()
    node.ctx = None
    from nodes.sd.vae import decode
    # The loader's VAE output, not the model cache's copy: the cache may have let the file go since
    # (it keeps four models, and the module's other workflows load more).
    reference = decode(node, result.values["4"][2], result.values["11"][0]["samples"])
    assert torch.allclose(decoded, reference, atol=1e-5)


def test_inpainting_keeps_the_unmasked_region(engine):
    graph = load("inpaint", engine.registry)
    result = engine.run(graph, keep=["11", "3"])
    assert result.ok
    before, after = result.values["11"][0], result.values["3"][0]
    # The sampler resizes the pixel mask to the latent bilinearly; where that is 0 nothing may change.
    mask = torch.nn.functional.interpolate(before["noise_mask"], size=after["samples"].shape[-2:], mode="bilinear")
    keep = (mask == 0).expand_as(after["samples"])
    assert keep.any() and not keep.all()
    # Equal up to the float rounding of scaling the latent by the VAE factor and back.
    assert torch.allclose(after["samples"][keep], before["samples"][keep], rtol=1e-5, atol=1e-7)


def test_lora_workflow_and_base_model_both_right_in_any_order(engine):
    plain = engine.run(load("txt2img", engine.registry, {("3", "seed"): 5}), keep=["3"]).values["3"][0]["samples"]
    # lora.json is txt2img.json with a LoRA between the loader and its users, on another model and prompt.
    txt2img = json.loads((WORKFLOWS / "txt2img.json").read_text())
    same = {(nid, key): txt2img[nid]["inputs"][key] for nid, key in
            (("4", "ckpt_name"), ("6", "text"), ("7", "text"), ("3", "cfg"), ("5", "width"), ("5", "height"))}
    lora = engine.run(load("lora", engine.registry, {("3", "seed"): 5, **same}), keep=["3"]).values["3"][0]["samples"]
    engine.cache.clear()
    again = engine.run(load("txt2img", engine.registry, {("3", "seed"): 5}), keep=["3"]).values["3"][0]["samples"]
    assert not torch.allclose(plain, lora)
    assert torch.equal(plain, again)


def test_lycoris_files_run_through_the_lora_loader(engine, base, caplog):
    """A LoHa (UNet attention and text encoder) with a DoRA LoKr conv, as LyCORIS saves them: every key patches a
    layer (nothing is reported unused) and the image changes with the strength."""
    g = torch.Generator().manual_seed(5)
    loha = {"hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32)}
    tensors = {f"{module}.{part}": torch.randn(shape, generator=g) * 0.3 for part, shape in loha.items()
               for module in ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                              "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k")}
    conv = "lora_unet_input_blocks_1_0_in_layers_2"
    tensors |= {f"{conv}.lokr_w1": torch.randn(4, 4, generator=g),
                f"{conv}.lokr_w2": torch.randn(8, 8, 3, 3, generator=g) * 0.1,
                f"{conv}.dora_scale": torch.rand(32, 1, 1, 1, generator=g) + 0.5}
    safetensors.torch.save_file(tensors, base.model_dirs("loras")[0] / "loha.safetensors")

    def run(strength):
        graph = load("lora", engine.registry, {("10", "lora_name"): "loha.safetensors", ("3", "seed"): 2,
                                               ("10", "strength_model"): strength, ("10", "strength_clip"): strength})
        result = engine.run(graph, keep=["3"])
        assert result.ok, result.error
        return result.values["3"][0]["samples"]

    with caplog.at_level("WARNING"):
        patched, plain = run(1.0), run(0.0)
    assert not torch.allclose(patched, plain)
    assert "patch nothing" not in caplog.text


def test_bad_inputs_fail_validation_before_anything_runs(engine, base):
    graph = load("txt2img", engine.registry, {("4", "ckpt_name"): "missing.safetensors", ("5", "width"): 100})
    problems = validate(graph, engine.registry).problems
    assert {(p.node_id, p.type) for p in problems} == {("4", "value_not_in_list"), ("5", "custom_validation_failed")}
    [missing] = [p for p in problems if p.node_id == "4"]
    assert "(the files in models/checkpoints" in missing.details  # where it looked, relative to the base
    (base.input / "broken.png").write_text("this is not a picture")
    graph = load("img2img", engine.registry, {("10", "image"): "broken.png"})
    with pytest.raises(WorkflowInvalid) as err:
        engine.run(graph)
    assert "not a readable image" in str(err.value)


def write_sdxl_lora(path: Path) -> None:
    """A LoRA that says SDXL by its cross-attention input width (2048), as real SDXL LoRAs do."""
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    safetensors.torch.save_file({f"{key}.lora_down.weight": torch.zeros(4, 2048),
                                 f"{key}.lora_up.weight": torch.zeros(32, 4)}, path)


def test_lora_for_another_family_is_refused_at_validation(engine, base):
    write_sdxl_lora(base.model_dirs("loras")[0] / "xl_lora.safetensors")
    graph = load("lora", engine.registry, {("10", "lora_name"): "xl_lora.safetensors"})
    [problem] = validate(graph, engine.registry).problems
    assert (problem.node_id, problem.type) == ("10", "custom_validation_failed")
    assert "xl_lora.safetensors is a SDXL LoRA; it does not fit the SD1 model" in problem.details
    loads = engine.services.models.loads
    with pytest.raises(WorkflowInvalid):
        engine.run(graph)
    assert engine.services.models.loads == loads  # refused before any file was loaded
    # Behind a second LoRA the family is still known; on the SDXL checkpoint the same LoRA is accepted.
    chained = load("lora", engine.registry, {("10", "lora_name"): "xl_lora.safetensors"})
    chained.nodes["10"].inputs.update(model=Link("12", 0), clip=Link("12", 1))
    chained.nodes["12"] = GraphNode("12", "LoraLoader", {"model": Link("4", 0), "clip": Link("4", 1),
                                                         "lora_name": "example_lora.safetensors",
                                                         "strength_model": 1.0, "strength_clip": 1.0})
    assert [p.node_id for p in validate(chained, engine.registry).problems] == ["10"]
    on_xl = load("lora", engine.registry, {("10", "lora_name"): "xl_lora.safetensors",
                                           ("4", "ckpt_name"): "sd_xl_base_1.0.safetensors"})
    assert validate(on_xl, engine.registry).ok


def test_sd2_checkpoint_runs_through_the_same_nodes(engine):
    result = engine.run(load("txt2img", engine.registry, {("4", "ckpt_name"): "sd2.safetensors"}))
    assert result.ok


def test_a_png_carries_its_workflow_back(engine, base, tmp_path):
    result = engine.run(load("txt2img", engine.registry, {("3", "seed"): 99}),
                        extra={"extra_pnginfo": {"workflow": {"nodes": [], "links": []}}})
    image = result.outputs["9"]["images"][0]
    png = tmp_path / "again.png"
    shutil.copy(base.output / image["filename"], png)
    graph = load_workflow(png, engine.registry)
    assert graph.nodes["3"].inputs["seed"] == 99
    assert engine.run(parse_api(graph.to_api())).cached  # the same graph again: served from the cache


def test_conditioning_zero_out_zeroes_embeddings_and_pooled_output_and_leaves_its_input():
    from nodes.sd.conditioning import ConditioningZeroOut

    emb, pooled = torch.ones(1, 77, 8), torch.ones(1, 4)
    cond = [(emb, {"pooled_output": pooled, "area": (8, 8, 0, 0)})]
    [(zero_emb, opts)] = ConditioningZeroOut().execute(cond)[0]
    assert not zero_emb.any() and not opts["pooled_output"].any() and opts["area"] == (8, 8, 0, 0)
    assert emb.all() and pooled.all() and cond[0][1]["pooled_output"] is pooled


def test_the_deprecated_loader_with_a_config_runs_and_its_config_sets_the_prediction(engine, base):
    # ComfyUI's CheckpointLoader (config_name, ckpt_name), which older workflows use.
    graph = load("txt2img", engine.registry)
    graph.nodes["4"].class_type = "CheckpointLoader"
    graph.nodes["4"].inputs["config_name"] = "v1-inference.yaml"
    result = engine.run(graph, keep=["4"])
    assert result.ok, result.error
    assert result.values["4"][0].prediction == "eps"
    (base.base / "models" / "configs").mkdir(parents=True, exist_ok=True)
    (base.base / "models" / "configs" / "mine.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    graph.nodes["4"].inputs["config_name"] = "mine.yaml"
    result = engine.run(graph, keep=["4"])
    assert result.ok, result.error
    assert result.values["4"][0].prediction == "v"
