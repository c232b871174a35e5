"""The block-quantized layers of ComfyUI's "mixed precision" files (NVFP4, MXFP8), dequantized to float32 as they load.

A mixed file tags each quantized linear layer with ``<layer>.comfy_quant``, a uint8 tensor holding JSON such as
``{"format": "nvfp4"}``; layers without a tag are plain (bf16). The plain formats (``float8_e4m3fn``,
``float8_e5m2``, ``int8*``: values times a per-tensor or per-row ``.weight_scale``) are ``ldm.t5.descale``'s; the
two block formats read here are stored as ComfyUI's comfy_kitchen tensor layouts write them (``state_dict_tensors``
of ``TensorCoreNVFP4Layout`` in comfy_kitchen/tensor/nvfp4.py and ``TensorCoreMXFP8Layout`` in tensor/mxfp8.py;
loaded by comfy/ops.py ``mixed_precision_ops`` ``Linear._load_from_state_dict``; quantized and dequantized by
comfy_kitchen/backends/eager/quantization.py ``quantize_nvfp4`` / ``dequantize_nvfp4`` / ``quantize_mxfp8`` /
``dequantize_mxfp8`` with comfy_kitchen/float_utils.py ``pack_uint4``, ``to_blocked``, ``from_blocked``,
``e8m0_to_f32``):

``nvfp4`` (group size 16). ``.weight``: uint8 [rows, cols / 2] (QUANT_ALGOS' storage_t; a
``float4_e2m1fn_x2`` tensor holds the same bytes and is read alike), two fp4 e2m1 codes per byte, the even column
in the HIGH nibble (comfy_kitchen's ``hi_first=True``, the default its quantizer writes and its GEMM assumes).
An e2m1 code is sign (bit 3) and magnitude index (bits 0-2) into 0, 0.5, 1, 1.5, 2, 3, 4, 6. ``.weight_scale``:
one float8_e4m3fn scale per 16 values of a row (ComfyUI views the stored bytes as e4m3, so uint8 or e4m3 storage
read alike), in cuBLAS's blocked layout (below). ``.weight_scale_2``: the per-tensor float32 scale. A value is
``code_value * block_scale * weight_scale_2``.

``mxfp8`` (group size 32). ``.weight``: float8_e4m3fn [rows, cols]. ``.weight_scale``: one e8m0 exponent byte per
32 values of a row (stored as uint8, ComfyUI views it as ``float8_e8m0fnu``), blocked likewise; the scale is
``2 ** (byte - 127)`` as comfy_kitchen's ``e8m0_to_f32`` makes it (the byte shifted into a float32's exponent:
byte 0 gives 0). A value is ``fp8_value * scale``.

The blocked layout (cuBLAS's block-scaling-factor layout, comfy_kitchen's ``to_blocked``): the [rows, cols / group]
scale matrix, zero-padded to a multiple of 128 rows and of 4 columns, is cut into 128 x 4 tiles stored one after
another, row tiles outermost; inside a tile the scale of row r, column c sits at byte
``(r % 32) * 16 + (r % 128 // 32) * 4 + c % 4``. ComfyUI stores the padded matrix as it is (2-D, ``flatten=False``);
only its element count is checked here.

Padding and shapes: comfy_kitchen pads a weight whose sides are not multiples of 16 (NVFP4) or 32 (MXFP8) with
zeros before quantizing, and ComfyUI takes the logical shape from the model's layer (``orig_shape = (out_features,
in_features)``), never from the file. The file alone cannot tell padding from zeros, so a padded layer comes out
padded (Loom's loaders then refuse its shape); the linear layers of the text encoders those files hold (Gemma 3
12B, Mistral Small 3) have sides that are multiples of 128. ComfyUI's eager dequantization multiplies in the model
dtype; here the product is exact in float32 (code value times block scale) before one rounding by the tensor scale.
Checked against comfy-kitchen 0.2.40's eager quantize_nvfp4 / quantize_mxfp8 (the test quantizer writes the same
bytes) and dequantize_nvfp4 / dequantize_mxfp8 in float32 (within one float32 rounding for NVFP4, equal for MXFP8).

Not read, and refused by name with the other unknown formats: a layer with a ``.pre_quant_scale`` (AWQ input
smoothing, which some third-party NVFP4 files carry).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

NVFP4 = "nvfp4"
MXFP8 = "mxfp8"
BLOCK_FORMATS = (NVFP4, MXFP8)
GROUP_SIZE = {NVFP4: 16, MXFP8: 32}
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_TAG = ".comfy_quant"


def tag_format(tag: Tensor) -> str | None:
    """The format a `.comfy_quant` tag names ("" when it names none); None for a tag that is no JSON object."""
    try:
        conf = json.loads(bytes(tag.to(torch.uint8).tolist()).decode())
        return str(conf.get("format", ""))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None


def block_layers(sd: Mapping[str, Tensor]) -> dict[str, str]:
    """`.weight` key -> format of every layer whose tag names NVFP4 or MXFP8; a CheckpointError naming a layer that
    lacks the tensors its format needs."""
    layers = {}
    for key in sd:
        if not key.endswith(_TAG):
            continue
        tag = sd[key]
        fmt = None if tag.is_meta else tag_format(tag)
        if fmt in BLOCK_FORMATS:
            layer = key.removesuffix(_TAG)
            _check_layer(sd, layer, fmt)
            layers[layer + ".weight"] = fmt
    return layers


def _check_layer(sd: Mapping[str, Tensor], layer: str, fmt: str) -> None:
    from ldm.checkpoint import CheckpointError

    needed = (".weight", ".weight_scale") + ((".weight_scale_2",) if fmt == NVFP4 else ())
    missing = [layer + s for s in needed if layer + s not in sd]
    problem = f"no {', '.join(missing)}" if missing else None
    if layer + ".pre_quant_scale" in sd:
        problem = "an AWQ `.pre_quant_scale`"
    elif not missing:
        weight, scale = sd[layer + ".weight"], sd[layer + ".weight_scale"]
        rows, cols = logical_shape(weight, fmt)
        want = _ceil(rows, 128) * _ceil(cols // GROUP_SIZE[fmt], 4)
        if weight.ndim != 2 or weight.element_size() != 1 or cols % GROUP_SIZE[fmt]:
            problem = f"a {weight.dtype} weight of shape {tuple(weight.shape)}"
        elif scale.numel() != want or scale.element_size() != 1:
            problem = f"{scale.numel()} {scale.dtype} block scales where its {rows} x {cols} weight has {want}"
    if problem:
        raise CheckpointError(f"{layer} is quantized as {fmt}, which Loom cannot read with {problem} (it reads "
                              "ComfyUI's nvfp4 and mxfp8 layers); use the model's bf16 or fp8 file")


def _ceil(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def logical_shape(weight: Tensor, fmt: str) -> tuple[int, int]:
    """The [rows, cols] a stored block-quantized weight holds (NVFP4 packs two columns a byte)."""
    rows, stored = weight.shape[0], weight.shape[-1]
    return rows, stored * 2 if fmt == NVFP4 else stored


def unblocked(scales: Tensor, rows: int, cols: int) -> Tensor:
    """The [rows, cols] matrix of scales stored in cuBLAS's blocked layout (see the module docstring)."""
    row_tiles, col_tiles = _ceil(rows, 128) // 128, _ceil(cols, 4) // 4
    # a tile's byte (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4: dims (row tile, col tile, r % 32, r % 128 // 32, c % 4)
    tiles = scales.reshape(row_tiles, col_tiles, 32, 4, 4)
    return tiles.permute(0, 3, 2, 1, 4).reshape(row_tiles * 128, col_tiles * 4)[:rows, :cols]


