"""alibaba-pai's Z-Image-Turbo Fun ControlNet Union (VideoX-Fun; 1.0, and the 2.0 / 2.1 files that also inpaint), a
VACE-style ControlNet that patches the Z-Image transformer (`ldm.z_image`) rather than riding on a conditioning.

The control context [B, control_in_dim, H, W] lives in the model's latent space (Flux's VAE, shifted and scaled):
the control image's latents (16 channels); the 2.x files take 33: those, the keep mask (1 where the picture is kept,
nearest at the latent's size) and the inpaint image's latents, its repainted part grey (`control_context`). It is
cut into 2x2 patches like the latents, embedded (`control_all_x_embedder`) and padded with the model's image pad
token to the image's token count. Then, as VideoX-Fun computes it (and diffusers' ZImageControlNetModel):

- a refiner stage on the image's tokens: 1.0 refines the control tokens alone with two plain Z-Image blocks
  (`control_noise_refiner`); 2.1's refiner blocks are control blocks, which also give a hint added after each of the
  model's noise-refiner layers; 2.0's were left untrained (zero), and its `control_layers` serve as that stage
  instead (their first two hints go to the refiner's layers), the refiner's weights unused;
- the control layers, over the control tokens followed by the model's refined text tokens, each one's hint added to
  the whole joint sequence [image, text] after one of the model's layers.

A control block is a Z-Image block; the first of a stack first adds `before_proj` of the control tokens to the
model's tokens entering that stage (the embedded image; the joint sequence with the refiner's hints in it), and each
block's hint is `after_proj` of its output. The control layers' places are not in the file: layer k serves the
model's layer k * round(model layers / control layers), as ComfyUI spreads them (0, 5, ..., 25 for 1.0's six layers
and 0, 2, ..., 28 for 2.x's fifteen over the released 30: the places of diffusers' configs). The refiner's hints go
to the noise refiner's layers 0, 1, ... Every hint is scaled by the strength.

Where the references differ, Loom follows the authors' code: diffusers' transformer takes the control layers' hints
only (the refiner's stay inside its ControlNet, which adds them to its own copy of the image stream), and ComfyUI
runs the control stages over the image's real tokens only (no pad tokens, no text tokens) and adds the hints to the
image's tokens alone.

Files are in VideoX-Fun's names, which are diffusers' (`attention.to_q` / `to_k` / `to_v` / `to_out.0`,
`norm_q` / `norm_k`); ComfyUI's converted names (fused `attention.qkv`, `out`, `q_norm`) are Loom's and load too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize, write_safetensors
from ldm.flux import pad_to_patch
from ldm.flux_presets import distinct_random_
from ldm.lora import shallow_copy
from ldm.z_image import ZImageBlock, ZImageConfig, ZImageModel, _with_pad, patch_tokens

EMBEDDER = "control_all_x_embedder.2-1"  # the patch embedding of 2x2 patches of one frame, the only one released
LATENT_CHANNELS = 16  # Flux's latents, which the control and inpaint images are encoded into
_CONTROL = re.compile(r"control_layers\.(\d+)\.")
_REFINER = re.compile(r"control_noise_refiner\.(\d+)\.")
# VideoX-Fun's (diffusers') attention names -> Loom's (ComfyUI's converted files already have Loom's)
_RENAMES = {"attention.to_out.0": "attention.out", "attention.norm_q": "attention.q_norm",
            "attention.norm_k": "attention.k_norm"}
_QKV = re.compile(r"\.attention\.to_[qkv]\.weight$")


@dataclass(frozen=True)
class FunControlConfig:
    """Shape of a Fun ControlNet: its blocks are the Z-Image model's (width, heads, MLP, modulation)."""

    dim: int = 3840
    num_heads: int = 30
    ffn_hidden: int = 10240
    adaln_dim: int = 256
    control_in_dim: int = 16
    num_control_layers: int = 6
    num_refiner_layers: int = 2  # its control_noise_refiner's blocks (0 for "layers")
    # How the refiner stage runs: "plain" (1.0: control_noise_refiner of plain blocks, no hints), "control" (2.1:
    # its own control blocks, with hints), "layers" (2.0: the control layers, its refiner's weights untrained)
    refiner: str = "plain"
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def inpaints(self) -> bool:
        """Whether it takes the inpainting channels (a keep mask and the inpaint image's latents: the 2.x files)."""
        return self.control_in_dim > LATENT_CHANNELS

    def block_config(self) -> ZImageConfig:
        return ZImageConfig(num_heads=self.num_heads, head_dim=self.head_dim, ffn_hidden=self.ffn_hidden,
                            adaln_dim=self.adaln_dim, eps=self.eps)


