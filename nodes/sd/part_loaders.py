"""ComfyUI's loaders of separately distributed parts: a UNet-only file, one or two CLIP text-encoder files."""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.loaders import _searched, engine_weight_dtypes, shared_model
from nodes.sd.models import Clip, DiffusionModel, device_and_dtype, file_fingerprint, load_device, schedule_of
from nodes.spec import Combo, InputSpec, Output

log = logging.getLogger(__name__)

# ComfyUI's folder names, each with its legacy one (models/unet, models/clip), searched in this order.
DIFFUSION_MODELS = ("diffusion_models", "unet")
TEXT_ENCODERS = ("text_encoders", "clip")

# ComfyUI's choices, so that its workflow files validate; Loom loads the SD ones and refuses the rest by name.
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
CLIP_TYPES = ("stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2", "ovis",
              "longcat_image", "cogvideox", "lens", "pixeldit", "ideogram4", "boogu", "krea2", "joyimage", "mage",
              "minimax", "yue2")
DUAL_CLIP_TYPES = ("sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image", "hunyuan_video_15",
                   "kandinsky5", "kandinsky5_image", "ltxv", "newbie", "ace")
DEVICES = ("default", "cpu")
# A UNETLoader weight_dtype -> Loom's weights dtype ("default": the engine's --weights-dtype). Loom stores fp8
# as e4m3 scaled per output channel and computes in the model dtype, so "_fast" (fp8 matmuls) is the same.
_UNET_WEIGHTS = {"fp8_e4m3fn": "fp8", "fp8_e4m3fn_fast": "fp8"}
_E5M2 = ("weight_dtype fp8_e5m2: Loom stores fp8 weights as e4m3 only; choose fp8_e4m3fn (the same memory) or "
         "default")


def part_names(kinds: tuple[str, ...]) -> list[str]:
    """The files of a part folder and its legacy one, sorted, without duplicates."""
    return sorted({name for kind in kinds for name in get_paths().list_models(kind)})


def part_path(kinds: tuple[str, ...], name: str) -> Path | None:
    return next((p for kind in kinds if (p := get_paths().find_model(kind, name)) is not None), None)


def _required_path(kinds: tuple[str, ...], name: str) -> Path:
    path = part_path(kinds, name)
    if path is None:
        raise FileNotFoundError(f"{kinds[0]} file {name!r} not found (looked in {_where(kinds)})")
    return path


def _where(kinds: tuple[str, ...]) -> str:
    return ", ".join(_searched(kind) for kind in kinds)


def part_file(kinds: tuple[str, ...]) -> InputSpec:
    return Combo(lambda: part_names(kinds), tooltip=f"a file in models/{kinds[0]} (or models/{kinds[1]})",
                 choices_where=lambda: _where(kinds))


def _fingerprint(kinds: tuple[str, ...], *names: Any) -> Any:
    return [file_fingerprint(part_path(kinds, str(name))) for name in names]


@functools.lru_cache(maxsize=64)
def _header(part: str, path: str, fingerprint: str) -> tuple[str | None, str | None]:
    """(UNet family or text-encoder kind, refusal) from a file's header, cached per file version; (None, None)
    where the header cannot tell (a .ckpt, an unreadable file: the loader reports it when it runs)."""
    from safetensors import SafetensorError

    from ldm.checkpoint import CheckpointError
    from ldm.flux_files import peek_flux
    from ldm.parts import peek_text_encoder, peek_unet
    from ldm.sd3_unet import peek_sd3

    try:
        if part == "unet":
            from ldm.ace_step15_files import peek_ace_step15
            from ldm.chroma_files import peek_chroma  # first: Chroma files also have Flux's probe keys
            from ldm.flux2_files import peek_flux2  # first: Flux.1's peek may misread its names
            from ldm.hidream_files import peek_hidream
            from ldm.hunyuan_image21_files import peek_hunyuan_image21
            from ldm.hunyuan_video15_files import peek_hunyuan_video15
            from ldm.ltx2_files import peek_ltx2
            from ldm.ltxv_files import peek_ltxv
            from ldm.lumina2_files import peek_lumina2
            from ldm.qwen_image21_files import peek_qwen_image21
            from ldm.qwen_image_files import peek_qwen_image  # first: diffusers-like names Flux's peek would refuse
            from ldm.wan_files import peek_wan
            from ldm.z_image_files import peek_z_image  # first: Flux's peek may misread its names

            family = (peek_flux2(path) or peek_qwen_image21(path) or peek_z_image(path) or peek_lumina2(path)
                      or peek_qwen_image(path) or peek_hidream(path) or peek_hunyuan_video15(path)
                      or peek_hunyuan_image21(path) or peek_chroma(path) or peek_flux(path)
                      or peek_sd3(path) or peek_wan(path) or peek_ltx2(path) or peek_ltxv(path) or peek_ace_step15(path)
                      or peek_unet(path))
            return (None if family is None else family.name), None
        return peek_text_encoder(path), None
    except CheckpointError as e:
        return None, str(e)
    except (SafetensorError, OSError, ValueError):
        return None, None


