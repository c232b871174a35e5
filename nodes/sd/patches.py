"""Model patches: FreeU, FreeU_V2, PatchModelAddDownscale (Deep Shrink), RescaleCFG, PerturbedAttentionGuidance,
SelfAttentionGuidance, HyperTile, the attention multiply nodes, ModelSamplingDiscrete, ModelSamplingContinuousEDM/V
and DifferentialDiffusion. Each returns a new MODEL (or CLIP); the one it was given (which the cache may hold) is
left as it was."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ldm.patches import DeepShrink, scaled_layers_copy, with_input_block_patch, with_output_block_patch
from ldm.patches import FreeU as FreeUPatch
from ldm.patches import HyperTile as HyperTilePatch
from ldm.sampling.model_patches import DifferentialDiffusion as DifferentialDiffusionMask
from ldm.sampling.model_patches import PerturbedAttentionGuidance as PerturbedAttention
from ldm.sampling.model_patches import RescaleCFG as RescaleCFGFunction
from ldm.sampling.model_patches import SelfAttentionGuidance as SelfAttention
from ldm.sampling.schedules import ContinuousSchedule, ContinuousVSchedule
from nodes.node import Node
from nodes.sd.latent import upscale_latent
from nodes.sd.models import Clip, DiffusionModel, discrete_betas_of
from nodes.spec import Boolean, Combo, Float, Int, Output, Socket


def _knob(default: float) -> Float:
    return Float(default, min=0.0, max=10.0, step=0.01)


class FreeU(Node):
    """FreeU (Si et al. 2023): amplifies the decoder's backbone features (b1, b2) and damps the low
    frequencies of its skip connections (s1, s2), in its two deepest stages. No training, no extra cost."""

    category = "model_patches/unet"
    version = 1
    model = Socket("MODEL")
    b1 = _knob(1.1)
    b2 = _knob(1.2)
    s1 = _knob(0.9)
    s2 = _knob(0.2)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, b1: float, b2: float, s1: float, s2: float) -> tuple[DiffusionModel]:
        patch = FreeUPatch(model.family.unet_config.model_channels, b1, b2, s1, s2, version=self.version)
        return (replace(model, unet=with_output_block_patch(model.unet, patch),
                        loras=(*model.loras, f"FreeU_V{self.version}")),)


class FreeU_V2(FreeU):  # noqa: N801 (ComfyUI's name)
    """FreeU's second version: the backbone gain follows each pixel's normalised channel mean."""

    version = 2
    b1 = _knob(1.3)
    b2 = _knob(1.4)


RESIZE_METHODS = ["bicubic", "nearest-exact", "bilinear", "area", "bislerp"]


def _resizer(method: str):
    return lambda x, height, width: upscale_latent(x, width, height, method, "disabled")


class PatchModelAddDownscale(Node):
    """Kohya's Deep Shrink: early in sampling, shrinks the features after one input block, so that the deep
    blocks see a large image at about their training size and it keeps one composition (no repeated subjects);
    the decoder's features are resized back to meet each skip connection."""

    display_name = "PatchModelAddDownscale (Kohya Deep Shrink)"
    category = "model_patches/unet"
    model = Socket("MODEL")
    block_number = Int(3, min=1, max=32, step=1)
    downscale_factor = Float(2.0, min=0.1, max=9.0, step=0.001)
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001)
    end_percent = Float(0.35, min=0.0, max=1.0, step=0.001)
    downscale_after_skip = Boolean(True)
    downscale_method = Combo(RESIZE_METHODS)
    upscale_method = Combo(RESIZE_METHODS)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, block_number: int, downscale_factor: float, start_percent: float,
                end_percent: float, downscale_after_skip: bool, downscale_method: str,
                upscale_method: str) -> tuple[DiffusionModel]:
        blocks = len(model.unet.input_blocks)
        if block_number >= blocks:
            raise ValueError(f"block_number {block_number}: {model.source}'s UNet has input blocks 0 to {blocks - 1}")
        schedule = model.schedule

        def timestep(percent: float) -> float:
            sigma = min(schedule.sigma_at_percent(percent), schedule.sigma_max)
            return float(schedule.unet_timestep(schedule.sigma_to_t_scalar(sigma)))

        patch = DeepShrink(block_number, downscale_factor, timestep(start_percent), timestep(end_percent),
                           downscale_after_skip, _resizer(downscale_method), _resizer(upscale_method))
        unet = with_input_block_patch(with_output_block_patch(model.unet, patch.restore), patch)
        return (replace(model, unet=unet, loras=(*model.loras, f"Deep Shrink x{downscale_factor:g}")),)


