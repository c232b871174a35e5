"""LoRA training: low-rank adapters on a frozen checkpoint's UNet, saved as a kohya-style LoRA file.

Each targeted layer's weight becomes `W + alpha/rank * up @ down` through a parametrization, so the
UNet's own code runs unchanged and only `down` and `up` train (`up` starts at zero: step 0 is the base
model). The file uses kohya's names (`lora_unet_<layer>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
diffusers' layer names for SD1/SD2, the LDM names for SDXL, as kohya's scripts write them), which
LoraLoader here, ComfyUI and A1111 read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ldm.attention import SpatialTransformer
from ldm.checkpoint import LoadedCheckpoint, write_safetensors
from ldm.lora import diffusers_unet_blocks, diffusers_unet_name
from ldm.sampling import DiscreteSchedule, sample
from ldm.training.data import ImageSet, pick_bucket
from ldm.training.loop import LoopConfig, TrainLoop, save_grid
from ldm.training.unet_trainer import checkpoint_unet, denoising_loss, encode_latents
from ldm.unet import UNetModel, sdxl_adm

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# kohya's default for the UNet: every Linear and 1x1 convolution inside the spatial transformers.
TARGETS = ("transformer", "attention")
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MAX_TOKENS = 77  # one CLIP chunk per caption, as kohya's default max_token_length


@dataclass
class LoraTrainConfig:
    rank: int = 8
    alpha: float = 8.0
    targets: str = "transformer"  # "transformer" (kohya's default) or "attention" (q, k, v, out only)
    cond_dropout: float = 0.0  # share of captions replaced by "" during training
    prediction: str | None = None  # "eps" or "v"; None: the checkpoint's
    offset_noise: float = 0.0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=500, lr=1e-4, ema_decay=0.0,
                                                                warmup_steps=50))


class LoraAdapter(nn.Module):
    """The trained pair `down` [rank, in(, kh, kw)] and `up` [out, rank(, 1, 1)]."""

    def __init__(self, down: Tensor, up: Tensor) -> None:
        super().__init__()
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)

    @classmethod
    def new(cls, weight: Tensor, rank: int, generator: torch.Generator) -> LoraAdapter:
        """kohya's start for a layer of `weight`'s shape: `down` random, `up` at zero."""
        fan_in = weight[0].numel()
        down = torch.randn(rank, *weight.shape[1:], generator=generator) / fan_in**0.5
        up = torch.zeros(weight.shape[0], rank, *([1] * (weight.ndim - 2)))
        return cls(down.to(weight.device), up.to(weight.device))

    def delta(self) -> Tensor:
        return (self.up.flatten(1) @ self.down.flatten(1)).reshape(self.up.shape[0], *self.down.shape[1:])


class PatchedWeight(nn.Module):
    """The parametrization: the frozen weight plus the adapter's scaled `delta()`, in `dtype` (None: the
    weight's own)."""

    def __init__(self, adapter: nn.Module, scale: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.adapter, self.scale, self.dtype = adapter, scale, dtype

    def forward(self, weight: Tensor) -> Tensor:
        dtype = self.dtype or weight.dtype
        return weight.to(dtype) + self.scale * self.adapter.delta().to(dtype).reshape(weight.shape)


def lora_targets(unet: UNetModel, targets: str = "transformer") -> list[str]:
    """Paths of the layers that get adapters: inside the spatial transformers, every Linear and 1x1
    convolution (`transformer`), or only the attention projections (`attention`)."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, not {targets!r}")
    paths = []
    for name, module in unet.named_modules():
        if not isinstance(module, SpatialTransformer):
            continue
        for sub, layer in module.named_modules():
            is_layer = isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))
            if is_layer and (targets == "transformer" or sub.endswith(ATTENTION)):
                paths.append(f"{name}.{sub}")
    return paths


def attach_lora(unet: UNetModel, rank: int, alpha: float, targets: str = "transformer",
                seed: int = 0) -> nn.ModuleDict:
    """Freeze `unet` and give each targeted layer an adapter; returns them, keyed by layer path
    (with "." as "__"). The UNet's outputs are the base model's until `up` moves from zero."""
    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters = nn.ModuleDict()
    for path in lora_targets(unet, targets):
        layer = unet.get_submodule(path)
        adapter = LoraAdapter.new(layer.weight.detach(), rank, generator)
        parametrize.register_parametrization(layer, "weight", PatchedWeight(adapter, alpha / rank))
        adapters[path.replace(".", "__")] = adapter
    if not adapters:
        raise ValueError("this UNet has no spatial transformer layers to put adapters on")
    return adapters


def kohya_name(path: str, blocks: dict[str, str], family: str) -> str:
    """kohya's module name of the UNet layer at `path` (`blocks`: `diffusers_unet_blocks` of the UNet)."""
    name = path if family == "sdxl" else diffusers_unet_name(path, blocks)
    if name is None:
        raise ValueError(f"no diffusers name for {path}")
    return "lora_unet_" + name.replace(".", "_")


def lora_file_tensors(unet: UNetModel, adapters: nn.ModuleDict, alpha: float, family: str) -> dict[str, Tensor]:
    """The adapters under kohya's names for `family`."""
    blocks = diffusers_unet_blocks(unet.config)
    tensors = {}
    for key, adapter in adapters.items():
        prefix = kohya_name(key.replace("__", "."), blocks, family)
        tensors[f"{prefix}.lora_down.weight"] = adapter.down.detach()
        tensors[f"{prefix}.lora_up.weight"] = adapter.up.detach()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return tensors


@torch.no_grad()
def _encode(text_encoder: nn.Module, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The frozen text encoder's contexts [N, 77, D] (the first CLIP chunk) and pooled vectors [N, P] (None
    for families without them) of `texts`."""
    encodings = [text_encoder.encode([text]) for text in texts]
    context = torch.cat([e.cond[:, :MAX_TOKENS].float() for e in encodings]).to(device)
    pooled = None if encodings[0].pooled is None else torch.cat([e.pooled.float() for e in encodings]).to(device)
    return context, pooled


def train_lora(data: ImageSet | list[ImageSet], out_dir: str | Path, config: LoraTrainConfig,
               checkpoint: LoadedCheckpoint, device: torch.device, output_name: str = "lora.safetensors",
               save_dtype: torch.dtype | None = torch.float16, preview_captions: list[str] | None = None) -> Path:
    """Train a LoRA for `checkpoint`'s UNet on `data` (one ImageSet per bucket size); the text encoder and
    the VAE stay frozen, and each picture and caption is encoded once. Resumes from `out_dir/NAME.train-state`
    (NAME: `output_name` without its suffix). Writes `NAME-loss.png`, `NAME-samples.png` (the preview captions
    with the LoRA) and the LoRA file,
    whose metadata hold the settings (kohya's `ss_*` keys and `loom.training`). Returns its path.
    `checkpoint.unet` keeps the adapters (as parametrizations, with the last step's weights)."""
    out_dir = Path(out_dir)
    if Path(output_name).suffix != ".safetensors":
        raise ValueError(f"the LoRA is written as .safetensors: give an output name like "
                         f"{Path(output_name).stem}.safetensors, not {output_name}")
    if not config.rank >= 1 or not config.alpha > 0 or not 0 <= config.cond_dropout <= 1:
        raise ValueError(f"rank must be 1 or more ({config.rank}), alpha above 0 ({config.alpha}) and "
                         f"cond_dropout from 0 to 1 ({config.cond_dropout})")
    if (out_dir / output_name).is_dir() or (out_dir.exists() and not out_dir.is_dir()):
        raise ValueError(f"cannot write {out_dir / output_name}: a folder or file is in the way")
    family = checkpoint.family
    if family.name not in BASE_MODEL_VERSION:
        raise ValueError(f"LoRA training supports SD1, SD2 and SDXL checkpoints, not {family.name.upper()}")
    if checkpoint.text_encoder is None:
        raise ValueError(f"{checkpoint.path.name} has no text encoder to encode the captions with")
    prediction = config.prediction or family.prediction
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    buckets = data if isinstance(data, list) else [data]
    unet = checkpoint.unet.to(device=device, dtype=torch.float32)
    vae = checkpoint.vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    text_encoder = checkpoint.text_encoder.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    # Each distinct caption encoded once; the last row is the empty caption (for cond_dropout).
    unique = sorted({c for bucket in buckets for c in bucket.captions})
    context, pooled = _encode(text_encoder, [*unique, ""], device)
    lookup = {caption: i for i, caption in enumerate(unique)}
    caption_rows = [torch.tensor([lookup[c] for c in bucket.captions], device=device) for bucket in buckets]
    empty = len(unique)
    posteriors = [encode_latents(vae, bucket.pixels.to(device)) for bucket in buckets]
    adapters = attach_lora(unet, config.rank, config.alpha, config.targets, config.loop.seed)
    if config.loop.grad_checkpointing:
        checkpoint_unet(unet)
    alphas_cumprod = DiscreteSchedule().alphas_cumprod

    def adm(pooled: Tensor | None, height: int, width: int) -> Tensor | None:
        """SDXL's `y` for pooled vectors at a picture size (uncropped, target = original); None for SD1/SD2."""
        return None if not unet.config.adm_in_channels else sdxl_adm(pooled, width, height).to(device)

    # One run per output name: its state, loss plot and samples are named after it, and the state file's
    # suffix keeps it out of the LoRA lists when the run writes into models/loras.
    stem = Path(output_name).stem
    run_dir = (out_dir / output_name).parent  # an output name with a folder keeps its run there too
    loop = TrainLoop(stem, {"lora": adapters}, config.loop, run_dir, device, state_file=f"{stem}.train-state",
                     settings={"base": checkpoint.path.name, "rank": config.rank, "alpha": config.alpha,
                               "targets": config.targets, "prediction": prediction})
    try:
        resumed = loop.resume()
    except (RuntimeError, KeyError, ValueError) as exc:
        said = str(exc) if "other settings (" in str(exc) else f"{loop.state_path} holds a run with other settings"
        raise ValueError(f"{said}: remove it to start afresh, or give another --output-name") from exc
    if resumed:
        print(f"{stem}: resuming at step {loop.step}")

    def loss_fn(g: torch.Generator) -> Tensor:
        batch = config.loop.batch_size
        bucket = pick_bucket(buckets, g)
        mean, std = posteriors[bucket]
        index = torch.randint(len(mean), (batch,), generator=g).to(device)
        eps = torch.randn((batch, *mean.shape[1:]), generator=g).to(device)
        drop = (torch.rand(batch, generator=g) < config.cond_dropout).to(device)
        latents = (mean[index] + std[index] * eps) * vae.scaling_factor
        rows = torch.where(drop, torch.full_like(index, empty), caption_rows[bucket][index])
        height, width = buckets[bucket].pixels.shape[-2:]
        y = adm(None if pooled is None else pooled[rows], height, width)
        return denoising_loss(unet, latents, context[rows], y, alphas_cumprod, g, prediction, config.offset_noise)

    previews = preview_captions or sorted({c for bucket in buckets for c in bucket.captions})[:8]
    height, width = buckets[0].pixels.shape[-2:]

    @torch.no_grad()
    def preview(step: int) -> None:
        """The preview captions with the LoRA (Euler, 20 steps, cfg 5, "" as the negative prompt)."""
        texts, texts_pooled = _encode(text_encoder, [*previews, ""], device)
        n, factor = len(previews), vae.config.downscale
        latent = torch.zeros(n, vae.config.z_channels, height // factor, width // factor, device=device)
        sides = []
        for rows in (torch.arange(n, device=device), torch.full((n,), n, device=device)):
            y = adm(None if texts_pooled is None else texts_pooled[rows], height, width)
            sides.append([(texts[rows], {} if y is None else {"y": y})])
        x = sample(unet, DiscreteSchedule(), latent, seed=0, steps=20, cfg=5.0, sampler_name="euler",
                   scheduler="normal", positive=sides[0], negative=sides[1], prediction=prediction)
        save_grid(vae.decode(x / vae.scaling_factor).float().clamp(-1, 1), run_dir / f"{stem}-samples.png")

    loop.run(loss_fn, preview)
    adapters.eval()
    settings = {"rank": config.rank, "alpha": config.alpha, "targets": config.targets, "prediction": prediction,
                "cond_dropout": config.cond_dropout, "offset_noise": config.offset_noise,
                "loop": config.loop.as_dict(), "steps": loop.step, "seconds": round(loop.elapsed, 1),
                "images": sum(len(b.captions) for b in buckets), "base": checkpoint.path.name, "device": str(device)}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
                "ss_network_alpha": str(config.alpha), "ss_base_model_version": BASE_MODEL_VERSION[family.name],
                "ss_steps": str(loop.step), "ss_sd_model_name": checkpoint.path.name,
                "loom.training": json.dumps(settings)}
    with torch.no_grad(), loop.ema.applied():
        preview(loop.step)
        tensors = lora_file_tensors(unet, adapters, config.alpha, family.name)
    path = out_dir / output_name
    write_safetensors(tensors, path, metadata, dtype=save_dtype)
    return path

