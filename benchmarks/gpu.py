"""SD1.5 and SDXL on one GPU: ours against diffusers on the same random weights, plus compile, fp8, batches.

    python -m benchmarks.gpu [--small] [--steps 20] [--no-diffusers] [--no-compile] [--budget-s 420]

Builds the `sd15` and `sdxl` presets with seeded random weights directly on the device, in bf16 (or
fp16 with an fp32 VAE where bf16 is missing), and for each measures, 20 euler steps at guidance 7.5,
batch 1: UNet iterations per second (the sampling loop alone; one iteration is one batched cond +
uncond UNet call), end-to-end seconds per image (text encoding, sampling, VAE decode) and peak GPU
memory; the same for diffusers' pipeline holding the same weights (only one side's models are on the
card at a time); ours without CUDA graphs (`ldm.cuda_graphs`, on by default on CUDA as in the engine)
and with `torch.compile`;
fp8 weights as `--weights-dtype fp8` stores them, the UNet's (memory, it/s, PSNR of the decoded images
against ours in bf16/fp16 over three seeds), and with the text encoders in fp8 too (memory, PSNR);
images per second at batch 1, 2 and 4.

Without CUDA (or with `--small`) the tiny presets run at 64 px instead, so the whole script can be
checked on a CPU; compile is then off unless `--compile` asks. Optional parts are skipped once
`--budget-s` seconds have passed, and a part that fails is reported (table and JSON `errors`) without
stopping the others. Prints one table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from executor.devices import DeviceManager
from ldm.compile import compiled_unet, forget_compiled
from ldm.cuda_graphs import graphed_unet, release
from ldm.layout import use_channels_last
from ldm.presets import PRESETS, randomize_
from ldm.quant import FP8_SKIP, fp8_skip, quantize_fp8_, weight_bytes
from ldm.sampling import DiscreteSchedule, prepare_noise, sample
from ldm.text_encoders import build_text_encoder, random_text_encoder_config
from ldm.unet import UNetModel, sdxl_adm
from ldm.vae import AutoencoderKL

PROMPT = "a photograph of an astronaut riding a horse"
SEEDS = (0, 1, 2)
FULL = {"sd15": ("sd15", 512), "sdxl": ("sdxl", 1024)}
SMALL = {"sd15": ("tiny-sd1", 64), "sdxl": ("tiny-sdxl", 64)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    began = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - began, out


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Models:
    family: str
    prediction: str
    unet: UNetModel
    vae: AutoencoderKL
    te: Any
    graphs: bool = False  # CUDA graphs, as the engine's KSampler uses them on CUDA (`--no-cuda-graphs`)
    unet_fn: Callable[..., torch.Tensor] | None = None  # the compiled forward, when measuring compile

    @property
    def runner(self) -> Callable[..., torch.Tensor]:
        forward = self.unet if self.unet_fn is None else self.unet_fn
        return graphed_unet(self.unet, forward) if self.graphs else forward


@torch.no_grad()
def build(preset: str, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype, seed: int = 0) -> Models:
    """Seeded random weights made on `device` itself (no host copy of a multi-GB model)."""
    family, prediction, unet_config, vae_config = PRESETS[preset]
    generator = torch.Generator(device).manual_seed(seed)
    te = build_text_encoder(random_text_encoder_config(preset), device=device)
    widths = {"context_dim": te.config.context_dim}
    if unet_config.adm_in_channels is not None:
        widths["adm_in_channels"] = te.config.pooled_dim + 6 * 256
    unet_config = dataclasses.replace(unet_config, **widths)
    with torch.device(device):
        norm_scales = {id(m.weight) for m in te.modules() if isinstance(m, torch.nn.LayerNorm)}
        for param in te.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02 + (id(param) in norm_scales))
        unet = randomize_(UNetModel(unet_config), generator).eval().requires_grad_(False)
        vae = randomize_(AutoencoderKL(vae_config), generator).eval().requires_grad_(False)
    unet = unet.to(dtype)
    if device.type == "cuda":
        use_channels_last(unet)  # as the engine's KSampler places it on CUDA (without --compile)
    return Models(family, prediction, unet, vae.to(vae_dtype), te.to(dtype), graphs=device.type == "cuda")


def conditioning(models: Models, prompts: list[str], size: int) -> list:
    encoding = models.te.encode(prompts)
    options = {}
    if models.family == "sdxl":
        options["y"] = sdxl_adm(encoding.pooled, size, size)
    return [(encoding.cond, options)]


def ours_latents(models: Models, positive: list, negative: list, seed: int, size: int, steps: int,
                 batch: int) -> torch.Tensor:
    device = models.unet.time_embed[0].weight.device
    # Latents stay in fp32 between steps, as the KSampler node keeps them; the UNet casts its input.
    latent = torch.zeros(batch, 4, size // 8, size // 8, device=device)
    return sample(models.runner, DiscreteSchedule(), latent, seed=seed, steps=steps, cfg=7.5, sampler_name="euler",
                  scheduler="normal", positive=positive, negative=negative, prediction=models.prediction)


def ours_txt2img(models: Models, seed: int, size: int, steps: int, batch: int = 1) -> torch.Tensor:
    """Images [B, 3, H, W] in 0..1: text encoding, sampling and decoding, as the engine's nodes do them."""
    positive = conditioning(models, [PROMPT] * batch, size)
    negative = conditioning(models, [""] * batch, size)
    z = ours_latents(models, positive, negative, seed, size, steps, batch)
    pixels = models.vae.decode(z / models.vae.scaling_factor)
    return ((pixels.float() + 1) / 2).clamp(0, 1)


