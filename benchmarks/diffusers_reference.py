"""A diffusers StableDiffusionPipeline holding the same weights as one of our SD1 checkpoint files.

The reference for end-to-end checks and for `benchmarks.pipeline`: diffusers' UNet, VAE and
scheduler, transformers' CLIPTextModel and tokenizer, all fed our file's tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.checkpoint import detect_family, load_state_dict, read_metadata
from ldm.text_encoders import text_encoder_config_from_state_dict
from tests.ldm.diffusers_reference import diffusers_unet, diffusers_vae

TEXT_PREFIX = "cond_stage_model.transformer."
VOCAB = Path(__file__).resolve().parent.parent / "ldm" / "data"


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}


def diffusers_sd1_pipeline(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """StableDiffusionPipeline with an Euler scheduler equal to our `euler` + `normal`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd = load_state_dict(path)
    family = detect_family(sd, read_metadata(path))
    if family.name != "sd1":
        raise ValueError(f"{path}: the diffusers reference here covers SD1 checkpoints, not {family.name}")
    clip = text_encoder_config_from_state_dict(sd).encoders[0]
    text_model = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_size=clip.hidden_size,
        num_hidden_layers=clip.num_layers, num_attention_heads=clip.num_heads,
        intermediate_size=clip.intermediate_size, hidden_act=clip.activation, projection_dim=clip.hidden_size))
    # The module's own naming decides (transformers 5 dropped the `text_model.` level in the state dict).
    wrapped = any(k.startswith("text_model.") for k in text_model.state_dict())
    text_state = {}
    for key, value in _strip(sd, TEXT_PREFIX).items():
        bare = key.removeprefix("text_model.")
        if "position_ids" not in key:
            text_state[f"text_model.{bare}" if wrapped else bare] = value
    missing, unexpected = text_model.load_state_dict(text_state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="linspace",
                                       prediction_type="epsilon" if family.prediction == "eps" else "v_prediction")
    pipe = StableDiffusionPipeline(
        vae=diffusers_vae(family.vae_config, _strip(sd, "first_stage_model.")),
        text_encoder=text_model.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(VOCAB, local_files_only=True, model_max_length=77),
        unet=diffusers_unet(family.unet_config, _strip(sd, "model.diffusion_model.")),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def diffusers_txt2img(pipe, prompt: str, *, seed: int, steps: int, cfg: float, size: int,
                      negative_prompt: str = "") -> torch.Tensor:
    """Images [B, H, W, 3] in 0..1 from the same seeded CPU noise our KSampler draws."""
    from ldm.sampling import prepare_noise

    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = prepare_noise(latent, seed).to(pipe.device, pipe.unet.dtype)
    with torch.inference_mode():
        out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=cfg,
                   height=size, width=size, latents=noise, output_type="pt")
    return out.images.permute(0, 2, 3, 1).float().cpu()


def diffusers_img2img(pipe, prompt: str, init: torch.Tensor, *, seed: int, steps: int, strength: float,
                      cfg: float, negative_prompt: str = "") -> torch.Tensor:
    """StableDiffusionImg2ImgPipeline on the components of `pipe`; `init` is [B, H, W, 3] in 0..1.

    Two deliberate differences from diffusers' defaults, so that it does what ComfyUI's VAEEncode +
    KSampler do: the init image's latent is the mean of the VAE posterior (diffusers samples it,
    drawing from the generator before the noise), and the noise comes from `torch.Generator`
    seeded with `seed`, which is what our `prepare_noise` draws. Note that diffusers' schedule for
    `steps` and `strength` runs int(steps * strength) steps of a `steps`-step schedule; ComfyUI's
    denoise runs all `steps` of a steps/denoise schedule.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    pixels = init.permute(0, 3, 1, 2).to(pipe.device, pipe.vae.dtype) * 2 - 1
    with torch.inference_mode():
        latent = img2img.vae.encode(pixels).latent_dist.mode() * img2img.vae.config.scaling_factor
        out = img2img(prompt, image=latent, strength=strength, negative_prompt=negative_prompt,
                      num_inference_steps=steps, guidance_scale=cfg, output_type="pt",
                      generator=torch.Generator().manual_seed(seed))
    return out.images.permute(0, 2, 3, 1).float().cpu()