class ControlBlock(ZImageBlock):
    """A Z-Image block over the control tokens; the first of a stack adds them (`before_proj`) to the model's tokens
    entering the stage, and each block gives a hint, `after_proj` of its output."""

    def __init__(self, c: ZImageConfig, first: bool):
        super().__init__(c)
        if first:
            self.before_proj = nn.Linear(c.dim, c.dim)
        self.after_proj = nn.Linear(c.dim, c.dim)

    def step(self, control: Tensor, x: Tensor, rope: tuple[Tensor, Tensor], temb: Tensor) -> tuple[Tensor, Tensor]:
        """(hint, the control tokens after this block) for control tokens and the model's tokens `x` alike."""
        if hasattr(self, "before_proj"):
            control = self.before_proj(control) + x
        control = self(control, rope, temb)
        return self.after_proj(control), control


class ZImageFunControlNet(nn.Module):
    """A Fun ControlNet's modules under its file's names (see the module docstring for how they run)."""

    unused_keys: tuple[str, ...] = ()  # its file's keys it does not use (set by the loader)

    def __init__(self, config: FunControlConfig):
        super().__init__()
        self.config = c = config
        block = c.block_config()
        self.control_all_x_embedder = nn.ModuleDict({"2-1": nn.Linear(4 * c.control_in_dim, c.dim)})
        self.control_layers = nn.ModuleList([ControlBlock(block, i == 0) for i in range(c.num_control_layers)])
        if c.refiner == "plain":
            self.control_noise_refiner = nn.ModuleList([ZImageBlock(block) for _ in range(c.num_refiner_layers)])
        elif c.refiner == "control":
            self.control_noise_refiner = nn.ModuleList([ControlBlock(block, i == 0)
                                                        for i in range(c.num_refiner_layers)])

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from an RMS norm, which fp8 weight storage (ldm.quant) leaves as is."""
        return self.control_layers[0].attention_norm1.weight.dtype

    @property
    def inpaints(self) -> bool:
        return self.config.inpaints

    def embed(self, control: Tensor, pad_token: Tensor) -> Tensor:
        """Control tokens [B, N, dim] (N padded as the image's tokens) of a control context [B, in_dim, H, W]."""
        tokens = patch_tokens(pad_to_patch(control, 2).to(self.dtype), 2)
        return _with_pad(self.control_all_x_embedder["2-1"](tokens), pad_token)

    def refine(self, control: Tensor, img: Tensor, rope: tuple[Tensor, Tensor], temb: Tensor
               ) -> tuple[Tensor, list[Tensor]]:
        """The refiner stage: (the control tokens after it, its hints in order) for the model's image tokens `img`
        entering its noise refiner."""
        if self.config.refiner == "plain":
            for block in self.control_noise_refiner:
                control = block(control, rope, temb)
            return control, []
        hints = []
        for block in self.control_noise_refiner if self.config.refiner == "control" else self.control_layers:
            hint, control = block.step(control, img, rope, temb)
            hints.append(hint)
        return control, hints

    def layer_hints(self, control: Tensor, joint: Tensor, rope: tuple[Tensor, Tensor], temb: Tensor
                    ) -> Iterator[Tensor]:
        """The control layers' hints, one by one, over the joint control sequence `control` ([control, text]
        tokens) beside the model's joint sequence `joint` entering its layers."""
        for block in self.control_layers:
            hint, control = block.step(control, joint, rope, temb)
            yield hint


def loom_name(key: str) -> str:
    """A VideoX-Fun (diffusers) key's name in Loom's layout (its q, k or v projection: the fused one's)."""
    key = _QKV.sub(".attention.qkv.weight", key)
    for theirs, ours in _RENAMES.items():
        key = key.replace(f".{theirs}.", f".{ours}.")
    return key


def from_videox(sd: StateDict) -> StateDict:
    """VideoX-Fun's (diffusers') attention names -> Loom's: the q / k / v projections fused (queries, keys, values);
    keys it does not know are kept, to be reported as unused."""
    out, sd = {}, dict(sd)
    for key in [k for k in sd if k.endswith(".attention.to_q.weight")]:
        stem = key.removesuffix("to_q.weight")
        if f"{stem}to_k.weight" in sd and f"{stem}to_v.weight" in sd:
            out[f"{stem}qkv.weight"] = torch.cat([sd.pop(f"{stem}{n}.weight") for n in ("to_q", "to_k", "to_v")])
    out.update({loom_name(k): v for k, v in sd.items()})
    return out


def is_z_image_fun_controlnet(sd: StateDict) -> bool:
    """Whether a state dict (or a file's header) holds an alibaba-pai Z-Image Fun ControlNet (its patch embedding,
    as ComfyUI and diffusers tell it)."""
    return f"{EMBEDDER}.weight" in sd


def _untrained(sd: StateDict, key: str) -> bool:
    return key not in sd or not bool(sd[key].float().abs().max() > 0)


def fun_controlnet_config(sd: StateDict) -> FunControlConfig:
    """The shape of a Fun ControlNet in Loom's names (`from_videox`) from its weights. Its refiner stage: plain
    blocks (1.0); control blocks (2.1); none, or control blocks whose first `before_proj` or `after_proj` is all
    zeros (2.0, as diffusers and ComfyUI tell it), for a file with the inpainting channels: its control layers."""
    try:
        dim, patch_values = sd[f"{EMBEDDER}.weight"].shape
        if patch_values % 4:
            raise CheckpointError(f"its patch embedding takes {patch_values} values, not whole channels of 2x2 "
                                  "patches")
        head_dim = sd["control_layers.0.attention.q_norm.weight"].shape[0]
        layers = sorted({int(m[1]) for k in sd if (m := _CONTROL.match(k))})
        refiners = sorted({int(m[1]) for k in sd if (m := _REFINER.match(k))})
        if layers != list(range(len(layers))) or refiners != list(range(len(refiners))):
            raise CheckpointError(f"its control layers ({layers}) or refiner blocks ({refiners}) are not numbered "
                                  "from 0 on")
        control_in_dim = patch_values // 4
        if not refiners or "control_noise_refiner.0.after_proj.weight" in sd:
            if not refiners and control_in_dim == LATENT_CHANNELS:
                raise CheckpointError("a 1.0 layout (16 control channels) with no control_noise_refiner blocks")
            untrained = not refiners or any(_untrained(sd, f"control_noise_refiner.0.{n}.weight")
                                            for n in ("before_proj", "after_proj"))
            refiner = "layers" if untrained and control_in_dim > LATENT_CHANNELS else "control"
        else:
            refiner = "plain"
        return FunControlConfig(
            dim=dim, num_heads=dim // head_dim, ffn_hidden=sd["control_layers.0.feed_forward.w1.weight"].shape[0],
            adaln_dim=sd["control_layers.0.adaLN_modulation.0.weight"].shape[1], control_in_dim=control_in_dim,
            num_control_layers=len(layers), num_refiner_layers=0 if refiner == "layers" else len(refiners),
            refiner=refiner, eps=1e-5)
    except KeyError as e:
        raise CheckpointError(f"an incomplete Z-Image Fun ControlNet: no weight {e}") from None


def load_z_image_fun_controlnet(sd: StateDict, path: str | Path, device: torch.device | str = "cpu",
                                dtype: torch.dtype = torch.bfloat16) -> ZImageFunControlNet:
    """A Fun ControlNet from a file's state dict `sd` on `device` in `dtype`; the keys it does not use (2.0's
    untrained refiner) are listed in its `unused_keys`."""
    path = Path(path)
    weights = from_videox(sd)
    try:
        config = fun_controlnet_config(weights)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = _materialize(lambda: ZImageFunControlNet(config), weights, "Z-Image Fun ControlNet", path, device,
                         dtype)
    expected = set(model.state_dict())
    model.unused_keys = tuple(sorted(k for k in sd if loom_name(k) not in expected))
    return model


def fun_control_problem(model: nn.Module, controlnet: ZImageFunControlNet) -> str | None:
    """Why a Fun ControlNet does not fit a model (None: it fits): the model must be a Z-Image transformer with the
    same blocks, as many noise-refiner layers as the ControlNet's refiner gives hints to, and room for its layers."""
    if not isinstance(model, ZImageModel):
        return f"a Z-Image Fun ControlNet runs with Z-Image models only, not {type(model).__name__}"
    ours, theirs = controlnet.config, model.config
    for name in ("dim", "num_heads", "ffn_hidden", "adaln_dim"):
        if getattr(ours, name) != getattr(theirs, name):
            return (f"the Fun ControlNet was made for a Z-Image model with {name} {getattr(ours, name)}, and this "
                    f"one has {getattr(theirs, name)}")
    if theirs.in_channels != LATENT_CHANNELS or ours.control_in_dim not in (LATENT_CHANNELS, 2 * LATENT_CHANNELS + 1):
        return (f"a Fun ControlNet of {ours.control_in_dim} control channels for a model of {theirs.in_channels} "
                f"latent channels: it takes Flux's {LATENT_CHANNELS} (33 with the inpainting channels)")
    if ours.num_control_layers > theirs.num_layers:
        return f"a Fun ControlNet of {ours.num_control_layers} control layers for a model of {theirs.num_layers}"
    if ours.refiner == "control" and ours.num_refiner_layers > theirs.num_refiner_layers:
        return (f"a Fun ControlNet of {ours.num_refiner_layers} refiner blocks for a model of "
                f"{theirs.num_refiner_layers} noise-refiner layers")
    return None


def control_places(control_layers: int, model_layers: int) -> list[int]:
    """The model layers after which the control layers' hints are added: k * round(model / control layers)."""
    step = max(1, round(model_layers / control_layers))
    places = [k * step for k in range(control_layers)]
    if places and places[-1] >= model_layers:
        raise ValueError(f"{control_layers} control layers do not spread over a model of {model_layers} layers")
    return places


Encode = Callable[[int, int, torch.device], Tensor]  # (latent height, width, device) -> control context


@dataclass(eq=False)
class BoundFunControl:
    """A Fun ControlNet bound to a model (`with_fun_control`): its control context per latent size, from `encode`,
    kept while the size holds; its hints, scaled by `strength`, at `places` of the model's layers."""

    controlnet: ZImageFunControlNet
    encode: Encode
    strength: float
    places: list[int]
    refiner_layers: int
    _cache: dict[tuple[int, int, str], Tensor] = field(default_factory=dict)

    def context(self, x: Tensor) -> Tensor:
        """The control context for latents `x` [B, 16, H, W], one row per sample (a batch of fewer repeated)."""
        height, width = x.shape[-2:]
        key = (height, width, str(x.device))
        if key not in self._cache:
            self._cache.clear()  # one size at a time: a new size is a new run
            context = self.encode(height, width, x.device)
            expected = self.controlnet.config.control_in_dim
            if context.ndim != 4 or context.shape[1] != expected or tuple(context.shape[-2:]) != (height, width):
                raise ValueError(f"a Fun ControlNet's control context of shape {list(context.shape)} for latents "
                                 f"of {height}x{width}: it takes [B, {expected}, {height}, {width}]")
            self._cache[key] = context.to(x.device)
        context = self._cache[key]
        return context.repeat(math.ceil(x.shape[0] / context.shape[0]), 1, 1, 1)[: x.shape[0]]

    def refiner_stage(self, control: Tensor, img: Tensor, rope: tuple[Tensor, Tensor], temb: Tensor,
                      pad_token: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        tokens = self.controlnet.embed(control, pad_token).to(img.dtype)
        tokens, hints = self.controlnet.refine(tokens, img, rope, temb)
        return tokens, {i: hint * self.strength for i, hint in enumerate(hints[: self.refiner_layers])}

    def layer_hints(self, control: Tensor, txt: Tensor, joint: Tensor, rope: tuple[Tensor, Tensor],
                    temb: Tensor) -> Iterator[tuple[int, Tensor]]:
        hints = self.controlnet.layer_hints(torch.cat([control, txt], dim=1), joint, rope, temb)
        for place, hint in zip(self.places, hints, strict=True):
            yield place, hint * self.strength


def with_fun_control(model: ZImageModel, controlnet: ZImageFunControlNet, encode: Encode,
                     strength: float = 1.0) -> ZImageModel:
    """A patched shallow copy of `model` (`ldm.lora.shallow_copy`: the weights shared, `model` left as it was) that
    adds the Fun ControlNet's hints, after those of the Fun ControlNets it already has. `encode(height, width,
    device)` gives the control context [B or 1, control_in_dim, height, width] for latents of that size
    (`control_context`); it is called once per size. Raises ValueError for a ControlNet that does not fit."""
    problem = fun_control_problem(model, controlnet)
    if problem:
        raise ValueError(problem)
    config = model.config
    bound = BoundFunControl(controlnet, encode, strength, control_places(controlnet.config.num_control_layers,
                                                                        config.num_layers),
                            config.num_refiner_layers)
    patched = shallow_copy(model)
    patched.fun_controls = (*model.fun_controls, bound)
    patched.cuda_graphs_safe = False  # it encodes the control images when a size is first run: it runs eagerly
    return patched


def control_context(control: Tensor | None = None, inpaint: Tensor | None = None, mask: Tensor | None = None,
                    in_dim: int | None = None) -> Tensor:
    """The control context [B, in_dim, h, w] of latents in the model's latent space (Flux's, shifted and scaled):
    the control image's `control` [B, 16, h, w]; with the inpainting channels (`in_dim` 33; by default when
    `inpaint` or `mask` is given) then the keep `mask` [B, 1, H, W] or [B, H, W] (1 where the picture is kept:
    resized nearest to h x w; zeros without one) and the inpaint image's latents `inpaint` (its repainted part grey
    before encoding). What is missing is zeros, as diffusers' pipelines fill it (ComfyUI encodes a grey picture for
    a missing control or inpaint image instead: pass those latents). A batch of one spreads over the others."""
    given = [t for t in (control, inpaint) if t is not None]
    if not given:
        raise ValueError("a Fun ControlNet's control context needs the control image's or the inpaint image's "
                         "latents")
    for t in given:
        if t.ndim != 4 or t.shape[1] != LATENT_CHANNELS or t.shape[-2:] != given[0].shape[-2:]:
            raise ValueError(f"control and inpaint latents [B, {LATENT_CHANNELS}, h, w] of one size; got "
                             f"{[list(g.shape) for g in given]}")
    height, width = given[0].shape[-2:]
    like = given[0]
    in_dim = in_dim or (2 * LATENT_CHANNELS + 1 if inpaint is not None or mask is not None else LATENT_CHANNELS)
    if in_dim == LATENT_CHANNELS:
        if control is None:
            raise ValueError("a Fun ControlNet without the inpainting channels (1.0) needs the control image")
        return control
    if in_dim != 2 * LATENT_CHANNELS + 1:
        raise ValueError(f"a Fun ControlNet takes 16 or 33 control channels, not {in_dim}")
    if mask is None:
        keep = torch.zeros(1, 1, height, width)
    else:
        keep = mask.float().reshape(-1, 1, *mask.shape[-2:])
        keep = F.interpolate(keep, size=(height, width), mode="nearest") if keep.shape[-2:] != (height, width) else keep
    parts = [torch.zeros_like(like[:1]) if control is None else control, keep.to(like.device, like.dtype),
             torch.zeros_like(like[:1]) if inpaint is None else inpaint]
    batch = max(part.shape[0] for part in parts)
    for part in parts:
        if part.shape[0] not in (1, batch):
            raise ValueError(f"control context parts of batches {[p.shape[0] for p in parts]}: one size, or 1")
    return torch.cat([part.expand(batch, -1, -1, -1) for part in parts], dim=1)


def to_videox(sd: StateDict) -> StateDict:
    """Loom's names -> VideoX-Fun's, the fused q / k / v split again (the layout alibaba-pai's files have)."""
    out = {}
    for key, value in sd.items():
        if key.endswith(".attention.qkv.weight"):
            stem = key.removesuffix("qkv.weight")
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3), strict=True):
                out[f"{stem}{name}.weight"] = part
            continue
        for theirs, ours in _RENAMES.items():
            key = key.replace(f".{ours}.", f".{theirs}.")
        out[key] = value
    return out


