"""LoRA training on ready-made latents and prompts, in memory: what ComfyUI's Train LoRA node does.

Every layer of a frozen copy of the UNet gets adapters, as ComfyUI's trainer gives them: a low-rank pair on the
weight of each Linear and convolution (LoCon for the 3x3 kernels), a whole difference on each norm's weight, and a
difference on every bias. New pairs start as ComfyUI's do (`up` random, `down` at zero, alpha 1), so that learning
rates carry over between the two. The UNet predicts its own kind of output (eps or v) at noise levels drawn evenly
over its schedule's table. The shared model is never changed: the copy holds its own module and parameter objects
over the same storage. The result is a kohya-layout state dict (`lora_unet_*` with `.lora_down.weight`,
`.lora_up.weight` and `.alpha`, or `.diff`; `.diff_b`), which `ldm.lora` applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ldm.lora import (
    FullWeight,
    LohaWeight,
    LokrWeight,
    Lora,
    LoraError,
    LoraWeight,
    diffusers_unet_blocks,
    match_lora,
    shallow_copy,
)
from ldm.quant import dequantized_weight, is_fp8
from ldm.sampling.schedules import DiscreteSchedule
from ldm.training.lora_trainer import LoraAdapter, PatchedWeight, kohya_name
from ldm.training.unet_trainer import checkpoint_unet
from ldm.unet import UNetModel

OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD,
              "RMSprop": torch.optim.RMSprop}
LOSSES = {"MSE": F.mse_loss, "L1": F.l1_loss, "Huber": F.huber_loss, "SmoothL1": F.smooth_l1_loss}
PREDICTIONS = ("eps", "v")
LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
# What an existing LoRA may hold that training does not continue, as named in its refusal.
KINDS = {LohaWeight: "LoHa", LokrWeight: "LoKr", FullWeight: "whole weight difference",
         LoraWeight: "Tucker-decomposed (lora_mid)"}


@dataclass(frozen=True)
class LatentLoraConfig:
    steps: int = 16
    batch_size: int = 1
    grad_accumulation: int = 1
    lr: float = 5e-4
    rank: int = 8
    optimizer: str = "AdamW"
    loss: str = "MSE"
    seed: int = 0
    autocast: torch.dtype | None = torch.bfloat16  # the matmuls' dtype; None: fp32 throughout
    lora_dtype: torch.dtype = torch.bfloat16  # the adapters' (and the result's)
    grad_checkpointing: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        for name in ("steps", "batch_size", "grad_accumulation", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, not {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be above 0, not {self.lr}")


@dataclass
class Example:
    """One training item: a latent [C, H, W] as the model samples it (scaled), its prompt's context [L, D] and,
    for models with a class/size embedding, its `y` [adm]."""

    latent: Tensor
    context: Tensor
    y: Tensor | None = None


class WeightDiff(nn.Module):
    """A whole difference of a weight or a bias."""

    def __init__(self, diff: Tensor) -> None:
        super().__init__()
        self.diff = nn.Parameter(diff)

    def delta(self) -> Tensor:
        return self.diff


@dataclass
class LayerAdapters:
    """What trains on one layer: its weight's adapter (a LoraAdapter, scaled by `scale`, or a WeightDiff) and its
    bias's difference (None for a layer without a bias)."""

    weight: LoraAdapter | WeightDiff
    scale: float
    bias: WeightDiff | None


def frozen_copy(unet: UNetModel) -> UNetModel:
    """A copy of `unet` to put adapters on: its own module and parameter objects over the same storage (fp8
    weights dequantized), none requiring grad, so that nothing done to it reaches the shared model."""
    copy = shallow_copy(unet)
    for module in copy.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            tensor = dequantized_weight(module) if name == "weight" and is_fp8(module) else param.detach()
            if type(tensor) is not torch.Tensor:
                raise ValueError(f"cannot train on the {type(tensor).__name__} weights of this model (int8?): load "
                                 "its checkpoint with the default weight dtype")
            if tensor.is_inference():  # made under inference mode: autograd may not use it as it is
                tensor = tensor.clone()
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    return copy


