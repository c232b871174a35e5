"""LoRA family dispatch: which model family a LoRA file is for, and which module gives a model's LoRA names.

SD1/SD2/SDXL names are ldm.lora_keys_sd's; Flux's, and diffusers' parts of its fused layers, ldm.lora_flux's; SD3's
ldm.lora_sd3's; Wan's ldm.lora_wan's; LTX-Video's ldm.lora_ltxv's; LTX-2's ldm.lora_ltx2's; Qwen-Image's
ldm.lora_qwen_image's; Z-Image's ldm.lora_z_image's; Lumina Image 2.0's ldm.lora_lumina2's (the original names, kohya's
`lora_unet_layers_0_attention_qkv` and ComfyUI's `diffusion_model.layers.0.attention.qkv`; diffusers'
Lumina2Transformer2DModel names with q / k / v apart, `transformer.layers.0.attn.to_q`; and Z-Image's diffusers
names); FLUX.2's ldm.lora_flux2's; HiDream-I1's ldm.lora_hidream's; ACE-Step 1.5's ldm.lora_ace_step15's; HunyuanVideo
1.5's ldm.lora_hunyuan_video15's; Chroma's ldm.chroma_lora's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

from ldm.flux import Flux
from ldm.lora_formats import Lora, LoraError
from ldm.lora_keys_sd import sd_clip_index, sd_unet_index
from ldm.unet import UNetModel

if TYPE_CHECKING:
    from ldm.lora_flux import Slot


# --- names ----------------------------------------------------------------------------------------

def _index(module: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may use for a patchable layer of `module` -> its path in `module`."""
    if isinstance(module, UNetModel):
        return sd_unet_index(module)
    from ldm import lora_flux, lora_sd3  # the families' modules load on first use
    from ldm.flux_text import FluxTextEncoder
    from ldm.mmdit import MMDiT
    from ldm.sd3_text import SD3TextEncoder

    chroma = _chroma_lora(module)  # Chroma: Flux's block names (ldm.chroma_lora)
    if chroma is not None:
        return chroma[0]

    if isinstance(module, Flux):
        return lora_flux.flux_index(module)
    if isinstance(module, FluxTextEncoder):
        return lora_flux.flux_text_index(module)
    if isinstance(module, MMDiT):
        return lora_sd3.sd3_index(module)
    if isinstance(module, SD3TextEncoder):
        return lora_sd3.sd3_text_index(module)
    from ldm import lora_flux2, lora_hidream, lora_ltxv, lora_lumina2, lora_qwen_image, lora_wan, lora_z_image
    from ldm.flux2 import Flux2
    from ldm.hidream import HiDreamModel
    from ldm.ltxv import LTXVModel
    from ldm.lumina2 import Lumina2Model
    from ldm.qwen_image import QwenImageModel
    from ldm.wan import WanModel
    from ldm.z_image import ZImageModel

    if isinstance(module, WanModel):
        return lora_wan.wan_index(module)
    if isinstance(module, LTXVModel):
        return lora_ltxv.ltxv_index(module)
    from ldm import lora_ltx2
    from ldm.ltx2 import LTX2Model
    from ldm.ltx2_files import LTX2Denoiser

    if isinstance(module, LTX2Denoiser | LTX2Model):
        return lora_ltx2.ltx2_index(module)
    if isinstance(module, QwenImageModel):
        return lora_qwen_image.qwen_image_index(module)
    if isinstance(module, ZImageModel):
        return lora_z_image.z_image_index(module)
    if isinstance(module, Lumina2Model):
        return lora_lumina2.lumina2_index(module)
    if isinstance(module, Flux2):
        return lora_flux2.flux2_index(module)
    if isinstance(module, HiDreamModel):
        return lora_hidream.hidream_index(module)
    from ldm import lora_ace_step15
    from ldm.ace_step15 import AceStep15Model
    from ldm.ace_step15_files import AceStep15Denoiser

    if isinstance(module, AceStep15Denoiser | AceStep15Model):
        return lora_ace_step15.ace_step15_index(module)
    if _is_hunyuan_video15(module):
        from ldm import lora_hunyuan_video15

        return lora_hunyuan_video15.hunyuan_video15_index(module)
    if takes_no_lora(module):
        return {}
    encoders = getattr(module, "encoders", None)
    if not isinstance(encoders, nn.ModuleDict):
        from ldm.hunyuan_image21_files import HunyuanImage21Denoiser

        if isinstance(module, HunyuanImage21Denoiser):
            raise TypeError("Loom does not apply LoRAs to HunyuanImage 2.1 models yet")
        raise TypeError(f"LoRA applies to a diffusion model or a text encoder, not {type(module).__name__}")
    return sd_clip_index(encoders)


