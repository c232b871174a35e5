"""Chroma model files: the transformer in BFL's layout (Chroma1-HD, v4x; bare or under `model.diffusion_model.`),
its family, its T5-only text encoder as ComfyUI's CLIPLoader type "chroma" runs it, all-in-one checkpoints, and
tiny random files.

All-in-one checkpoints (as ComfyUI's checkpoint savers write them, fp8 or bf16) hold the transformer under
`model.diffusion_model.`, Flux's ae under `first_stage_model.` and T5-XXL under `text_encoders.t5xxl.transformer.`.

Text: ComfyUI encodes Chroma's prompts as PixArt's (its CLIPLoader types "chroma" and "pixart" share a tokenizer):
the T5 tokens and the end token, not padded (minimum length 1), so the transformer sees no padding and needs no
mask. diffusers' ChromaPipeline pads to 512 and masks all but the first pad token instead.

Sampling: ComfyUI's Chroma samples on Flux's levels (ModelSamplingFlux, shift 1.15 unless a node sets one), with
real classifier-free guidance (Chroma is not guidance-distilled: its guidance input is 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm import checkpoint as ckpt
from ldm.checkpoint import FLUX_VAE_SCALE, UNET_PREFIX, VAE_PREFIX, CheckpointError, StateDict, write_safetensors
from ldm.chroma import Chroma, ChromaConfig, chroma_config_from_state_dict, is_chroma
from ldm.flow_family import FlowFamily
from ldm.flux_files import DEV_SHIFT, FLUX_VAE, LATENT_SHIFT
from ldm.flux_presets import TINY_FLUX_VAE, TINY_T5, distinct_random_
from ldm.flux_text import T5_PREFIX
from ldm.presets import randomize_
from ldm.t5 import T5Encoder, build_t5, descaled_fp8, is_t5, scaling_keys, t5_from_weights
from ldm.text_encoders import PinnableTextEncoder, TextEncoding
from ldm.vae import AutoencoderKL, VAEConfig

# ComfyUI's PixArt/Chroma T5 tokenizer: no padding.
CHROMA_MIN_LENGTH = 1
TINY_CHROMA = ChromaConfig(in_channels=16, out_channels=16, context_dim=TINY_T5.d_model, hidden_size=32, num_heads=2,
                           depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6), approximator_in=64,
                           approximator_hidden=48, approximator_layers=2)


@dataclass(frozen=True)
class ChromaFamily(FlowFamily):
    """A Chroma model's family: its transformer's config, Flux's latent space, and ModelSamplingFlux's shift."""

    unet_config: ChromaConfig
    vae_config: VAEConfig = FLUX_VAE
    name: str = "chroma"
    latent_shift: float = LATENT_SHIFT

    @property
    def shift(self) -> float:
        return DEV_SHIFT


@dataclass
class LoadedChroma:
    family: ChromaFamily
    unet: Chroma
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def _bare(sd: StateDict) -> StateDict:
    if is_chroma(sd, UNET_PREFIX):
        return {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    return {k: v for k, v in sd.items() if not k.startswith(("first_stage_model.", "text_encoders."))}


def chroma_family(weights: StateDict, name: str = "") -> ChromaFamily:
    try:
        return ChromaFamily(chroma_config_from_state_dict(weights))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}" if name else str(e)) from None


def is_chroma_file(path: str | Path) -> bool:
    """Whether a .safetensors file holds a Chroma transformer (its distilled guidance layer), from its header."""
    shapes = ckpt.read_shapes(path)
    return shapes is not None and (is_chroma(shapes) or is_chroma(shapes, UNET_PREFIX))


def peek_chroma(path: str | Path) -> ChromaFamily | None:
    """The family of a Chroma file from its header alone; None for other files and formats."""
    if not is_chroma_file(path):
        return None
    return chroma_family(_bare(ckpt.read_shapes(path)), Path(path).name)


def load_chroma_unet(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     sd: StateDict | None = None) -> LoadedChroma:
    """Load a Chroma transformer (a file of its own, or the one in a checkpoint, `sd` if already read) on `device`
    in `dtype` (fp8 and scaled fp8 weights cast as they load); keys of neither the transformer nor a checkpoint's
    other parts are listed as unused."""
    path = Path(path)
    sd = ckpt.load_state_dict(path) if sd is None else sd
    if not (is_chroma(sd) or is_chroma(sd, UNET_PREFIX)):
        raise CheckpointError(f"{path.name}: not a Chroma diffusion model (no distilled_guidance_layer / img_in "
                              "weights in Black Forest Labs' layout)")
    weights = dict(descaled_fp8(_bare(sd)))
    family = chroma_family(weights, path.name)
    model = ckpt._materialize(lambda: Chroma(family.unet_config), weights, "Chroma transformer", path, device, dtype)
    expected = set(model.state_dict())
    prefix = UNET_PREFIX if is_chroma(sd, UNET_PREFIX) else ""
    skipped = scaling_keys(sd)
    unused = sorted(k for k in sd if k not in skipped and not k.startswith((VAE_PREFIX, "text_encoders."))
                    and not (k.startswith(prefix) and k[len(prefix):] in expected))
    return LoadedChroma(family, model, unused, path, ckpt.read_metadata(path))


def load_chroma_checkpoint(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                           text_encoder: bool = True) -> ckpt.LoadedCheckpoint:
    """An all-in-one Chroma checkpoint (see the module docstring) as a LoadedCheckpoint: the transformer, Flux's
    VAE, and T5-XXL as Chroma's text encoder where the file has it (`text_encoder=False` skips it)."""
    path = Path(path)
    sd = ckpt.load_state_dict(path)
    if is_chroma(sd):
        raise CheckpointError(f"{path.name}: a Chroma transformer alone, not an all-in-one checkpoint; load it with "
                              "UNETLoader (Load Diffusion Model), T5-XXL with CLIPLoader type chroma and Flux's VAE "
                              "with VAELoader")
    if not is_chroma(sd, UNET_PREFIX):
        raise CheckpointError(f"{path.name}: not a Chroma checkpoint (no model.diffusion_model.distilled_guidance_"
                              "layer weights)")
    loaded = load_chroma_unet(path, device, dtype, sd=sd)
    vae_weights = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    try:
        vae_config = ckpt._vae_config(vae_weights, "", FLUX_VAE_SCALE)
    except KeyError as e:
        raise CheckpointError(f"{path.name}: the checkpoint's VAE (first_stage_model.) lacks {e}") from None
    vae = ckpt._materialize(lambda: AutoencoderKL(vae_config), vae_weights, "VAE", path, device, dtype)
    used = {VAE_PREFIX + k for k in vae.state_dict()}
    t5_weights = {k[len(T5_PREFIX):]: v for k, v in sd.items() if k.startswith(T5_PREFIX)}
    encoder = None
    if text_encoder and t5_weights:
        t5, t5_used = t5_from_weights(t5_weights, f"{path.name} ({T5_PREFIX})", dtype)
        encoder = ChromaTextEncoder(t5).to(device).eval()
        used |= {T5_PREFIX + k for k in t5_used}
    unused = sorted({*loaded.unused_keys, *(k for k in sd if k.startswith((VAE_PREFIX, "text_encoders."))
                                             and k not in used and (text_encoder or k.startswith(VAE_PREFIX)))})
    return ckpt.LoadedCheckpoint(loaded.family, loaded.unet, vae, encoder, unused, path, loaded.metadata)