def new_pair(weight: Tensor, rank: int, generator: torch.Generator) -> LoraAdapter:
    """ComfyUI's start for a new pair: `up` [out, rank(, 1, 1)] uniform in +-1/sqrt(rank) (torch's
    kaiming_uniform_ with a = sqrt(5)), `down` [rank, in(, kh, kw)] at zero: the model starts as it was."""
    up = (torch.rand(weight.shape[0], rank, generator=generator) * 2 - 1) / math.sqrt(rank)
    down = torch.zeros(rank, *weight.shape[1:])
    return LoraAdapter(down, up.reshape(weight.shape[0], rank, *([1] * (weight.ndim - 2))))


def file_patches(unet: UNetModel, lora: Lora) -> dict[str, LoraWeight | FullWeight]:
    """The patches of `lora` that training can continue, by layer path in `unet`: low-rank pairs on weights,
    whole differences on norms and biases (what this trainer writes). Others are refused."""
    source = lora.path.name if lora.path else "the LoRA"
    matched = match_lora(unet, lora)
    for path, patch in matched.items():
        weight = unet.get_submodule(path).weight
        pair = isinstance(patch, LoraWeight) and patch.mid is None
        difference = isinstance(patch, FullWeight) and (patch.diff is None or weight.ndim == 1)
        if patch.dora_scale is not None or not (pair or difference):
            kind = "DoRA" if patch.dora_scale is not None else KINDS.get(type(patch), type(patch).__name__)
            raise LoraError(f"{source} holds {kind} weights (e.g. for {path}); training continues plain LoRA "
                            "pairs, and the weight differences of norms and biases")
    return matched


def attach_adapters(unet: UNetModel, config: LatentLoraConfig, generator: torch.Generator,
                    existing: Lora | None = None) -> dict[str, LayerAdapters]:
    """Give every Linear, convolution and norm of `unet` (a `frozen_copy`) its adapters, held in the config's LoRA
    dtype and added in fp32; keyed by layer path. Layers that `existing` patches start from its weights."""
    from_file = file_patches(unet, existing) if existing is not None else {}
    adapters = {}
    for path, layer in unet.named_modules():
        if not isinstance(layer, LAYERS):
            continue
        weight, patch = layer.weight, from_file.get(path)
        if weight.ndim == 1:
            start = patch.diff if isinstance(patch, FullWeight) and patch.diff is not None else None
            adapter, scale = WeightDiff(torch.zeros(weight.shape) if start is None else start.float()), 1.0
        elif isinstance(patch, LoraWeight):
            adapter, scale = LoraAdapter(patch.down.float(), patch.up.float()), patch.scaled(patch.rank)
        else:
            adapter, scale = new_pair(weight, config.rank, generator), 1.0 / config.rank
        adapter.to(device=weight.device, dtype=config.lora_dtype)
        # unsafe: the parametrization gives fp32 for a weight stored in fp16 or bf16.
        parametrize.register_parametrization(layer, "weight", PatchedWeight(adapter, scale, torch.float32),
                                             unsafe=True)
        bias = None
        if layer.bias is not None:
            start = patch.bias if patch is not None and patch.bias is not None else torch.zeros(layer.bias.shape)
            bias = WeightDiff(start.float()).to(device=weight.device, dtype=config.lora_dtype)
            parametrize.register_parametrization(layer, "bias", PatchedWeight(bias, 1.0, torch.float32), unsafe=True)
        adapters[path] = LayerAdapters(adapter, scale, bias)
    return adapters


def adapter_tensors(unet: UNetModel, adapters: dict[str, LayerAdapters], family: str,
                    dtype: torch.dtype) -> dict[str, Tensor]:
    """The adapters under kohya's names for `family`, on the CPU in `dtype` (alphas in fp32)."""
    blocks = diffusers_unet_blocks(unet.config)
    tensors = {}
    for path, layer in adapters.items():
        prefix = kohya_name(path, blocks, family)
        if isinstance(layer.weight, LoraAdapter):
            tensors[f"{prefix}.lora_down.weight"] = layer.weight.down
            tensors[f"{prefix}.lora_up.weight"] = layer.weight.up
        else:
            tensors[f"{prefix}.diff"] = layer.weight.diff
        if layer.bias is not None:
            tensors[f"{prefix}.diff_b"] = layer.bias.diff
    tensors = {key: t.detach().to("cpu", dtype).clone() for key, t in tensors.items()}
    for path, layer in adapters.items():
        if isinstance(layer.weight, LoraAdapter):  # alpha / rank is the pair's scale
            rank = layer.weight.down.shape[0]
            tensors[f"{kohya_name(path, blocks, family)}.alpha"] = torch.tensor(layer.scale * rank)
    return tensors


