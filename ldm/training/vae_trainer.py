"""Training the KL autoencoder: reconstruction (L1 + L2 + edge) and KL losses, saved as an LDM VAE file."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import write_safetensors
from ldm.training.data import ImageSet, pick_bucket
from ldm.training.loop import LoopConfig, TrainLoop, checkpoint_modules, save_grid
from ldm.vae import AutoencoderKL, VAEConfig

VAE_PREFIX = "first_stage_model."
# SD1's latent scale. The loader applies the family's factor whatever the file says, so trained
# latents are rescaled (exactly, see `calibrate_latent_scale`) to the spread this factor expects.
SD1_SCALING_FACTOR = 0.18215


@dataclass
class VAETrainConfig:
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=1000))
    kl_weight: float = 1e-6  # per latent element summed, relative to the per-pixel mean, as in LDM
    edge_weight: float = 0.5  # L1 on image gradients: keeps shape corners sharp
    # False trains the decoder alone and keeps the latent space exactly (as SD's ft-MSE VAE did), so a
    # UNet trained on this VAE's latents stays valid.
    train_encoder: bool = True


def checkpoint_vae(vae: AutoencoderKL) -> int:
    """Gradient checkpointing over the VAE's resnet blocks and middle blocks."""
    blocks: list[nn.Module] = [vae.encoder.mid, vae.decoder.mid]
    for level in [*vae.encoder.down, *vae.decoder.up]:
        blocks.extend(level.block)
    return checkpoint_modules(blocks)


def _gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def _reconstruction_loss(reconstruction: Tensor, pixels: Tensor, config: VAETrainConfig) -> Tensor:
    error = reconstruction - pixels
    loss = error.abs().mean() + error.pow(2).mean()
    if config.edge_weight:
        loss = loss + config.edge_weight * sum(
            (a - b).abs().mean() for a, b in zip(_gradients(reconstruction), _gradients(pixels), strict=True))
    return loss


def vae_loss(vae: AutoencoderKL, pixels: Tensor, generator: torch.Generator, config: VAETrainConfig) -> Tensor:
    posterior = vae.encode(pixels)
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device, posterior.mean.dtype)
    reconstruction = vae.decode(posterior.mean + posterior.std * noise).float()
    kl = posterior.kl().float().mean() / pixels[0].numel()
    return _reconstruction_loss(reconstruction, pixels, config) + config.kl_weight * kl


def decoder_loss(vae: AutoencoderKL, mean: Tensor, std: Tensor, pixels: Tensor, generator: torch.Generator,
                 config: VAETrainConfig) -> Tensor:
    """The reconstruction loss of the decoder alone, from posteriors the frozen encoder gave once."""
    noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
    return _reconstruction_loss(vae.decode(mean + std * noise).float(), pixels, config)


@torch.no_grad()
def calibrate_latent_scale(vae: AutoencoderKL, pixels: list[Tensor],
                           scaling_factor: float = SD1_SCALING_FACTOR) -> float:
    """Rescale the latent space so that `latents * scaling_factor` has unit spread over `pixels` (one
    tensor per image size); returns the factor applied.

    Multiplying the posterior mean by k (and its log-variance by adding 2 ln k) in `quant_conv`
    and dividing `post_quant_conv`'s input by k leaves reconstructions unchanged.
    """
    z = torch.cat([vae.encode(p).mean.float().flatten() for p in pixels])
    k = 1.0 / (scaling_factor * float(z.std()))
    zc = vae.config.z_channels
    vae.quant_conv.weight[:zc] *= k
    vae.quant_conv.bias[:zc] *= k
    vae.quant_conv.bias[zc:] += 2 * torch.log(torch.tensor(k))
    vae.post_quant_conv.weight *= 1.0 / k
    vae.scaling_factor = scaling_factor
    return k


