"""LTX-2 model files: the all-in-one checkpoint's parts, the family, the denoiser the sampler calls, tiny files.

Files: Lightricks' `ltx-2-19b-dev.safetensors` (and its fp8 and distilled copies; LTX-2.3's 22B alike) holds the
audio-video transformer under `model.diffusion_model.` (with its text connectors), the video VAE under `vae.`, the
audio VAE under `audio_vae.`, the vocoder under `vocoder.` and the text encoder's feature projection under
`text_embedding_projection.`; its header's `config` JSON holds what the weights do not tell (RoPE settings, the
audio front end, the vocoder's strides). ComfyUI reads that one file three times: CheckpointLoaderSimple takes the
transformer and video VAE (`load_ltx2_checkpoint`), LTXVAudioVAELoader the audio VAE and vocoder
(`load_ltx2_audio_codec`), LTXAVTextEncoderLoader the projection (`ldm.ltx2_text`); each reads only its part.
A transformer alone (models/diffusion_models) loads through UNETLoader (`load_ltx2_unet`).

Sampling (ComfyUI's LTXAV, an LTXV model): Flux's exponential time shift, 2.37 by default (LTXVScheduler and
ManualSigmas set their own levels); the latent normalised per channel by the video VAE, as LTX-Video's. The sampler
packs the video and audio latents into one (`ldm.sampling.av_latent`); `LTX2Denoiser` unpacks nothing itself: it
takes the parts, each prompt's video and audio contexts (the connectors run once per prompt before sampling:
`nodes.sd.ltx2.ltx2_conditioning`), and each part's noise mask as per-token levels (ComfyUI's process_timestep).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import UNET_PREFIX, CheckpointError, StateDict, write_safetensors
from ldm.flux_presets import distinct_random_
from ldm.ltx2 import LTX2Config, LTX2Model, config_from_state_dict, is_ltx2, tiny_config, tiny_config_23
from ldm.ltx2_audio import (
    VAE_PREFIX as AUDIO_VAE_PREFIX,
)
from ldm.ltx2_audio import (
    VOCODER_PREFIX,
    AudioVAEConfig,
    GeneratorConfig,
    LTX2AudioVAE,
    LTX2Vocoder,
    VocoderConfig,
    load_ltx2_audio,
)
from ldm.ltxv_files import LATENT_MEAN_KEY, LATENT_STD_KEY, VAE_PART, LTXVFamily, latent_statistics
from ldm.t5 import descaled_fp8, scaling_keys

PROJECTION_PREFIX = "text_embedding_projection."
# The all-in-one file's parts that other loaders read (skipped, not unused, by the transformer's loader).
OTHER_PARTS = (VAE_PART, AUDIO_VAE_PREFIX, VOCODER_PREFIX, PROJECTION_PREFIX)


@dataclass(frozen=True)
class LTX2Family(LTXVFamily):
    """An LTX-2 model's family: LTX-Video's (the video latents' statistics, None for a transformer-only file; Flux's
    default time shift; noise masks as per-token levels) with LTX-2's transformer, its latents video and audio,
    sampled together."""

    unet_config: LTX2Config
    name: str = "ltx2"
    audio_video: bool = True  # samples LTXVConcatAVLatent's latents (ldm.sampling.av_latent)


class LTX2Denoiser(nn.Module):
    """The LTX-2 transformer as the sampler calls it, through `ldm.sampling.av_latent.PackedParts`: the parts
    [video [B, 128, F, h, w], audio [B, 8, T, 16]] at flow levels `timesteps` [B], the prompt's video context and,
    by keyword, its audio context and mask (`ltx2_conditioning`); `y` [B, 1 + 6 K]: the frame rate, then keyframe
    guides' [3, K, 2] pixel spans flattened; `guide_attention` [B, K, 2]: each guide token's guide and weight
    (`ltx2_conditioning`'s, only where one is not 1); `denoise_masks`: each part's noise mask, the token's level
    being the mask times the step's (with guides, the video tokens where it is negative are left out); `ref_audio`
    [B, R, 128]: a reference clip's audio tokens (LTXVReferenceAudio's).

    `stg_blocks`, `a2v_cross_attention` and `v2a_cross_attention` are `LTX2Model.forward`'s switches of the same
    meaning, which a guidance pass sets on a shallow copy (`ldm.ltx2_guidance.LTX2Perturbation`)."""

    stg_blocks: frozenset[int] = frozenset()
    a2v_cross_attention = True
    v2a_cross_attention = True
    cuda_graphs_safe = False  # called with a list of parts, which a graph replay does not take
    # fp8 weights (--weights-dtype fp8) for the blocks alone, as Lightricks' fp8 files keep the rest in bf16
    fp8_keep = r"^model\.(?!transformer_blocks\.)"

    def __init__(self, model: LTX2Model):
        super().__init__()
        self.model = model

    @property
    def config(self) -> LTX2Config:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, parts: Sequence[Tensor], timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                audio_context: Tensor | None = None, attn_mask: Tensor | None = None,
                denoise_masks: Sequence[Tensor] | None = None, control: object = None,
                guide_attention: Tensor | None = None, ref_audio: Tensor | None = None) -> list[Tensor]:
        if control is not None:
            raise ValueError("ControlNets and T2I-Adapters do not fit an LTX-2 model")
        video, audio = parts
        batch = video.shape[0]
        frame_rate, keyframes = 25.0, None
        if y is not None:  # the prompts of a call share the frame rate (LTXVConditioning sets both)
            frame_rate = float(y.reshape(-1)[0])
            if y.shape[-1] > 1:
                keyframes = y.reshape(batch, -1)[:, 1:].unflatten(1, (3, -1, 2))
        levels = timesteps.reshape(-1).float().expand(batch) if timesteps.numel() == 1 else timesteps.reshape(-1)
        video_levels = audio_levels = levels
        kept = None
        if denoise_masks is not None:
            video_mask, audio_mask = denoise_masks
            video_levels = (video_mask[:, 0] * levels.reshape(-1, 1, 1, 1)).flatten(1)
            audio_levels = audio_mask[:, 0, :, 0] * levels.reshape(-1, 1)
            holes = video_mask[0, 0] < 0  # IC-LoRA guides' holes (the first item's, as ComfyUI's grid mask)
            if keyframes is not None and bool(holes.any()):
                kept = ~holes.flatten()
        out_video, out_audio = self.model(video, audio, video_levels, audio_levels, context, audio_context,
                                          attn_mask, frame_rate, keyframes, guide_attention=guide_attention,
                                          kept_tokens=kept,
                                          ref_audio=ref_audio, stg_blocks=self.stg_blocks,
                                          a2v=self.a2v_cross_attention, v2a=self.v2a_cross_attention)
        return [out_video, out_audio]


@dataclass
class LoadedLTX2:
    family: LTX2Family
    unet: LTX2Denoiser
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def _prefix(keys: StateDict | set[str]) -> str | None:
    return next((p for p in (UNET_PREFIX, "") if is_ltx2(keys, p)), None)


def ltx2_family(shapes: StateDict, metadata: dict[str, str] | None, statistics: tuple | None = None,
                name: str = "") -> LTX2Family:
    prefix = _prefix(shapes)
    if prefix is None:
        raise CheckpointError(f"{name}: not an LTX-2 transformer (no patchify_proj / audio_adaln_single weights)")
    try:
        told = json.loads((metadata or {}).get("config", "{}")).get("transformer", {})
        config = config_from_state_dict(shapes, prefix, told.get("num_attention_heads", 32),
                                        told.get("audio_num_attention_heads", 32), metadata=metadata)
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{name}: {e}") from None
    mean, std = statistics if statistics is not None else (None, None)
    return LTX2Family(config, latent_mean=mean, latent_std=std)


def is_ltx2_file(path: str | Path) -> bool:
    """Whether a .safetensors file holds an LTX-2 transformer (bare or in an all-in-one file), from its header."""
    shapes = ckpt.shapes_or_none(path)
    return shapes is not None and _prefix(shapes) is not None


def _statistics(path: Path, shapes: StateDict) -> tuple | None:
    if LATENT_MEAN_KEY not in shapes or LATENT_STD_KEY not in shapes:
        return None
    with safetensors.safe_open(path, framework="pt") as f:
        return latent_statistics({k: f.get_tensor(k) for k in (LATENT_MEAN_KEY, LATENT_STD_KEY)})


def peek_ltx2(path: str | Path) -> LTX2Family | None:
    """The family of an LTX-2 file from its header (and its video latents' two statistics tensors); None for other
    files and formats."""
    path = Path(path)
    shapes = ckpt.shapes_or_none(path)
    if shapes is None or _prefix(shapes) is None:
        return None
    return ltx2_family(shapes, ckpt.read_metadata(path), _statistics(path, shapes), path.name)


def read_part(path: Path, prefixes: tuple[str, ...]) -> StateDict:
    """The tensors of a checkpoint under `prefixes`; the rest of a .safetensors file stays on disk."""
    shapes = ckpt.read_shapes(path)
    if shapes is None:
        return {k: v for k, v in ckpt.load_state_dict(path).items() if k.startswith(prefixes)}
    with safetensors.safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in shapes if k.startswith(prefixes)}


def load_ltx2_unet(path: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.bfloat16) -> LoadedLTX2:
    """An LTX-2 transformer (a file of its own, or the one in an all-in-one file) on `device` in `dtype`, fp8 and
    scaled fp8 weights cast as they load; the keys of neither it nor the file's other parts are listed unused."""
    path = Path(path)
    shapes = ckpt.read_shapes(path)
    prefix = _prefix(shapes if shapes is not None else ckpt.load_state_dict(path))
    if prefix is None:
        raise CheckpointError(f"{path.name}: not an LTX-2 transformer (no patchify_proj / audio_adaln_single weights "
                              "in Lightricks' layout)")
    sd = read_part(path, (prefix,)) if prefix else ckpt.load_state_dict(path)
    metadata = ckpt.read_metadata(path)
    family = ltx2_family(sd, metadata, _statistics(path, shapes) if shapes is not None else None, path.name)
    weights = descaled_fp8({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    model = ckpt._materialize(lambda: LTX2Model(family.unet_config), weights, "LTX-2 transformer", path, device,
                              dtype)
    expected, skipped = set(model.state_dict()), set(scaling_keys(sd))
    keys = shapes if shapes is not None else sd
    unused = sorted(k for k in keys if k not in skipped and not k.startswith(OTHER_PARTS if prefix else ())
                    and not (k.startswith(prefix) and k[len(prefix):] in expected))
    return LoadedLTX2(family, LTX2Denoiser(model).eval(), unused, path, metadata)


def load_ltx2_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.bfloat16) -> ckpt.LoadedCheckpoint:
    """An all-in-one LTX-2 file as a LoadedCheckpoint: the transformer, its family with the video latents'
    statistics, the video VAE, and no text encoder (Gemma 3 comes from its own file: LTXAVTextEncoderLoader)."""
    from ldm.ltxv_vae import load_ltxv_vae

    path = Path(path)
    loaded = load_ltx2_unet(path, device, dtype)
    shapes = ckpt.read_shapes(path)
    if shapes is not None and not any(k.startswith(VAE_PART) for k in shapes):
        raise CheckpointError(f"{path.name}: an LTX-2 transformer without its video VAE; load it with UNETLoader "
                              "(Load Diffusion Model) and the VAE with VAELoader")
    vae = load_ltxv_vae(path, device, dtype, prefix=VAE_PART)  # its part alone, with the header's padding modes
    return ckpt.LoadedCheckpoint(loaded.family, loaded.unet, vae, None, loaded.unused_keys, path, loaded.metadata)


class LTX2AudioCodec(nn.Module):
    """LTX-2's audio VAE and vocoder as one VAE (LTXVAudioVAELoader's): waveforms to normalised audio latents
    [B, 8, T, 16] and back, at the vocoder's rate."""

    def __init__(self, vae: LTX2AudioVAE, vocoder: LTX2Vocoder):
        super().__init__()
        self.audio_vae, self.vocoder = vae, vocoder

    @property
    def sample_rate(self) -> int:
        """The rate of decoded audio (the vocoder's: 24 kHz for LTX-2, 48 kHz for LTX-2.3)."""
        return self.vocoder.sample_rate

    @property
    def input_sample_rate(self) -> int:
        """The rate audio is encoded at (16 kHz): encode resamples to it."""
        return self.audio_vae.sample_rate

    @property
    def latent_channels(self) -> int:
        return self.audio_vae.config.latent_channels

    def latent_shape(self, frames: int, frame_rate: float, batch_size: int = 1) -> tuple[int, int, int, int]:
        """ComfyUI's LTXVEmptyLatentAudio: the audio latent for `frames` video frames at `frame_rate`."""
        return self.audio_vae.latent_shape(frames, frame_rate, batch_size)

    def encode(self, waveform: Tensor, sample_rate: int) -> Tensor:
        return self.audio_vae.encode(waveform.to(self.audio_vae.dtype), sample_rate)

    def decode(self, latents: Tensor) -> Tensor:
        """[B, 2, samples] at `sample_rate`."""
        return self.vocoder(self.audio_vae.decode(latents.to(self.audio_vae.dtype)).to(self.vocoder.dtype))


def load_ltx2_audio_codec(path: str | Path, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> LTX2AudioCodec:
    """The audio VAE and vocoder of an LTX-2 checkpoint (or a file of them alone), the rest left on disk."""
    path = Path(path)
    part = read_part(path, (AUDIO_VAE_PREFIX, VOCODER_PREFIX))
    if not any(k.startswith(AUDIO_VAE_PREFIX) for k in part):
        raise CheckpointError(f"{path.name}: no LTX-2 audio VAE (audio_vae.* weights): LTXVAudioVAELoader takes an "
                              "LTX-2 checkpoint such as ltx-2-19b-dev.safetensors")
    try:
        vae, vocoder = load_ltx2_audio(part, metadata=ckpt.read_metadata(path), device=device, dtype=dtype)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("state dict", path.name)) from None
    return LTX2AudioCodec(vae, vocoder).eval()


# --- tiny files ----------------------------------------------------------------------------------------------

TINY_LTX2 = tiny_config(in_channels=128, out_channels=128)
TINY_AUDIO_VAE = AudioVAEConfig(base_channels=16, ch_mult=(1, 2, 4), num_res_blocks=1)
TINY_VOCODER = VocoderConfig(vocoder=GeneratorConfig(initial_channels=64, resblock_kernel_sizes=(3,),
                                                     resblock_dilations=((1, 3, 5),)))
# What the weights do not tell, as Lightricks' header states it (ComfyUI reads the same).
TINY_HEADER = {"audio_vae": {"model": {"params": {"ddconfig": {"mel_bins": 64, "causality_axis": "height"},
                                                  "preprocessing": {"stft": {"hop_length": 160,
                                                                             "filter_length": 1024}}}},
                             "sampling_rate": 16000},
               "vocoder": {"upsample_rates": [6, 5, 2, 2, 2], "resblock_dilation_sizes": [[1, 3, 5]]}}


# LTX-2.3's layout at the same size: gated attention, modulated prompts, no caption projections (the connectors as
# wide as the streams), a BigVGAN vocoder with its bandwidth extension (16 kHz mel -> 48 kHz).
TINY_LTX23 = tiny_config_23(in_channels=128, out_channels=128)
TINY_VOCODER_23 = VocoderConfig(
    vocoder=GeneratorConfig(initial_channels=64, upsample_rates=(5, 2, 2, 2, 2, 2), resblock_kernel_sizes=(3,),
                            upsample_kernel_sizes=(11, 4, 4, 4, 4, 4), resblock_dilations=((1, 3, 5),),
                            bigvgan=True, final="clamp", final_bias=False),
    bwe=GeneratorConfig(initial_channels=32, upsample_rates=(6, 5, 2, 2, 2), upsample_kernel_sizes=(12, 11, 4, 4, 4),
                        resblock_kernel_sizes=(3,), resblock_dilations=((1, 3, 5),), bigvgan=True, final="none",
                        final_bias=False),
    sample_rate=48000)


def write_tiny_ltx2(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16,
                    config: LTX2Config = TINY_LTX2, projection: StateDict | None = None,
                    vocoder: VocoderConfig = TINY_VOCODER) -> Path:
    """A tiny random all-in-one LTX-2 file (LTX-2.3's with `TINY_LTX23` and `TINY_VOCODER_23`): transformer, video
    VAE, audio VAE, vocoder, header, and the text projection `projection` (`ldm.ltx2_text.tiny_projection_state`,
    or LTX-2.3's two) if given. The videos it makes are noise."""
    from ldm.ltxv_vae import LTXVVAE
    from ldm.ltxv_vae import TINY_LTX2 as TINY_VIDEO_VAE

    path = Path(path)
    parts = {UNET_PREFIX: distinct_random_(LTX2Model(config).eval(), seed, norm_scales=("norm.weight",)),
             VAE_PART: distinct_random_(LTXVVAE(TINY_VIDEO_VAE).eval(), seed + 1),
             AUDIO_VAE_PREFIX: distinct_random_(LTX2AudioVAE(TINY_AUDIO_VAE).eval(), seed + 2),
             VOCODER_PREFIX: distinct_random_(LTX2Vocoder(vocoder).eval(), seed + 3)}
    tensors: StateDict = {}
    for prefix, module in parts.items():
        for key, value in module.state_dict().items():
            if prefix == VOCODER_PREFIX and vocoder.bwe is None:
                key = key.removeprefix("vocoder.")  # LTX-2's lone generator sits under `vocoder.` in the file
            tensors[prefix + key] = value
    for stats in ("per_channel_statistics.std-of-means",):  # positive spreads, as trained statistics are
        for prefix in (VAE_PART, AUDIO_VAE_PREFIX):
            tensors[prefix + stats] = tensors[prefix + stats].abs() + 0.5
    tensors |= projection or {}
    header = {**TINY_HEADER, "transformer": {"num_attention_heads": config.num_heads,
                                             "audio_num_attention_heads": config.audio_num_heads,
                                             "connector_num_attention_heads": config.connector_heads,
                                             "audio_connector_num_attention_heads": config.audio_connector_heads}}
    if vocoder.bwe is not None:
        header["vocoder"] = {}  # the released strides, known by their kernels
    write_safetensors(tensors, path, {"config": json.dumps(header), "loom.seed": str(seed)}, dtype)
    return path


TINY_GEMMA_WIDTH, TINY_GEMMA_LAYERS = 32, 3


def make_ltx2_files(models_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Tiny random LTX-2 files in the model folders under `models_dir`, named like Lightricks' and Comfy-Org's with
    `-tiny`: the all-in-one checkpoints of LTX-2 and LTX-2.3 (their text projections included), Gemma 3 (with its
    vision tower) and the x2 latent upscaler; returns each file's path by part. Their videos and sounds are noise."""
    from ldm.ltx2_text import tiny_projection_state, write_tiny_gemma3
    from ldm.ltx2_upsampler import LatentUpsampler, LatentUpsamplerConfig

    models_dir = Path(models_dir)
    paths = {"checkpoint": models_dir / "checkpoints" / "ltx-2-19b-dev-tiny.safetensors",
             "checkpoint_23": models_dir / "checkpoints" / "ltx-2.3-22b-dev-tiny.safetensors",
             "text_encoder": models_dir / "text_encoders" / "gemma_3_12B_it-tiny.safetensors",
             "upscaler": models_dir / "latent_upscale_models" / "ltx-2-spatial-upscaler-x2-1.0-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    projection = tiny_projection_state(seed, TINY_GEMMA_WIDTH, TINY_GEMMA_LAYERS, TINY_LTX2.caption_channels)
    write_tiny_ltx2(paths["checkpoint"], seed, dtype, projection=projection)
    widths = {"video": TINY_LTX23.connector_dim, "audio": TINY_LTX23.audio_connector_dim}
    dual = {}
    for i, (part, width) in enumerate(widths.items()):  # LTX-2.3's two projections, with their biases
        [weight] = tiny_projection_state(seed + 6 + i, TINY_GEMMA_WIDTH, TINY_GEMMA_LAYERS, width).values()
        dual |= {f"{PROJECTION_PREFIX}{part}_aggregate_embed.weight": weight,
                 f"{PROJECTION_PREFIX}{part}_aggregate_embed.bias": torch.zeros(width)}
    write_tiny_ltx2(paths["checkpoint_23"], seed + 7, dtype, TINY_LTX23, dual, TINY_VOCODER_23)
    write_tiny_gemma3(paths["text_encoder"], seed + 4, dtype, TINY_GEMMA_WIDTH, TINY_GEMMA_LAYERS, vision=True)
    upsampler = LatentUpsamplerConfig(mid_channels=32, blocks_per_stage=1, rational=True)
    weights = distinct_random_(LatentUpsampler(upsampler).eval(), seed + 5).state_dict()
    write_safetensors(weights, paths["upscaler"], {"config": json.dumps({"spatial_scale": 2.0})}, dtype)
    return paths