def noised(schedule: DiscreteSchedule, prediction: str, latents: Tensor,
           generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(the UNet's input, its timesteps, the output it should give) for `latents` noised to levels drawn evenly
    from the schedule's table: in the Karras et al. (2022) form x = x0 + sigma * noise, seen by the UNet as
    c_in * x with c_in = 1 / sqrt(sigma^2 + sigma_data^2). The target inverts `ldm.sampling.Denoiser`: the noise
    for eps-prediction, (c_in^2 x - x0) / (sigma c_in) for v-prediction (Salimans & Ho 2022's v)."""
    device, n = latents.device, latents.shape[0]
    t = torch.randint(schedule.num_timesteps, (n,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    sigma = schedule.sigmas[t].to(device).reshape(-1, *[1] * (latents.ndim - 1))
    x = latents + sigma * noise
    c_in = (sigma**2 + schedule.sigma_data**2) ** -0.5
    target = noise if prediction == "eps" else (x * c_in**2 - latents) / (sigma * c_in)
    timesteps = torch.as_tensor(schedule.unet_timestep(t.float()), dtype=torch.float32).to(device)
    return x * c_in, timesteps, target


def batch_loss(unet: UNetModel, batch: list[Example], schedule: DiscreteSchedule, prediction: str,
               criterion: Callable[[Tensor, Tensor], Tensor], generator: torch.Generator) -> Tensor:
    """The mean loss over `batch`, one UNet call per group of items whose latent and prompt shapes match."""
    groups: dict[tuple, list[Example]] = {}
    for example in batch:
        key = (tuple(example.latent.shape), tuple(example.context.shape), example.y is None)
        groups.setdefault(key, []).append(example)
    total = torch.zeros(())
    for items in groups.values():
        latents = torch.stack([e.latent for e in items])
        y = None if items[0].y is None else torch.stack([e.y for e in items])
        x_in, timesteps, target = noised(schedule, prediction, latents, generator)
        out = unet(x_in, timesteps, torch.stack([e.context for e in items]), y)
        total = total.to(out.device) + criterion(out.float(), target.float()) * len(items)
    return total / len(batch)


def train_latent_lora(unet: UNetModel, examples: list[Example], schedule: DiscreteSchedule, prediction: str,
                      family: str, config: LatentLoraConfig, existing: Lora | None = None,
                      on_step: Callable[[int, int], None] | None = None) -> tuple[dict[str, Tensor], list[float]]:
    """Train adapters for `unet` on `examples` (each step: `batch_size` items drawn without replacement, times
    `grad_accumulation`); every random draw comes from one CPU generator seeded with `config.seed`, so a seed gives
    the same LoRA. Returns the LoRA's tensors (see `adapter_tensors`) and the loss of each step. `on_step(step,
    steps)` is called after each step (and may raise to stop)."""
    if not examples:
        raise ValueError("there are no latents to train on")
    if prediction not in PREDICTIONS:
        raise ValueError(f"training supports eps- and v-prediction models, not {prediction}-prediction")
    device = examples[0].latent.device
    generator = torch.Generator().manual_seed(config.seed)
    criterion = LOSSES[config.loss]
    losses: list[float] = []
    with torch.inference_mode(False), torch.enable_grad():
        trained = frozen_copy(unet)
        adapters = attach_adapters(trained, config, generator, existing)
        if config.grad_checkpointing:
            checkpoint_unet(trained)
        params = [p for layer in adapters.values() for module in (layer.weight, layer.bias) if module is not None
                  for p in module.parameters()]
        optimizer = OPTIMIZERS[config.optimizer](params, lr=config.lr)
        for step in range(config.steps):
            total = 0.0
            for _ in range(config.grad_accumulation):
                index = torch.randperm(len(examples), generator=generator)[:config.batch_size].tolist()
                autocast = (torch.autocast(device.type, dtype=config.autocast) if config.autocast is not None
                            else nullcontext())
                with autocast:
                    loss = batch_loss(trained, [examples[i] for i in index], schedule, prediction, criterion,
                                      generator)
                (loss / config.grad_accumulation).backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise ValueError(f"the loss became {total} at step {step + 1}: try a lower learning rate")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total / config.grad_accumulation)
            if on_step is not None:
                on_step(step + 1, config.steps)
    return adapter_tensors(trained, adapters, family, config.lora_dtype), losses
