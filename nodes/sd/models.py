"""The MODEL, CLIP and VAE values that flow between nodes: loaded ldm modules plus what they are."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ldm.sampling.model_patches import SamplingPatches
from ldm.sampling.schedules import ContinuousSchedule, ContinuousVSchedule, DiscreteSchedule

# SD's noise schedule, shared by every model that does not set its own (ModelSamplingDiscrete's zsnr does),
# and its zero-terminal-SNR rescaling, for checkpoints marked as trained on it.
DEFAULT_SCHEDULE = DiscreteSchedule()
ZERO_SNR_SCHEDULE = DEFAULT_SCHEDULE.zero_terminal_snr()


def family_refusal(family: str | None, wanted: str, source: str, needs: str) -> str | None:
    """Why a CLIP or MODEL of `family` (from `source`) does not fit a node made for `wanted` family: `needs`, a
    template of `{source}` and `{family}`; None when it fits, or when validation cannot tell (no family known)."""
    if family is None or family == wanted:
        return None
    return needs.format(source=source, family=family.upper())


def clip_family_facts(linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """A prompt encoder's CONDITIONING facts: the family of the CLIP linked, when known, which the ControlNet
    nodes check their ControlNet's against at validation."""
    family = linked.get("clip", {}).get("family")
    return {} if family is None else {0: {"family": family}}


# Flow-model families whose levels follow SD3's time shift (ModelSamplingSD3).
SD3_SHIFTED = frozenset({"sd3", "wan21", "wan22", "qwen_image", "z_image", "lumina2", "hidream", "ace_step15",
                         "qwen_image21", "hunyuan_video15", "hunyuan_image21"})


def schedule_of(family: Any) -> DiscreteSchedule:
    """The noise schedule a checkpoint of this family (ldm.checkpoint.ModelFamily) samples with."""
    if getattr(family, "prediction", None) == "flow":  # Flux or SD3 (ldm.flux_files, ldm.sd3_files), own time shift
        from ldm.sampling.flow import FlowSchedule, SD3FlowSchedule

        # SD3's shift (ComfyUI's ModelSamplingDiscreteFlow) for SD3 and Wan; Flux's exponential one for the others
        return (SD3FlowSchedule if family.name in SD3_SHIFTED else FlowSchedule)(family.shift)
    if getattr(family, "edm", None) is not None:
        return ContinuousSchedule(*family.edm)
    if getattr(family, "v_continuous", None) is not None:  # Stable Audio's (ldm.stable_audio_files)
        return ContinuousVSchedule(*family.v_continuous)
    if getattr(family, "zero_snr", False):
        return ZERO_SNR_SCHEDULE
    return discrete_betas_of(family)


def discrete_betas_of(family: Any) -> DiscreteSchedule:
    """The family's table of 1,000 discrete noise levels as configured for training, before any zero-SNR
    rescaling: SD's scaled-linear betas, or the x4 upscaler's own (`ldm.upscaler_x4`). ModelSamplingDiscrete
    starts from it, as ComfyUI's starts from the model's sampling settings."""
    if getattr(family, "name", None) == "sd_x4_upscaler":
        from ldm.upscaler_x4 import schedule

        return schedule()
    return DEFAULT_SCHEDULE


# Playground v2.5's latent normalisation (ComfyUI's SDXL_Playground_2_5): per channel, (z - mean) * 0.5 / std.
PLAYGROUND_MEAN = (-1.6574, 1.886, -1.383, 2.5155)
PLAYGROUND_STD = (8.4927, 5.9022, 6.5498, 5.2299)

# Models are owned (and budgeted) by the model cache; an output-cache entry holding one costs little, plus the
# weights it made itself (a LoRA's patched layers, a merge's mixed ones), which only that entry holds.
HANDLE_SIZE = 1024


def new_bytes(module: torch.nn.Module, base: torch.nn.Module) -> int:
    """The bytes of `module`'s weights that it does not share with `base` (a patched or merged copy's own)."""
    shared = {t.data_ptr() for t in base.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if t.data_ptr() not in shared)