class ChromaTextEncoder(PinnableTextEncoder):
    """T5-XXL alone, encoding as ComfyUI does for Chroma (see the module docstring); the interface of
    ``ldm.text_encoders.TextEncoder``: `encode` gives T5's hidden states and no pooled vector. Pinned to the CPU
    (`pinned_to_cpu`, CLIPLoader's device "cpu"), `.to()` changes its dtype only."""

    def __init__(self, t5xxl: T5Encoder) -> None:
        super().__init__()
        self.t5xxl = t5xxl

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """`cond`: T5's hidden states [B, L, d_model] of the prompts' tokens and end token (the shorter prompts of a
        batch padded to the longest). Clip skip and textual-inversion embeddings do not apply to T5."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = (per_encoder or {}).get("t5xxl", prompts)
        return TextEncoding(self.t5xxl.encode(texts, CHROMA_MIN_LENGTH), None)


@dataclass
class LoadedChromaText:
    encoder: ChromaTextEncoder
    unused_keys: list[str]
    family: str = "chroma"


def load_chroma_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32) -> LoadedChromaText:
    """One T5-XXL file (t5xxl_fp16.safetensors, fp8 copies) as Chroma's text encoder, on `device` in `dtype`."""
    if len(paths) != 1:
        raise CheckpointError(f"Chroma takes one T5-XXL text encoder file; got {len(paths)}")
    path = Path(paths[0])
    sd = ckpt.load_state_dict(path)
    if not is_t5(sd):
        raise CheckpointError(f"{path.name}: not a T5-XXL text encoder (CLIPLoader type chroma takes T5-XXL alone, "
                              "e.g. t5xxl_fp16.safetensors)")
    encoder, used = t5_from_weights(sd, path.name, dtype)
    return LoadedChromaText(ChromaTextEncoder(encoder).to(device).eval(), sorted(f"{path.name}: {k}" for k in sd
                                                                                 if k not in used))


