"""What a MODEL value needs to know of a rectified-flow transformer family (Flux, SD3): the attributes of
`ldm.checkpoint.ModelFamily` it reads, with the transformer's config as `unet_config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ldm.vae import VAEConfig


@dataclass(frozen=True)
class FlowFamily:
    unet_config: Any  # the transformer's config (ldm.flux.FluxConfig, ldm.mmdit.MMDiTConfig)
    vae_config: VAEConfig
    name: str
    latent_shift: float  # the latents are (z - shift) * scale for the transformer
    prediction: str = "flow"  # velocity (ldm.sampling.denoiser)
    zero_snr: bool = False
    edm: tuple[float, float, float] | None = None
    playground: bool = False
    unclip: bool = False

    @property
    def latent_scale_factor(self) -> float:
        return self.vae_config.scaling_factor
