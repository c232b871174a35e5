"""Where a UNet step's GPU time goes: ours against diffusers' UNet on the same random weights.

    python -m benchmarks.unet_profile [--preset sdxl sd15] [--reps 20] [--no-diffusers]

One UNet forward at the batch of a guided step (2), bf16 on CUDA, eager and with our CUDA graphs: ours
as the engine runs it (channels-last), then each variant in VARIANTS (NCHW, as `--no-channels-last`
leaves it; fused q/k/v projections), each undone before the next. Then kernel profiles of one eager
forward, summed by kind of kernel (matmul, convolution and its layout copies, attention, norms,
elementwise, other copies), ours, the NCHW variant and diffusers' side by side. It says which kernels
make ours slower or faster than diffusers before anyone changes the UNet; session 8 found cuDNN's
NCHW-to-NHWC copies this way (ldm/layout.py). Without CUDA it runs the tiny presets on the CPU: a
smoke check of the script, whose CPU figures mean little (the CPU profile nests aten ops)."""

from __future__ import annotations

import argparse
import functools
import gc
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from executor.devices import DeviceManager
from ldm.attention import GEGLU, CrossAttention
from ldm.cuda_graphs import graphed_unet, release
from ldm.layout import use_channels_last
from ldm.presets import PRESETS, randomize_
from ldm.unet import UNetModel

SIZES = {"sd15": 512, "sdxl": 1024, "tiny-sd1": 64, "tiny-sdxl": 64}
CONTEXT_TOKENS = 77

# Kernel name patterns, first match wins; the rest is "other".
KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("conv layout copy", r"nchwToNhwc|nhwcToNchw"),
    ("conv", r"conv|implicit|cudnn|winograd|dgrad|wgrad|fprop"),
    ("matmul", r"gemm|cutlass|sm90|sm80|nvjet|cublas|xmma|matmul"),
    ("group norm", r"group_norm|groupnorm|GroupNorm|RowwiseMoments"),
    ("layer norm", r"layer_norm|LayerNorm"),
    ("copy / cat / layout", r"copy|cat|Cat|transpose|permute|contiguous|upsample|index"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|mul|add|activation"),
]


def kind(kernel: str) -> str:
    return next((name for name, pattern in KINDS if re.search(pattern, kernel)), "other")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_call(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Best of three averages over `reps` calls, after warm-up (autotuning, graph capture)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):
        sync(device)
        began = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - began) / reps * 1000)
    return best


