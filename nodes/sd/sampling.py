"""KSampler and KSamplerAdvanced: denoise a latent with a MODEL, prompts, a sampler and a schedule."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ldm.latent_preview import LatentPreview, fit_for, sampler_rgb_map
from ldm.sampling import SAMPLER_NAMES, SCHEDULER_NAMES, av_latent, sample
from ldm.sampling.guidance import DualCfg
from ldm.sampling.ksampler import RESIZING_SAMPLERS
from nodes.node import Node
from nodes.sd.models import DiffusionModel, device_and_dtype, devices_of, on_device
from nodes.spec import INT_MAX, Combo, Float, Int, Output, Socket


def _with_adm(conditioning: list, model: DiffusionModel, latent: torch.Tensor, negative: bool = False,
              seed: int = 0) -> list:
    """SDXL's extra `y` input, from each entry's pooled text embedding and size options (the refiner's
    also from its aesthetic score: 6 unless said, 2.5 for the negative prompt, as in ComfyUI); an unCLIP
    model's from each entry's image prompts, noised from `seed` (nodes.sd.vision.unclip_y)."""
    unclip = getattr(model.family, "unclip", False)
    if not unclip and any("unclip_conditioning" in options for _, options in conditioning):
        from nodes.sd.vision import warn_not_unclip

        warn_not_unclip(model)
    if model.family.name == "chroma":  # no `y`; another family's CLIP's prompts refused
        from nodes.sd.chroma import chroma_conditioning

        return chroma_conditioning(conditioning, model, "negative" if negative else "positive")
    if model.family.name == "flux":  # its `y`: the pooled prompt and the guidance strength
        from nodes.sd.flux import flux_y

        return flux_y(conditioning, model)
    if model.family.name == "flux2":  # its prompts padded to 512 tokens; dev's `y`: the guidance strength
        from nodes.sd.flux2 import flux2_conditioning

        return flux2_conditioning(conditioning, model)
    if model.family.name == "hidream":  # its `y`: the pooled CLIP-L and CLIP-G prompts; the Llama states required
        from nodes.sd.hidream import hidream_conditioning

        return hidream_conditioning(conditioning, model, "negative" if negative else "positive")
    if model.family.name == "sd3":  # its `y`: the pooled CLIP-L and CLIP-G prompts
        from nodes.sd.sd3 import sd3_y

        return sd3_y(conditioning)
    if model.family.name == "ltxv":  # its `y`: the frame rate (LTXVConditioning's)
        from nodes.sd.ltxv import ltxv_conditioning

        return ltxv_conditioning(conditioning)
    if model.family.name == "ltx2":  # its prompts through the model's connectors; its `y`: the frame rate
        from nodes.sd.ltx2 import ltx2_conditioning

        return ltx2_conditioning(conditioning, model)
    if model.family.name in ("wan21", "wan22"):  # its `y`: the start image's CLIP vision states (image-to-video)
        from nodes.sd.wan import wan_conditioning

        return wan_conditioning(conditioning)
    if model.family.name == "hunyuan_video15":  # its `y`: the start picture's SigLIP states (image-to-video)
        from nodes.sd.hunyuan_video15 import hunyuan_video15_conditioning

        return hunyuan_video15_conditioning(conditioning)
    if model.family.name == "hunyuan_image21":  # the distilled model's `y`: the guidance strength
        from nodes.sd.hunyuan_image21 import hunyuan_image21_conditioning

        return hunyuan_image21_conditioning(conditioning, model)
    if model.family.name == "svd":  # its `y`: the frame rate, motion bucket and augmentation, and the frame count
        from nodes.sd.svd import svd_sampling_y

        return svd_sampling_y(conditioning, latent)
    if not model.needs_adm:
        return conditioning
    if unclip:
        from nodes.sd.vision import unclip_y

        return [(embedding, {**options, "y": unclip_y(model, options, seed)}) for embedding, options in conditioning]
    from ldm.unet import ADM_NUMBERS, sdxl_adm, sdxl_refiner_adm

    refiner = model.family.name == "sdxl_refiner"
    height, width = latent.shape[-2] * 8, latent.shape[-1] * 8
    out = []
    for embedding, options in conditioning:
        pooled = options.get("pooled_output")
        if pooled is None:  # e.g. a conditioning made by a plugin: no pooled text, as if empty
            numbers = ADM_NUMBERS.get(model.family.name, 6)
            pooled = torch.zeros(embedding.shape[0], model.family.unet_config.adm_in_channels - numbers * 256)
        size = (options.get("width", width), options.get("height", height), options.get("crop_w", 0),
                options.get("crop_h", 0))
        if refiner:
            score = options.get("aesthetic_score", 2.5 if negative else 6.0)
            y = sdxl_refiner_adm(pooled, *size, aesthetic_score=score)
        else:  # the target size defaults to the prompt's size, as in ComfyUI
            y = sdxl_adm(pooled, *size, options.get("target_width", size[0]), options.get("target_height", size[1]))
        out.append((embedding, {**options, "y": y}))
    return out


# Families whose latents have a frame axis ([B, C, frames, h, w]).
VIDEO_FAMILIES = frozenset({"wan21", "wan22", "ltxv", "ltx2", "hunyuan_video15"})


def _fit_empty_latent(model: DiffusionModel, latent: dict) -> torch.Tensor:
    """An empty (all-zero) latent made for another latent space takes the model's channel count, its pixels per
    latent pixel (EmptyLatentImage's 8, marked `downscale_ratio_spacial`, for Qwen-Image 2.1's 16), and a video
    model's latent its frame axis, as ComfyUI's samplers fit them (fix_empty_latent_channels): EmptyLatentImage's 4
    channels serve Flux's 16, an image latent a Wan model as one frame. A latent holding values is left to be
    refused."""
    family, samples = model.family, latent["samples"]
    channels = getattr(family, "latent_channels", None) or family.vae_config.z_channels
    if samples.shape[1] != channels and not samples.any():
        samples = samples.new_zeros(samples.shape[0], channels, *samples.shape[2:])
    # Only a family that names its ratio is refitted (FLUX.2's own empty latent is marked 16 and fits as it is).
    made_for, ratio = latent.get("downscale_ratio_spacial"), getattr(family, "spatial_ratio", None)
    if made_for is not None and ratio is not None and made_for != ratio and not samples.any():
        size = [round(side * made_for / ratio) for side in samples.shape[-2:]]
        samples = samples.new_zeros(*samples.shape[:-2], *size)
    if family.name in VIDEO_FAMILIES and samples.ndim == 4:
        samples = samples.unsqueeze(2)
    return samples


def _check_prompt_widths(model: DiffusionModel, positive: list, negative: list, middle: list = ()) -> None:
    """Prompts encoded by another checkpoint's CLIP (the SDXL base's with the refiner, say) are refused
    with the widths, rather than failing inside the UNet with a matrix-shape error."""
    config = model.family.unet_config
    # A UNet may project wider contexts itself (Stable Zero123's image embedding and camera, `ldm.zero123`).
    widths = {config.context_dim, *getattr(model.unet, "extra_context_widths", ())}
    # A family of split files names the text encoder to use (ldm.flux2_files' prompt_hint).
    hint = getattr(model.family, "prompt_hint", "encode it with this checkpoint's CLIP")
    for side, conditioning in (("positive", positive), ("negative", negative), ("second positive", middle)):
        for embedding, _ in conditioning:
            if embedding.shape[-1] not in widths:
                raise ValueError(f"the {side} prompt was encoded {embedding.shape[-1]} wide, and the model "
                                 f"{model.source} ({model.family.name.upper()}) takes {config.context_dim}: {hint}")


def _controls(*conditionings: list) -> list:
    """Every ControlNet application the prompts carry (`ldm.controlnet.Control`), chains unrolled, once each."""
    found: dict[int, Any] = {}
    for conditioning in conditionings:
        for _, options in conditioning:
            first = options.get("control")
            for control in first.chain() if first is not None else ():
                found.setdefault(id(control), control)
    return list(found.values())


def _place_controls(node: Node, model: DiffusionModel, controls: list) -> tuple[torch.nn.Module, ...]:
    """Move the ControlNets to the compute device, after checking that each fits the model; returns them."""
    from ldm.control_lora import ControlLora
    from ldm.t2i_adapter import T2IAdapter

    placed: dict[int, torch.nn.Module] = {}
    for control in controls:
        name = control.source or "the ControlNet"
        if control.family is not None and control.family != model.family.name:
            raise ValueError(f"{name} is a ControlNet for {control.family.upper()}; "
                             f"the model ({model.source}) is {model.family.name.upper()}")
        if hasattr(control, "fit"):  # a control that checks itself against the model (ldm.controlnet_sd3)
            mismatch = control.fit(model.unet, model.schedule)
        elif isinstance(control.model, T2IAdapter):  # its features must fit the UNet's blocks (ldm.t2i_adapter)
            mismatch = control.model.unet_mismatch(model.family.unet_config)
        else:
            mismatch = _encoder_mismatch(control.model.config, model.family.unet_config)
        if mismatch:  # the same family, another size (the bundled demo model is a small SD1-style UNet)
            raise ValueError(f"{name} does not fit the model {model.source}: {mismatch}")
        # Checked (and, for SD3/Flux ones, fitted to the model's schedule) each, but placed once per ControlNet.
        if id(control.model) in placed:
            continue
        # A Control-LoRA's ControlNet is made from this model's UNet (ldm.control_lora), and kept for it.
        module = control.model.controlnet(model.unet) if isinstance(control.model, ControlLora) else control.model
        # Kept: the ControlNets placed before, and the UNet, which runs with them next.
        placed[id(control.model)] = on_device(node.ctx, module, keep=(model.unet, *placed.values()))
    return tuple(placed.values())


def _encoder_mismatch(controlnet: Any, unet: Any) -> str | None:
    """How a ControlNet's encoder differs from the UNet's (None when its residuals fit the UNet's blocks)."""
    for name in ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels"):
        theirs, ours = getattr(controlnet, name), getattr(unet, name)
        if theirs != ours:
            return f"the ControlNet was made for a UNet with {name} {theirs}, and this one has {ours}"
    return None


def _control_uncond(positive: list, negative: list) -> list:
    """ComfyUI's rule for Apply ControlNet (OLD), which marks its entries `control_apply_to_uncond`: when no
    whole-image negative entry has a control of its own, the whole-image negative entries without one get
    those positive entries' controls, cycled over them. CFG then compares two controlled predictions."""
    controls = [opts["control"] for _, opts in positive
                if opts.get("control_apply_to_uncond") and "area" not in opts and opts.get("control") is not None]
    whole = [i for i, (_, opts) in enumerate(negative) if "area" not in opts]
    if not controls or not whole or any(negative[i][1].get("control") is not None for i in whole):
        return negative
    negative = list(negative)
    for n, control in enumerate(controls):
        i = whole[n % len(whole)]
        negative[i] = (negative[i][0], {**negative[i][1], "control": control})
    return negative


def _check_hook_families(model: DiffusionModel, *conditionings: list) -> None:
    """A prompt's hook LoRA (CreateHookLora) for another family is refused before sampling, as LoraLoader refuses
    it, even where its layers would happen to fit or it has none for the UNet."""
    from ldm.lora import check_lora_family

    for conditioning in conditionings:
        for _, options in conditioning:
            for hook in getattr(options.get("hooks"), "hooks", ()):
                if hook.lora is not None:
                    check_lora_family(hook.lora, model.family.name)


def run_sampler(node: Node, model: DiffusionModel, latent: dict, positive: list, negative: list, *,
                seed: int, cfg: float, sampler_name: str, steps: int = 20, scheduler: str = "normal",
                denoise: float = 1.0, sigmas: torch.Tensor | None = None, sampler_options: dict | None = None,
                add_noise: bool = True, start_step: int | None = None, end_step: int | None = None,
                return_leftover_noise: bool = False, dual: DualCfg | None = None) -> tuple[dict, dict]:
    """The shared body of the KSampler and custom sampling nodes: the sampled LATENT, and the LATENT of
    the last step's denoised prediction (the same as the first if no step ran). LATENT values stay
    unscaled, as in ComfyUI. `sigmas` replaces `steps`, `scheduler` and `denoise`; `dual` adds DualCFGGuider's
    second positive prompt; without one, the model's patches may add a third prompt (the PerpNeg patch's)."""
    dual = dual if dual is not None else model.sampling_patches.third_prompt
    _check_hook_families(model, positive, negative, dual.middle if dual else [])
    _check_prompt_widths(model, positive, negative, dual.middle if dual else [])
    device, _, _ = device_and_dtype(node.ctx)
    # fitted to the model's latent space, whose size the sampled LATENT has (the 1/8 marker goes, as in ComfyUI)
    latent = {key: value for key, value in latent.items() if key != "downscale_ratio_spacial"} | {
        "samples": _fit_empty_latent(model, latent)}
    samples = latent["samples"]  # the video part of an audio-video latent (LTX-2's), packed with its audio below
    av_shapes = _audio_video_shapes(model, latent)
    if av_shapes is not None:
        _check_av_prompts(positive, negative, dual.middle if dual else [])
    noise_mask = latent.get("noise_mask") if av_shapes is None else av_latent.packed_mask(latent)
    # Latents stay in fp32 between steps whatever the model's dtype: fp16/bf16 would lose the small
    # updates of late steps. The UNet casts its input to its own dtype and its output back.
    x = model.latent_in(samples.to(device, torch.float32))
    if av_shapes is not None:  # the model's video latent and the audio latent (the audio VAE's own space) as one
        x = av_latent.pack([x, latent[av_latent.AUDIO_SAMPLES].to(device, torch.float32)])

    last: list[torch.Tensor] = []
    # The step previews' latent-to-RGB map for this model's latent space, in the sampler's (scaled) latents.
    family = model.family
    # A video family normalises per channel and names no image VAE: its latent space is (width, scale 1).
    space = ((family.latent_channels, family.latent_scale_factor) if getattr(family, "latent_mean", None) is not None
             else family.vae_config)
    rgb_map = sampler_rgb_map(fit_for(space), samples.shape[1], model.latent_out)

    def on_step(step: int, total: int, denoised: torch.Tensor) -> None:
        last[:] = [denoised]
        shown = denoised if av_shapes is None else av_latent.unpack(denoised, av_shapes)[0]
        node.ctx.progress(step + 1, total, preview=LatentPreview(shown, rgb_map))

    def interrupted() -> bool:
        node.ctx.check_interrupt()  # raises the engine's Interrupted
        return False

    # What models with channels beside the latent's take (inpainting, InstructPix2Pix, the x4 upscaler).
    from nodes.sd.concat_models import model_inputs

    concat, (positive, negative, *middle) = model_inputs(model, latent, seed, positive, negative,
                                                         *([dual.middle] if dual else []))
    if dual is not None:
        dual = replace(dual, middle=middle[0])
    negative = _control_uncond(positive, negative)
    controls = _controls(positive, negative, *([dual.middle] if dual else []))
    if dual is not None:
        dual = replace(dual, middle=_with_adm(dual.middle, model, samples, negative=True, seed=seed))
    controlnets = _place_controls(node, model, controls)
    # GLIGEN models (GLIGENTextBoxApply) run inside the UNet's blocks: on the device with it and the ControlNets.
    gligens = {id(opts["gligen"][1]): opts["gligen"][1] for side in (positive, negative, *middle)
               for _, opts in side if opts.get("gligen") is not None}
    placed = (*controlnets, *(on_device(node.ctx, g, keep=(model.unet, *controlnets)) for g in gligens.values()))
    unet = on_device(node.ctx, model.unet, keep=placed)  # the ControlNets stay on the device with it
    placed_unet = unet
    devices = devices_of(node.ctx)
    if devices is not None and not devices.options.lowvram:  # streamed blocks move: no compile, no graphs
        module = unet
        options = devices.options
        # A UNet patched to branch on the timestep (Deep Shrink) runs without graphs, which would replay one branch;
        # a sampler that resizes the latent meets most sizes once, and capturing one costs about three steps.
        graphs = (options.cuda_graphs and device.type == "cuda" and getattr(module, "cuda_graphs_safe", True)
                  and sampler_name not in RESIZING_SAMPLERS)
        # Channels-last pays under CUDA graphs only: its group norm launches more, smaller kernels, and
        # launches are what a step without graphs waits on. A ControlNet's residuals change every step,
        # so those runs launch eagerly, in NCHW. Not measured with --compile: left NCHW.
        if device.type == "cuda" and not options.compile and model.compile_backend is None:
            from ldm.layout import use_channels_last, use_nchw

            if options.channels_last and graphs and not controls:
                use_channels_last(module)  # before the graphs: they capture the weights' storage
            else:
                use_nchw(module)  # back from an earlier run's channels-last, if there was one
        backend = model.compile_backend or ("inductor" if options.compile else None)
        if backend == "cudagraphs" and device.type != "cuda":
            backend = None  # torch's cudagraphs backend needs a CUDA device: eager, as the node's tooltip says
        if backend is not None:
            from ldm.compile import compiled_unet

            unet = compiled_unet(module, backend=backend)
        if graphs:
            from ldm.cuda_graphs import graphed_unet

            unet = graphed_unet(module, unet)
    if model.family.name == "wan21":  # bound for the run: a Fun camera model's camera, a VACE model's controls
        from nodes.sd.wan_camera import camera_controls
        from nodes.sd.wan_vace import vace_controls

        unet = vace_controls(camera_controls(unet, model, positive, negative), model, positive, negative)
    if getattr(model.unet, "prefix_cache", False):  # Qwen-Image 2.1: the prompt's keys and values kept for this run
        from ldm.qwen_image21_files import PrefixKVRun

        unet = PrefixKVRun(unet)  # compiled if asked (CUDA graphs are off: the cached calls' shapes change)
    if getattr(model.unet, "reference_kv", False):  # FluxKVCache: references' keys and values kept for this run
        from ldm.flux2 import ReferenceKVRun

        unet = ReferenceKVRun(unet, placed_unet)
    clean_kept = noise_mask is not None and getattr(model.family, "token_timesteps", False)
    if av_shapes is not None:  # the model takes the parts (and their masks, as per-token noise levels)
        unet = av_latent.PackedParts(unet, av_shapes, noise_mask if clean_kept else None)
    elif clean_kept:  # the mask as per-token noise levels (LTX-Video's, Wan 2.2 5B's image-to-video)
        from ldm.sampling.masked_timesteps import MaskedTimesteps

        unet = MaskedTimesteps(unet, noise_mask, x)
    try:
        with torch.inference_mode():
            out = sample(
                unet, model.schedule, x, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                scheduler=scheduler, positive=_with_adm(positive, model, samples, seed=seed),
                negative=_with_adm(negative, model, samples, negative=True, seed=seed),
                denoise=denoise, sigmas=sigmas,
                add_noise=add_noise, start_step=start_step, end_step=end_step,
                return_leftover_noise=return_leftover_noise, noise_mask=noise_mask, noise_parts=av_shapes,
                batch_index=latent.get("batch_index"), callback=on_step, interrupt=interrupted,
                prediction=model.prediction, sampler_options=sampler_options, patches=model.sampling_patches,
                module=model.unet, dual=dual, concat=concat, clean_kept=clean_kept,
            )
    finally:
        for control in controls:  # the Controls live on in cached conditioning: no device memory with them
            control.release()
    result = _sampled(latent, model, out.float(), av_shapes)
    denoised = _sampled(latent, model, last[0].float(), av_shapes) if last else result
    return result, denoised


def _audio_video_shapes(model: DiffusionModel, latent: dict) -> av_latent.Shapes | None:
    """The parts' shapes of an audio-video LATENT (LTXVConcatAVLatent's), which only an LTX-2 model samples;
    None for any other latent."""
    if not av_latent.is_av(latent):
        return None
    if not getattr(model.family, "audio_video", False):
        raise ValueError(f"the latent holds video and audio (LTXVConcatAVLatent), which only an LTX-2 model samples;"
                         f" {model.source} is {model.family.name}: separate them with LTXVSeparateAVLatent")
    return av_latent.shapes_of(av_latent.parts_of(latent))


def _check_av_prompts(*conditionings: list) -> None:
    """Prompts an audio-video latent cannot take: areas and masks (of which part?), and hooks (the LoRA-patched
    copies of the model they run take no packed latent)."""
    for conditioning in conditionings:
        for _, options in conditioning:
            if options.get("area") is not None or options.get("mask") is not None:
                raise ValueError("area and mask prompts (ConditioningSetArea, ConditioningSetMask) do not apply to an "
                                 "audio-video latent: sample the whole video with each prompt")
            if options.get("hooks") is not None:
                raise ValueError("prompts with hooks (LoRAs for some prompts) do not run on an audio-video latent: "
                                 "apply the LoRA to the model (LoraLoaderModelOnly)")


def _sampled(latent: dict, model: DiffusionModel, x: torch.Tensor, av_shapes: av_latent.Shapes | None) -> dict:
    """The sampled LATENT: the input's entries (its noise masks too, as ComfyUI keeps them) with the model's latent
    `x` back in the LATENT's space."""
    if av_shapes is None:
        return {**latent, "samples": model.latent_out(x).cpu()}
    video, audio = av_latent.unpack(x, av_shapes)
    return {**latent, "samples": model.latent_out(video).cpu(), av_latent.AUDIO_SAMPLES: audio.cpu()}


class KSampler(Node):
    """Denoises a latent image guided by the positive and negative prompts."""

    category = "sampling"
    model = Socket("MODEL")
    seed = Int(0, min=0, max=INT_MAX, control_after_generate=True, tooltip="the seed of the initial noise")
    steps = Int(20, min=1, max=10000)
    cfg = Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)
    sampler_name = Combo(SAMPLER_NAMES)
    scheduler = Combo(SCHEDULER_NAMES)
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    latent_image = Socket("LATENT")
    denoise = Float(1.0, min=0.0, max=1.0, step=0.01, tooltip="below 1 keeps part of the input (img2img)")
    outputs = (Output("LATENT"),)

    @classmethod
    def check_links(cls, inputs: dict, linked: dict) -> str | None:
        from nodes.sd.chroma import chroma_link_refusal  # a Chroma model or CLIP with another family's
        from nodes.sd.edit_validation import edit_input_refusal  # Flux edit inputs the model does not take

        return chroma_link_refusal(linked) or edit_input_refusal(linked)

    def execute(self, model: DiffusionModel, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                positive: list, negative: list, latent_image: dict, denoise: float) -> tuple[dict]:
        return (run_sampler(self, model, latent_image, positive, negative, seed=seed, steps=steps, cfg=cfg,
                            sampler_name=sampler_name, scheduler=scheduler, denoise=denoise)[0],)