def e2m1_values(packed: Tensor) -> Tensor:
    """float32 [rows, 2 * n] of NVFP4 bytes [rows, n], the high nibble first."""
    packed = packed.view(torch.uint8)
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=-1).flatten(-2).long()
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=packed.device)
    return table[codes]


def e8m0_scales(exponents: Tensor) -> Tensor:
    """float32 scales of e8m0 bytes: the byte as a float32's exponent (2 ** (byte - 127); 0 for byte 0)."""
    return (exponents.view(torch.uint8).to(torch.int32) << 23).view(torch.float32)


def dequantize_nvfp4(packed: Tensor, block_scales: Tensor, tensor_scale: Tensor) -> Tensor:
    """float32 [rows, cols] of an NVFP4 weight: packed [rows, cols / 2], blocked e4m3 scales, the tensor scale."""
    values = e2m1_values(packed)
    rows, cols = values.shape
    scales = unblocked(block_scales.view(torch.uint8).view(torch.float8_e4m3fn).reshape(-1), rows, cols // 16)
    blocks = values.reshape(rows, cols // 16, 16) * scales.float().unsqueeze(-1)
    return (blocks * tensor_scale.float().reshape(())).reshape(rows, cols)


def dequantize_mxfp8(data: Tensor, block_scales: Tensor) -> Tensor:
    """float32 [rows, cols] of an MXFP8 weight: e4m3 values [rows, cols] and blocked e8m0 scales."""
    if data.dtype == torch.uint8:
        data = data.view(torch.float8_e4m3fn)
    rows, cols = data.shape
    scales = e8m0_scales(unblocked(block_scales.view(torch.uint8).reshape(-1), rows, cols // 32))
    return (data.float().reshape(rows, cols // 32, 32) * scales.unsqueeze(-1)).reshape(rows, cols)


def dequantized(sd: Mapping[str, Tensor], key: str, fmt: str) -> Tensor:
    """The float32 weight `key` of a layer in `fmt` (`block_layers`' pairs); a meta tensor of its logical shape when
    the stored weight is on the meta device (a file's header)."""
    weight, layer = sd[key], key.removesuffix(".weight")
    if weight.is_meta:
        return torch.empty(logical_shape(weight, fmt), dtype=torch.float32, device="meta")
    if fmt == NVFP4:
        return dequantize_nvfp4(weight, sd[layer + ".weight_scale"], sd[layer + ".weight_scale_2"])
    return dequantize_mxfp8(weight, sd[layer + ".weight_scale"])


# A block layer's tensors that its dequantized weight stands for (its `.input_scale`, unread, stays).
_CONSUMED = (".weight_scale", ".weight_scale_2", _TAG)


class _Dequantizing(Mapping[str, Tensor]):
    """`dequantizing`'s view: a block layer's `.weight` dequantized when read, its scales and tag left out."""

    def __init__(self, sd: Mapping[str, Tensor], blocks: dict[str, str]) -> None:
        self._sd, self._blocks = sd, blocks
        consumed = {key.removesuffix(".weight") + suffix for key in blocks for suffix in _CONSUMED}
        self._keys = {k: None for k in sd if k not in consumed}

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return dequantized(self._sd, key, self._blocks[key]) if key in self._blocks else self._sd[key]

    def shape_of(self, key: str) -> torch.Size:
        """A weight's shape, a block layer's unpacked one, without dequantizing it."""
        if key in self._blocks:
            return torch.Size(logical_shape(self._sd[key], self._blocks[key]))
        return self._sd[key].shape

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def dequantizing(sd: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """`sd` with its NVFP4 and MXFP8 layers as plain float32 ones: each `.weight` dequantized when it is read (one at
    a time, so a 12B file never stands in float32 whole), their block scales and tags left out (a loader counts them
    used through ``ldm.t5.scaling_keys`` of the file's own keys); `sd` itself when it has none. For loaders that read
    weights one by one (``ldm.qwen_text.load_prefixed``) rather than through ``ldm.t5.descaled_fp8``."""
    blocks = block_layers(sd)
    return _Dequantizing(sd, blocks) if blocks else sd