def random_chroma(config: ChromaConfig = TINY_CHROMA, seed: int = 0) -> Chroma:
    """A Chroma transformer with seeded random weights, each distinct (`ldm.flux_presets.distinct_random_`)."""
    return distinct_random_(Chroma(config).eval(), seed)


def tiny_chroma_parts(seed: int = 0) -> dict[str, StateDict]:
    """The tensors of a tiny random Chroma by part ("unet": BFL's layout, "t5xxl": transformers', "vae": Flux's ae)."""
    with torch.random.fork_rng():  # transformers initialises T5 from the global generator
        torch.manual_seed(seed)
        t5 = build_t5(TINY_T5)
    vae = randomize_(AutoencoderKL(TINY_FLUX_VAE), torch.Generator().manual_seed(seed + 1))
    return {"unet": random_chroma(TINY_CHROMA, seed).state_dict(),
            "t5xxl": {k: v for k, v in t5.model.state_dict().items() if k != "encoder.embed_tokens.weight"},
            "vae": vae.state_dict()}


def make_chroma_checkpoint(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16,
                           text_encoder: bool = True) -> Path:
    """Write the tiny random Chroma of `make_chroma_files` (the same `seed`, the same tensors) as one all-in-one
    checkpoint at `path`, in ComfyUI's layout (see the module docstring), stored in `dtype`; without T5 when
    `text_encoder` is False."""
    parts = tiny_chroma_parts(seed)
    combined = {**{UNET_PREFIX + k: v for k, v in parts["unet"].items()},
                **{VAE_PREFIX + k: v for k, v in parts["vae"].items()},
                **({T5_PREFIX + k: v for k, v in parts["t5xxl"].items()} if text_encoder else {})}
    write_safetensors(combined, path, {"loom.seed": str(seed)}, dtype)
    return Path(path)


def make_chroma_files(models_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Write tiny random Chroma files into the model folders under `models_dir`, in the layouts a ComfyUI user has:
    the transformer in BFL's layout (diffusion_models/chroma-tiny.safetensors), T5-XXL in transformers' layout
    (text_encoders/t5xxl-chroma-tiny.safetensors) and Flux's ae (vae/ae-chroma-tiny.safetensors); returns each
    file's path by part ("unet", "t5xxl", "vae"). The pictures they make are noise."""
    models_dir = Path(models_dir)
    parts = tiny_chroma_parts(seed)
    paths = {"unet": models_dir / "diffusion_models" / "chroma-tiny.safetensors",
             "t5xxl": models_dir / "text_encoders" / "t5xxl-chroma-tiny.safetensors",
             "vae": models_dir / "vae" / "ae-chroma-tiny.safetensors"}
    for part, path in paths.items():
        write_safetensors(parts[part], path, {"loom.seed": str(seed)}, dtype)
    return paths