def kernel_ms(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """GPU time per kernel name over one call (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
        sync(device)
    times: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if device.type == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if device.type != "cuda" and not event.name.startswith("aten::"):
            continue
        times[event.name] += event.device_time_total / 1000 if device.type == "cuda" else event.cpu_time / 1000
    return dict(times)


def by_kind(times: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for name, ms in times.items():
        out[kind(name)] += ms
    return dict(out)


# Variants of ours, each a context manager that patches the built UNet and undoes it.


@contextmanager
def _forwards(patches: dict[torch.nn.Module, Callable[..., torch.Tensor]]) -> Iterator[None]:
    """Each module's forward replaced for the block, then its class's again."""
    for module, forward in patches.items():
        module.forward = forward
    try:
        yield
    finally:
        for module in patches:
            del module.forward


def fused_self_qkv(unet: torch.nn.Module) -> Any:
    """Self-attention's q, k and v as one matmul over the concatenated weights (diffusers'
    `fuse_qkv_projections`), to see whether three projections in one GEMM pay at this size."""
    patches = {}
    for module in unet.modules():
        if isinstance(module, CrossAttention) and module.to_k.in_features == module.to_q.in_features:
            weight = torch.cat([module.to_q.weight, module.to_k.weight, module.to_v.weight])

            def forward(x: torch.Tensor, context: torch.Tensor | None = None, *, m: CrossAttention = module,
                        w: torch.Tensor = weight) -> torch.Tensor:
                if context is not None:
                    return CrossAttention.forward(m, x, context)
                b, n, _ = x.shape
                q, k, v = F.linear(x, w).view(b, n, 3, m.heads, -1).permute(2, 0, 3, 1, 4)
                out = F.scaled_dot_product_attention(q, k, v)
                return m.to_out(out.transpose(1, 2).reshape(b, n, -1))

            patches[module] = forward
    return _forwards(patches)


@contextmanager
def nchw(unet: torch.nn.Module) -> Iterator[None]:
    """The UNet as `--no-channels-last` leaves it: NCHW weights, so every convolution converts."""
    unet.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        use_channels_last(unet)


@functools.cache
def _fused_kernels() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """Two small torch.compile regions, each one generated kernel per shape: GEGLU's GELU-times-gate, and
    group norm followed by SiLU (the elementwise work that full `--compile` fuses; seconds to compile).
    An SDXL UNet has a few dozen norm shapes: dynamo's default limit of 8 recompilations per function would
    leave most of them eager."""
    import torch._dynamo.config as dynamo_config

    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across PyTorch releases
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 128))

    @torch.compile(dynamic=False)
    def gated_gelu(h: torch.Tensor) -> torch.Tensor:
        x, gate = h.chunk(2, dim=-1)
        return x * F.gelu(gate)

    @torch.compile(dynamic=False)
    def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                        eps: float) -> torch.Tensor:
        return F.silu(F.group_norm(x, groups, weight, bias, eps))

    return gated_gelu, group_norm_silu


def fused_elementwise(unet: torch.nn.Module) -> Any:
    """GEGLU and every GroupNorm-then-SiLU pair through `_fused_kernels`: what the default path could gain
    from fusing them without compiling the whole UNet (the open part of issue 10: SDXL against diffusers)."""
    gated_gelu, group_norm_silu = _fused_kernels()
    patches: dict[torch.nn.Module, Callable[..., torch.Tensor]] = {}
    for module in unet.modules():
        if isinstance(module, GEGLU):
            patches[module] = lambda x, m=module: gated_gelu(m.proj(x))
        elif (isinstance(module, torch.nn.Sequential) and len(module) >= 2
              and isinstance(module[0], torch.nn.GroupNorm) and isinstance(module[1], torch.nn.SiLU)):
            def forward(x: torch.Tensor, m: torch.nn.Sequential = module) -> torch.Tensor:
                norm = m[0]
                h = group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
                for layer in list(m)[2:]:
                    h = layer(h)
                return h

            patches[module] = forward
    return _forwards(patches)


VARIANTS: dict[str, Callable[[torch.nn.Module], Any]] = {
    "NCHW (--no-channels-last)": nchw,
    "fused self-attention qkv": fused_self_qkv,
    "fused GEGLU and GroupNorm+SiLU": fused_elementwise,
}
PROFILED = ("NCHW (--no-channels-last)", "fused GEGLU and GroupNorm+SiLU")
CUDA_ONLY = ("fused GEGLU and GroupNorm+SiLU",)  # inductor's CPU build takes minutes on a small machine


def inputs(preset: str, unet: UNetModel, device: torch.device, dtype: torch.dtype) -> tuple:
    config = unet.config
    size = SIZES[preset] // 8
    generator = torch.Generator(device).manual_seed(1)
    x = torch.randn(2, config.in_channels, size, size, generator=generator, device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    context = torch.randn(2, CONTEXT_TOKENS, config.context_dim, generator=generator, device=device, dtype=dtype)
    y = (None if config.adm_in_channels is None else
         torch.randn(2, config.adm_in_channels, generator=generator, device=device, dtype=dtype))
    return x, t, context, y


def diffusers_call(unet: UNetModel, args: tuple, device: torch.device, dtype: torch.dtype) -> Callable[[], Any]:
    from benchmarks.gpu_diffusers import diffusers_unet

    state = {k: v.to("cpu", copy=True) for k, v in unet.state_dict().items()}
    model = diffusers_unet(unet.config, state).to(device, dtype)
    x, t, context, y = args
    extra = {}
    if y is not None:  # SDXL's y is the pooled embedding, then six 256-wide number embeddings
        extra["added_cond_kwargs"] = {"text_embeds": y[:, :y.shape[1] - 6 * 256], "time_ids": torch.tensor(
            [[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=dtype)}
    return lambda: model(x, t, encoder_hidden_states=context, return_dict=False, **extra)


def report(preset: str, device: torch.device, dtype: torch.dtype, reps: int, diffusers: bool) -> dict:
    """Prints one preset's rows and kernel tables; returns them as {"ms", "max_diff", "kernel_ms_by_kind"}."""
    _, _, config, _ = PRESETS[preset]
    generator = torch.Generator(device).manual_seed(0)
    with torch.device(device):
        unet = randomize_(UNetModel(config), generator).eval().requires_grad_(False).to(dtype)
    use_channels_last(unet)  # as the engine runs it on CUDA (here on the CPU too, to compare the same layouts)
    args = inputs(preset, unet, device, dtype)
    print(f"\n{preset} at {SIZES[preset]} px, batch 2, {dtype}: ms per UNet forward", flush=True)
    rows: list[tuple[str, float]] = []
    diffs: dict[str, float] = {}
    with torch.inference_mode():
        ours = lambda: unet(*args[:3], y=args[3])  # noqa: E731
        rows.append(("ours eager", ms_per_call(ours, device, reps)))
        if device.type == "cuda":
            graphed = graphed_unet(unet)
            rows.append(("ours CUDA graphs", ms_per_call(lambda: graphed(*args), device, reps)))
            release(unet)
        base = ours()
        profiles = {"ours": kernel_ms(ours, device)}
        for name, variant in VARIANTS.items():
            if name in CUDA_ONLY and device.type != "cuda":
                continue
            with variant(unet):
                diffs[name] = float((ours() - base).abs().max())
                rows.append((f"ours {name}, eager", ms_per_call(ours, device, reps)))
                if device.type == "cuda":
                    graphed = graphed_unet(unet)
                    rows.append((f"ours {name}, graphs", ms_per_call(lambda g=graphed: g(*args), device, reps)))
                    release(unet)
                if name in PROFILED:
                    profiles[name] = kernel_ms(ours, device)
        if diffusers:
            theirs = diffusers_call(unet, args, device, dtype)
            rows.append(("diffusers eager", ms_per_call(theirs, device, reps)))
            profiles["diffusers"] = kernel_ms(theirs, device)
    for name, ms in rows:
        print(f"  {name:<50} {ms:8.2f} ms  {1000 / ms:7.1f} forwards/s")
    for name, diff in diffs.items():
        print(f"  {name}: output max diff {diff:.2g} from ours")
    kinds = {side: by_kind(times) for side, times in profiles.items()}
    names = sorted({k for sums in kinds.values() for k in sums}, key=lambda k: -kinds["ours"].get(k, 0.0))
    print("  kernel time by kind, ms per forward (eager): " + " | ".join(f"[{i}] {side}" for i, side in
                                                                        enumerate(profiles)))
    print(f"    {'':<22}" + "".join(f"{f'[{i}]':>10}" for i in range(len(profiles))))
    for name in [*names, "total"]:
        cells = [sum(kinds[side].values()) if name == "total" else kinds[side].get(name, 0.0) for side in profiles]
        print(f"    {name:<22}" + "".join(f"{cell:10.2f}" for cell in cells))
    for side, times in profiles.items():
        if side in PROFILED:
            continue
        print(f"  top kernels, {side}:")
        for kernel, ms in sorted(times.items(), key=lambda item: -item[1])[:12]:
            print(f"    {ms:8.2f} ms  {kind(kernel):<12} {kernel[:110]}")
    unet.to("meta")  # frees the weights before the next preset
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ms": dict(rows), "max_diff": diffs, "kernel_ms_by_kind": kinds}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", choices=["sd15", "sdxl"], default=["sdxl", "sd15"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    args = parser.parse_args(argv)
    devices = DeviceManager()
    device = devices.device
    cuda = device.type == "cuda"
    if cuda:
        print(torch.cuda.get_device_name(device), torch.__version__)
    return {preset: report(preset if cuda else {"sd15": "tiny-sd1", "sdxl": "tiny-sdxl"}[preset], device,
                           devices.dtype, args.reps if cuda else 2, args.diffusers)
            for preset in args.preset}


if __name__ == "__main__":
    main()