def takes_no_lora(module: nn.Module) -> bool:
    """Whether `module` is a text encoder no LoRA patches: Wan's UMT5, LTX-Video's T5, LTX-2's Gemma 3 (with its
    feature projection), Qwen-Image's Qwen2.5-VL, Z-Image's Qwen3, Lumina 2's Gemma-2-2B, FLUX.2's Mistral / Qwen3,
    HiDream-I1's CLIP-L / CLIP-G / T5-XXL / Llama 3.1, ACE-Step 1.5's Qwen3 and HunyuanVideo 1.5's Qwen2.5-VL / byT5
    (diffusers' loaders for those models patch their transformers alone, and so does Loom; LTX-2's: the transformer
    and the connectors; ComfyUI reads no trainer's names for HunyuanVideo 1.5's encoders, only its own
    `text_encoders.` keys)."""
    from ldm.ace_step15_text import AceStep15TextEncoder
    from ldm.flux2_text import Flux2TextEncoder
    from ldm.gemma_text import Lumina2TextEncoder
    from ldm.hidream_text import HiDreamTextEncoder
    from ldm.hunyuan_video15_text import HunyuanVideo15TextEncoder
    from ldm.ltx2_text import LTX2TextEncoder
    from ldm.ltxv_text import LTXVTextEncoder
    from ldm.qwen3_text import ZImageTextEncoder
    from ldm.qwen_text import QwenImageTextEncoder
    from ldm.umt5 import WanTextEncoder

    return isinstance(module, WanTextEncoder | LTXVTextEncoder | QwenImageTextEncoder | ZImageTextEncoder
                      | Lumina2TextEncoder | Flux2TextEncoder | HiDreamTextEncoder | AceStep15TextEncoder
                      | LTX2TextEncoder | HunyuanVideo15TextEncoder)


def _slots(module: nn.Module) -> dict[str, Slot]:
    """Names of parts of fused layers (a Flux, SD3, Z-Image, Lumina 2, FLUX.2 or HunyuanVideo 1.5 transformer's, in
    diffusers' layout; HunyuanVideo 1.5's q, k, v also in Tencent's) -> their slots."""
    from ldm import lora_flux, lora_flux2, lora_lumina2, lora_sd3, lora_z_image
    from ldm.flux2 import Flux2
    from ldm.lumina2 import Lumina2Model
    from ldm.mmdit import MMDiT
    from ldm.z_image import ZImageModel

    if isinstance(module, MMDiT):
        return lora_sd3.sd3_slots(module)
    if isinstance(module, ZImageModel):
        return lora_z_image.z_image_slots(module)
    if isinstance(module, Lumina2Model):
        return lora_lumina2.lumina2_slots(module)
    if isinstance(module, Flux2):
        return lora_flux2.flux2_slots(module)
    if _is_hunyuan_video15(module):
        from ldm import lora_hunyuan_video15

        return lora_hunyuan_video15.hunyuan_video15_slots(module)
    chroma = _chroma_lora(module)
    if chroma is not None:
        return chroma[1]
    return lora_flux.flux_slots(module) if isinstance(module, Flux) else {}


def _redundant(module: nn.Module, names: Iterable[str]) -> set[str]:
    """A file's patch names that repeat others of the same file for `module` (Z-Image and Lumina 2 trainers'
    twice-written attentions, `ldm.lora_z_image`), to be left out."""
    from ldm import lora_lumina2, lora_z_image
    from ldm.lumina2 import Lumina2Model
    from ldm.z_image import ZImageModel

    if isinstance(module, ZImageModel):
        return lora_z_image.z_image_redundant(module, names)
    if isinstance(module, Lumina2Model):
        return lora_lumina2.lumina2_redundant(module, names)
    return set()


def _is_hunyuan_video15(module: nn.Module) -> bool:
    """Whether `module` is a HunyuanVideo 1.5 transformer or the denoiser that wraps it."""
    from ldm.hunyuan_video15 import HunyuanVideo15
    from ldm.hunyuan_video15_files import HunyuanVideo15Denoiser

    return isinstance(module, HunyuanVideo15Denoiser | HunyuanVideo15)


def _chroma_lora(module: nn.Module) -> tuple[dict[str, str], dict[str, Slot]] | None:
    """(index, slots) of a Chroma transformer or text encoder (`ldm.chroma_lora`); None for other modules."""
    from ldm import chroma_lora
    from ldm.chroma import Chroma
    from ldm.chroma_files import ChromaTextEncoder

    if isinstance(module, Chroma):
        return chroma_lora.chroma_index(module), chroma_lora.chroma_slots(module)
    if isinstance(module, ChromaTextEncoder):
        return chroma_lora.chroma_text_index(module), {}
    return None


# --- family ---------------------------------------------------------------------------------------

_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# Block names only Flux has: BFL's (kohya's flattened, ComfyUI's dotted) and diffusers' single-stream blocks. A
# diffusers file of double blocks alone is told from SD3's by ldm.lora_sd3.transformer_family (or not at all).
_FLUX_NAME = re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d")