class RescaleCFG(Node):
    """Rescales guided predictions to the positive one's spread (Lin et al. 2024), against the washed-out or
    over-exposed images strong cfg gives v-prediction and zero-terminal-SNR models."""

    category = "advanced/model"
    model = Socket("MODEL")
    multiplier = Float(0.7, min=0.0, max=1.0, step=0.01)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, multiplier: float) -> tuple[DiffusionModel]:
        patches = replace(model.sampling_patches, cfg_function=RescaleCFGFunction(multiplier))
        return (replace(model, sampling_patches=patches),)


class PerturbedAttentionGuidance(Node):
    """Perturbed-Attention Guidance (Ahn et al. 2024): guides away from the model's prediction with its middle
    block's self-attention made the identity, for sharper structure; one more model pass per step."""

    category = "model_patches/unet"
    model = Socket("MODEL")
    scale = Float(3.0, min=0.0, max=100.0, step=0.01, round=0.01)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, scale: float) -> tuple[DiffusionModel]:
        patches = model.sampling_patches
        patches = replace(patches, post_cfg=(*patches.post_cfg, PerturbedAttention(scale)))
        return (replace(model, sampling_patches=patches),)


def _attention_factors(prefix: str, q: float, k: float, v: float, out: float, names: tuple[str, ...]) -> dict:
    return {f"{prefix}.{name}": factor for name, factor in zip(names, (q, k, v, out), strict=True)}


_UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


class UNetSelfAttentionMultiply(Node):
    """Scales the UNet's self-attention projections (query, key, value, output weights and biases)."""

    category = "_for_testing"
    model = Socket("MODEL")
    q = Float(1.0, min=0.0, max=10.0, step=0.01)
    k = Float(1.0, min=0.0, max=10.0, step=0.01)
    v = Float(1.0, min=0.0, max=10.0, step=0.01)
    out = Float(1.0, min=0.0, max=10.0, step=0.01)
    outputs = (Output("MODEL"),)
    attention = "attn1"

    def execute(self, model: DiffusionModel, q: float, k: float, v: float, out: float) -> tuple[DiffusionModel]:
        unet = scaled_layers_copy(model.unet, _attention_factors(self.attention, q, k, v, out, _UNET_ATTENTION))
        if unet is model.unet:
            return (model,)
        return (model.with_unet(unet, f"{self.attention} x({q:g}, {k:g}, {v:g}, {out:g})"),)


class UNetCrossAttentionMultiply(UNetSelfAttentionMultiply):
    """Scales the UNet's cross-attention projections (query, key, value, output weights and biases)."""

    attention = "attn2"


class CLIPAttentionMultiply(Node):
    """Scales the text encoders' self-attention projections (query, key, value, output weights and biases)."""

    category = "_for_testing"
    clip = Socket("CLIP")
    q = Float(1.0, min=0.0, max=10.0, step=0.01)
    k = Float(1.0, min=0.0, max=10.0, step=0.01)
    v = Float(1.0, min=0.0, max=10.0, step=0.01)
    out = Float(1.0, min=0.0, max=10.0, step=0.01)
    outputs = (Output("CLIP"),)

    def execute(self, clip: Clip, q: float, k: float, v: float, out: float) -> tuple[Clip]:
        encoder = scaled_layers_copy(clip.encoder, _attention_factors("self_attn", q, k, v, out, _CLIP_ATTENTION))
        if encoder is clip.encoder:
            return (clip,)
        return (clip.with_encoder(encoder, f"attention x({q:g}, {k:g}, {v:g}, {out:g})"),)


