"""Training the latent diffusion UNet (and its CLIP text encoder) on captioned images, saved as an SD1 file."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.attention import SpatialTransformer
from ldm.sampling import DiscreteSchedule, sample
from ldm.text_encoders import TextEncoder, build_text_encoder, random_text_encoder_config
from ldm.training.data import ImageSet, pick_bucket
from ldm.training.loop import LoopConfig, TrainLoop, checkpoint_modules, save_grid
from ldm.unet import ResBlock, UNetConfig, UNetModel
from ldm.vae import AutoencoderKL


@dataclass(frozen=True)
class TextEncoderSize:
    """A CLIP-L-layout text encoder (SD1 keys, the real 49,408-token vocabulary) of a chosen size."""

    hidden: int = 48
    layers: int = 3
    intermediate: int = 192

    @property
    def heads(self) -> int:
        # The loader infers heads from the width by this rule (64-wide heads, else 16-wide).
        return self.hidden // 64 if self.hidden % 64 == 0 else max(1, self.hidden // 16)


@dataclass
class UNetTrainConfig:
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1, transformer_depth=(1, 1, 0),
        num_heads=4, context_dim=64))
    text: TextEncoderSize = field(default_factory=TextEncoderSize)
    train_text_encoder: bool = True
    cond_dropout: float = 0.1  # captions replaced by "" so the model also learns the unconditional case
    prediction: str = "eps"  # "eps" or "v"
    # Offset noise: a per-image, per-channel constant added to the training noise (std `offset_noise`).
    # With SD's schedule the noisiest step still leaks ~7% of the latent, and on small latents its
    # mean gives away the picture's overall colour; the model then learns to read the colour from
    # that leak instead of the caption, and at sampling time (pure noise) colours come out random.
    offset_noise: float = 0.0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=1000))


@dataclass
class DiffusionModel:
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder


def new_text_encoder(size: TextEncoderSize) -> TextEncoder:
    base = random_text_encoder_config("tiny-sd1")
    clip = dataclasses.replace(base.encoders[0], hidden_size=size.hidden, num_layers=size.layers,
                               num_heads=size.heads, intermediate_size=size.intermediate)
    return build_text_encoder(dataclasses.replace(base, encoders=(clip,)))


@torch.no_grad()
def new_unet(config: UNetConfig) -> UNetModel:
    """A UNet with LDM's initialisation: residual branches' last layers and the output start at zero."""
    unet = UNetModel(config)
    last_layers = [unet.out[2]]
    for module in unet.modules():
        if isinstance(module, ResBlock):
            last_layers.append(module.out_layers[3])
        elif isinstance(module, SpatialTransformer):
            last_layers.append(module.proj_out)
    for layer in last_layers:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return unet


def checkpoint_unet(unet: UNetModel) -> int:
    """Gradient checkpointing over every input, middle and output block of the UNet."""
    return checkpoint_modules([*unet.input_blocks, unet.middle_block, *unet.output_blocks])


def token_ids(text_encoder: TextEncoder, captions: list[str]) -> tuple[Tensor, Tensor]:
    """(ids [unique captions + 1, 77], index [len(captions)]): each distinct caption tokenized once;
    the last row is the empty caption, used for condition dropout."""
    clip = next(iter(text_encoder.encoders.values())).config
    unique = sorted(set(captions))
    rows = []
    for caption in [*unique, ""]:
        ids, _ = text_encoder.tokenizer.tokenize(caption).padded(clip.pad_token, 1)
        rows.append(ids[0])
    lookup = {caption: i for i, caption in enumerate(unique)}
    return torch.tensor(rows), torch.tensor([lookup[c] for c in captions])


def encode_text(text_encoder: TextEncoder, ids: Tensor) -> Tensor:
    """The UNet context for token ids [B, 77]: what `TextEncoder.encode` gives for unweighted prompts."""
    encoder = next(iter(text_encoder.encoders.values()))
    hidden, _ = encoder(ids, text_encoder.config.default_clip_skip)
    return hidden


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every image (unscaled), computed once so training samples latents cheaply."""
    means, stds = [], []
    for start in range(0, len(pixels), batch):
        posterior = vae.encode(pixels[start:start + batch].float())
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def generate(model: DiffusionModel, captions: list[str], cfg: float = 5.0, steps: int = 20, seed: int = 0,
             prediction: str = "eps", width: int = 64, height: int = 64) -> Tensor:
    """Pixels [N, 3, height, width] in -1..1 for `captions` (Euler sampler, normal schedule, "" as negative)."""
    device = next(model.unet.parameters()).device
    f = model.vae.config.downscale
    latent = torch.zeros(len(captions), model.vae.config.z_channels, height // f, width // f, device=device)
    ids, index = token_ids(model.text_encoder, captions)
    context = encode_text(model.text_encoder, ids.to(device))
    positive = [(context[index], {})]
    negative = [(context[-1:].expand(len(captions), -1, -1), {})]
    x = sample(model.unet, DiscreteSchedule(), latent, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
               scheduler="normal", positive=positive, negative=negative, prediction=prediction)
    return model.vae.decode(x / model.vae.scaling_factor).float().clamp(-1, 1)


def training_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> Tensor:
    """Gaussian noise of `shape` [B, C, H, W], plus a constant per image and channel of std `offset`."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    return noise


def denoising_loss(unet: UNetModel, latents: Tensor, context: Tensor, y: Tensor | None, alphas_cumprod: Tensor,
                   generator: torch.Generator, prediction: str, offset_noise: float = 0.0) -> Tensor:
    """The DDPM training objective of LDM: noise a latent at a uniform random step and predict eps (or v)."""
    device = latents.device
    t = torch.randint(len(alphas_cumprod), (len(latents),), generator=generator)
    noise = training_noise(latents.shape, offset_noise, generator).to(device)
    a = alphas_cumprod[t].to(device).view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * latents
    prediction_ = unet(noisy, t.to(device).float(), context, y)
    return F.mse_loss(prediction_.float(), target)


def diffusion_loss(unet: UNetModel, text_encoder: TextEncoder, latents: Tensor, ids: Tensor,
                   alphas_cumprod: Tensor, generator: torch.Generator, prediction: str,
                   offset_noise: float = 0.0) -> Tensor:
    """`denoising_loss` with the context encoded from token ids by a text encoder that trains too."""
    return denoising_loss(unet, latents, encode_text(text_encoder, ids), None, alphas_cumprod, generator,
                          prediction, offset_noise)


def train_unet(data: ImageSet | list[ImageSet], out_dir: str | Path, config: UNetTrainConfig, device: torch.device,
               vae: AutoencoderKL, unet: UNetModel | None = None, text_encoder: TextEncoder | None = None,
               on_sample: Callable[[DiffusionModel, int], None] | None = None,
               checkpoint_name: str = "model.safetensors", save_dtype: torch.dtype | None = torch.float16,
               preview_captions: list[str] | None = None) -> tuple[DiffusionModel, Path]:
    """Train a UNet (new, or `unet` to fine-tune) with its text encoder on `data` (one ImageSet per
    bucket size), encoded once by the frozen `vae`.

    Resumes from `out_dir/unet-state.pt` when present. Writes `unet-loss.png`, `unet-samples.png`
    every `sample_every` steps and finally the single-file checkpoint `checkpoint_name` (EMA
    weights) with the training settings in its metadata. Returns the model (EMA weights) and the path.
    """
    out_dir = Path(out_dir)
    if config.prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', not {config.prediction!r}")
    text_encoder = text_encoder if text_encoder is not None else new_text_encoder(config.text)
    context_dim = text_encoder.config.context_dim
    if unet is None:
        unet = new_unet(dataclasses.replace(config.unet, context_dim=context_dim))
    config = dataclasses.replace(config, unet=unet.config)
    vae = vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    # Loaded checkpoints come back frozen for inference; training needs the UNet's gradients back.
    unet = unet.to(device=device, dtype=torch.float32).train().requires_grad_(True)
    text_encoder = text_encoder.to(device=device, dtype=torch.float32).requires_grad_(config.train_text_encoder)
    if config.loop.grad_checkpointing:
        checkpoint_unet(unet)

    buckets = data if isinstance(data, list) else [data]
    posteriors = [encode_latents(vae, bucket.pixels.to(device)) for bucket in buckets]
    captions = [caption for bucket in buckets for caption in bucket.captions]
    ids, caption_index = token_ids(text_encoder, captions)
    ids = ids.to(device)
    # Each bucket's rows of the caption index, in the buckets' order.
    offsets = torch.tensor([0, *(len(b.captions) for b in buckets)]).cumsum(0).tolist()
    bucket_captions = [caption_index[offsets[i]:offsets[i + 1]].to(device) for i in range(len(buckets))]
    empty = len(ids) - 1
    scale = vae.scaling_factor
    alphas_cumprod = DiscreteSchedule().alphas_cumprod
    modules: dict[str, nn.Module] = {"unet": unet, "text_encoder": text_encoder}
    loop = TrainLoop("unet", modules, config.loop, out_dir, device)
    if loop.resume():
        print(f"unet: resuming at step {loop.step}")

    def loss_fn(g: torch.Generator) -> Tensor:
        batch = config.loop.batch_size
        bucket = pick_bucket(buckets, g)
        mean, std = posteriors[bucket]
        index = torch.randint(len(mean), (batch,), generator=g)
        eps = torch.randn((batch, *mean.shape[1:]), generator=g).to(device)
        drop = (torch.rand(batch, generator=g) < config.cond_dropout).to(device)
        index = index.to(device)
        latents = (mean[index] + std[index] * eps) * scale
        rows = torch.where(drop, torch.full_like(index, empty), bucket_captions[bucket][index])
        return diffusion_loss(unet, text_encoder, latents, ids[rows], alphas_cumprod, g, config.prediction,
                              config.offset_noise)

    model = DiffusionModel(unet, vae, text_encoder)
    previews = preview_captions or sorted(set(captions))[:16]
    width, height = buckets[0].pixels.shape[-1], buckets[0].pixels.shape[-2]

    def sample(step: int) -> None:
        with loop.autocast():
            images = generate(model, previews, prediction=config.prediction, width=width, height=height)
        save_grid(images, out_dir / "unet-samples.png")
        if on_sample is not None:
            on_sample(model, step)

    loop.run(loss_fn, sample)
    for module in modules.values():
        module.eval()
    with torch.no_grad(), loop.ema.applied():
        sample(loop.step)
        # Fresh modules: the EMA weights without the training copies' checkpointing hooks.
        final = DiffusionModel(UNetModel(unet.config).to(device), vae,
                               build_text_encoder(text_encoder.config, device=device))
        final.unet.load_state_dict(unet.state_dict())
        final.text_encoder.load_state_dict(text_encoder.state_dict())
    settings = {"unet": dataclasses.asdict(config.unet), "text": dataclasses.asdict(config.text),
                "train_text_encoder": config.train_text_encoder, "cond_dropout": config.cond_dropout,
                "prediction": config.prediction, "offset_noise": config.offset_noise,
                "loop": config.loop.as_dict(), "steps": loop.step, "seconds": round(loop.elapsed, 1),
                "images": len(captions), "device": str(device)}
    from ldm.checkpoint import save_checkpoint

    # The resolution it was trained at, so front ends (e.g. loom.Pipeline) can default to it.
    resolution = max(bucket.pixels.shape[-1] for bucket in buckets)
    metadata = {"loom.family": "sd1", "loom.prediction": config.prediction, "loom.resolution": str(resolution),
                "loom.training": json.dumps(settings)}
    path = save_checkpoint(out_dir / checkpoint_name, final.unet, vae, final.text_encoder, metadata, dtype=save_dtype)
    return final, path