def header(part: str, kinds: tuple[str, ...], name: Any) -> tuple[str | None, str | None]:
    path = part_path(kinds, str(name))
    return (None, None) if path is None else _header(part, str(path), str(file_fingerprint(path)))


def _text_family(kinds: list[str | None]) -> str | None:
    from ldm.parts import TEXT_FAMILIES

    return None if None in kinds else TEXT_FAMILIES.get(tuple(sorted(k for k in kinds if k)))


def _unsupported_type(value: Any, supported: str, loads: str) -> str:
    return (f"type {value!r} is for a model family whose text encoders Loom does not support; Loom loads type "
            f"{supported} ({loads})")


class UNETLoader(Node):
    """Loads a UNet-only file (SD1.x, SD2.x, SDXL or the SDXL refiner; LDM or diffusers layout), a Flux.1
    diffusion model (Black Forest Labs' layout) or an SD3/SD3.5 transformer (Stability's layout, with or without
    `model.diffusion_model.`; fp8 and scaled fp8 too), from models/diffusion_models or models/unet. Flux and SD3
    transformers in diffusers' layout load too (ldm.diffusers_dit), a sharded one from any of its shards; Chroma's
    transformer (ldm.chroma_files), Wan 2.1 / 2.2's video transformers (ldm.wan_files), LTX-Video 0.9.x's
    (ldm.ltxv_files), Qwen-Image's (ldm.qwen_image_files), Z-Image's (ldm.z_image_files), Lumina Image 2.0's
    (ldm.lumina2_files), FLUX.2's (dev and klein, ldm.flux2_files) and HiDream-I1's (ldm.hidream_files) too. fp8
    weight_dtypes store the weights in fp8 (e4m3).

    An LTX-Video transformer alone carries no latent statistics: those (per-channel mean and std) come from the VAE
    part of an all-in-one ltx-video-2b-v0.9*.safetensors (CheckpointLoaderSimple); a bare transformer's family has
    none, which is logged as a warning."""

    display_name = "Load Diffusion Model"
    category = "advanced/loaders"
    unet_name = part_file(DIFFUSION_MODELS)
    weight_dtype = Combo(WEIGHT_DTYPES, extra={"advanced": True},
                         tooltip="default: the engine's --weights-dtype; fp8_e4m3fn(_fast): fp8 weights; "
                                 "fp8_e5m2 is not supported")
    outputs = (Output("MODEL"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _fingerprint(DIFFUSION_MODELS, inputs.get("unet_name", ""))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        if inputs.get("weight_dtype") == "fp8_e5m2":
            return _E5M2
        return header("unet", DIFFUSION_MODELS, inputs.get("unet_name"))[1]

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        family, _ = header("unet", DIFFUSION_MODELS, inputs.get("unet_name"))
        if family != "flux":
            return {} if family is None else {0: {"family": family}}
        from nodes.sd.edit_validation import model_file_facts  # its name and edit kind, for the KSampler's checks

        path = part_path(DIFFUSION_MODELS, str(inputs.get("unet_name")))
        return {0: {"family": family, **model_file_facts(path, inputs.get("unet_name"), family)}}

    def execute(self, unet_name: str, weight_dtype: str) -> tuple[DiffusionModel]:
        from ldm.flux_files import is_flux_file, load_flux_unet
        from ldm.parts import load_unet
        from ldm.quant import quantize_
        from ldm.sd3_unet import is_sd3_unet_file, load_sd3_unet

        if weight_dtype == "fp8_e5m2":
            raise ValueError(_E5M2)
        weights = _UNET_WEIGHTS.get(weight_dtype) or engine_weight_dtypes(self)[0]
        path = _required_path(DIFFUSION_MODELS, unet_name)
        _, dtype, _ = device_and_dtype(self.ctx)
        device = load_device(self.ctx)

        def load() -> Any:
            from ldm.ace_step15_files import is_ace_step15_file, load_ace_step15_unet
            from ldm.chroma_files import is_chroma_file, load_chroma_unet
            from ldm.diffusers_dit import diffusers_file_kind  # Flux in diffusers' layout (SD3's: is_sd3_unet_file)
            from ldm.flux2_files import is_flux2_file, load_flux2_unet
            from ldm.hidream_files import is_hidream_file, load_hidream_unet
            from ldm.hunyuan_image21_files import is_hunyuan_image21_file, load_hunyuan_image21_unet
            from ldm.hunyuan_video15_files import is_hunyuan_video15_file, load_hunyuan_video15_unet
            from ldm.ltx2_files import is_ltx2_file, load_ltx2_unet
            from ldm.ltxv_files import is_ltxv_file, load_ltxv_unet
            from ldm.lumina2_files import is_lumina2_file, load_lumina2_unet
            from ldm.qwen_image21_files import is_qwen_image21_file, load_qwen_image21_unet
            from ldm.qwen_image_files import is_qwen_image_file, load_qwen_image_unet
            from ldm.wan_files import is_wan_file, load_wan_unet
            from ldm.z_image_files import is_z_image_file, load_z_image_unet

            if is_flux2_file(path):  # first: Flux.1's probes may misread its names
                loader = load_flux2_unet
            elif is_qwen_image21_file(path):
                loader = load_qwen_image21_unet
            elif is_z_image_file(path):  # first: Flux's probes may misread its names
                loader = load_z_image_unet
            elif is_lumina2_file(path):  # Z-Image's architecture without its pad tokens
                loader = load_lumina2_unet
            elif is_qwen_image_file(path):  # first: its diffusers-like names are not Flux's diffusers layout
                loader = load_qwen_image_unet
            elif is_hidream_file(path):  # diffusers-like names too
                loader = load_hidream_unet
            elif is_wan_file(path):
                loader = load_wan_unet
            elif is_hunyuan_video15_file(path):  # before Flux: its double_blocks / txt_in names are Flux-like
                loader = load_hunyuan_video15_unet
            elif is_hunyuan_image21_file(path):  # likewise (and single_blocks)
                loader = load_hunyuan_image21_unet
            elif is_ltx2_file(path):  # before LTX-Video: its transformer's names are a superset
                loader = load_ltx2_unet
            elif is_ltxv_file(path):
                loader = load_ltxv_unet
            elif is_ace_step15_file(path):
                loader = load_ace_step15_unet
            elif is_chroma_file(path):  # before Flux: the same layout
                loader = load_chroma_unet
            elif is_flux_file(path) or diffusers_file_kind(path) == "flux":
                loader = load_flux_unet
            else:
                loader = load_sd3_unet if is_sd3_unet_file(path) else load_unet
            loaded = loader(path, device=device, dtype=dtype)
            if loaded.family.name == "ltxv" and loaded.family.latent_mean is None:
                log.warning("%s: an LTX-Video transformer without its VAE's latent statistics (they come from the VAE "
                            "part of an all-in-one ltx-video-2b-v0.9*.safetensors); latents are taken as they are",
                            path.name)
            quantize_(loaded.unet, weights)
            if loaded.unused_keys:
                log.warning("%s: %d unused keys, e.g. %s", path.name, len(loaded.unused_keys), loaded.unused_keys[:3])
            return loaded

        key = ("unet", str(path), str(file_fingerprint(path)), str(device), str(dtype), weights)
        loaded = shared_model(self, key, load)
        return (DiffusionModel(loaded.unet, loaded.family, unet_name, schedule=schedule_of(loaded.family)),)


def load_clip(node: Node, names: tuple[str, ...], device: str, load_files: Callable[..., Any] | None = None,
              family: str | None = None) -> Clip:
    """Load (or share) text-encoder files as one CLIP with `load_files(paths, device=, dtype=)` (SD's
    `ldm.parts.load_text_encoders` unless given; a result with `.encoder`, `.unused_keys` and, unless `family`
    names it, `.family`): on the offload device in the model dtype, or with device "cpu" in float32 on the CPU,
    pinned there; the engine's --te-weights-dtype applies."""
    import torch

    from ldm.parts import load_text_encoders
    from ldm.quant import quantize_

    load_files = load_files or load_text_encoders
    paths = [_required_path(TEXT_ENCODERS, name) for name in names]
    weights = engine_weight_dtypes(node)[1]
    pinned = device == "cpu"
    target, dtype = (torch.device("cpu"), torch.float32) if pinned else (load_device(node.ctx),
                                                                          device_and_dtype(node.ctx)[1])

    def load() -> Any:
        loaded = load_files(paths, device=target, dtype=dtype)
        loaded.encoder.pinned_to_cpu = pinned  # the engine leaves a pinned encoder on the CPU
        quantize_(loaded.encoder, weights)
        if loaded.unused_keys:
            log.warning("%d unused keys, e.g. %s", len(loaded.unused_keys), loaded.unused_keys[:3])
        return loaded

    key = (load_files.__qualname__, tuple((str(p), str(file_fingerprint(p))) for p in paths), str(target),
           str(dtype), weights, pinned)
    loaded = shared_model(node, key, load)
    return Clip(loaded.encoder, family or loaded.family, " + ".join(names))


@functools.lru_cache(maxsize=64)
def text_kind(path: str, fingerprint: str) -> tuple[str | None, str | None]:
    """("t5xxl", "t5base", "umt5xxl", "qwen25_7b", "mistral3_24b", "qwen3_4b", "qwen3_8b" (ldm.flux2_text.text_kind;
    or "qwen3", "gemma": ldm.qwen3_text.text_kind), "qwen3_06b_ace15", "ace15_lm" (ldm.ace_step15_text.text_kind),
    "qwen3vl_8b" (ldm.qwen3vl_text.text_kind), "llama3" (HiDream's Llama 3.1 8B), "byt5" (HunyuanVideo 1.5's glyph
    encoder) or a CLIP kind, refusal) of a
    text-encoder file from its header; (None, None) if it cannot tell."""
    from safetensors import SafetensorError

    from ldm.ace_step15_text import text_kind as ace_kind
    from ldm.checkpoint import CheckpointError, read_shapes
    from ldm.flux2_text import text_kind as flux2_kind
    from ldm.gemma_text import gemma_kind
    from ldm.hunyuan_video15_text import is_byt5
    from ldm.llama_text import is_llama3
    from ldm.parts import peek_text_encoder
    from ldm.qwen3_text import text_kind as qwen3_kind
    from ldm.qwen3vl_text import text_kind as qwen3vl_kind
    from ldm.qwen_text import is_qwen25
    from ldm.stable_audio_text import is_t5_base
    from ldm.t5 import is_t5, is_umt5

    try:
        shapes = read_shapes(path)
        if shapes is not None and is_byt5(shapes):  # before T5: a T5 v1.1 of bytes
            return "byt5", None
        if shapes is not None and is_t5(shapes):  # the original T5 (ReLU: t5-base, Stable Audio's) or v1.1 (XXL)
            return ("t5base" if is_t5_base(shapes) else "t5xxl"), None
        if shapes is not None and is_umt5(shapes):
            return "umt5xxl", None
        if shapes is not None and is_qwen25(shapes):
            return "qwen25_7b", None
        if shapes is not None and (kind := qwen3vl_kind(shapes)):  # Qwen-Image 2.1's: before Qwen3's, which it passes
            return kind, None
        if shapes is not None and (kind := ace_kind(shapes)):  # ACE-Step 1.5's Qwen3s: before the other Qwen3s
            return kind, None
        if shapes is not None and (kind := flux2_kind(shapes)):  # Mistral Small 3, Qwen3-4B / 8B
            return kind, None
        if shapes is not None and (kind := gemma_kind(shapes)):  # Gemma-2-2B (Lumina 2) and other Gemmas
            return kind, None
        if shapes is not None and (kind := qwen3_kind(shapes)):
            return kind, None
        if shapes is not None and is_llama3(shapes):
            return "llama3", None
        return peek_text_encoder(path), None
    except CheckpointError as e:
        return None, str(e)
    except (SafetensorError, OSError, ValueError):
        return None, None


def text_kinds_problem(names: list[Any], wanted: list[str], needs: str, some: bool = False) -> str | None:
    """Why text-encoder files are not the `wanted` kinds (in any order; with `some`, distinct kinds among them),
    ending with `needs`; None where they are or their headers cannot tell."""
    found = []
    for name in names:
        path = part_path(TEXT_ENCODERS, str(name))
        found.append((None, None) if path is None else text_kind(str(path), str(file_fingerprint(path))))
    problem = next((problem for _, problem in found if problem), None)
    kinds = [kind for kind, _ in found]
    if problem or None in kinds:
        return problem
    if (len(set(kinds)) == len(kinds) and set(kinds) <= set(wanted)) if some else sorted(kinds) == sorted(wanted):
        return None
    return f"{' and '.join(map(str, names)) if len(names) == 2 else ', '.join(map(str, names))} " \
           f"{'holds' if len(names) == 1 else 'hold'} {' + '.join(kinds)}; {needs}"


_SD3_KINDS = ["clip_l", "clip_g", "t5xxl"]


def _sd3_problem(names: list[Any], needs: str) -> str | None:
    return text_kinds_problem(names, _SD3_KINDS, f"{needs} of SD3's CLIP-L (clip_l), CLIP-G (clip_g) and T5-XXL "
                              "(t5xxl)", some=True)


def _sd3_clip(node: Node, names: tuple[str, ...], device: str) -> Clip:
    """SD3's text encoders from some of its files, the others absent (their parts zeros, as in ComfyUI)."""
    from ldm.sd3_text import load_some_sd3_text_encoders

    return load_clip(node, names, device, load_some_sd3_text_encoders, "sd3")


@dataclass(frozen=True)
class TextType:
    """What CLIPLoader loads for one `type`: the file kinds it takes (one file of any of them, as `text_kind` names
    them), the end of its refusal, the loader (`module:function`, as `load_clip` calls it) and the CLIP's family."""

    kinds: tuple[str, ...]
    needs: str
    loader: str
    family: str
    described: str  # what the type loads, for the refusal of an unsupported type
    kind_families: tuple[tuple[str, str], ...] = ()  # (kind, family) where the file's kind decides the family


# HiDream-I1's text-encoder kinds; its loaders take any of them, the absent ones' parts zeros (as in ComfyUI).
HIDREAM_KINDS = ("clip_l", "clip_g", "t5xxl", "llama3")
_HIDREAM_NEEDS = ("type hidream takes two of HiDream-I1's CLIP-L (clip_l), CLIP-G (clip_g), T5-XXL (t5xxl) and Llama "
                  "3.1 8B (llama3)")

# CLIPLoader's types other than stable_diffusion and sd3 (SD's and SD3's own loaders, whose files tell the family).
TEXT_TYPES = {
    "chroma": TextType(("t5xxl",), "type chroma takes one T5-XXL (t5xxl)", "ldm.chroma_files:load_chroma_text_encoder",
                       "chroma", "Chroma's T5"),
    "wan": TextType(("umt5xxl",), "type wan takes one UMT5-XXL (umt5xxl: umt5_xxl_fp16.safetensors or an fp8 copy)",
                    "ldm.umt5:load_wan_text_encoder", "wan", "Wan's UMT5"),
    "ltxv": TextType(("t5xxl",), "type ltxv takes one T5-XXL (t5xxl: t5xxl_fp16.safetensors or an fp8 copy)",
                     "ldm.ltxv_text:load_ltxv_text_encoder", "ltxv", "LTX-Video's T5"),
    "qwen_image": TextType(("qwen25_7b", "qwen3vl_8b"), "type qwen_image takes one Qwen2.5-VL-7B, Qwen-Image's "
                           "(qwen_2.5_vl_7b.safetensors or an fp8 copy), or Qwen3-VL-8B, Qwen-Image 2.1's "
                           "(qwen3vl_8b_bf16.safetensors)", "ldm.qwen3vl_text:load_qwen_image_type_text_encoder",
                           "qwen_image", "Qwen-Image's Qwen2.5-VL or Qwen-Image 2.1's Qwen3-VL",
                           (("qwen25_7b", "qwen_image"), ("qwen3vl_8b", "qwen_image21"))),
    "lumina2": TextType(("gemma2_2b", "qwen3_4b"), "type lumina2 takes one Gemma-2-2B, Lumina Image 2.0's text encoder "
                        "(gemma_2_2b_fp16.safetensors), or Qwen3-4B, Z-Image's (qwen_3_4b.safetensors or an fp8 copy)",
                        "ldm.gemma_text:load_lumina2_type_text_encoder", "lumina2",
                        "Lumina 2's Gemma-2-2B or Z-Image's Qwen3-4B",
                        (("gemma2_2b", "lumina2"), ("qwen3_4b", "z_image"))),
    "hidream": TextType(HIDREAM_KINDS, "type hidream takes one of HiDream-I1's CLIP-L (clip_l), CLIP-G (clip_g), "
                        "T5-XXL (t5xxl) and Llama 3.1 8B (llama3), the others absent",
                        "ldm.hidream_text:load_hidream_text_encoder", "hidream", "one of HiDream-I1's text encoders"),
    "flux2": TextType(("mistral3_24b", "qwen3_4b", "qwen3_8b"), "type flux2 takes one FLUX.2 text encoder: Mistral "
                      "Small 3 (mistral3_24b: mistral_3_small_flux2_bf16.safetensors or an fp8 copy) for FLUX.2 [dev], "
                      "Qwen3-4B (qwen3_4b) for [klein] 4B or Qwen3-8B (qwen3_8b) for [klein] 9B",
                      "ldm.flux2_text:load_flux2_text_encoder", "flux2", "FLUX.2's Mistral Small 3 or Qwen3"),
    "stable_audio": TextType(("t5base",), "type stable_audio takes one T5-base (t5base: t5-base.safetensors)",
                             "ldm.stable_audio_text:load_stable_audio_text_encoder", "stable_audio",
                             "Stable Audio's T5-base"),
    "hunyuan_image": TextType(("qwen25_7b",), "type hunyuan_image takes one Qwen2.5-VL-7B (qwen25_7b: "
                              "qwen_2.5_vl_7b.safetensors or an fp8 copy); DualCLIPLoader adds the byT5 glyph encoder",
                              "ldm.hunyuan_video15_text:load_hunyuan_image21_text_encoder", "hunyuan_image21",
                              "HunyuanImage 2.1's Qwen2.5-VL-7B"),
}
_LOADED_TYPES = ("stable_diffusion, sd3, " + ", ".join(list(TEXT_TYPES)[:-1]) + f" or {list(TEXT_TYPES)[-1]}",
                 "SD1.x, SD2.x and the SDXL refiner, one of SD3's, "
                 + ", ".join(t.described for t in TEXT_TYPES.values()) + "; DualCLIPLoader's sdxl for SDXL")


def _loader(text_type: TextType) -> Callable[..., Any]:
    module, name = text_type.loader.split(":")
    return getattr(importlib.import_module(module), name)


class CLIPLoader(Node):
    """Loads one text-encoder file from models/text_encoders or models/clip. With type stable_diffusion: SD1.x's
    CLIP-L, SD2.x's OpenCLIP-H or the SDXL refiner's OpenCLIP bigG, told apart by the file (transformers' CLIPTextModel
    layout, or OpenCLIP's); with type sd3: one of SD3's CLIP-L, CLIP-G and T5-XXL, the other two absent; with type
    chroma: Chroma's T5-XXL; with type wan: Wan's UMT5-XXL; with type ltxv: LTX-Video's T5-XXL (Flux's t5xxl files,
    encoded with the prompt's attention mask, which the conditioning carries); with type qwen_image: Qwen-Image's
    Qwen2.5-VL-7B (its language model, the prompt in Qwen-Image's chat template, the mask carried likewise); with type
    lumina2: Lumina Image 2.0's Gemma-2-2B (ldm.gemma_text) or Z-Image's Qwen3-4B (ldm.qwen3_text), the file telling
    which; with type flux2: FLUX.2's Mistral Small 3 ([dev]) or Qwen3-4B / 8B ([klein]), the file telling which
    (ldm.flux2_text); with type stable_audio: Stable Audio's T5-base (ldm.stable_audio_text). The other types are other
    model families' text encoders, which Loom refuses."""

    display_name = "Load CLIP"
    category = "advanced/loaders"
    clip_name = part_file(TEXT_ENCODERS)
    type = Combo(CLIP_TYPES, tooltip="stable_diffusion: SD1.x, SD2.x or the SDXL refiner (the file tells which); "
                                     "sd3: one of SD3's CLIP-L, CLIP-G and T5-XXL; chroma: Chroma's T5-XXL; "
                                     "wan: Wan's UMT5-XXL; ltxv: LTX-Video's T5-XXL; qwen_image: Qwen-Image's "
                                     "Qwen2.5-VL-7B; lumina2: Lumina 2's Gemma-2-2B or Z-Image's Qwen3-4B; "
                                     "flux2: FLUX.2's Mistral Small 3 (dev) or Qwen3 (klein); stable_audio: "
                                     "Stable Audio's T5-base")
    device = Combo(DEVICES, optional=True, extra={"advanced": True},
                   tooltip="cpu: keep the text encoder on the CPU, in float32")
    outputs = (Output("CLIP"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _fingerprint(TEXT_ENCODERS, inputs.get("clip_name", ""))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        text_type = TEXT_TYPES.get(inputs.get("type"))
        if text_type is not None:
            return text_kinds_problem([inputs.get("clip_name")], list(text_type.kinds), text_type.needs, some=True)
        if inputs.get("type") == "sd3":
            return _sd3_problem([inputs.get("clip_name")], "type sd3 takes one")
        if inputs.get("type") != "stable_diffusion":
            return _unsupported_type(inputs.get("type"), *_LOADED_TYPES)
        return header("text_encoder", TEXT_ENCODERS, inputs.get("clip_name"))[1]

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        text_type = TEXT_TYPES.get(inputs.get("type"))
        if text_type is not None and text_type.kind_families:  # the file's kind tells the family
            path = part_path(TEXT_ENCODERS, str(inputs.get("clip_name")))
            kind = None if path is None else text_kind(str(path), str(file_fingerprint(path)))[0]
            family = dict(text_type.kind_families).get(kind)
            return {} if family is None else {0: {"family": family}}
        if text_type is not None or inputs.get("type") == "sd3":
            return {0: {"family": "sd3" if text_type is None else text_type.family}}
        family = _text_family([header("text_encoder", TEXT_ENCODERS, inputs.get("clip_name"))[0]])
        return {} if family is None else {0: {"family": family}}

    def execute(self, clip_name: str, type: str, device: str = "default") -> tuple[Clip]:
        text_type = TEXT_TYPES.get(type)
        if text_type is not None:  # the loaded files' family where their kind decides it
            family = None if text_type.kind_families else text_type.family
            return (load_clip(self, (clip_name,), device, _loader(text_type), family),)
        if type == "sd3":
            return (_sd3_clip(self, (clip_name,), device),)
        if type != "stable_diffusion":
            raise ValueError(_unsupported_type(type, *_LOADED_TYPES))
        return (load_clip(self, (clip_name,), device),)


# ACE-Step 1.5's two text files: the Qwen3-0.6B encoder and the 5 Hz language model (1.7B or 4B).
ACE_KINDS = ("qwen3_06b_ace15", "ace15_lm")
HUNYUAN_VIDEO15_KINDS = ("qwen25_7b", "byt5")
_HUNYUAN_VIDEO15_NEEDS = ("type hunyuan_video_15 needs Qwen2.5-VL-7B (qwen25_7b: qwen_2.5_vl_7b_fp8_scaled"
                          ".safetensors) and the byT5 glyph encoder (byt5: byt5_small_glyphxl_fp16.safetensors)")
_ACE_NEEDS = ("type ace needs ACE-Step 1.5's Qwen3-0.6B text encoder (qwen3_06b_ace15: qwen_0.6b_ace15.safetensors) "
              "and its 5 Hz language model (ace15_lm: qwen_1.7b_ace15.safetensors or qwen_4b_ace15.safetensors)")
# DualCLIPLoader's types Loom loads, and what they load, for the refusal of the others.
_DUAL_LOADED = ("sdxl, flux, sd3, hidream, ace, hunyuan_video_15 or hunyuan_image", "SDXL's CLIP-L and OpenCLIP bigG, "
                "Flux's CLIP-L and T5-XXL, two of SD3's or of HiDream's, ACE-Step 1.5's Qwen3-0.6B and language model, "
                "HunyuanVideo 1.5's or HunyuanImage 2.1's Qwen2.5-VL-7B and byT5")


class DualCLIPLoader(Node):
    """Loads two text-encoder files as one CLIP: with type sdxl, SDXL's CLIP-L and OpenCLIP bigG; with type flux,
    Flux.1's CLIP-L and T5-XXL; with type sd3, two of SD3's CLIP-L, CLIP-G and T5-XXL, the third absent; with type
    hidream, two of HiDream-I1's CLIP-L, CLIP-G, T5-XXL and Llama 3.1 8B, the others absent; with type ace,
    ACE-Step 1.5's Qwen3-0.6B text encoder and its 5 Hz language model (in either order); with type
    hunyuan_video_15, HunyuanVideo 1.5's Qwen2.5-VL-7B and byT5 glyph encoder (in either order); with type
    hunyuan_image, the same two files as HunyuanImage 2.1's (its own prompt template), from models/text_encoders or
    models/clip. The other types are other model families', which Loom refuses."""

    display_name = "DualCLIPLoader"
    category = "advanced/loaders"
    clip_name1 = part_file(TEXT_ENCODERS)
    clip_name2 = part_file(TEXT_ENCODERS)
    type = Combo(DUAL_CLIP_TYPES, tooltip="sdxl: SDXL's CLIP-L and OpenCLIP bigG; flux: Flux's CLIP-L and T5-XXL; "
                                          "sd3: two of SD3's CLIP-L, CLIP-G and T5-XXL; hidream: two of HiDream's "
                                          "CLIP-L, CLIP-G, T5-XXL and Llama 3.1 8B; ace: ACE-Step 1.5's Qwen3-0.6B "
                                          "and language model; hunyuan_video_15: HunyuanVideo 1.5's Qwen2.5-VL-7B "
                                          "and byT5")
    device = Combo(DEVICES, optional=True, extra={"advanced": True},
                   tooltip="cpu: keep the text encoders on the CPU, in float32")
    outputs = (Output("CLIP"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _fingerprint(TEXT_ENCODERS, inputs.get("clip_name1", ""), inputs.get("clip_name2", ""))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        if inputs.get("type") == "flux":
            return text_kinds_problem([inputs.get("clip_name1"), inputs.get("clip_name2")], ["clip_l", "t5xxl"],
                                      "type flux needs one CLIP-L (clip_l) and one T5-XXL (t5xxl)")
        if inputs.get("type") == "sd3":
            return _sd3_problem([inputs.get("clip_name1"), inputs.get("clip_name2")], "type sd3 takes two")
        if inputs.get("type") == "hidream":
            return text_kinds_problem([inputs.get("clip_name1"), inputs.get("clip_name2")], list(HIDREAM_KINDS),
                                      _HIDREAM_NEEDS, some=True)
        if inputs.get("type") == "ace":
            return text_kinds_problem([inputs.get("clip_name1"), inputs.get("clip_name2")], list(ACE_KINDS),
                                      _ACE_NEEDS)
        if inputs.get("type") in ("hunyuan_video_15", "hunyuan_image"):
            return text_kinds_problem([inputs.get("clip_name1"), inputs.get("clip_name2")],
                                      list(HUNYUAN_VIDEO15_KINDS), _HUNYUAN_VIDEO15_NEEDS.replace(
                                          "hunyuan_video_15", inputs["type"]))
        if inputs.get("type") != "sdxl":
            return _unsupported_type(inputs.get("type"), *_DUAL_LOADED)
        found = [header("text_encoder", TEXT_ENCODERS, inputs.get(name)) for name in ("clip_name1", "clip_name2")]
        refusal = next((problem for _, problem in found if problem), None)
        kinds = [kind for kind, _ in found]
        if refusal or None in kinds or _text_family(kinds) == "sdxl":
            return refusal
        return (f"{inputs['clip_name1']} and {inputs['clip_name2']} hold {' + '.join(map(str, kinds))}; type sdxl "
                "needs one CLIP-L (clip_l) and one OpenCLIP bigG (clip_g)")

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        if inputs.get("type") in ("flux", "sd3", "hidream"):
            return {0: {"family": inputs["type"]}}
        if inputs.get("type") == "ace":
            return {0: {"family": "ace_step15"}}
        if inputs.get("type") == "hunyuan_video_15":
            return {0: {"family": "hunyuan_video15"}}
        if inputs.get("type") == "hunyuan_image":
            return {0: {"family": "hunyuan_image21"}}
        family = _text_family([header("text_encoder", TEXT_ENCODERS, inputs.get(name))[0]
                               for name in ("clip_name1", "clip_name2")])
        return {} if family is None else {0: {"family": family}}

    def execute(self, clip_name1: str, clip_name2: str, type: str, device: str = "default") -> tuple[Clip]:
        if type == "flux":
            from ldm.flux_text import load_flux_text_encoders

            return (load_clip(self, (clip_name1, clip_name2), device, load_flux_text_encoders, "flux"),)
        if type == "sd3":
            return (_sd3_clip(self, (clip_name1, clip_name2), device),)
        if type == "hidream":
            return (load_clip(self, (clip_name1, clip_name2), device, _loader(TEXT_TYPES["hidream"]), "hidream"),)
        if type == "ace":
            from ldm.ace_step15_text import load_ace_step15_text_encoder

            return (load_clip(self, (clip_name1, clip_name2), device, load_ace_step15_text_encoder, "ace_step15"),)
        if type == "hunyuan_video_15":
            from ldm.hunyuan_video15_text import load_hunyuan_video15_text_encoder

            return (load_clip(self, (clip_name1, clip_name2), device, load_hunyuan_video15_text_encoder,
                              "hunyuan_video15"),)
        if type == "hunyuan_image":
            from ldm.hunyuan_video15_text import load_hunyuan_image21_text_encoder

            return (load_clip(self, (clip_name1, clip_name2), device, load_hunyuan_image21_text_encoder,
                              "hunyuan_image21"),)
        if type != "sdxl":
            raise ValueError(_unsupported_type(type, *_DUAL_LOADED))
        return (load_clip(self, (clip_name1, clip_name2), device),)


NODES = [UNETLoader, CLIPLoader, DualCLIPLoader]