class HyperTile(Node):
    """Faster self-attention on large images: the shallow transformers attend within tiles of about
    `tile_size` pixels, the tiling shifting from step to step."""

    category = "_for_testing"
    model = Socket("MODEL")
    tile_size = Int(256, min=1, max=2048)
    swap_size = Int(2, min=1, max=128)
    max_depth = Int(0, min=0, max=10)
    scale_depth = Boolean(False)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, tile_size: int, swap_size: int, max_depth: int,
                scale_depth: bool) -> tuple[DiffusionModel]:
        tiling = HyperTilePatch(model.unet.config.model_channels, tile_size, swap_size, max_depth, scale_depth)
        return (replace(model, unet=tiling.patch(model.unet), loras=(*model.loras, f"HyperTile {tile_size}")),)


class SelfAttentionGuidance(Node):
    """Self-Attention Guidance (Hong et al. 2023): blurs the parts of the image the model's self-attention
    dwells on and guides away from the model's prediction of that blurred image; two more model passes per
    step, and the negative prompt runs even at cfg 1."""

    category = "_for_testing"
    display_name = "Self-Attention Guidance"
    model = Socket("MODEL")
    scale = Float(0.5, min=-2.0, max=5.0, step=0.01)
    blur_sigma = Float(2.0, min=0.0, max=10.0, step=0.1)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, scale: float, blur_sigma: float) -> tuple[DiffusionModel]:
        patches = model.sampling_patches
        patches = replace(patches, post_cfg=(*patches.post_cfg, SelfAttention(scale, blur_sigma)), keep_negative=True)
        return (replace(model, sampling_patches=patches),)


# ComfyUI's sampling types -> the denoiser's prediction names (img_to_img is for one other model kind).
_PREDICTIONS = {"eps": "eps", "v_prediction": "v", "lcm": "lcm", "x0": "x0"}


class ModelSamplingDiscrete(Node):
    """Overrides what the model predicts (eps, v, x0, or a latent consistency model's distilled schedule
    and boundary condition, for LCM LoRAs) and optionally rescales its schedule to zero terminal SNR."""

    category = "advanced/model"
    model = Socket("MODEL")
    sampling = Combo(["eps", "v_prediction", "lcm", "x0", "img_to_img"])
    zsnr = Boolean(False, tooltip="rescale the noise schedule to zero terminal SNR (Lin et al. 2024)")
    outputs = (Output("MODEL"),)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        if inputs.get("sampling") == "img_to_img":
            return "sampling img_to_img is for Lotus-style image-to-image models, which Loom does not support"
        return None

    def execute(self, model: DiffusionModel, sampling: str, zsnr: bool) -> tuple[DiffusionModel]:
        schedule = discrete_betas_of(model.family)
        schedule = schedule.zero_terminal_snr() if zsnr else schedule
        if sampling == "lcm":  # after the rescaling, as in ComfyUI: the distilled levels of the rescaled table
            schedule = schedule.distilled()
        return (replace(model, schedule=schedule, prediction_type=_PREDICTIONS[sampling]),)


