"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A ControlNet is a trainable copy of the UNet's encoder (embeddings, input blocks, middle block) that
also sees a hint image (edges, depth, pose...) through a small convolutional encoder, added after the
first input block. Each input block's output and the middle block's output go through a 1x1 "zero
convolution"; these residuals are added to the UNet's skip connections and middle output
(`UNetModel.forward(control=...)`).

Files come in two layouts, both read here: LDM's (`input_hint_block.*`, `zero_convs.*`,
`middle_block_out.*`, optionally under `control_model.`), used by the SD1.5 ControlNet 1.0/1.1 releases,
and diffusers' `ControlNetModel` (`controlnet_cond_embedding.*`, `controlnet_down_blocks.*`), used by
most SDXL ControlNets; ControlNet Unions (`ldm.controlnet_union`), Control-LoRAs (`ldm.control_lora`), SD3, Flux and
Qwen-Image ControlNets (`ldm.controlnet_sd3`, `ldm.controlnet_flux`, `ldm.controlnet_qwen_image`) load here too.
`Control` is one ControlNet applied to one conditioning, as ComfyUI's Apply
ControlNet nodes make it: hint image, strength, the part of the schedule it acts on, and the control
it was chained after.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import (
    FAMILY_RULES,
    UNET_PREFIX,
    CheckpointError,
    StateDict,
    _indices,
    _materialize,
    _unet_config,
    load_state_dict,
    read_metadata,
    read_shapes,
    write_safetensors,
)
from ldm.lora_keys_sd import _RESNET, diffusers_unet_blocks, rename_path
from ldm.quant import dequantized_weight, is_fp8
from ldm.unet import ControlResiduals, UNetConfig, build_encoder, embed

LDM_PREFIX = "control_model."
HINT_WIDTHS = (16, 32, 96, 256)  # the hint encoder's widths in every released ControlNet


class ControlNet(nn.Module):
    def __init__(self, config: UNetConfig, hint_channels: int = 3, hint_widths: tuple[int, ...] = HINT_WIDTHS):
        super().__init__()
        self.config = config
        skip_channels = build_encoder(self, config)
        # Two convolutions per width, the second halving the size: the hint is 8x the latent's size.
        layers: list[nn.Module] = [nn.Conv2d(hint_channels, hint_widths[0], 3, padding=1), nn.SiLU()]
        for width, wider in zip(hint_widths, hint_widths[1:], strict=False):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(width, wider, 3, padding=1, stride=2), nn.SiLU()]
        layers.append(nn.Conv2d(hint_widths[-1], config.model_channels, 3, padding=1))
        self.input_hint_block = nn.Sequential(*layers)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(ch, ch, 1)) for ch in skip_channels)
        self.middle_block_out = nn.Sequential(nn.Conv2d(skip_channels[-1], skip_channels[-1], 1))
        # The shuffle ControlNet was trained with its residuals averaged over the image; its files say so only
        # by name (`*_shuffle.pth`, `*_shuffle_fp16.safetensors`), which `load_controlnet` reads.
        self.global_average_pooling = False

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor,
                y: Tensor | None = None) -> list[Tensor]:
        """The residuals for latents `x` [B, 4, H, W] and hint images `hint` [B, C, 8H, 8W] in 0..1: one
        per UNet input block, then the middle block's (`UNetModel.forward`'s `control`)."""
        dtype = self.dtype
        emb = embed(self, self.config, timesteps, y, dtype)
        return self.encode(x, self.input_hint_block(hint.to(dtype)), emb, context)

    def encode(self, x: Tensor, guided: Tensor, emb: Tensor, context: Tensor) -> list[Tensor]:
        """The residuals from the UNet encoder's copy, the hint's features `guided` added after its first block."""
        dtype = self.dtype
        context = context.to(dtype)
        h = x.to(dtype)
        outs = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs


# --- files --------------------------------------------------------------------------------------------


@dataclass
class LoadedControlNet:
    model: ControlNet  # or an ldm.t2i_adapter.T2IAdapter, or an ldm.control_lora.ControlLora (made when first used)
    family: str | None  # "sd1" | "sd2" | "sdxl": the UNets it fits; None: any its shape fits (a T2I-Adapter)
    unused_keys: list[str]
    path: Path