class KSamplerAdvanced(Node):
    """KSampler with control over the steps run and the noise added, for multi-stage workflows."""

    category = "sampling"
    display_name = "KSampler (Advanced)"
    model = Socket("MODEL")
    add_noise = Combo(["enable", "disable"])
    noise_seed = Int(0, min=0, max=INT_MAX, control_after_generate=True)
    steps = Int(20, min=1, max=10000)
    cfg = Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)
    sampler_name = Combo(SAMPLER_NAMES)
    scheduler = Combo(SCHEDULER_NAMES)
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    latent_image = Socket("LATENT")
    start_at_step = Int(0, min=0, max=10000)
    end_at_step = Int(10000, min=0, max=10000)
    return_with_leftover_noise = Combo(["disable", "enable"])
    outputs = (Output("LATENT"),)
    check_links = KSampler.check_links

    def execute(self, model: DiffusionModel, add_noise: str, noise_seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, positive: list, negative: list, latent_image: dict,
                start_at_step: int, end_at_step: int, return_with_leftover_noise: str) -> tuple[dict]:
        return (run_sampler(self, model, latent_image, positive, negative, seed=noise_seed, steps=steps, cfg=cfg,
                            sampler_name=sampler_name, scheduler=scheduler, add_noise=add_noise == "enable",
                            start_step=start_at_step, end_step=end_at_step,
                            return_leftover_noise=return_with_leftover_noise == "enable")[0],)


NODES: list[Any] = [KSampler, KSamplerAdvanced]