class ModelSamplingContinuousEDM(Node):
    """Samples the model as one trained on continuous noise levels between sigma_min and sigma_max (EDM: CosXL
    with v_prediction, Playground v2.5, EDM-trained fine-tunes), with what it predicts."""

    category = "advanced/model"
    model = Socket("MODEL")
    sampling = Combo(["v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmap"])
    sigma_max = Float(120.0, min=0.0, max=1000.0, step=0.001, round=False)
    sigma_min = Float(0.002, min=0.0, max=1000.0, step=0.001, round=False)
    outputs = (Output("MODEL"),)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        if inputs.get("sampling") == "cosmap":
            return "sampling cosmap (cosine-mapped flow models) is not supported by Loom"
        low, high = inputs.get("sigma_min"), inputs.get("sigma_max")
        if isinstance(low, float) and isinstance(high, float) and not 0 < low < high:
            return f"sigma_min ({low}) must be above 0 and below sigma_max ({high})"
        return None

    def execute(self, model: DiffusionModel, sampling: str, sigma_max: float,
                sigma_min: float) -> tuple[DiffusionModel]:
        if (problem := self.check_inputs({"sampling": sampling, "sigma_min": sigma_min, "sigma_max": sigma_max})):
            raise ValueError(problem)
        edm = sampling in ("edm", "edm_playground_v2.5")  # EDM's own prediction, on data of spread 0.5
        schedule = ContinuousSchedule(sigma_min, sigma_max, 0.5 if edm else 1.0)
        prediction = "edm" if edm else _PREDICTIONS[sampling]
        playground = True if sampling == "edm_playground_v2.5" else None
        return (replace(model, schedule=schedule, prediction_type=prediction, playground_latents=playground),)


class ModelSamplingContinuousV(Node):
    """Samples the model as a v-prediction one trained on continuous noise levels between sigma_min and sigma_max,
    its timestep atan(sigma) * 2 / pi."""

    category = "advanced/model"
    model = Socket("MODEL")
    sampling = Combo(["v_prediction"])
    sigma_max = Float(500.0, min=0.0, max=1000.0, step=0.001, round=False)
    sigma_min = Float(0.03, min=0.0, max=1000.0, step=0.001, round=False)
    outputs = (Output("MODEL"),)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        low, high = inputs.get("sigma_min"), inputs.get("sigma_max")
        if isinstance(low, float) and isinstance(high, float) and not 0 < low < high:
            return f"sigma_min ({low}) must be above 0 and below sigma_max ({high})"
        return None

    def execute(self, model: DiffusionModel, sampling: str, sigma_max: float,
                sigma_min: float) -> tuple[DiffusionModel]:
        if (problem := self.check_inputs({"sigma_min": sigma_min, "sigma_max": sigma_max})):
            raise ValueError(problem)
        return (replace(model, schedule=ContinuousVSchedule(sigma_min, sigma_max), prediction_type="v"),)


class TorchCompileModel(Node):
    """Runs the model's UNet through torch.compile (as `--compile` does for every model): slow at the first run
    of each image size, faster after. The cudagraphs backend needs a CUDA GPU; elsewhere the model runs eagerly."""

    category = "_for_testing"
    model = Socket("MODEL")
    backend = Combo(["inductor", "cudagraphs"])
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, backend: str) -> tuple[DiffusionModel]:
        return (replace(model, compile_backend=backend),)


class DifferentialDiffusion(Node):
    """Differential Diffusion (Levin & Fried 2023): a soft inpainting mask becomes a per-pixel strength, each
    pixel repainted only over the last part of the run its mask value gives it."""

    category = "_for_testing"
    model = Socket("MODEL")
    strength = Float(1.0, min=0.0, max=1.0, step=0.01, optional=True,
                     tooltip="below 1, mixes the soft mask back into the thresholded one")
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, strength: float = 1.0) -> tuple[DiffusionModel]:
        patches = replace(model.sampling_patches, denoise_mask=DifferentialDiffusionMask(strength))
        return (replace(model, sampling_patches=patches),)


NODES: list[Any] = [FreeU, FreeU_V2, PatchModelAddDownscale, RescaleCFG, PerturbedAttentionGuidance,
                    SelfAttentionGuidance, HyperTile, UNetSelfAttentionMultiply, UNetCrossAttentionMultiply,
                    CLIPAttentionMultiply, ModelSamplingDiscrete, ModelSamplingContinuousEDM, ModelSamplingContinuousV,
                    TorchCompileModel, DifferentialDiffusion]