def ours_its(models: Models, device: torch.device, size: int, steps: int, reps: int = 2) -> float:
    positive, negative = conditioning(models, [PROMPT], size), conditioning(models, [""], size)
    best = min(timed(device, lambda: ours_latents(models, positive, negative, 0, size, steps, 1))[0]
               for _ in range(reps))
    return steps / best


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@dataclass
class Figures:
    preset: str
    size: int
    its: float | None = None
    image_s: float | None = None
    peak_gb: float | None = None
    its_eager: float | None = None  # without CUDA graphs (the same as `its` off CUDA)
    its_nchw: float | None = None  # CUDA graphs, the UNet NCHW (`--no-channels-last`)
    nchw_max_diff: float | None = None
    graphs_max_diff: float | None = None
    its_compiled: float | None = None  # torch.compile, graphs as in `its`
    its_compiled_eager: float | None = None
    compile_s: float | None = None
    its_diffusers: float | None = None
    image_s_diffusers: float | None = None
    peak_gb_diffusers: float | None = None
    weights_mib: float | None = None
    weights_mib_fp8: float | None = None
    its_fp8: float | None = None
    psnr_fp8: float | None = None
    weights_mib_fp8_te: float | None = None  # the text encoders in fp8 too
    psnr_fp8_te: float | None = None
    images_per_s: dict[int, float] = field(default_factory=dict)
    fp8_variants: dict[str, dict[str, float]] = field(default_factory=dict)  # --fp8-variants: MiB and PSNR
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def attempt(f: Figures, name: str, device: torch.device, fn: Callable[[], Any]) -> None:
    """Run one part; a failure is printed and recorded, and the other parts still run (one GPU run
    is all a session may get, so one broken part must not cost the rest)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported in the figures and the table
        traceback.print_exc()
        f.errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
        free(device)


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.began, self.budget_s = time.perf_counter(), budget_s

    def left(self, reserve_s: float = 0.0) -> bool:
        """Whether a part expected to take `reserve_s` still ends within the budget."""
        return time.perf_counter() - self.began + reserve_s < self.budget_s


def run_ours(models: Models, device: torch.device, f: Figures, steps: int) -> dict[int, torch.Tensor]:
    size = f.size
    with torch.inference_mode():
        ours_txt2img(models, 0, size, 2)  # warm-up: kernels, cuDNN autotuning
        f.its = ours_its(models, device, size, steps)
        reset_peak(device)
        f.image_s, _ = timed(device, lambda: ours_txt2img(models, 0, size, steps))
        f.peak_gb = peak_gb(device)
        reference = {seed: ours_txt2img(models, seed, size, steps) for seed in SEEDS}
    return reference


def run_variants(models: Models, device: torch.device, f: Figures, steps: int, clock: Clock,
                 reference: dict[int, torch.Tensor]) -> None:
    """Without CUDA graphs, with the UNet NCHW, and batches 1, 2, 4: each a few seconds."""
    size = f.size

    def eager() -> None:  # as `--no-cuda-graphs` runs it: NCHW too (see nodes/sd/sampling.py)
        models.graphs = False
        models.unet.to(memory_format=torch.contiguous_format)
        try:
            image = ours_txt2img(models, SEEDS[0], size, steps)
            f.graphs_max_diff = float((image - reference[SEEDS[0]]).abs().max())
            f.its_eager = ours_its(models, device, size, steps)
        finally:
            models.graphs = device.type == "cuda"
            use_channels_last(models.unet)

    def nchw() -> None:
        models.unet.to(memory_format=torch.contiguous_format)
        release(models.unet)
        try:
            image = ours_txt2img(models, SEEDS[0], size, steps)
            f.nchw_max_diff = float((image - reference[SEEDS[0]]).abs().max())
            f.its_nchw = ours_its(models, device, size, steps)
        finally:
            use_channels_last(models.unet)
            release(models.unet)

    def batches() -> None:
        for batch in (1, 2, 4):
            ours_txt2img(models, 0, size, 2, batch)  # warm-up at this shape (autotuning, graph capture)
            seconds, _ = timed(device, lambda b=batch: ours_txt2img(models, 0, size, steps, b))
            f.images_per_s[batch] = batch / seconds

    with torch.inference_mode():
        if models.graphs:
            attempt(f, "without CUDA graphs", device, eager)
            attempt(f, "NCHW", device, nchw)
        if clock.left(30):
            attempt(f, "batches", device, batches)
        else:
            f.skipped.append("batches")


def run_compiled(models: Models, device: torch.device, f: Figures, steps: int) -> None:
    """torch.compile (inductor's default mode), with CUDA graphs as the engine adds them, and without."""
    size = f.size
    graphs = models.graphs
    models.unet.to(memory_format=torch.contiguous_format)  # as the engine compiles it
    release(models.unet)
    with torch.inference_mode():
        models.unet_fn = compiled_unet(models.unet)
        try:
            models.graphs = False
            f.compile_s, _ = timed(device, lambda: ours_txt2img(models, 0, size, steps))
            f.its_compiled_eager = ours_its(models, device, size, steps)
            if graphs:
                models.graphs = True
                ours_txt2img(models, 0, size, 2)  # captures the compiled kernels
                f.its_compiled = ours_its(models, device, size, steps)
            else:
                f.its_compiled = f.its_compiled_eager
        finally:
            models.unet_fn, models.graphs = None, graphs
            forget_compiled(models.unet)
            torch._dynamo.reset()
            if device.type == "cuda":
                use_channels_last(models.unet)


# More layers in bf16/fp16 than `--weights-dtype fp8` keeps (`fp8_skip`), or fewer: where the fp8 error
# comes from (`--fp8-variants`, memory and PSNR only). Text encoders are never quantized here.
FP8_VARIANTS: dict[str, Callable[[torch.nn.Module], re.Pattern[str]]] = {
    "unet, every block": lambda unet: FP8_SKIP,
    "unet, attention kept too": lambda unet: re.compile(fp8_skip(unet).pattern + r"|\.attn[12]\."),
}


def run_fp8(models: Models, device: torch.device, f: Figures, steps: int, reference: dict[int, torch.Tensor],
            variants: bool = False) -> None:
    """fp8 copies against the reference images (the VAE stays as it is): the UNet as `--weights-dtype fp8`
    makes it (memory, it/s, PSNR), then the text encoders too (`--te-weights-dtype fp8`: memory and PSNR);
    with `variants`, also the FP8_VARIANTS."""
    f.weights_mib = (weight_bytes(models.unet) + weight_bytes(models.te)) / 2**20

    def quantized(skip: re.Pattern[str] | None, text_encoder: bool) -> Models:
        return Models(models.family, models.prediction, quantize_fp8_(copy.deepcopy(models.unet), skip), models.vae,
                      quantize_fp8_(copy.deepcopy(models.te)) if text_encoder else models.te, graphs=models.graphs)

    def worst_psnr(small: Models) -> float:
        return min(psnr(ours_txt2img(small, seed, f.size, steps), reference[seed]) for seed in SEEDS)

    def mib(small: Models) -> float:
        return (weight_bytes(small.unet) + weight_bytes(small.te)) / 2**20

    small = quantized(None, False)
    f.weights_mib_fp8 = mib(small)
    with torch.inference_mode():
        ours_txt2img(small, 0, f.size, 2)
        f.its_fp8 = ours_its(small, device, f.size, steps)
        f.psnr_fp8 = worst_psnr(small)
        del small
        free(device)
        small = quantized(None, True)
        f.weights_mib_fp8_te, f.psnr_fp8_te = mib(small), worst_psnr(small)
        del small
        free(device)
        for name, skip in (FP8_VARIANTS.items() if variants else ()):
            small = quantized(skip(models.unet), False)
            f.fp8_variants[name] = {"mib": round(mib(small), 1), "psnr": round(worst_psnr(small), 2)}
            print(f"fp8 {name}: {f.fp8_variants[name]}", flush=True)
            del small
            free(device)


def run_diffusers(models: Models, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype, f: Figures,
                  steps: int) -> None:
    """Moves our weights to the host, frees the card, and measures diffusers' pipeline on them."""
    from diffusers.utils import logging as diffusers_logging

    from benchmarks.gpu_diffusers import diffusers_pipeline

    diffusers_logging.set_verbosity_error()

    states = {"unet": models.unet.state_dict(), "vae": models.vae.state_dict(),
              **{name: enc.state_dict() for name, enc in models.te.encoders.items()}}
    states = {part: {k: v.to("cpu", copy=True) for k, v in sd.items()} for part, sd in states.items()}
    unet_config, vae_config, te = models.unet.config, models.vae.config, models.te.to("meta")
    models.unet, models.vae = None, None  # type: ignore[assignment]
    free(device)
    pipe = diffusers_pipeline(models.family, models.prediction, unet_config, vae_config, te, states)
    del states
    pipe.to(device, dtype)
    pipe.vae.to(vae_dtype)
    size = f.size
    is_xl = models.family == "sdxl"

    def call(steps_: int, **kwargs: Any) -> Any:
        noise = prepare_noise(torch.zeros(1, 4, size // 8, size // 8), 0).to(device, pipe.unet.dtype)
        return pipe(num_inference_steps=steps_, guidance_scale=7.5, height=size, width=size, latents=noise, **kwargs)

    with torch.inference_mode():
        call(2, prompt=PROMPT, negative_prompt="", output_type="pt")  # warm-up
        embeds = pipe.encode_prompt(PROMPT, device, 1, True, "") if not is_xl else pipe.encode_prompt(
            PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="")
        names = (["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
                 if is_xl else ["prompt_embeds", "negative_prompt_embeds"])
        kwargs = dict(zip(names, embeds, strict=True))
        best = min(timed(device, lambda: call(steps, output_type="latent", **kwargs))[0] for _ in range(2))
        f.its_diffusers = steps / best
        reset_peak(device)
        f.image_s_diffusers, _ = timed(device, lambda: call(steps, prompt=PROMPT, negative_prompt="",
                                                            output_type="pt"))
        f.peak_gb_diffusers = peak_gb(device)


def measure(key: str, preset: str, size: int, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype,
            args: argparse.Namespace, clock: Clock) -> Figures:
    """Ours (required), then each optional part on its own; diffusers last, since it takes our weights."""
    f = Figures(preset, size)
    models = build(preset, device, dtype, vae_dtype)
    reference = run_ours(models, device, f, args.steps)
    print(f"{key}: ours {f.its:.2f} it/s, {f.image_s:.2f} s/image ({time.perf_counter() - clock.began:.0f} s)",
          flush=True)
    run_variants(models, device, f, args.steps, clock, reference)
    if clock.left(60):
        attempt(f, "fp8", device, lambda: run_fp8(models, device, f, args.steps, reference, args.fp8_variants))
    else:
        f.skipped.append("fp8")
    if args.compile and clock.left(150 if size < 1024 else 240):  # SDXL compiles for minutes
        attempt(f, "compile", device, lambda: run_compiled(models, device, f, args.steps))
    elif args.compile:
        f.skipped.append("compile")
    if args.diffusers:
        attempt(f, "diffusers", device, lambda: run_diffusers(models, device, dtype, vae_dtype, f, args.steps))
    models = None  # drops the weights before the next preset (the lambdas above share this variable)
    free(device)
    return f


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, Figures], device_name: str, dtype: torch.dtype) -> str:
    rows = [
        ("UNet it/s, ours", "its"), ("UNet it/s, ours without CUDA graphs", "its_eager"),
        ("UNet it/s, ours NCHW (not channels-last)", "its_nchw"),
        ("UNet it/s, ours compiled", "its_compiled"), ("UNet it/s, ours compiled, no graphs", "its_compiled_eager"),
        ("UNet it/s, diffusers", "its_diffusers"), ("s/image end to end, ours", "image_s"),
        ("s/image end to end, diffusers", "image_s_diffusers"), ("peak GPU GiB, ours", "peak_gb"),
        ("peak GPU GiB, diffusers", "peak_gb_diffusers"), ("first compiled run s", "compile_s"),
        ("UNet+TE weights MiB", "weights_mib"), ("UNet+TE weights MiB, fp8 UNet", "weights_mib_fp8"),
        ("UNet it/s, fp8 UNet", "its_fp8"), ("PSNR fp8 UNet vs full dB (worst seed)", "psnr_fp8"),
        ("UNet+TE weights MiB, fp8 UNet and TE", "weights_mib_fp8_te"),
        ("PSNR fp8 UNet and TE vs full dB", "psnr_fp8_te"),
        ("CUDA graphs: max pixel diff vs without (NCHW)", "graphs_max_diff"),
        ("NCHW: max pixel diff vs channels-last", "nchw_max_diff"),
    ]
    keys = list(results)
    head = f"{device_name}, {str(dtype).removeprefix('torch.')}, 20-step euler, cfg 7.5"
    lines = [head, f"{'':36}" + "".join(f"{results[k].preset + ' ' + str(results[k].size) + 'px':>22}" for k in keys)]
    for label, attr in rows:
        lines.append(f"{label:36}" + "".join(f"{_fmt(getattr(results[k], attr)):>22}" for k in keys))
    for batch in (1, 2, 4):
        lines.append(f"{f'images/s at batch {batch}, ours':36}"
                     + "".join(f"{_fmt(results[k].images_per_s.get(batch), 3):>22}" for k in keys))
    ratios = [f"{k}: {results[k].its / results[k].its_diffusers:.2f}x diffusers"
              + (f" ({results[k].its_eager / results[k].its_diffusers:.2f}x without graphs)"
                 if results[k].its_eager else "")
              for k in keys if results[k].its and results[k].its_diffusers]
    if ratios:
        lines.append("ours/diffusers it/s: " + ", ".join(ratios))
    skipped = [f"{k}: {', '.join(results[k].skipped)}" for k in keys if results[k].skipped]
    if skipped:
        lines.append("skipped for time: " + "; ".join(skipped))
    lines += [f"error in {k}: {e}" for k in keys for e in results[k].errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny presets at 64 px (automatic without CUDA)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="ours only")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="measure torch.compile (default: on with CUDA, off on the CPU)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip optional parts after this long")
    parser.add_argument("--only", choices=["sd15", "sdxl"], help="one preset")
    parser.add_argument("--fp8-variants", action="store_true",
                        help="also PSNR and memory with more layers kept in full precision (FP8_VARIANTS)")
    args = parser.parse_args(argv)
    devices = DeviceManager()
    device = devices.device
    small = args.small or device.type != "cuda"
    if args.compile is None:
        args.compile = device.type == "cuda"
    if device.type != "cuda":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (small presets)"
    clock = Clock(args.budget_s)
    results: dict[str, Figures] = {}
    for key, (preset, size) in (SMALL if small else FULL).items():
        if args.only and key != args.only:
            continue
        results[key] = measure(key, preset, size, device, devices.dtype, devices.vae_dtype, args, clock)
        # Each preset's figures at once, so a run cut short by a time limit still leaves them.
        print(json.dumps({"preset_done": key, "after_s": round(time.perf_counter() - clock.began),
                          **dataclasses.asdict(results[key])}), flush=True)
    print(table(results, device_name, devices.dtype))
    sd15, sdxl = results.get("sd15"), results.get("sdxl")

    def get(figures: Figures | None, attr: str) -> float | None:
        value = getattr(figures, attr) if figures else None
        return None if value is None else round(value, 3)

    summary = {
        "device": device_name, "dtype": str(devices.dtype).removeprefix("torch."), "small": small,
        "sd15_its": get(sd15, "its"), "sd15_its_diffusers": get(sd15, "its_diffusers"),
        "sdxl_its": get(sdxl, "its"), "sdxl_its_diffusers": get(sdxl, "its_diffusers"),
        "sd15_peak_gb": get(sd15, "peak_gb"), "sd15_peak_gb_diffusers": get(sd15, "peak_gb_diffusers"),
        "sd15_image_s": get(sd15, "image_s"),
        "sd15_its_compiled": get(sd15, "its_compiled"), "sdxl_its_compiled": get(sdxl, "its_compiled"),
        "sd15_its_eager": get(sd15, "its_eager"), "sdxl_its_eager": get(sdxl, "its_eager"),
        "sd15_its_nchw": get(sd15, "its_nchw"), "sdxl_its_nchw": get(sdxl, "its_nchw"),
        "sd15_its_compiled_eager": get(sd15, "its_compiled_eager"),
        "sdxl_image_s": get(sdxl, "image_s"), "sdxl_peak_gb": get(sdxl, "peak_gb"),
        "sdxl_peak_gb_diffusers": get(sdxl, "peak_gb_diffusers"),
        "sd15_psnr_fp8": get(sd15, "psnr_fp8"), "sdxl_psnr_fp8": get(sdxl, "psnr_fp8"),
        "sd15_psnr_fp8_te": get(sd15, "psnr_fp8_te"), "sdxl_psnr_fp8_te": get(sdxl, "psnr_fp8_te"),
        "sd15_weights_mib": get(sd15, "weights_mib"), "sd15_weights_mib_fp8": get(sd15, "weights_mib_fp8"),
        "sdxl_weights_mib": get(sdxl, "weights_mib"), "sdxl_weights_mib_fp8": get(sdxl, "weights_mib_fp8"),
        "sd15_weights_mib_fp8_te": get(sd15, "weights_mib_fp8_te"),
        "sdxl_weights_mib_fp8_te": get(sdxl, "weights_mib_fp8_te"),
        "sd15_images_per_s": {b: round(v, 3) for b, v in sd15.images_per_s.items()} if sd15 else None,
        "sdxl_images_per_s": {b: round(v, 3) for b, v in sdxl.images_per_s.items()} if sdxl else None,
        "fp8_variants": {k: figures.fp8_variants for k, figures in results.items() if figures.fp8_variants},
        "errors": [f"{k}: {e}" for k, figures in results.items() for e in figures.errors],
        "total_s": round(time.perf_counter() - clock.began, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