def save_vae(vae: AutoencoderKL, path: str | Path, metadata: dict[str, str], dtype: torch.dtype | None = None) -> Path:
    """A standalone VAE file with LDM keys under `first_stage_model.` (read by `ldm.checkpoint.load_vae`)."""
    tensors = {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    path = Path(path)
    write_safetensors(tensors, path, {"loom.scaling_factor": str(vae.scaling_factor), **metadata}, dtype)
    return path


@torch.no_grad()
def _posteriors(vae: AutoencoderKL, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior means and standard deviations of `pixels`, encoded in chunks."""
    posteriors = [vae.encode(chunk.float()) for chunk in pixels.split(256)]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


def train_vae(data: ImageSet | list[ImageSet], out_dir: str | Path, config: VAETrainConfig, device: torch.device,
              vae: AutoencoderKL | None = None,
              on_sample: Callable[[AutoencoderKL, int], None] | None = None) -> AutoencoderKL:
    """Train (or fine-tune `vae`) on `data` (one ImageSet per bucket size), resuming from `out_dir` if a state is there.

    Writes `vae-state.pt` (resume), `vae-loss.png`, `vae-samples.png` (inputs above their
    reconstructions) and `vae.safetensors` (EMA weights, latent scale calibrated); returns the VAE
    with those weights.
    """
    out_dir = Path(out_dir)
    if vae is None:
        vae = AutoencoderKL(config.vae)
        config = replace(config, vae=vae.config)
    vae = vae.to(device=device, dtype=torch.float32).train().requires_grad_(True)  # loaded models come frozen
    for frozen in (vae.encoder, vae.quant_conv):
        frozen.requires_grad_(config.train_encoder)
    if config.loop.grad_checkpointing:
        checkpoint_vae(vae)
    buckets = data if isinstance(data, list) else [data]
    pixels = [bucket.pixels.to(device) for bucket in buckets]
    loop = TrainLoop("vae", {"vae": vae}, config.loop, out_dir, device)
    if loop.resume():
        print(f"vae: resuming at step {loop.step}")

    if config.train_encoder:
        def loss_fn(g: torch.Generator) -> Tensor:
            bucket = pixels[pick_bucket(buckets, g)]
            index = torch.randint(len(bucket), (config.loop.batch_size,), generator=g).to(device)
            return vae_loss(vae, bucket[index].float(), g, config)
    else:
        posteriors = [_posteriors(vae, bucket) for bucket in pixels]  # the encoder is frozen: once, not per step

        def loss_fn(g: torch.Generator) -> Tensor:
            which = pick_bucket(buckets, g)
            index = torch.randint(len(pixels[which]), (config.loop.batch_size,), generator=g).to(device)
            mean, std = (t[index] for t in posteriors[which])
            return decoder_loss(vae, mean, std, pixels[which][index].float(), g, config)

    previews = pixels[0][:16].float()

    def sample(step: int) -> None:
        with loop.autocast():
            reconstructions = vae.decode(vae.encode(previews).mean).float()
        save_grid(torch.cat([previews[:8], reconstructions[:8], previews[8:], reconstructions[8:]]),
                  out_dir / "vae-samples.png")
        if on_sample is not None:
            on_sample(vae, step)

    loop.run(loss_fn, sample)
    vae.eval()
    with torch.no_grad(), loop.ema.applied():
        sample(loop.step)
        final = AutoencoderKL(vae.config).to(device)
        final.load_state_dict(vae.state_dict())
    if config.train_encoder:
        calibrate_latent_scale(final, [bucket[:1024].float() for bucket in pixels])
    settings = {"vae": asdict(config.vae), "loop": config.loop.as_dict(), "kl_weight": config.kl_weight,
                "edge_weight": config.edge_weight, "train_encoder": config.train_encoder,
                "steps": loop.step, "seconds": round(loop.elapsed, 1)}
    save_vae(final, out_dir / "vae.safetensors", {"loom.training": json.dumps(settings)})
    return final.eval()
