"""FLUX.2 nodes (Black Forest Labs' FLUX.2 [dev] and [klein]): its empty latent, its scheduler, and what its
transformer takes from the prompts (the sampler's `flux2_conditioning`, `flux2_inputs`).

FLUX.2's latent is the VAE's 32 channels packed 2x2 into 128 at 1/16 of the picture (ldm.flux2_vae), already
normalised by the VAE, so the transformer takes it as it is. Its prompts are the text encoder's states
(ldm.flux2_text: Mistral Small 3 for dev, Qwen3 for klein), zero-padded at the front to 512 tokens as ComfyUI's Flux2
model does; dev is guidance-distilled (FluxGuidance's value, 3.5 unless said), klein is not. Reference latents
(ReferenceLatent) are FLUX.2's multi-image editing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ldm.flux2 import DEFAULT_REFERENCE_METHOD, with_reference_kv
from ldm.sampling.flow import flux2_sigmas
from nodes.node import Node
from nodes.sd.conditioning import MAX_RESOLUTION
from nodes.sd.custom_sampling import _sigmas_out
from nodes.sd.flux import DEFAULT_GUIDANCE
from nodes.sd.flux_variants import with_references
from nodes.sd.models import DiffusionModel
from nodes.spec import Int, Output, Socket

LATENT_CHANNELS = 128
LATENT_DOWNSCALE = 16
# ComfyUI's Flux2 pads shorter prompts with zeros at the front to this many tokens (its extra_conds).
TEXT_TOKENS = 512


class EmptyFlux2LatentImage(Node):
    """A batch of empty (zero) FLUX.2 latents: 128 channels at 1/16 of the picture's width and height."""

    display_name = "Empty Flux 2 Latent"
    category = "latent"
    width = Int(1024, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(1024, min=16, max=MAX_RESOLUTION, step=16)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    def execute(self, width: int, height: int, batch_size: int) -> tuple[dict]:
        shape = (batch_size, LATENT_CHANNELS, height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE)
        return ({"samples": torch.zeros(shape), "downscale_ratio_spacial": LATENT_DOWNSCALE},)


class Flux2Scheduler(Node):
    """FLUX.2's noise levels for `steps` steps at width x height: evenly spaced in time, shifted by the fit of
    `ldm.sampling.flow.empirical_mu` (more time at high noise for larger images and fewer steps)."""

    category = "sampling/custom_sampling/schedulers"
    steps = Int(20, min=1, max=4096)
    width = Int(1024, min=16, max=MAX_RESOLUTION, step=1)
    height = Int(1024, min=16, max=MAX_RESOLUTION, step=1)
    outputs = (Output("SIGMAS"),)

    def execute(self, steps: int, width: int, height: int) -> tuple[torch.Tensor]:
        return _sigmas_out(flux2_sigmas(steps, width, height))


def _padded(embedding: torch.Tensor) -> torch.Tensor:
    missing = TEXT_TOKENS - embedding.shape[1]
    return F.pad(embedding, (0, 0, missing, 0)) if missing > 0 else embedding


def flux2_conditioning(conditioning: list, model: DiffusionModel) -> list:
    """Each entry as a FLUX.2 transformer takes it: the prompt states zero-padded at the front to 512 tokens, and, for
    a guidance-distilled model (dev), `y` the entry's guidance (3.5 unless said; None: unguided). The text
    encoder's attention mask is dropped: ComfyUI's FLUX.2 attends to every token."""
    config = model.family.unet_config
    out = []
    for embedding, options in conditioning:
        options = {k: v for k, v in options.items() if k != "attention_mask"}
        guidance = options.get("guidance", DEFAULT_GUIDANCE)
        if config.guidance_embed and guidance is not None:
            options["y"] = torch.full((embedding.shape[0], 1), float(guidance))
        out.append((_padded(embedding), options))
    return out


def flux2_inputs(model: DiffusionModel, latent: dict, *conditionings: list) -> tuple[None, list[list]]:
    """`nodes.sd.concat_models.model_inputs` for FLUX.2: no extra channels (None), and the conditionings with each
    entry's `ref_latents` from its reference latents, placed by FLUX.2's default method where the prompts name none."""
    samples = latent["samples"]
    if samples.ndim != 4 or samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"the latent {tuple(samples.shape)} is not a FLUX.2 latent ({LATENT_CHANNELS} channels at "
                         f"1/{LATENT_DOWNSCALE} of the picture): make it with EmptyFlux2LatentImage or the FLUX.2 VAE")
    return None, [[(embedding, with_references(model, options, DEFAULT_REFERENCE_METHOD))
                   for embedding, options in c] for c in conditionings]


class FluxKVCache(Node):
    """For FLUX.2 [klein] 9B KV: the reference images' keys and values are computed on the first step and reused by
    the others, so each step runs on the image's and the prompt's tokens alone. The references are modulated at
    timestep 0 and attend only to themselves, as the KV model was trained; other FLUX.2 models were not."""

    display_name = "Flux KV Cache"
    category = "advanced/model"
    model = Socket("MODEL")
    outputs = (Output("MODEL"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        family = linked.get("model", {}).get("family")
        if family is not None and family != "flux2":
            return f"FluxKVCache is for FLUX.2 models (klein 9B KV); the MODEL linked is {family.upper()}"
        return None

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel) -> tuple[DiffusionModel]:
        if model.family.name != "flux2":
            raise ValueError(f"FluxKVCache is for FLUX.2 models (klein 9B KV); {model.source} is "
                             f"{model.family.name.upper()}")
        return (replace(model, unet=with_reference_kv(model.unet), own_bytes=0),)


NODES = [EmptyFlux2LatentImage, Flux2Scheduler, FluxKVCache]
