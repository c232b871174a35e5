"""Loader nodes: checkpoints, standalone VAEs and LoRAs, each loaded once per file and shared."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ldm.latent_preview import register_vae
from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.models import (
    Clip,
    DiffusionModel,
    Vae,
    device_and_dtype,
    devices_of,
    file_fingerprint,
    load_device,
    schedule_of,
)
from nodes.spec import Combo, Float, InputSpec, Output, Socket

log = logging.getLogger(__name__)


def model_path(kind: str, name: str) -> Path:
    path = get_paths().find_model(kind, name)
    if path is None:
        folders = ", ".join(str(p) for p in get_paths().model_dirs(kind))
        raise FileNotFoundError(f"{kind} file {name!r} not found (looked in {folders})")
    return path


def shared_model(node: Node, key: tuple, load: Any) -> Any:
    """Load through the engine's model cache when there is one, so every node shares one copy."""
    models = getattr(getattr(node.ctx, "services", None), "models", None)
    return models.get_or_load(key, load) if models is not None else load()


def shared_file_model(node: Node, kind: str, path: Path, read: Any) -> Any:
    """The model of the file `path`, read once per file version, device and dtype and shared through the model
    cache: `read(path, device=, dtype=)` gives a result with `.model`, and `.unused_keys`, which are logged."""
    _, dtype, _ = device_and_dtype(node.ctx)
    device = load_device(node.ctx)

    def load() -> Any:
        loaded = read(path, device=device, dtype=dtype)
        if loaded.unused_keys:
            log.warning("%s: %d unused keys, e.g. %s", path.name, len(loaded.unused_keys), loaded.unused_keys[:3])
        return loaded.model

    return shared_model(node, (kind, str(path), str(file_fingerprint(path)), str(device), str(dtype)), load)


@functools.lru_cache(maxsize=64)
def _header_family(kind: str, path: str, fingerprint: str) -> str | None:
    """The model family a checkpoint, LoRA or ControlNet file is for, from its header (cached per file version)."""
    from ldm.lora import LoraError, lora_family, peek_lora

    if kind == "controlnet":
        from ldm.controlnet import peek_controlnet_family

        return peek_controlnet_family(path)

    if kind == "checkpoints":
        from safetensors import SafetensorError

        from ldm.ace_step15_files import is_ace_step15_checkpoint_file
        from ldm.checkpoint import peek_family
        from ldm.chroma_files import is_chroma_file
        from ldm.flux_files import is_flux_file
        from ldm.ltx2_files import is_ltx2_file
        from ldm.ltxv_files import is_ltxv_file
        from ldm.lumina2_files import is_lumina2_checkpoint_file
        from ldm.sd3_files import is_sd3_file
        from ldm.stable_audio_files import is_stable_audio_file

        # The same order as load_checkpoint_outputs, so validation names the family the loader will load.
        try:
            if is_lumina2_checkpoint_file(path):
                return "lumina2"
            if is_chroma_file(path):
                return "chroma"
            if is_flux_file(path):
                return "flux"
            if is_sd3_file(path):
                return "sd3"
            if is_ltx2_file(path):  # before LTX-Video: its transformer's names are a superset
                return "ltx2"
            if is_ltxv_file(path):
                return "ltxv"
            if is_stable_audio_file(path):
                return "stable_audio"
            if is_ace_step15_checkpoint_file(path):
                return "ace_step15"
        except (SafetensorError, OSError, ValueError):  # unreadable: CheckpointLoaderSimple reports it when it runs
            return None
        family = peek_family(path)
        return None if family is None else family.name
    try:
        lora = peek_lora(path)
    except (LoraError, OSError, ValueError):  # unreadable: LoraLoader reports it when it runs
        return None
    family = None if lora is None else lora_family(lora)
    if family == "flux":  # "flux.1" where its names or shapes tell Flux.1's from FLUX.2's (which share the layout)
        from ldm.lora_flux2 import is_flux1_lora

        return FLUX1_LORA if is_flux1_lora(lora.weights) else family
    return family


# A LoRA file's family where its header tells Flux.1's from FLUX.2's (`_header_family`).
FLUX1_LORA = "flux.1"


def header_family(kind: str, name: Any) -> str | None:
    """The family of a file of `kind` ("checkpoints", "loras" or "controlnet") named by a node input, or None."""
    path = get_paths().find_model(kind, str(name))
    return None if path is None else _header_family(kind, str(path), str(file_fingerprint(path)))