@dataclass(frozen=True, eq=False)
class DiffusionModel:
    """MODEL: a UNet, its family (schedule, prediction, latent scale), the LoRAs applied to it, and what model
    patches changed: the noise schedule and prediction type (ModelSamplingDiscrete), guidance and masks
    (`sampling_patches`). Patches of the UNet's forward (FreeU) live on its own patched copy."""

    unet: torch.nn.Module
    family: Any  # ldm.checkpoint.ModelFamily
    source: str
    loras: tuple[str, ...] = ()
    schedule: DiscreteSchedule = DEFAULT_SCHEDULE
    prediction_type: str | None = None  # None: the family's
    sampling_patches: SamplingPatches = SamplingPatches()
    own_bytes: int = 0  # weights this value made and alone holds (see HANDLE_SIZE)
    playground_latents: bool | None = None  # None: the family's (ModelSamplingContinuousEDM sets it)
    compile_backend: str | None = None  # TorchCompileModel's: torch.compile the UNet with it (as --compile does)
    noise_augmentor: Any = None  # an unCLIP checkpoint's (ldm.unclip.NoiseAugmentor); None: the standard one
    # The safetensors metadata of the last LoRA applied whose file has any (ComfyUI's "lora_metadata" attachment,
    # which GetICLoRAParameters reads); None: no such LoRA
    lora_metadata: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.unet, torch.nn.Module):  # --lowvram streams a denoiser's blocks (executor.devices)
            self.unet.loom_denoiser = True

    @property
    def prediction(self) -> str:
        return self.prediction_type or self.family.prediction

    def _latent_affine(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(shift, scale) from a LATENT's values (unscaled, as the VAE gives them) to the model's latents."""
        playground = self.playground_latents if self.playground_latents is not None else self.family.playground
        shape = (1, -1, *[1] * (like.ndim - 2))
        if getattr(self.family, "latent_mean", None) is not None:  # video models' per-channel statistics (Wan)
            if like.shape[1] != len(self.family.latent_mean):
                raise ValueError(f"{self.source} is a video model ({self.family.name.upper()}) sampling "
                                 f"{len(self.family.latent_mean)}-channel video latents; the latent "
                                 f"{tuple(like.shape)} is not one: make it with the model's empty video latent "
                                 "node (EmptyHunyuanLatentVideo for Wan 2.1 and Wan 2.2 14B, Wan22ImageToVideoLatent "
                                 "for Wan 2.2 5B, EmptyLTXVLatentVideo for LTX-Video)")
            mean, std = (torch.tensor(v, dtype=like.dtype, device=like.device).reshape(shape)
                         for v in (self.family.latent_mean, self.family.latent_std))
            return mean, self.family.latent_scale_factor / std
        if not playground:  # Flux's latents are shifted before they are scaled
            return getattr(self.family, "latent_shift", 0.0), self.family.latent_scale_factor
        mean, std = (torch.tensor(v, dtype=like.dtype, device=like.device).reshape(shape)
                     for v in (PLAYGROUND_MEAN, PLAYGROUND_STD))
        return mean, 0.5 / std

    def latent_in(self, samples: torch.Tensor) -> torch.Tensor:
        """A LATENT's values as the model samples them (ComfyUI's process_latent_in)."""
        shift, scale = self._latent_affine(samples)
        return (samples - shift) * scale

    def latent_out(self, x: torch.Tensor) -> torch.Tensor:
        """The model's latents back as a LATENT's values (ComfyUI's process_latent_out)."""
        shift, scale = self._latent_affine(x)
        return x / scale + shift

    @property
    def needs_adm(self) -> bool:
        return getattr(self.family.unet_config, "adm_in_channels", None) is not None

    def with_unet(self, unet: torch.nn.Module, lora: str, metadata: dict[str, str] | None = None) -> DiffusionModel:
        """A copy running `unet`, patched by `lora`; a LoRA file's `metadata` replaces the earlier one's unless
        empty, as ComfyUI's load_lora_for_models sets its attachment."""
        return replace(self, unet=unet, loras=(*self.loras, lora), own_bytes=new_bytes(unet, self.unet),
                       lora_metadata=dict(metadata) if metadata else self.lora_metadata)

    def cache_size(self) -> int:
        return HANDLE_SIZE + self.own_bytes


@dataclass(frozen=True, eq=False)
class Clip:
    """CLIP: the text encoder(s) of a checkpoint and the layer to stop at (None: the family's default)."""

    encoder: torch.nn.Module
    family_name: str
    source: str
    clip_skip: int | None = None
    loras: tuple[str, ...] = ()
    own_bytes: int = 0  # weights this value made and alone holds (see HANDLE_SIZE)
    cond_hooks: Any = None  # SetClipHooks' ldm.sampling.hooks.Hooks, which the prompts it encodes carry
    # SetClipHooks' keyframed Hooks with schedule_clip: the encoders patch `encoder` with them per keyframe range
    # as they encode (ldm.sampling.clip_schedule), giving one entry per range
    clip_schedule: Any = None
    # T5TokenizerOptions' (min_padding, min_length), which the T5 encoders tokenize with (ldm.t5.tokenizer_options)
    t5_options: tuple[int, int] | None = None

    def with_clip_skip(self, layer: int) -> Clip:
        return replace(self, clip_skip=layer)

    def with_encoder(self, encoder: torch.nn.Module, lora: str) -> Clip:
        return replace(self, encoder=encoder, loras=(*self.loras, lora), own_bytes=new_bytes(encoder, self.encoder))

    def cache_size(self) -> int:
        return HANDLE_SIZE + self.own_bytes


@dataclass(frozen=True, eq=False)
class Vae:
    """VAE: an AutoencoderKL working on unscaled latents (LATENT holds unscaled latents, as in ComfyUI)."""

    vae: torch.nn.Module
    source: str

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.scaling_factor)

    def cache_size(self) -> int:
        return HANDLE_SIZE


def file_fingerprint(path: Path | None) -> Any:
    """Size and modification time: a replaced file re-runs its loader without hashing gigabytes."""
    if path is None:
        return None
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def devices_of(ctx: Any) -> Any:
    """The engine's DeviceManager, or None when a node runs outside an engine."""
    return getattr(getattr(ctx, "services", None), "devices", None)


def device_and_dtype(ctx: Any) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """(device, model dtype, VAE dtype) from the engine's device manager; the CPU in fp32 without one."""
    devices = devices_of(ctx)
    if devices is None:
        return torch.device("cpu"), torch.float32, torch.float32
    return devices.device, devices.dtype, devices.vae_dtype


def load_device(ctx: Any) -> torch.device:
    """Where loaders put weights: the offload device; `on_device` moves a model when a node runs it."""
    devices = devices_of(ctx)
    return torch.device("cpu") if devices is None else devices.offload_device


def on_device(ctx: Any, module: torch.nn.Module, keep: tuple[torch.nn.Module, ...] = ()) -> torch.nn.Module:
    """`module` ready to run on the compute device (moved there, older models offloaded if need be, but
    not those in `keep`, which the node runs together with it)."""
    devices = devices_of(ctx)
    return module if devices is None else devices.use(module, keep=keep)