def random_fun_controlnet(model_config: ZImageConfig, seed: int = 0, version: str = "1.0",
                          control_layers: int | None = None) -> ZImageFunControlNet:
    """A Fun ControlNet for a model of `model_config` with seeded random weights, each distinct (the RMS norms' near
    1): "1.0" (16 control channels, a plain refiner), "2.0" (33; its refiner left untrained: zeros), "2.1" (33, a
    refiner of control blocks). Its control layers: `control_layers`, else one per 5 model layers (1.0) or per 2
    (2.x), as the released files have over 30."""
    if version not in ("1.0", "2.0", "2.1"):
        raise ValueError(f"version must be 1.0, 2.0 or 2.1, not {version!r}")
    c = model_config
    layers = control_layers or math.ceil(c.num_layers / (5 if version == "1.0" else 2))
    config = FunControlConfig(dim=c.dim, num_heads=c.num_heads, ffn_hidden=c.ffn_hidden, adaln_dim=c.adaln_dim,
                              control_in_dim=LATENT_CHANNELS if version == "1.0" else 2 * LATENT_CHANNELS + 1,
                              num_control_layers=layers, num_refiner_layers=c.num_refiner_layers,
                              refiner={"1.0": "plain", "2.0": "control", "2.1": "control"}[version], eps=c.eps)
    model = distinct_random_(ZImageFunControlNet(config).eval(), seed, norm_scales=(
        "norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight"))
    if version == "2.0":
        with torch.no_grad():
            for name, param in model.control_noise_refiner.named_parameters():
                if "_proj." in name:
                    param.zero_()
        model.config = dataclasses.replace(config, refiner="layers", num_refiner_layers=0)
    return model


def write_tiny_z_image_fun_controlnet(path: str | Path, config: ZImageConfig, seed: int = 0, version: str = "1.0",
                                      control_layers: int | None = None,
                                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random Fun ControlNet (`random_fun_controlnet`) for a model of `config` (e.g.
    `ldm.z_image_files.TINY_Z_IMAGE`) in alibaba-pai's key names; returns the path."""
    model = random_fun_controlnet(config, seed, version, control_layers)
    path = Path(path)
    write_safetensors(to_videox(model.state_dict()), path, {"loom.seed": str(seed)}, dtype)
    return path