def _from_diffusers(sd: StateDict) -> StateDict:
    """diffusers' ControlNetModel names -> LDM's."""
    keys = list(sd)
    levels = len(_indices(keys, r"down_blocks\.(\d+)\."))
    n = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
    # The encoder half of the UNet mapping; transformer_depth only shapes the decoder's part.
    shape = UNetConfig(channel_mult=(1,) * levels, num_res_blocks=n, transformer_depth=(0,) * levels)
    blocks = {theirs: ours for ours, theirs in diffusers_unet_blocks(shape).items()
              if not ours.startswith(("output_blocks", "out."))}
    blocks.update({"controlnet_cond_embedding.conv_in": "input_hint_block.0",
                   "controlnet_mid_block": "middle_block_out.0"})
    hint_blocks = _indices(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    blocks.update({f"controlnet_cond_embedding.blocks.{i}": f"input_hint_block.{2 * (i + 1)}" for i in hint_blocks})
    blocks["controlnet_cond_embedding.conv_out"] = f"input_hint_block.{2 * (len(hint_blocks) + 1)}"
    blocks.update({f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0"
                   for i in _indices(keys, r"controlnet_down_blocks\.(\d+)\.")})
    resnet = {theirs: ours for ours, theirs in _RESNET.items()}
    out = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")  # leaf: weight / bias
        ours = rename_path(module, blocks, resnet)
        out[key if ours is None else f"{ours}.{leaf}"] = value  # a key with no LDM name is reported as unused
    return out


def controlnet_shape(sd: StateDict, metadata: dict[str, str] | None = None
                     ) -> tuple[str, UNetConfig, int, tuple[int, ...]]:
    """(family, encoder config, hint channels, hint widths) of an LDM-named ControlNet state dict.

    The head layout is the family's standard one unless `metadata` carries `loom.unet_config`
    (written by `save_controlnet`: tiny test models)."""
    prefixed = {UNET_PREFIX + k: v for k, v in sd.items()}
    rule = next((r for r in FAMILY_RULES if r.matches(prefixed)), None)
    if rule is None or "input_hint_block.0.weight" not in sd:
        raise CheckpointError("not a ControlNet: no input_hint_block or input_blocks weights")
    heads = rule.heads
    if metadata and "loom.unet_config" in metadata:
        saved = json.loads(metadata["loom.unet_config"])
        heads = {"num_heads": saved["num_heads"], "num_head_channels": saved["num_head_channels"]}
    try:
        config = _unet_config(prefixed, heads)
    except (KeyError, StopIteration) as e:
        raise CheckpointError(f"incomplete ControlNet: no weight {e}") from None
    convs = [sd[f"input_hint_block.{i}.weight"] for i in _indices(list(sd), r"input_hint_block\.(\d+)\.weight")]
    widths = (convs[0].shape[0], *(conv.shape[0] for conv in convs[2:-1:2]))
    return rule.name, config, convs[0].shape[1], widths


# Files that look like ControlNets but need what this engine does not have: (a key that marks them, what they are).
UNSUPPORTED = (
    ("controlnet_mode_embedding.weight", "a Flux ControlNet Union (InstantX's, Shakker Labs')"),
)


def _unsupported(sd: StateDict) -> str | None:
    """What a state dict is, if it is a kind of control model this engine does not run."""
    for marker, what in UNSUPPORTED:
        if marker in sd:
            return what
    if "controlnet_cond_embedding.conv_in.weight" not in sd and any("controlnet_" in k for k in sd):
        return "a ControlNet for a model family other than SD1, SD2 and SDXL"
    return None


class UNetWeights(Mapping[str, Tensor]):
    """A UNet's weights by state-dict name (what a difference ControlNet or a Control-LoRA adds to), its fp8
    ones (`ldm.quant`) dequantized each time one is read: no full-precision copy of the whole UNet is made."""

    def __init__(self, unet: nn.Module):
        self.config: UNetConfig | None = getattr(unet, "config", None)
        self._fp8 = {f"{name}.weight": module for name, module in unet.named_modules() if is_fp8(module)}
        scales = {key.removesuffix("weight") + "weight_scale" for key in self._fp8}
        self._weights = {k: v for k, v in unet.state_dict().items() if k not in scales}

    def __getitem__(self, key: str) -> Tensor:
        layer = self._fp8.get(key)
        return self._weights[key] if layer is None else dequantized_weight(layer)

    def __contains__(self, key: object) -> bool:
        return key in self._weights

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


def unet_weights(unet: nn.Module) -> UNetWeights:
    """`unet`'s weights, fp8 ones in full precision as they are read (`load_controlnet`'s `base`)."""
    return UNetWeights(unet)


def load_controlnet(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    base: Mapping[str, Tensor] | None = None) -> LoadedControlNet:
    """An SD1, SD2 or SDXL ControlNet from a single file, in LDM's or diffusers' layout (or a T2I-Adapter,
    which ComfyUI's Load ControlNet Model reads too: `ldm.t2i_adapter`). A difference ControlNet (the early
    `diff_control_sd15_*` files, marked by a `difference` entry) holds offsets from a checkpoint's UNet: its
    weights are those plus `base`'s of the same name (`unet_weights`; ComfyUI's DiffControlNetLoader). A
    Control-LoRA (`ldm.control_lora`) is made the same way from `base`, or without one comes back unmade, to be
    made from the UNet of the model it is first used with."""
    path = Path(path)
    sd = load_state_dict(path)
    from ldm.control_lora import is_control_lora, load_control_lora

    if is_control_lora(sd):
        return load_control_lora(sd, path, device, dtype, base)
    if "difference" in sd:
        if base is None:
            raise CheckpointError(f"{path.name} is a difference ControlNet (offsets from a checkpoint's UNet): "
                                  "load it with Load ControlNet Model (diff), which adds it to a model")
        offsets, sd = sd, {}
        for key, offset in offsets.items():
            own = base.get(key.removeprefix(LDM_PREFIX))
            if key != "difference":
                sd[key] = offset + own.to(offset) if own is not None and own.shape == offset.shape else offset
    from ldm.t2i_adapter import is_t2i_adapter, load_t2i_adapter

    if is_t2i_adapter(sd):
        return load_t2i_adapter(sd, path, device, dtype)
    from ldm.controlnet_sd3 import is_sd3_controlnet, load_sd3_controlnet

    if is_sd3_controlnet(sd):
        return load_sd3_controlnet(sd, path, device, dtype)
    from ldm.controlnet_flux import is_flux_controlnet, load_flux_controlnet
    from ldm.controlnet_qwen_image import is_qwen_image_controlnet, load_qwen_image_controlnet

    if is_qwen_image_controlnet(sd):  # before Flux's: both have a controlnet_x_embedder
        return load_qwen_image_controlnet(sd, path, device, dtype)
    if is_flux_controlnet(sd):
        return load_flux_controlnet(sd, path, device, dtype)
    kind = _unsupported(sd)
    if kind is not None:
        raise CheckpointError(f"{path.name}: {kind}, which this engine does not run")
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        sd = _from_diffusers(sd)
    elif any(k.startswith(LDM_PREFIX) for k in sd):
        sd = {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
    if not any(k.startswith("input_hint_block.") for k in sd):
        raise CheckpointError(f"{path.name}: not a ControlNet (no input_hint_block or controlnet_cond_embedding "
                              "weights)")
    try:
        family, config, hint_channels, widths = controlnet_shape(sd, read_metadata(path))
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    # A ControlNet Union (ldm.controlnet_union) is known by its extra weights.
    from ldm.controlnet_union import UnionControlNet, union_layout

    try:
        union = union_layout(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    factory = ((lambda: ControlNet(config, hint_channels, widths)) if union is None
               else lambda: UnionControlNet(config, *union, hint_channels, widths))
    model = _materialize(factory, sd, "ControlNet", path, device, dtype)
    model.global_average_pooling = path.stem.endswith(("_shuffle", "_shuffle_fp16"))
    expected = set(model.state_dict())
    return LoadedControlNet(model, family, sorted(k for k in sd if k not in expected), path)


def peek_controlnet_family(path: str | Path) -> str | None:
    """The model family ("sd1", "sd2", "sdxl", "sd3", "flux", "qwen_image") a ControlNet file is for, from its header
    alone; None when the header cannot tell, or the file fits more than one (a T2I-Adapter), or is made from the model
    (a Control-LoRA, a difference ControlNet)."""
    from ldm.control_lora import is_control_lora
    from ldm.controlnet_sd3 import is_sd3_controlnet
    from ldm.t2i_adapter import is_t2i_adapter

    try:
        sd = read_shapes(path)
    except (safetensors.SafetensorError, OSError, ValueError):
        return None
    if sd is None or "difference" in sd or is_control_lora(sd) or is_t2i_adapter(sd):
        return None
    if is_sd3_controlnet(sd):
        return "sd3"
    from ldm.controlnet_flux import is_flux_controlnet
    from ldm.controlnet_qwen_image import FAMILY, is_qwen_image_controlnet

    if is_qwen_image_controlnet(sd):
        return FAMILY
    if is_flux_controlnet(sd):
        return "flux"
    if _unsupported(sd):
        return None
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        sd = _from_diffusers(sd)
    prefixed = {UNET_PREFIX + k.removeprefix(LDM_PREFIX): v for k, v in sd.items()}
    rule = next((r for r in FAMILY_RULES if r.matches(prefixed)), None)
    return None if rule is None else rule.name


def save_controlnet(path: str | Path, model: ControlNet, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as an LDM-layout .safetensors ControlNet (what `load_controlnet` reads back)."""
    path = Path(path)
    write_safetensors(model.state_dict(), path, {"loom.unet_config": json.dumps(asdict(model.config))}, dtype)
    return path


# --- applying one ------------------------------------------------------------------------------------


def prepare_hint(image: Tensor, height: int, width: int, mode: str = "nearest-exact") -> Tensor:
    """An IMAGE-like [B, C, h, w] cropped at the centre to the target's aspect ratio, then resized
    (nearest-exact, or `mode`) to [B, C, height, width], as ComfyUI's ControlNet prepares its hint: the same
    number of rows (or columns) is trimmed from each side."""
    h, w = image.shape[-2:]
    old_aspect, new_aspect = w / h, width / height
    if old_aspect > new_aspect:
        trim = round((w - w * new_aspect / old_aspect) / 2)
        image = image[..., :, trim:w - trim]
    elif old_aspect < new_aspect:
        trim = round((h - h * old_aspect / new_aspect) / 2)
        image = image[..., trim:h - trim, :]
    if image.shape[-2:] != (height, width):
        bilinear = {"align_corners": False} if mode == "bilinear" else {}
        image = F.interpolate(image, size=(height, width), mode=mode, **bilinear)
    return image


@dataclass(eq=False)
class Control:
    """One ControlNet applied to one conditioning. Identity matters: the guider batches the
    positive and negative prompts in one model call only when they carry the same Control."""

    model: ControlNet
    hint: Tensor  # [B, C, H, W] in 0..1, any size: cropped and resized to the latent's at use
    strength: float = 1.0
    sigma_range: tuple[float, float] = (math.inf, 0.0)  # acts while high >= sigma >= low
    previous: Control | None = None  # a control chained before this one: the residuals add up
    source: str = ""  # the file's name, for messages
    family: str | None = None  # "sd1" | "sd2" | "sdxl": the UNets it fits
    model_kwargs: dict = field(default_factory=dict)  # more arguments to the model: a ControlNet Union's control_type
    _hints: dict = field(default_factory=dict, repr=False)

    def cache_size(self) -> int:
        """Bytes held beyond the model (which the model cache owns): the hint image."""
        return self.hint.element_size() * self.hint.nelement() + 1024

    def chain(self) -> list[Control]:
        """This control and every one before it."""
        controls, control = [], self
        while control is not None:
            controls.append(control)
            control = control.previous
        return controls

    def residuals(self, x: Tensor, sigma: float, timesteps: Tensor, context: Tensor, y: Tensor | None,
                  repeats: int = 1, attn_mask: Tensor | None = None) -> list[Tensor] | ControlResiduals | None:
        """The summed residuals of this chain for one UNet call on `x`, which holds `repeats` copies of
        the latent batch (positive and negative prompts in one call); None when none is active. A chain
        with a T2I-Adapter in it gives `ControlResiduals`. The prompt's `attn_mask` goes to the ControlNets that
        read one (`accepts_attn_mask`: Qwen-Image's), as it goes to their model."""
        from ldm.t2i_adapter import T2IAdapterControl, add_residuals

        total = None
        for control in self.chain():
            high, low = control.sigma_range
            if control.strength == 0 or not low <= sigma <= high:
                continue
            if isinstance(control, T2IAdapterControl):  # features for the UNet's blocks, from the hint alone
                total = add_residuals(total, control.features(x, repeats))
                continue
            kwargs = dict(control.model_kwargs)
            if attn_mask is not None and getattr(control.model, "accepts_attn_mask", False):
                kwargs["attn_mask"] = attn_mask
            outs = control.model(x, control._hint(x, repeats), timesteps, context, y=y, **kwargs)
            if control.model.global_average_pooling:  # the shuffle ControlNet: each residual's spatial mean
                outs = [out.mean(dim=(2, 3), keepdim=True).expand_as(out) for out in outs]
            outs = [out * control.strength for out in outs]
            total = add_residuals(total, outs)
        return total

    def release(self) -> None:
        """Drop the resized hints kept for the run (they are on the compute device)."""
        self._hints.clear()

    def _hint(self, x: Tensor, repeats: int) -> Tensor:
        batch, _, height, width = x.shape
        key = (batch, height, width, repeats, x.device, self.model.dtype)
        if key not in self._hints:
            if len(self._hints) >= 4:  # area prompts can take a few shapes in turn; keep no more
                self._hints.clear()
            hint = prepare_hint(self.hint.to(x.device, torch.float32), height * 8, width * 8)
            per_copy = batch // repeats
            hint = hint[torch.arange(per_copy, device=hint.device) % hint.shape[0]]  # cycled over the batch
            self._hints[key] = hint.repeat(repeats, 1, 1, 1).to(self.model.dtype)
        return self._hints[key]

