"""Lumina Image 2.0 files (and Neta Lumina's: the same model): ComfyUI's diffusion-model files (lumina_2_model_bf16:
the released keys, bare or under `model.diffusion_model.`; bf16, fp16, fp8 and scaled fp8), Comfy-Org's all-in-one
checkpoint lumina_2.safetensors, their family, and tiny random files.

The all-in-one checkpoint (ComfyUI's supported_models Lumina2: `vae_key_prefix` "vae.", `text_encoder_key_prefix`
"text_encoders.") holds the transformer under `model.diffusion_model.`, Flux's VAE (BFL's ae layout) under `vae.`,
Gemma-2-2B under `text_encoders.gemma2_2b.transformer.` (transformers' names: `model.embed_tokens.weight`, ...), an
unused `text_encoders.gemma2_2b.logit_scale`, and the Gemma tokenizer as `text_encoders.spiece_model` (the
sentencepiece model's bytes, uint8).

The family carries what the sampler needs beyond the weights: the VAE is Flux's (its latent scale 0.3611 and shift
0.1159, ComfyUI's Flux latent format), and the model samples on SD3's shifted flow levels, `shift * t / (1 + (shift
- 1) * t)` (ComfyUI's ModelSamplingAuraFlow, multiplier 1), at shift 6, ComfyUI's default for the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm import checkpoint as ckpt
from ldm.checkpoint import UNET_PREFIX, CheckpointError, StateDict, write_safetensors
from ldm.flux_files import FLUX_VAE
from ldm.flux_presets import TINY_FLUX_VAE, distinct_random_
from ldm.lumina2 import UNUSED, Lumina2Config, Lumina2Model, is_lumina2, lumina2_config_from_state_dict
from ldm.presets import randomize_
from ldm.single_file_family import SingleFileFamily
from ldm.vae import AutoencoderKL
from ldm.z_image import is_z_image
from ldm.z_image_files import ZImageFamily

LUMINA2_SHIFT = 6.0  # ComfyUI's sampling shift for Lumina 2 (SD3-style schedule, multiplier 1)
# Files Loom writes carry the RoPE split, which the weights cannot tell (the released model's heads are 96 wide).
AXES_KEY = "loom.lumina2_axes"
VAE_PREFIX = "vae."
GEMMA_PREFIX = "text_encoders.gemma2_2b.transformer."
TOKENIZER_KEY = "text_encoders.spiece_model"
LOGIT_SCALE_KEY = "text_encoders.gemma2_2b.logit_scale"
# The MLP 4 * dim wide and the timestep MLP min(dim, 1024) wide, as the released model's are.
TINY_LUMINA2 = Lumina2Config(num_layers=2, num_refiner_layers=1, num_heads=4, num_kv_heads=2, head_dim=12,
                             cap_feat_dim=32, ffn_hidden=192, t_hidden=48, adaln_dim=48, axes_dim=(4, 4, 4))


@dataclass(frozen=True)
class Lumina2Family(ZImageFamily):
    """A Lumina 2 model's family: Z-Image's (its transformer's config, Flux's 16-channel latent space) under its own
    name and sampling shift. Built as `Lumina2Family(config)`."""

    unet_config: Lumina2Config
    name: str = "lumina2"

    @property
    def shift(self) -> float:
        return LUMINA2_SHIFT


@dataclass
class LoadedLumina2:
    family: Lumina2Family
    unet: Lumina2Model
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def _family(weights: StateDict, axes: tuple[int, ...] | None, prefix: str) -> Lumina2Family:
    config = lumina2_config_from_state_dict(weights, axes, prefix)
    if config.in_channels != FLUX_VAE.z_channels:
        raise ValueError(f"a model of {config.in_channels} latent channels; Lumina 2's VAE (Flux's) makes 16")
    return Lumina2Family(config)


# The family of Lumina 2 weights (the RoPE split from Loom's metadata if saved); whether a file holds them (alone or
# in the all-in-one checkpoint; Z-Image's, with pad tokens, are not); a file's family from its header alone.
FILES = SingleFileFamily("a Lumina 2 transformer", is_lumina2, _family, AXES_KEY)
lumina2_family, is_lumina2_file, peek_lumina2 = FILES.family, FILES.is_file, FILES.peek


def is_lumina2_checkpoint(sd: StateDict) -> bool:
    """Whether a state dict (or a header's shapes) is the all-in-one layout: the transformer under
    `model.diffusion_model.` with Gemma-2 under `text_encoders.gemma2_2b.transformer.`."""
    return is_lumina2(sd, UNET_PREFIX) and f"{GEMMA_PREFIX}model.embed_tokens.weight" in sd


def is_lumina2_checkpoint_file(path: str | Path) -> bool:
    """Whether a .safetensors file is the all-in-one lumina_2.safetensors layout, from its header."""
    shapes = ckpt.shapes_or_none(path)
    return shapes is not None and is_lumina2_checkpoint(shapes)


def split_lumina2_checkpoint(sd: StateDict) -> tuple[StateDict, StateDict, StateDict]:
    """The all-in-one checkpoint's (transformer, VAE, Gemma) weights with their prefixes stripped; the Gemma weights
    in gemma_2_2b_fp16.safetensors' layout (`model.…` and the tokenizer as `spiece_model`), so that
    `ldm.gemma_text` loads them as it loads that file. The unused logit scale is dropped; any other key raises."""
    unet, vae, gemma, other = {}, {}, {}, []
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX):]] = value
        elif key.startswith(GEMMA_PREFIX):
            gemma[key[len(GEMMA_PREFIX):]] = value
        elif key in (TOKENIZER_KEY, "text_encoders.gemma2_2b.spiece_model"):
            gemma["spiece_model"] = value
        elif key != LOGIT_SCALE_KEY:
            other.append(key)
    if other:
        raise CheckpointError(f"a Lumina 2 checkpoint with {len(other)} keys outside its transformer, VAE and Gemma: "
                              + ", ".join(other[:8]))
    if not is_lumina2(unet):
        raise CheckpointError("not a Lumina 2 checkpoint: no transformer under model.diffusion_model. in Lumina 2's "
                              "layout" + (" (a Z-Image one)" if is_z_image(unet) else ""))
    return unet, vae, gemma


def load_lumina2_unet(path: str | Path, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16) -> LoadedLumina2:
    """Load a Lumina 2 diffusion-model file (or the transformer of the all-in-one checkpoint) on `device` in
    `dtype` (fp8 and scaled fp8 weights cast as they load); keys the transformer does not use are listed as unused
    (not its final norm, which no one uses; in the all-in-one checkpoint, not its VAE and text encoder either)."""
    path = Path(path)
    family, model, unused, metadata = FILES.load(
        path, lambda family: Lumina2Model(family.unet_config), "Lumina 2 transformer", device, dtype, _refusal,
        _ignored)
    return LoadedLumina2(family, model, unused, path, metadata)


def _refusal(sd: StateDict) -> str:
    looks = ("; it is a Z-Image transformer (pad tokens), which Z-Image's loader takes"
             if is_z_image(sd) or is_z_image(sd, UNET_PREFIX) else "")
    return ("not a Lumina 2 diffusion model (no x_embedder / cap_embedder / layers.0.attention.qkv weights in its "
            f"released layout){looks}")


def _ignored(sd: StateDict, prefix: str) -> set[str]:
    """The unused final norm's key, and in the all-in-one checkpoint its VAE's and text encoder's."""
    ignored = {prefix + k for k in UNUSED}
    if is_lumina2_checkpoint(sd):
        ignored |= {k for k in sd if k.startswith((VAE_PREFIX, "text_encoders."))}
    return ignored


def random_lumina2(config: Lumina2Config = TINY_LUMINA2, seed: int = 0) -> Lumina2Model:
    """A Lumina 2 transformer with seeded random weights, each distinct (`ldm.flux_presets.distinct_random_`; the
    RMS norms' weights near 1)."""
    return distinct_random_(Lumina2Model(config).eval(), seed, norm_scales=(
        "norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight", "cap_embedder.0.weight"))


def write_tiny_lumina2(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, prefix: str = "",
                       config: Lumina2Config = TINY_LUMINA2) -> Path:
    """Write a tiny random Lumina 2 transformer (prompt width 32 unless `config` says) in ComfyUI's single-file
    layout (its keys under `prefix`: bare, as Comfy-Org's lumina_2_model_bf16 is; the unused final norm beside
    them), with the RoPE split in Loom's metadata; returns the path. Its images are noise."""
    model = random_lumina2(config, seed)
    path = Path(path)
    weights = {prefix + k: v for k, v in model.state_dict().items()} | {prefix + UNUSED[0]: torch.ones(config.dim)}
    write_safetensors(weights, path, {AXES_KEY: ",".join(map(str, config.axes_dim)), "loom.seed": str(seed)}, dtype)
    return path


def write_tiny_lumina2_checkpoint(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a tiny all-in-one Lumina 2 checkpoint in lumina_2.safetensors' layout (see the module docstring): the
    tiny transformer (prompt width 32), a tiny Flux VAE (`TINY_FLUX_VAE`) and a tiny Gemma-2 32 wide with its
    tokenizer (`ldm.gemma_text.tiny_gemma_state`); returns the path."""
    from ldm.gemma_text import HEAD_DIM_KEY, tiny_gemma_state, tiny_head_dim

    unet = random_lumina2(TINY_LUMINA2, seed).state_dict()
    vae = randomize_(AutoencoderKL(TINY_FLUX_VAE), torch.Generator().manual_seed(seed + 1)).state_dict()
    gemma = tiny_gemma_state(seed + 2, hidden=TINY_LUMINA2.cap_feat_dim)
    tokenizer = gemma.pop("spiece_model")
    weights = ({UNET_PREFIX + k: v for k, v in unet.items()} | {VAE_PREFIX + k: v for k, v in vae.items()}
               | {GEMMA_PREFIX + k: v for k, v in gemma.items()} | {TOKENIZER_KEY: tokenizer}
               | {LOGIT_SCALE_KEY: torch.tensor(4.6052), UNET_PREFIX + UNUSED[0]: torch.ones(TINY_LUMINA2.dim)})
    path = Path(path)
    # the tokenizer's bytes (uint8) are kept as they are; the weights are cast to `dtype`
    metadata = {AXES_KEY: ",".join(map(str, TINY_LUMINA2.axes_dim)),
                HEAD_DIM_KEY: str(tiny_head_dim(TINY_LUMINA2.cap_feat_dim)), "loom.seed": str(seed)}
    write_safetensors(weights, path, metadata, dtype)
    return path


def load_lumina2_checkpoint(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                            text_encoder: bool = True, text_dtype: torch.dtype | None = None) -> ckpt.LoadedCheckpoint:
    """The all-in-one lumina_2.safetensors (see the module docstring) as a LoadedCheckpoint: the transformer and the
    VAE in `dtype`, and Gemma-2-2B as Lumina 2's text encoder (`ldm.gemma_text.Lumina2TextEncoder`, in
    `text_dtype`, else `dtype`) unless `text_encoder=False`. Keys no part reads are listed as unused."""
    from ldm.gemma_text import GEMMA2_HEAD_DIM, HEAD_DIM_KEY, lumina2_text_encoder_from_state_dict

    path = Path(path)
    sd = ckpt.load_state_dict(path)
    if not is_lumina2_checkpoint(sd):
        raise CheckpointError(f"{path.name}: not a Lumina 2 checkpoint (no model.diffusion_model. transformer in "
                              "Lumina 2's layout with Gemma-2 under text_encoders.gemma2_2b.transformer.)")
    _, vae_weights, gemma = split_lumina2_checkpoint(sd)
    loaded = load_lumina2_unet(path, device, dtype)
    try:
        vae_config = ckpt._vae_config(vae_weights, "", FLUX_VAE.scaling_factor)
    except KeyError as e:
        raise CheckpointError(f"{path.name}: the checkpoint's VAE (vae.) lacks {e}") from None
    vae = ckpt._materialize(lambda: AutoencoderKL(vae_config), vae_weights, "VAE", path, device, dtype)
    unused = [*loaded.unused_keys, *(VAE_PREFIX + k for k in sorted(set(vae_weights) - set(vae.state_dict())))]
    encoder = None
    if text_encoder:
        head_dim = int(loaded.metadata.get(HEAD_DIM_KEY, GEMMA2_HEAD_DIM))
        text = lumina2_text_encoder_from_state_dict(gemma, path.name, device, text_dtype or dtype, head_dim)
        encoder = text.encoder
        unused += [GEMMA_PREFIX + k.removeprefix(f"{path.name}: ") for k in text.unused_keys]
    return ckpt.LoadedCheckpoint(loaded.family, loaded.unet, vae, encoder, sorted(unused), path, loaded.metadata)