def lora_family(lora: Lora) -> str | None:
    """The family a LoRA was trained for ("sd1", "sd2", "sdxl", "flux", "sd3", "wan21", "wan22" or "wan": see
    ldm.lora_wan, "ltxv", "ltx2", "qwen_image", "lumina2", "z_image", "flux2", "hidream", "ace_step15",
    "hunyuan_video15"), None when its keys do not tell.
    (An SD3 file of CLIP-L/CLIP-G keys alone reads as SDXL: their names and widths are the same; a file on the Flux
    layout that does not tell FLUX.2's from Flux.1's reads as Flux's, one of LTX-Video's block names alone LTX-Video's
    though it may be LTX-2's: see `family_fits`.)"""
    from ldm.lora_ace_step15 import ace_step15_family
    from ldm.lora_flux2 import flux2_family
    from ldm.lora_hidream import hidream_family
    from ldm.lora_hunyuan_video15 import hunyuan_video15_family
    from ldm.lora_ltx2 import ltx2_family
    from ldm.lora_ltxv import ltxv_family
    from ldm.lora_lumina2 import lumina2_family
    from ldm.lora_qwen_image import qwen_image_family
    from ldm.lora_sd3 import transformer_family
    from ldm.lora_t5 import is_t5_name
    from ldm.lora_wan import wan_family
    from ldm.lora_z_image import z_image_family

    names = lora.weights.keys()
    # Qwen-Image's before the transformer families: its diffusers attention names are Flux's too (see its module).
    # FLUX.2's first: its marks are its own, and its diffusers names under ComfyUI's prefix are Qwen-Image's too.
    # Lumina 2's before Z-Image's, whose names it shares (ldm.lora_lumina2 tells it by its own names or its shapes).
    # HiDream's and ACE-Step 1.5's block names are their own. LTX-2's before LTX-Video's, whose names it shares.
    # HunyuanVideo 1.5's last, before Flux's: ComfyUI's names of its double blocks are Flux's (its width tells).
    named = (flux2_family(lora.weights) or hidream_family(lora.weights) or ace_step15_family(lora.weights)
             or wan_family(lora.weights) or ltx2_family(lora.weights) or ltxv_family(lora.weights)
             or qwen_image_family(lora.weights)
             or lumina2_family(lora.weights) or z_image_family(lora.weights)
             or hunyuan_video15_family(lora.weights))
    if named is not None:
        return named
    if any(_FLUX_NAME.search(n) for n in names):
        return "flux"
    transformer = transformer_family(lora.weights)
    if transformer is not None:
        return transformer
    # A second CLIP is SDXL's; Flux's T5 goes by the same prefixes (OneTrainer's lora_te2_, diffusers' text_encoder_2.).
    if any((n.startswith(("lora_te2_", "text_encoder_2.")) and not is_t5_name(n)) or "add_embedding" in n
           or "label_emb" in n for n in names):
        return "sdxl"
    for name, weight in lora.weights.items():
        if re.search(r"attn2[._](processor[._])?to_k$", name) and weight.in_numel in _CONTEXT_FAMILY:
            return _CONTEXT_FAMILY[weight.in_numel]
    return None


def check_lora_family(lora: Lora, family: str) -> None:
    """Raise LoraError when the LoRA is recognisably for another family than `family` (a Flux-layout file on FLUX.2
    where its names or shapes tell Flux.1's)."""
    from ldm.lora_flux2 import is_flux1_lora

    found = lora_family(lora)
    flux1_on_flux2 = (found, family) == ("flux", "flux2") and is_flux1_lora(lora.weights)
    if found is not None and (not family_fits(found, family) or flux1_on_flux2):
        source = lora.path.name if lora.path else "this LoRA"
        raise LoraError(f"{source} is a {found.upper()} LoRA; it does not fit a {family.upper()} model")


def family_fits(found: str, family: str) -> bool:
    """Whether a LoRA of family `found` (`lora_family`) fits a model of `family`: the same family, Flux's on Chroma
    (which keeps Flux's block names), a Wan LoRA of an unreleased width on either Wan family, Flux's on FLUX.2 (a
    Flux-layout file that does not tell the two apart reads as Flux's; `check_lora_family` refuses one that tells
    Flux.1's, and a header that tells it reads "flux.1", which fits Flux and Chroma only), Z-Image's on Lumina 2 (a
    Lumina 2 file on the shared names whose shapes do not tell reads as Z-Image's; a real Z-Image LoRA is then refused
    by its shapes), LTX-Video's on LTX-2 (whose video blocks keep LTX-Video's names and 13B's width: a file of those
    names alone reads as LTX-Video's, ldm.lora_ltx2; one of LTX-Video 2B's width is then refused by its shapes)."""
    return (found == family or (found, family) in (("flux", "chroma"), ("flux", "flux2"), ("flux.1", "flux"),
                                                    ("flux.1", "chroma"), ("z_image", "lumina2"), ("ltxv", "ltx2"))
            or (found == "wan" and family.startswith("wan")))
