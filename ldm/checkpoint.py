"""Single-file checkpoints: safe reading, family detection by a table of rules, loading, saving."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
FLUX_VAE_SCALE = 0.3611  # Flux.1's latent scale (its shift is in ldm.flux_files)
StateDict = dict[str, torch.Tensor]


class CheckpointError(Exception):
    """A file that cannot be used as a model: unreadable, unsafe, or missing weights."""


# --- reading ---------------------------------------------------------------------------------------------

def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # a protocol-2+ pickle: torch's legacy (pre-zip) format
        return "torch"
    raise CheckpointError(f"{path.name}: not a checkpoint (neither safetensors nor a torch file)")


def _load_torch(path: Path) -> dict:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Pre-zip torch files cannot be memory-mapped; they are still read with weights_only.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path.name}: refusing to load, it holds Python objects beyond tensors and would need "
                "full unpickling (which can run arbitrary code); convert it to .safetensors") from None
        raise CheckpointError(f"{path.name}: not a valid torch checkpoint ({e})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path.name}: unreadable or truncated torch checkpoint ({e})") from None


def load_state_dict(path: str | Path) -> StateDict:
    """All tensors of a checkpoint file, memory-mapped where the format allows (no second copy in RAM).

    `.ckpt`/`.pt` files are read only with `torch.load(weights_only=True)`, and a top-level
    `state_dict` entry is unwrapped (or BasicSR's `params_ema`, else `params`, as Real-ESRGAN's files hold
    their weights). Anything else raises `CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.name}: no such file")
    if _sniff(path) == "safetensors":
        try:
            return safetensors.torch.load_file(path)
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path.name}: unreadable or truncated safetensors file ({e})") from None
    data = _load_torch(path)
    data = unwrap_weights(data)
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)} if isinstance(data, dict) else {}
    if not tensors:
        raise CheckpointError(f"{path.name}: holds no tensors")
    return tensors


def unwrap_weights(data: Any) -> Any:
    """The weights of a loaded .ckpt/.pth: a top-level `state_dict` entry, or BasicSR's `params_ema` (else
    `params`, as Real-ESRGAN's files hold theirs); anything else as it is."""
    for wrapper in ("state_dict", "params_ema", "params"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            return data[wrapper]
    return data


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a .safetensors file ({} for other formats)."""
    path = Path(path)
    if _sniff(path) != "safetensors":
        return {}
    with safetensors.safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


# --- family detection ------------------------------------------------------------------------------------

# The resolution each family was trained at: what front ends default to, and LoRA training's picture size.
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024, "sdxl_refiner": 1024}


@dataclass(frozen=True)
class ModelFamily:
    name: str  # "sd1" | "sd2" | "sdxl"
    prediction: str  # "eps" | "v"
    unet_config: UNetConfig
    vae_config: VAEConfig
    zero_snr: bool = False  # trained on a zero-terminal-SNR schedule (a `ztsnr` marker in the file)
    # Trained on continuous noise levels (EDM): (sigma_min, sigma_max, sigma_data); see `edm_settings`.
    edm: tuple[float, float, float] | None = None
    playground: bool = False  # Playground v2.5's latents: normalised per channel, not just scaled
    unclip: bool = False  # SD 2.1 unCLIP: `y` is an image embedding and its noise level (`ldm.unclip`)

    @property
    def latent_scale_factor(self) -> float:
        return self.vae_config.scaling_factor


@dataclass(frozen=True)
class FamilyRule:
    """One family: how to recognise it, and the facts the weights cannot tell."""

    name: str
    matches: Callable[[StateDict], bool]
    prediction: str
    scaling_factor: float
    heads: dict = field(default_factory=dict)  # the UNet's head layout is not stored in the weights
    unclip: bool = False


def _proj_in_is_linear(sd: StateDict) -> bool:
    key = next((k for k in sd if k.startswith(UNET_PREFIX) and k.endswith("proj_in.weight")), None)
    return key is not None and sd[key].ndim == 2


def _is_sdxl_refiner(sd: StateDict) -> bool:
    """The refiner's `y` is the pooled bigG embedding (as wide as its context) and five numbers; the base's
    pooled embedding is narrower than its CLIP-L + bigG context, and it has six numbers."""
    adm = sd.get(f"{UNET_PREFIX}label_emb.0.0.weight")
    attn2 = next((k for k in sd if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    return adm is not None and attn2 is not None and adm.shape[1] - 5 * 256 == sd[attn2].shape[1]


def _is_sd2_unclip(sd: StateDict) -> bool:
    """SD 2.1 unCLIP: an SD2 UNet whose `y` is an image embedding and its noise level. Known by the noise
    augmentor or image encoder saved with it, or, a UNet alone, by SD2's 1024-wide context (SDXL's is wider)."""
    if f"{UNET_PREFIX}label_emb.0.0.weight" not in sd or not _proj_in_is_linear(sd):
        return False
    if any(k.startswith(("noise_augmentor.", "embedder.model.visual.")) for k in sd):
        return True
    attn2 = next((k for k in sd if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    return attn2 is not None and sd[attn2].shape[1] == 1024


# First match wins. SD2 checkpoints cannot be told apart by prediction type from the weights: the 768-px
# releases (the common ones) predict v, the 512-px base predicts noise; see `_prediction`.
FAMILY_RULES: list[FamilyRule] = [
    # Before SDXL's rules, which know a UNet with `y` by its `label_emb` alone. An SD2 model all the same
    # (SD2 LoRAs fit it), sampled with an image prompt for `y`.
    FamilyRule("sd2", _is_sd2_unclip, "v", 0.18215, {"num_head_channels": 64}, unclip=True),
    FamilyRule("sdxl_refiner", _is_sdxl_refiner, "eps", 0.13025, {"num_head_channels": 64}),
    FamilyRule("sdxl", lambda sd: f"{UNET_PREFIX}label_emb.0.0.weight" in sd, "eps", 0.13025,
               {"num_head_channels": 64}),
    # The x4 upscaler: SD2's text encoder, its noise level as a class label (`label_emb` an embedding table).
    FamilyRule("sd_x4_upscaler", lambda sd: f"{UNET_PREFIX}label_emb.weight" in sd, "v", 0.08333,
               {"num_heads": 8}),
    FamilyRule("sd2", _proj_in_is_linear, "v", 0.18215, {"num_head_channels": 64}),
    FamilyRule("sd1", lambda sd: f"{UNET_PREFIX}input_blocks.0.0.weight" in sd, "eps", 0.18215,
               {"num_heads": 8}),
]


def _indices(keys: list[str], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def _unet_config(sd: StateDict, heads: dict) -> UNetConfig:
    """The exact UNet shape from key names and tensor shapes."""
    keys = [k[len(UNET_PREFIX):] for k in sd if k.startswith(UNET_PREFIX)]
    w = {k: sd[UNET_PREFIX + k] for k in keys}
    model_channels, in_channels = w["input_blocks.0.0.weight"].shape[:2]
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downsamples = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in w]
    num_res_blocks = (downsamples[0] - 1) if downsamples else len(blocks) - 1
    levels = len(downsamples) + 1
    mults, depths = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        mults.append(w[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // model_channels)
        depths.append(len(_indices(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")))
    attn2 = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    adm, labels = w.get("label_emb.0.0.weight"), w.get("label_emb.weight")
    out = w.get("out.2.weight")  # may be missing: reported as such when the weights are loaded
    return UNetConfig(
        in_channels=in_channels, out_channels=in_channels if out is None else out.shape[0],
        model_channels=model_channels,
        channel_mult=tuple(mults), num_res_blocks=num_res_blocks, transformer_depth=tuple(depths),
        transformer_depth_middle=len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")),
        context_dim=w[attn2].shape[1], use_linear_in_transformer=_proj_in_is_linear(sd),
        adm_in_channels=None if adm is None else adm.shape[1], num_classes=None if labels is None else labels.shape[0],
        disable_self_attentions=_text_only_levels(w, levels, num_res_blocks), **heads)


def _text_only_levels(w: StateDict, levels: int, num_res_blocks: int) -> tuple[bool, ...] | None:
    """Per level, whether its transformers' first attention reads the context (its keys as wide as the context,
    not as the image tokens); None when no level's does. A level as wide as the context reads as attending to
    itself, which is right for the one model that has such levels (the x4 upscaler's widest is self-attention)."""
    flags = []
    for level in range(levels):
        prefix = f"input_blocks.{1 + level * (num_res_blocks + 1)}.1.transformer_blocks.0.attn1."
        key, query = w.get(prefix + "to_k.weight"), w.get(prefix + "to_q.weight")
        flags.append(key is not None and query is not None and key.shape[1] != query.shape[1])
    return tuple(flags) if any(flags) else None


def _vae_config(sd: StateDict, prefix: str, scaling_factor: float) -> VAEConfig:
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    w = {k: sd[prefix + k] for k in keys}
    ch, in_channels = w["encoder.conv_in.weight"].shape[:2]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    # Flux's autoencoder has neither 1x1 convolution around the latent; a file with one of them has both.
    quant = "quant_conv.weight" in w or "post_quant_conv.weight" in w
    return VAEConfig(
        ch=ch, ch_mult=tuple(w[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels),
        num_res_blocks=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        in_channels=in_channels,
        out_ch=w["decoder.conv_out.weight"].shape[0] if "decoder.conv_out.weight" in w else in_channels,
        z_channels=w["post_quant_conv.weight" if quant else "decoder.conv_in.weight"].shape[int(not quant)],
        scaling_factor=scaling_factor, use_quant_conv=quant)


# Empty tensors that say how a checkpoint samples, as ComfyUI writes and reads them: `v_pred` for
# v-prediction, `ztsnr` for a zero-terminal-SNR schedule.
MARKERS = ("v_pred", "ztsnr")


def sampling_markers(prediction: str, zero_snr: bool) -> StateDict:
    """The marker tensors a checkpoint of this prediction type and schedule carries."""
    return {name: torch.zeros(0) for name, on in (("v_pred", prediction == "v"), ("ztsnr", zero_snr)) if on}


# Entries that mark an SDXL checkpoint trained EDM's way, as ComfyUI reads them: `edm_vpred.sigma_max` (and
# `.sigma_min`): continuous-level v-prediction (CosXL); `edm_mean`/`edm_std`: Playground v2.5, EDM's own
# prediction with sigma_data 0.5 on per-channel normalised latents.
EDM_KEYS = ("edm_vpred.sigma_max", "edm_vpred.sigma_min", "edm_mean", "edm_std")


def edm_settings(state_dict: StateDict) -> tuple[str, tuple[float, float, float], bool] | None:
    """(prediction, (sigma_min, sigma_max, sigma_data), Playground latents) of an EDM-trained checkpoint, or
    None for one trained on SD's discrete schedule. Shapes-only tensors (a header read) give the defaults."""
    def value(key: str, default: float) -> float:
        tensor = state_dict.get(key)
        return default if tensor is None or tensor.is_meta or tensor.numel() != 1 else float(tensor)

    if "edm_vpred.sigma_max" in state_dict:
        return "v", (value("edm_vpred.sigma_min", 0.002), value("edm_vpred.sigma_max", 120.0), 1.0), False
    if "edm_mean" in state_dict and "edm_std" in state_dict:
        return "edm", (0.002, 80.0, 0.5), True
    return None


def _prediction(rule: FamilyRule, metadata: dict[str, str], v_prediction: bool | None,
                markers: Collection[str] = ()) -> str:
    """Explicit override, then a `v_pred` marker tensor, then file metadata (ours or ModelSpec's), then the
    family's usual choice."""
    if v_prediction is not None:
        return "v" if v_prediction else "eps"
    if "v_pred" in markers:
        return "v"
    declared = metadata.get("loom.prediction") or metadata.get("modelspec.prediction_type", "")
    if declared in ("v", "v_prediction"):
        return "v"
    if declared in ("eps", "epsilon"):
        return "eps"
    return rule.prediction


def head_layout(rule: FamilyRule, metadata: dict[str, str]) -> dict:
    """The UNet's attention head layout, which its weights cannot tell: the one our metadata saved (tiny
    test models have their own), else the family's standard one."""
    if "loom.unet_config" not in metadata:
        return rule.heads
    saved = json.loads(metadata["loom.unet_config"])
    return {"num_heads": saved["num_heads"], "num_head_channels": saved["num_head_channels"]}


def detect_family(state_dict: StateDict, metadata: dict[str, str] | None = None,
                  v_prediction: bool | None = None) -> ModelFamily:
    """Family and exact configuration of a full LDM checkpoint, from its keys and shapes.

    `metadata` may carry the head layout (`loom.unet_config`, written by `save_checkpoint`) and the
    prediction type; without it the family's standard head layout is assumed.
    """
    metadata = metadata or {}
    if f"{UNET_PREFIX}input_blocks.1.0.time_stack.in_layers.0.weight" in state_dict:  # ldm.svd_files reads these
        raise CheckpointError("a Stable Video Diffusion (img2vid) checkpoint: load it with ImageOnlyCheckpointLoader")
    rule = next((r for r in FAMILY_RULES if r.matches(state_dict)), None)
    if rule is None:
        raise CheckpointError("not a Stable Diffusion checkpoint: no model.diffusion_model UNet weights")
    try:
        unet_config = _unet_config(state_dict, head_layout(rule, metadata))
        vae_config = _vae_config(state_dict, VAE_PREFIX, rule.scaling_factor)
    except (KeyError, StopIteration) as e:
        raise CheckpointError(f"incomplete {rule.name} checkpoint: no weight {e}") from None
    markers = [k for k in MARKERS if k in state_dict]
    prediction = _prediction(rule, metadata, v_prediction, markers)
    edm = edm_settings(state_dict)
    if edm is not None:
        return ModelFamily(rule.name, edm[0] if v_prediction is None else prediction, unet_config, vae_config,
                           edm=edm[1], playground=edm[2], unclip=rule.unclip)
    return ModelFamily(rule.name, prediction, unet_config, vae_config, zero_snr="ztsnr" in markers,
                       unclip=rule.unclip)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_shapes(path: str | Path) -> StateDict | None:
    """Every tensor of a .safetensors file as a meta tensor (name, shape, dtype; no data).

    Reads only the file's JSON header, so validation can tell a model's family before anything
    heavy runs. None for other formats (a pickle-based .ckpt cannot be read without loading it).
    """
    path = Path(path)
    if not path.is_file() or _sniff(path) != "safetensors":
        return None
    shapes = {}
    with safetensors.safe_open(path, framework="pt") as f:
        for key in f.keys():
            view = f.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(view.get_dtype(), torch.float32)
            shapes[key] = torch.empty(view.get_shape(), dtype=dtype, device="meta")
    return shapes


def metadata_ints(metadata: Mapping[str, str], key: str) -> tuple[int, ...] | None:
    """Integers a file's metadata holds under `key` as "a,b,c" (e.g. Loom's RoPE split of a tiny model), or None."""
    saved = metadata.get(key)
    return None if saved is None else tuple(int(a) for a in saved.split(","))


def shapes_or_none(path: str | Path) -> StateDict | None:
    """`read_shapes`, or None also for files whose header cannot be read: for header probes (`is_..._file`) that
    only ask whether a file is theirs."""
    try:
        return read_shapes(path)
    except (CheckpointError, safetensors.SafetensorError, OSError, ValueError):
        return None


def peek_family(path: str | Path) -> ModelFamily | None:
    """The family of a checkpoint file from its header alone; None when the header cannot tell."""
    try:
        shapes = read_shapes(path)
        return None if shapes is None else detect_family(shapes, read_metadata(path))
    except (CheckpointError, safetensors.SafetensorError, OSError, ValueError):
        return None


# --- loading into modules --------------------------------------------------------------------------------

@dataclass
class LoadedCheckpoint:
    family: ModelFamily
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: nn.Module | None
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]
    noise_augmentor: nn.Module | None = None  # an unCLIP checkpoint's (ldm.unclip.NoiseAugmentor)


@dataclass
class LoadedVAE:
    vae: AutoencoderKL
    unused_keys: list[str]
    path: Path


def _strip(sd: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _vae_attention_as_conv(sd: StateDict) -> StateDict:
    """Some VAE files (converted from diffusers) store the mid attention projections as linear weights."""
    pattern = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")
    return {k: v[:, :, None, None] if v.ndim == 2 and pattern.search(k) else v for k, v in sd.items()}


def check_fit(factory: Callable[[], nn.Module], weights: StateDict, sizes: object) -> None:
    """ValueError naming the weights missing, unexpected or misshapen in `weights` for `factory()`'s model (built on
    the meta device), whose `sizes` (a config) the weights implied."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in factory().state_dict().items()}
    wrong = sorted(k for k in expected.keys() & weights.keys() if tuple(weights[k].shape) != tuple(expected[k]))
    missing, extra = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    for what, keys in (("missing", missing), ("unexpected", extra), ("misshapen", wrong)):
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            raise ValueError(f"{len(keys)} weights {what} for the sizes the file implies ({sizes}): {shown}")


def _materialize(factory: Callable[[], nn.Module], weights: StateDict, what: str, path: Path,
                 device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Build `factory()` without allocating, then adopt the file's tensors (cast only where needed).

    The module comes back frozen (eval, no grad), like the text encoder; training code unfreezes.
    """
    with torch.device("meta"):
        module = factory()
    expected = list(module.state_dict())
    missing = [k for k in expected if k not in weights]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path.name}: the {what} is missing {len(missing)} weights: {shown}")
    state = {k: weights[k].to(device, dtype if weights[k].is_floating_point() else None) for k in expected}
    try:
        module.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path.name}: {what} weights do not fit the detected shape ({e})") from None
    return module.eval().requires_grad_(False)


def _load_text_encoder(sd: StateDict, path: Path, device: torch.device | str,
                       dtype: torch.dtype) -> tuple[nn.Module, set[str]]:
    from ldm.text_encoders import build_text_encoder, text_encoder_config_from_state_dict

    config = text_encoder_config_from_state_dict(sd)
    if config is None:
        raise CheckpointError(f"{path.name}: no text encoder weights (cond_stage_model / conditioner)")
    encoder = build_text_encoder(config, device="meta", dtype=dtype)
    try:
        used = encoder.load_ldm_state_dict(sd)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    return encoder.to(device).eval(), set(used)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    text_encoder: bool = True, v_prediction: bool | None = None) -> LoadedCheckpoint:
    """Load a single-file SD1/SD2/SDXL checkpoint into our modules on `device` in `dtype`.

    Refuses files missing any expected weight; every key it does not use is listed in `unused_keys`.
    `v_prediction` overrides the prediction type (SD2 768-px models predict v, the 512-px base eps;
    without metadata saying which, SD2 files are taken to be v). `text_encoder=False` skips it.
    """
    path = Path(path)
    sd = load_state_dict(path)
    metadata = read_metadata(path)
    try:
        family = detect_family(sd, metadata, v_prediction)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    unet = _materialize(lambda: UNetModel(family.unet_config), _strip(sd, UNET_PREFIX), "UNet", path,
                        device, dtype)
    vae = _materialize(lambda: AutoencoderKL(family.vae_config),
                       _vae_attention_as_conv(_strip(sd, VAE_PREFIX)), "VAE", path, device, dtype)
    used = ({UNET_PREFIX + k for k in unet.state_dict()} | {VAE_PREFIX + k for k in vae.state_dict()} | set(MARKERS)
            | set(EDM_KEYS))
    encoder = None
    if text_encoder:
        encoder, te_used = _load_text_encoder(sd, path, device, dtype)
        used |= te_used
    augmentor = None
    if family.unclip:
        from ldm.unclip import load_noise_augmentor

        augmentor, augmentor_used = load_noise_augmentor(sd, family.unet_config.adm_in_channels // 2, path.name)
        # The image encoder's keys are ldm.clip_vision's, which reads (and reports) them from the same file.
        used |= augmentor_used | {k for k in sd if k.startswith("embedder.")}
    unused = sorted(set(sd) - used)
    return LoadedCheckpoint(family, unet, vae, encoder, unused, path, metadata, augmentor)


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             scaling_factor: float | None = None) -> LoadedVAE:
    """A standalone VAE file: LDM keys with or without `first_stage_model.`, or diffusers keys.

    The weights do not say which latent space they belong to: pass the `scaling_factor` of the
    model it is used with (default: file metadata `loom.scaling_factor`, else SD1/2's 0.18215).
    """
    path = Path(path)
    sd = load_state_dict(path)
    if any(k.startswith(VAE_PREFIX) for k in sd):
        names = {k: k[len(VAE_PREFIX):] for k in sd if k.startswith(VAE_PREFIX)}
    elif "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        levels = len(_indices(list(sd), r"decoder\.up_blocks\.(\d+)\."))
        names = {k: _diffusers_vae_key_to_ldm(k, levels) for k in sd}
    else:
        names = {k: k for k in sd}
    weights = _vae_attention_as_conv({new: sd[old] for old, new in names.items()})
    if scaling_factor is None:
        # Without 1x1 convolutions around the latent it is Flux's autoencoder (BFL's ae.safetensors), with its scale.
        flux = not {"quant_conv.weight", "post_quant_conv.weight"} & set(weights)
        default = FLUX_VAE_SCALE if flux else 0.18215
        scaling_factor = float(read_metadata(path).get("loom.scaling_factor", default))
    try:
        config = _vae_config(weights, "", scaling_factor)
    except KeyError as e:
        from ldm.parts import look_of

        look = look_of(sd)
        held = f": it looks like {look.what}; {look.advice}" if look is not None and look.kind != "vae" else ""
        raise CheckpointError(f"{path.name}: not a VAE Loom knows (no weight {e}){held}") from None
    vae = _materialize(lambda: AutoencoderKL(config), weights, "VAE", path, device, dtype)
    expected = vae.state_dict().keys()
    return LoadedVAE(vae, sorted(k for k in sd if names.get(k) not in expected), path)


_DIFFUSERS_VAE_RULES = [
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.mid.attn_1."),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
    (r"conv_norm_out", lambda m: "norm_out"),
    (r"conv_shortcut", lambda m: "nin_shortcut"),
    (r"attn_1\.(group_norm)", lambda m: "attn_1.norm"),
    (r"attn_1\.(?:to_q|query)", lambda m: "attn_1.q"),
    (r"attn_1\.(?:to_k|key)", lambda m: "attn_1.k"),
    (r"attn_1\.(?:to_v|value)", lambda m: "attn_1.v"),
    (r"attn_1\.(?:to_out\.0|proj_attn)", lambda m: "attn_1.proj_out"),
]


def _diffusers_vae_key_to_ldm(key: str, up_levels: int) -> str:
    # diffusers numbers decoder levels from the lowest resolution, LDM from the highest.
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{up_levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{up_levels - 1 - int(m[1])}.upsample.", key)
    for pattern, replace in _DIFFUSERS_VAE_RULES:
        key = re.sub(pattern, replace, key)
    return key


# --- saving ----------------------------------------------------------------------------------------------

def write_safetensors(tensors: StateDict, path: str | Path, metadata: dict[str, str],
                      dtype: torch.dtype | None = None) -> None:
    """safetensors' save_file of `tensors` (floating-point ones cast to `dtype` if given; the folder made if
    need be), with the permissions of any new file: safetensors makes its files owner-only (0600), which a
    model shared with other users, or served from another account, cannot be read by."""
    tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in tensors.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    umask = _umask()
    if umask is not None:
        try:
            os.chmod(path, 0o666 & ~umask)
        except OSError:  # a file system without Unix permissions: the file is written, which is what matters
            pass


def _umask() -> int | None:
    """The process's umask, read without changing it (os.umask would, for a moment, for every thread);
    None where it cannot be read (not Linux), and the file keeps the mode safetensors gave it."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def save_checkpoint(path: str | Path, unet: UNetModel, vae: AutoencoderKL, text_encoder: nn.Module | None,
                    metadata: dict[str, str], dtype: torch.dtype | None = None,
                    markers: StateDict | None = None) -> Path:
    """Write one LDM-layout .safetensors file (weights cast to `dtype` if given) with string metadata and the
    `markers` (see `sampling_markers`).

    The UNet config goes into the metadata too, so head layouts that differ from the family's standard
    one (tiny test models) survive the round trip.
    """
    path = Path(path)
    tensors: StateDict = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    if text_encoder is not None:
        tensors.update(text_encoder.ldm_state_dict())
    tensors.update(markers or {})
    unet_fields = {f.name: getattr(unet.config, f.name) for f in fields(unet.config)}
    metadata = {"loom.unet_config": json.dumps(unet_fields), "loom.scaling_factor": str(vae.scaling_factor),
                **metadata}
    write_safetensors(tensors, path, metadata, dtype)
    return path