def model_file(kind: str) -> InputSpec:
    """A combo of the model files of one kind, listed afresh each time; a name not among them is reported
    with the folders that were searched."""
    return Combo(lambda: get_paths().list_models(kind), tooltip=f"a file in models/{kind}",
                 choices_where=lambda: _searched(kind))


def _searched(kind: str) -> str:
    """The folders of one model kind, relative to the base folder: an error answer may go to a remote client,
    which has no business knowing where the server's files are. Folders elsewhere show their last two parts."""
    paths = get_paths()
    bundled = paths.bundled_models / kind if paths.bundled_models else None
    shown = []
    for folder in paths.model_dirs(kind):
        if folder == bundled:
            shown.append("Loom's bundled models")
            continue
        try:
            shown.append(str(folder.relative_to(paths.base)))
        except ValueError:
            shown.append(f".../{folder.parent.name}/{folder.name}")
    return ", ".join(dict.fromkeys(shown))


class CheckpointLoaderSimple(Node):
    """Loads a single-file SD1.x, SD2.x or SDXL checkpoint (.safetensors, or .ckpt read safely), or an all-in-one
    Flux.1 or Chroma checkpoint (.safetensors), or LTX-Video's all-in-one ltx-video-2b-v0.9*.safetensors (its
    transformer and VAE; its CLIP output only says to load T5-XXL with CLIPLoader type ltxv), Stable Audio Open's
    single file (its CLIP likewise says to load T5-base), ACE-Step 1.5's all-in-one checkpoint (the model, its
    text encoder and language model, its VAE) or LTX-2's (the audio-video transformer and the video VAE; its audio
    VAE through LTXVAudioVAELoader, its text encoder through LTXAVTextEncoderLoader)."""

    display_name = "Load Checkpoint"
    category = "loaders"
    ckpt_name = model_file("checkpoints")
    outputs = (Output("MODEL", tooltip="the denoising UNet"), Output("CLIP", tooltip="the text encoder"),
               Output("VAE", tooltip="the autoencoder between pixels and latents"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("checkpoints", str(inputs.get("ckpt_name", ""))))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        family = header_family("checkpoints", inputs.get("ckpt_name"))
        if family is None:
            return {}
        from nodes.sd.edit_validation import model_file_facts  # its name, and a Flux model's edit kind

        path = get_paths().find_model("checkpoints", str(inputs.get("ckpt_name")))
        return {0: {"family": family, **model_file_facts(path, inputs.get("ckpt_name"), family)},
                1: {"family": family}}

    def execute(self, ckpt_name: str) -> tuple[DiffusionModel, Clip, Vae]:
        return load_checkpoint_outputs(self, ckpt_name, *engine_weight_dtypes(self))


def engine_weight_dtypes(node: Node) -> tuple[str, str]:
    """The engine's `--weights-dtype` and `--te-weights-dtype` (both "default" without a device manager)."""
    devices = devices_of(node.ctx)
    return ("default", "default") if devices is None else (devices.options.weights_dtype,
                                                           devices.options.te_weights_dtype)


_LTXV_T5 = ("load T5-XXL (t5xxl_fp16.safetensors or an fp8 copy) with CLIPLoader (Load CLIP) type ltxv and encode "
            "with its CLIP")
_STABLE_AUDIO_T5 = ("load T5-base (t5-base.safetensors) with CLIPLoader (Load CLIP) type stable_audio and encode "
                    "with its CLIP")
# The families whose checkpoints hold no text encoder, and where their prompts' encoder comes from (None: SD3's).
_LTX2_GEMMA = ("load Gemma 3 12B (gemma_3_12B_it.safetensors) with this checkpoint through LTXAVTextEncoderLoader "
               "and encode with its CLIP")
_OWN_TEXT_FILES = {"sd3": None, "ltxv": _LTXV_T5, "stable_audio": _STABLE_AUDIO_T5, "ltx2": _LTX2_GEMMA}


def load_checkpoint_outputs(node: Node, ckpt_name: str, weights_dtype: str, te_weights_dtype: str,
                            v_prediction: bool | None = None) -> tuple[DiffusionModel, Clip, Vae]:
    """Load (or share) a checkpoint on the offload device; `weights_dtype` "fp8"/"int8" shrinks the UNet's
    weights, `te_weights_dtype` the text encoders' (the VAE stays in its own dtype); `v_prediction`, when
    given, overrides what the file says about its prediction type."""
    from ldm.ace_step15_files import is_ace_step15_checkpoint_file, load_ace_step15_checkpoint
    from ldm.checkpoint import load_checkpoint
    from ldm.chroma_files import is_chroma_file, load_chroma_checkpoint
    from ldm.flux_files import is_flux_file, load_flux_checkpoint
    from ldm.ltx2_files import is_ltx2_file, load_ltx2_checkpoint
    from ldm.ltxv_files import is_ltxv_file, load_ltxv_checkpoint
    from ldm.lumina2_files import is_lumina2_checkpoint_file, load_lumina2_checkpoint
    from ldm.sd3_files import is_sd3_file, load_sd3_checkpoint
    from ldm.stable_audio_files import is_stable_audio_file, load_stable_audio_checkpoint

    path = model_path("checkpoints", ckpt_name)
    _, dtype, vae_dtype = device_and_dtype(node.ctx)
    device = load_device(node.ctx)

    def load() -> Any:
        from ldm.quant import quantize_

        if is_lumina2_checkpoint_file(path):  # lumina_2.safetensors: transformer, Flux's VAE and Gemma-2-2B
            loaded = load_lumina2_checkpoint(path, device=device, dtype=dtype)
        elif is_chroma_file(path):  # an all-in-one Chroma checkpoint: before Flux, whose probe keys it also has
            loaded = load_chroma_checkpoint(path, device=device, dtype=dtype)
        elif is_flux_file(path):  # an all-in-one Flux.1 checkpoint (ComfyUI's layout)
            loaded = load_flux_checkpoint(path, device=device, dtype=dtype)
        elif is_sd3_file(path):  # SD3 / SD3.5 (Stability's layout), with or without its text encoders
            loaded = load_sd3_checkpoint(path, device=device, dtype=dtype)
        elif is_ltx2_file(path):  # LTX-2's all-in-one file: transformer and video VAE (audio, text: other loaders)
            loaded = load_ltx2_checkpoint(path, device=device, dtype=dtype)
        elif is_ltxv_file(path):  # LTX-Video's all-in-one file: transformer and video VAE, no text encoder
            loaded = load_ltxv_checkpoint(path, device=device, dtype=dtype)
        elif is_stable_audio_file(path):  # Stable Audio Open: transformer, seconds conditioners, audio VAE
            loaded = load_stable_audio_checkpoint(path, device=device, dtype=dtype)
        elif is_ace_step15_checkpoint_file(path):  # ACE-Step 1.5's all-in-one: model, VAE, encoder and LM
            loaded = load_ace_step15_checkpoint(path, device=device, dtype=dtype)
        else:
            loaded = load_checkpoint(path, device=device, dtype=dtype, v_prediction=v_prediction)
        if vae_dtype != dtype:
            loaded.vae.to(dtype=vae_dtype)
        quantize_(loaded.unet, weights_dtype)
        if loaded.text_encoder is not None:
            quantize_(loaded.text_encoder, te_weights_dtype)
        if loaded.unused_keys:
            log.warning("%s: %d unused keys, e.g. %s", path.name, len(loaded.unused_keys), loaded.unused_keys[:3])
        return loaded

    key = ("checkpoint", str(path), str(file_fingerprint(path)), str(device), str(dtype), weights_dtype,
           te_weights_dtype, v_prediction)
    loaded = shared_model(node, key, load)
    encoder = loaded.text_encoder
    if encoder is None and loaded.family.name in _OWN_TEXT_FILES:  # their encoders come from their own files
        from nodes.sd.sd3 import NoTextEncoders

        advice = _OWN_TEXT_FILES[loaded.family.name]
        encoder = NoTextEncoders(ckpt_name) if advice is None else NoTextEncoders(ckpt_name, advice)
    if encoder is None:
        raise ValueError(f"{ckpt_name} has no text encoder weights; it cannot encode prompts")
    register_vae(loaded.vae)  # the step previews' colours for this latent space (fitted once per VAE)
    return (DiffusionModel(loaded.unet, loaded.family, ckpt_name, schedule=schedule_of(loaded.family),
                           noise_augmentor=loaded.noise_augmentor),
            Clip(encoder, loaded.family.name, ckpt_name),
            Vae(loaded.vae, ckpt_name))


class CheckpointLoaderWeightDtype(Node):
    """Loads a checkpoint with its UNet weights, and optionally its text encoders', stored smaller: fp8
    (e4m3, computed in fp16/bf16 layer by layer; about half the memory of fp16) or int8 (torchao, where
    installed). fp8 text encoders move SDXL's images more than its fp8 UNet does."""

    display_name = "Load Checkpoint (weight dtype)"
    category = "advanced/loaders"
    ckpt_name = model_file("checkpoints")
    weight_dtype = Combo(["default", "fp8_e4m3fn", "int8"], tooltip="how the UNet's weights are stored")
    text_encoder_dtype = Combo(["default", "fp8_e4m3fn", "int8"], optional=True,
                               tooltip="how the text encoders' weights are stored")
    outputs = (Output("MODEL"), Output("CLIP"), Output("VAE"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return CheckpointLoaderSimple.fingerprint(inputs)

    def execute(self, ckpt_name: str, weight_dtype: str,
                text_encoder_dtype: str = "default") -> tuple[DiffusionModel, Clip, Vae]:
        names = {"fp8_e4m3fn": "fp8"}
        return load_checkpoint_outputs(self, ckpt_name, names.get(weight_dtype, weight_dtype),
                                       names.get(text_encoder_dtype, text_encoder_dtype))


# The LDM configs ComfyUI ships in models/configs, which workflows saved there name.
LDM_CONFIGS = ("anything_v3.yaml", "v1-inference.yaml", "v1-inference_clip_skip_2.yaml",
               "v1-inference_clip_skip_2_fp16.yaml", "v1-inference_fp16.yaml", "v1-inpainting-inference.yaml",
               "v2-inference-v.yaml", "v2-inference-v_fp32.yaml", "v2-inference.yaml", "v2-inference_fp32.yaml",
               "v2-inpainting-inference.yaml")


def config_names() -> list[str]:
    return sorted({*LDM_CONFIGS, *get_paths().list_models("configs")})


def config_predicts_v(config_name: str) -> bool:
    """Whether an LDM config describes a v-predicting model: its `parameterization: "v"` where the file is
    in models/configs, else the naming of the stock configs (v2-inference-v*.yaml)."""
    path = get_paths().find_model("configs", config_name)
    if path is not None:
        return re.search(r"""parameterization:\s*["']?v["']?\s*$""", path.read_text(errors="replace"),
                         re.MULTILINE) is not None
    return Path(config_name).stem.startswith("v2-inference-v")


class CheckpointLoader(Node):
    """ComfyUI's deprecated loader that also names an LDM config (.yaml), for workflows saved with it. The
    model family comes from the weights, as in Load Checkpoint; the config only says whether the model
    predicts v."""

    display_name = "Load Checkpoint With Config (DEPRECATED)"
    category = "advanced/loaders"
    config_name = Combo(config_names, tooltip="an LDM config: v2-inference-v.yaml for v-prediction models")
    ckpt_name = model_file("checkpoints")
    outputs = (Output("MODEL"), Output("CLIP"), Output("VAE"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        config = get_paths().find_model("configs", str(inputs.get("config_name", "")))
        return [CheckpointLoaderSimple.fingerprint(inputs), file_fingerprint(config)]

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return CheckpointLoaderSimple.output_facts(inputs, linked)

    def execute(self, config_name: str, ckpt_name: str) -> tuple[DiffusionModel, Clip, Vae]:
        return load_checkpoint_outputs(self, ckpt_name, *engine_weight_dtypes(self),
                                       v_prediction=config_predicts_v(config_name))


class VAELoader(Node):
    """Loads a standalone VAE file to use instead of a checkpoint's own: an image VAE, FLUX.2's, Wan's video VAE,
    LTX-Video's (a VAE-only file, or the VAE part of an all-in-one file), HunyuanVideo 1.5's, HunyuanImage 2.1's, or an
    Oobleck audio VAE (Stable Audio's, in its own file or its checkpoint's; ACE-Step 1.5's)."""

    display_name = "Load VAE"
    category = "loaders"
    vae_name = model_file("vae")
    outputs = (Output("VAE"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("vae", str(inputs.get("vae_name", ""))))

    def execute(self, vae_name: str) -> tuple[Vae]:
        from ldm.checkpoint import load_vae, read_shapes
        from ldm.flux2_vae import load_flux2_vae, peek_flux2_vae
        from ldm.hunyuan_image21_vae import load_hunyuan_image21_vae, peek_hunyuan_image21_vae
        from ldm.hunyuan_video15_vae import load_hunyuan_video15_vae, peek_hunyuan_video15_vae
        from ldm.ltxv_vae import load_ltxv_vae, peek_ltxv_vae
        from ldm.oobleck import SAO_PREFIX, is_oobleck, load_oobleck
        from ldm.qwen_image21_vae import load_qwen_image21_vae, peek_qwen_image21_vae
        from ldm.wan_vae_files import load_wan_vae, peek_wan_vae

        path = model_path("vae", vae_name)
        _, _, vae_dtype = device_and_dtype(self.ctx)
        device = load_device(self.ctx)

        def load() -> Any:
            if peek_flux2_vae(path):  # FLUX.2's: 32 channels packed 2x2 into 128, normalised
                return load_flux2_vae(path, device=device, dtype=vae_dtype)
            if peek_qwen_image21_vae(path):  # Qwen-Image 2.1's RGBA VAE: Wan 2.2's names, frame kernel 1
                return load_qwen_image21_vae(path, device=device, dtype=vae_dtype)
            if peek_wan_vae(path):  # Wan's causal video VAE (2.1's or 2.2's)
                return load_wan_vae(path, device=device, dtype=vae_dtype)
            if peek_ltxv_vae(path):  # LTX-Video's causal video VAE (0.9.0, 0.9.1 or 0.9.5)
                return load_ltxv_vae(path, device=device, dtype=vae_dtype)
            if peek_hunyuan_video15_vae(path):  # HunyuanVideo 1.5's: 32 channels, 16x in space, 4x in time
                return load_hunyuan_video15_vae(path, device=device, dtype=vae_dtype)
            if peek_hunyuan_image21_vae(path):  # HunyuanImage 2.1's: 64 channels at 1/32 of the picture
                return load_hunyuan_image21_vae(path, device=device, dtype=vae_dtype)
            shapes = read_shapes(path)
            if shapes is not None and (is_oobleck(shapes) or is_oobleck(shapes, SAO_PREFIX)):
                # an audio VAE (Stable Audio's, ACE-Step 1.5's), kept in float32: bf16 moves its sound by percents
                return load_oobleck(path, device=device, dtype=torch.float32)
            return load_vae(path, device=device, dtype=vae_dtype).vae

        vae = shared_model(self, ("vae", str(path), str(file_fingerprint(path)), str(device), str(vae_dtype)), load)
        register_vae(vae)  # the step previews' colours for this latent space (fitted once per VAE)
        return (Vae(vae, vae_name),)


# Model families whose LoRAs Loom does not apply yet: LoraLoader refuses them by name before the run.
NO_LORA_FAMILIES = {"hunyuan_image21": "HunyuanImage 2.1"}


class LoraLoader(Node):
    """Applies a LoRA to the UNet and the text encoder, each with its own strength.

    The loaded models are never changed: the result is a patched copy that shares every
    untouched weight, so workflows with and without the LoRA both stay right.
    """

    display_name = "Load LoRA"
    category = "loaders"
    model = Socket("MODEL")
    clip = Socket("CLIP")
    lora_name = model_file("loras")
    strength_model = Float(1.0, min=-100.0, max=100.0, step=0.01)
    strength_clip = Float(1.0, min=-100.0, max=100.0, step=0.01)
    outputs = (Output("MODEL"), Output("CLIP"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("loras", str(inputs.get("lora_name", ""))))

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        """A LoRA recognisably for another family than the checkpoint upstream is refused before the run."""
        from ldm.lora import family_fits

        model_family = linked.get("model", {}).get("family") or linked.get("clip", {}).get("family")
        if model_family in NO_LORA_FAMILIES:
            return f"Loom does not apply LoRAs to {NO_LORA_FAMILIES[model_family]} models yet"
        lora = header_family("loras", inputs.get("lora_name"))
        if model_family is None or lora is None or family_fits(lora, model_family):
            return None
        if lora == FLUX1_LORA and model_family != "flux2":  # named Flux.1's only where that is why it does not fit
            lora = "flux"
        return (f"{inputs['lora_name']} is a {lora.upper()} LoRA; it does not fit the {model_family.upper()} "
                "model it is applied to")

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {}), 1: linked.get("clip", {})}  # a LoRA keeps the model's family

    def execute(self, model: DiffusionModel, clip: Clip, lora_name: str, strength_model: float,
                strength_clip: float) -> tuple[DiffusionModel, Clip]:
        from ldm.lora import LoraError, apply_lora, check_lora_family, takes_no_lora, unmatched_lora_keys

        if strength_model == 0 and strength_clip == 0:  # as ComfyUI: off, the file not even read
            return model, clip
        lora = shared_lora(self, lora_name)
        check_lora_family(lora, model.family.name)
        unmatched = unmatched_lora_keys(lora, model.unet, clip.encoder)
        if len(unmatched) == len([k for keys in lora.sources.values() for k in keys]) + len(lora.unknown_keys):
            if takes_no_lora(clip.encoder):  # e.g. Comfy-Org's Gemma 3 LoRA for LTX-2's text encoder
                raise LoraError(f"{lora_name} patches no layer of this model ({model.family.name.upper()}); if it "
                                f"is a LoRA for its text encoder ({clip.source}), Loom applies none to that encoder "
                                "yet: bypass the LoraLoader node to run without it")
            raise LoraError(f"{lora_name} patches no layer of this model ({model.family.name.upper()}): it is a "
                            "LoRA for another kind of model")
        left = sorted(set(unmatched) - {k for keys in lora.incomplete.values() for k in keys})
        if left:
            why = " (its text encoder takes no LoRA: the diffusion model alone is patched)" if takes_no_lora(
                clip.encoder) else ""
            log.warning("%s: %d keys patch nothing in this model%s, e.g. %s", lora_name, len(left), why, left[:3])
        with torch.no_grad():
            unet = apply_lora(model.unet, lora, strength_model)
            encoder = apply_lora(clip.encoder, lora, strength_clip)
        return model.with_unet(unet, lora_name, lora_metadata(lora)), clip.with_encoder(encoder, lora_name)


def lora_metadata(lora: Any) -> dict[str, str]:
    """A loaded LoRA's file metadata (safetensors' string header; {} for other files), which the model it patches
    keeps for GetICLoRAParameters."""
    from ldm.checkpoint import read_metadata

    return {} if lora.path is None else read_metadata(lora.path)


def shared_lora(node: Node, lora_name: str) -> Any:
    """The LoRA file `lora_name` of models/loras, loaded once per file version through the model cache (LoraLoader's
    and the hook nodes' alike); incomplete LyCORIS layers are warned about."""
    from ldm.lora import load_lora

    path = model_path("loras", lora_name)
    lora = shared_model(node, ("lora", str(path), str(file_fingerprint(path))), lambda: load_lora(path))
    _warn_incomplete(lora_name, lora)
    return lora


def _warn_incomplete(lora_name: str, lora: Any) -> None:
    if lora.incomplete:
        log.warning("%s: %d layers have incomplete or malformed weights and are left out, e.g. %s", lora_name,
                    len(lora.incomplete), lora.incomplete_note())


class LoraLoaderModelOnly(Node):
    """Applies a LoRA to the UNet alone (its text-encoder weights, if any, are left unused)."""

    category = "loaders"
    model = Socket("MODEL")
    lora_name = model_file("loras")
    strength_model = Float(1.0, min=-100.0, max=100.0, step=0.01)
    outputs = (Output("MODEL"),)

    fingerprint = LoraLoader.fingerprint
    check_links = LoraLoader.check_links

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, lora_name: str, strength_model: float) -> tuple[DiffusionModel]:
        from ldm.lora import apply_lora, check_lora_family, match_lora

        if strength_model == 0:  # as ComfyUI: off, the file not even read
            return (model,)
        lora = shared_lora(self, lora_name)
        check_lora_family(lora, model.family.name)
        if not match_lora(model.unet, lora):
            log.warning("%s: no key patches this model's UNet (a text-encoder-only LoRA?)", lora_name)
        with torch.no_grad():
            unet = apply_lora(model.unet, lora, strength_model)
        return (model.with_unet(unet, lora_name, lora_metadata(lora)),)


NODES = [CheckpointLoaderSimple, CheckpointLoaderWeightDtype, CheckpointLoader, VAELoader, LoraLoader,
         LoraLoaderModelOnly]
