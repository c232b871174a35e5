"""ComfyUI's block-quantized mixed-precision layers (NVFP4, MXFP8), dequantized as they load (ldm.quant_formats).

The quantizers here are written from the layout alone, apart from the dequantizer's code: fp4 e2m1 codes picked as the
nearest of the value table, packed two a byte with the even column in the high nibble, block scales placed by the
cuBLAS tile formula one element at a time (the dequantizer reshapes and permutes instead), scales and clamps as
comfy_kitchen's eager quantize_nvfp4 / quantize_mxfp8 compute them. A tiny T5 file holding such layers goes through
Loom's real loader (`load_t5` -> `descaled_fp8`) and is checked against the quantize-then-dequantize values (exactly)
and against the float weights it was made from (within the format's error), and its encoder against transformers'.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from transformers import T5Config as HFConfig
from transformers import T5EncoderModel

from ldm.checkpoint import CheckpointError
from ldm.flux2_text import flux2_text_model, write_tiny_flux2_klein
from ldm.quant_formats import dequantize_mxfp8, dequantize_nvfp4, dequantizing, unblocked
from ldm.t5 import descaled_fp8, load_t5

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
F8_MAX, F4_MAX = 448.0, 6.0


def _tag(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def blocked(scales: torch.Tensor) -> torch.Tensor:
    """cuBLAS's blocked layout of a [rows, cols] scale matrix, built element by element from the tile formula: padded to
    128 x 4 tiles, tiles row-major, byte (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4 inside a tile. Returned 2-D, padded
    shape, as comfy_kitchen's to_blocked(flatten=False) stores it."""
    rows, cols = scales.shape
    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    r = torch.arange(padded_rows)[:, None].expand(padded_rows, padded_cols)
    c = torch.arange(padded_cols)[None, :].expand(padded_rows, padded_cols)
    tile = (r // 128) * (padded_cols // 4) + c // 4
    offset = tile * 512 + (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4
    padded = torch.zeros(padded_rows, padded_cols, dtype=scales.dtype)
    padded[:rows, :cols] = scales
    flat = torch.zeros(padded_rows * padded_cols, dtype=scales.dtype)
    flat[offset.flatten()] = padded.flatten()
    return flat.reshape(padded_rows, padded_cols)


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [rows, cols / 2], blocked e4m3 scales, float32 tensor scale, the float64 values they encode)."""
    rows, cols = w.shape
    w = w.double()
    tensor_scale = (w.abs().max() / (F8_MAX * F4_MAX)).float()
    blocks = w.reshape(rows, cols // 16, 16)
    block_scale = (blocks.abs().amax(-1) / F4_MAX / tensor_scale.double()).clamp(max=F8_MAX).to(torch.float8_e4m3fn)
    total = block_scale.double() * tensor_scale.double()
    scaled = torch.where(total[..., None] > 0, blocks / total[..., None].clamp_min(1e-30), 0.0).clamp(-F4_MAX, F4_MAX)
    magnitude = (scaled.abs()[..., None] - E2M1).abs().argmin(-1)
    codes = (magnitude | torch.where(scaled < 0, 8, 0)).reshape(rows, cols).to(torch.uint8)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    values = E2M1[magnitude] * torch.where(scaled < 0, -1.0, 1.0)
    encoded = (values * block_scale.double()[..., None] * tensor_scale.double()).reshape(rows, cols)
    return packed, blocked(block_scale), tensor_scale, encoded


def quantize_mxfp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 values [rows, cols], blocked e8m0 exponent bytes, the float64 values they encode)."""
    rows, cols = w.shape
    blocks = w.double().reshape(rows, cols // 32, 32)
    needed = (blocks.abs().amax(-1) / F8_MAX).clamp_min(2.0**-127)
    exponent = (torch.ceil(torch.log2(needed)) + 127).clamp(0, 254)
    scale = torch.exp2(exponent - 127)
    data = (blocks / scale[..., None]).clamp(-F8_MAX, F8_MAX).to(torch.float8_e4m3fn)
    encoded = (data.double() * scale[..., None]).reshape(rows, cols)
    return data.reshape(rows, cols), blocked(exponent.to(torch.uint8)), encoded


def test_blocked_scales_come_back_in_place() -> None:
    torch.manual_seed(0)
    scales = torch.randint(0, 256, (300, 10), dtype=torch.uint8)  # 3 row tiles, 3 column tiles (10 padded to 12)
    stored = blocked(scales)
    assert stored.shape == (384, 12)
    assert torch.equal(unblocked(stored.flatten(), 300, 10), scales)
    assert torch.equal(unblocked(stored, 300, 10), scales)


def test_nvfp4_nibble_order_and_values() -> None:
    """The even column is the high nibble; codes 0-7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6 and bit 3 the sign."""
    packed = torch.tensor([[0x2F, 0x70, 0x9A, 0x34, 0x56, 0x18, 0xBC, 0xDE]], dtype=torch.uint8)
    one = torch.tensor([[1.0]], dtype=torch.float8_e4m3fn)
    got = dequantize_nvfp4(packed, blocked(one), torch.tensor(2.0))
    want = torch.tensor([1.0, -6.0, 6.0, 0.0, -0.5, -1.0, 1.5, 2.0, 3.0, 4.0, 0.5, -0.0, -1.5, -2.0, -3.0, -4.0])
    assert torch.equal(got, 2 * want[None])


@pytest.mark.parametrize("shape", [(272, 96), (64, 160)])
def test_nvfp4_dequantizes_exactly_and_within_fp4_error(shape) -> None:
    torch.manual_seed(1)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 0.2
    packed, scales, tensor_scale, encoded = quantize_nvfp4(w)
    got = dequantize_nvfp4(packed, scales, tensor_scale)
    assert got.dtype == torch.float32 and torch.equal(got, encoded.float())  # the exact product, rounded once
    peak = w.reshape(shape[0], -1, 16).abs().amax(-1, keepdim=True)
    error = (got - w).reshape(shape[0], -1, 16).abs()
    assert (error <= peak / 4 + 1e-7).all()  # half of e2m1's widest step (4 to 6) and the e4m3 rounding of the scale
    assert (got - w).norm() / w.norm() < 0.12


def test_mxfp8_dequantizes_exactly_and_within_fp8_error() -> None:
    torch.manual_seed(2)
    w = torch.randn(272, 96) * torch.rand(272, 1)
    data, scales, encoded = quantize_mxfp8(w)
    got = dequantize_mxfp8(data, scales)
    assert torch.equal(got, encoded.float())
    peak = w.reshape(272, -1, 32).abs().amax(-1, keepdim=True)
    error = (got - w).reshape(272, -1, 32).abs()
    assert (error <= w.reshape(272, -1, 32).abs() / 16 + peak * 2.0**-14).all()  # e4m3's 3 mantissa bits


def reference_t5(seed: int = 0) -> T5EncoderModel:
    """A tiny transformers T5 encoder with every weight random; sides multiples of 32, a feed-forward 160 wide (two
    row tiles of block scales, and 10 NVFP4 blocks a row padded to 12)."""
    torch.manual_seed(seed)
    config = HFConfig(vocab_size=32128, d_model=64, d_kv=16, d_ff=160, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape) * 0.1)
    return model


BLOCK0 = "encoder.block.0.layer."
# layer -> (format, storage): ComfyUI's uint8 NVFP4 bytes or torch's float4_e2m1fn_x2 view of them; MXFP8 exponents
# as uint8 (ComfyUI's) or float8_e8m0fnu
LAYERS = {BLOCK0 + "0.SelfAttention.q": ("nvfp4", torch.uint8),
          BLOCK0 + "0.SelfAttention.k": ("nvfp4", torch.float4_e2m1fn_x2),
          BLOCK0 + "0.SelfAttention.v": ("mxfp8", torch.uint8),
          BLOCK0 + "0.SelfAttention.o": ("mxfp8", torch.float8_e8m0fnu),
          BLOCK0 + "1.DenseReluDense.wi_0": ("nvfp4", torch.uint8),
          BLOCK0 + "1.DenseReluDense.wo": ("nvfp4", torch.uint8),
          "encoder.block.1.layer.1.DenseReluDense.wo": ("mxfp8", torch.uint8),
          "encoder.block.1.layer.0.SelfAttention.q": ("float8_e4m3fn", None)}


def mixed_t5_file(model: T5EncoderModel, path) -> dict[str, torch.Tensor]:
    """`model` saved as a ComfyUI mixed file (LAYERS quantized, the rest float32); returns the encoded weights."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    encoded = {}
    for layer, (fmt, storage) in LAYERS.items():
        w = sd.pop(layer + ".weight")
        if fmt == "nvfp4":
            packed, scales, tensor_scale, values = quantize_nvfp4(w)
            sd |= {layer + ".weight": packed.view(storage), layer + ".weight_scale": scales,
                   layer + ".weight_scale_2": tensor_scale, layer + ".input_scale": torch.tensor(1.0)}
        elif fmt == "mxfp8":
            data, scales, values = quantize_mxfp8(w)
            sd |= {layer + ".weight": data, layer + ".weight_scale": scales.view(storage)}
        else:
            scale = w.abs().max() / F8_MAX
            sd |= {layer + ".weight": (w / scale).to(torch.float8_e4m3fn), layer + ".weight_scale": scale}
            values = sd[layer + ".weight"].double() * scale.double()
        sd[layer + ".comfy_quant"] = _tag(fmt)
        encoded[layer + ".weight"] = values.float()
    safetensors.torch.save_file(sd, path)
    return encoded


def test_a_mixed_t5_file_loads_dequantized(tmp_path) -> None:
    reference = reference_t5()
    original = {k: v.clone() for k, v in reference.state_dict().items()}
    encoded = mixed_t5_file(reference, tmp_path / "t5_fp4_mixed.safetensors")
    stored = safetensors.torch.load_file(tmp_path / "t5_fp4_mixed.safetensors")
    assert stored[BLOCK0 + "0.SelfAttention.k.weight"].dtype == torch.float4_e2m1fn_x2
    assert stored[BLOCK0 + "0.SelfAttention.o.weight_scale"].dtype == torch.float8_e8m0fnu
    encoder, unused = load_t5(tmp_path / "t5_fp4_mixed.safetensors")
    assert unused == []
    weights = encoder.model.state_dict()
    for key, values in encoded.items():
        assert torch.equal(weights[key], values), key
        error = (weights[key] - original[key]).norm() / original[key].norm()
        assert error < (0.12 if LAYERS[key.removesuffix(".weight")][0] == "nvfp4" else 0.04), key
    reference.load_state_dict(encoded, strict=False)  # transformers' T5 with the same (dequantized) weights
    ids, _ = encoder.tokenizer.batch(["a photo of a cat", "translate English to German: The house is wonderful."])
    with torch.no_grad():
        difference = (encoder(ids) - reference(input_ids=ids).last_hidden_state).abs().max().item()
    assert difference < 1e-5  # measured 0.0 (same float32 weights, same kernels)


def test_a_language_model_reads_block_layers_through_the_dequantizing_view(tmp_path) -> None:
    """``dequantizing`` for loaders that read weights one at a time (ldm.qwen_text.load_prefixed): FLUX.2 [klein]'s
    tiny Qwen3 built from the view holds the dequantized weights and encodes as the float model with them does."""
    path = write_tiny_flux2_klein(tmp_path / "qwen_3_4b.safetensors", hidden=32, dtype=torch.float32)
    sd = safetensors.torch.load_file(path)
    plain, encoded = dict(sd), {}
    for i in range(0, 27, 3):  # layers 0 to 26 are read (27's input is the deepest state)
        for name, fmt in (("self_attn.q_proj", "nvfp4"), ("mlp.down_proj", "nvfp4"), ("self_attn.o_proj", "mxfp8")):
            layer = f"model.layers.{i}.{name}"
            w = sd.pop(layer + ".weight")
            if fmt == "nvfp4":
                packed, scales, tensor_scale, values = quantize_nvfp4(w)
                sd |= {layer + ".weight": packed, layer + ".weight_scale": scales,
                       layer + ".weight_scale_2": tensor_scale}
            else:
                data, scales, values = quantize_mxfp8(w)
                sd |= {layer + ".weight": data, layer + ".weight_scale": scales}
            sd[layer + ".comfy_quant"] = _tag(fmt)
            plain[layer + ".weight"] = encoded[layer + ".weight"] = values.float()
    view = dequantizing(sd)
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in view and len(view) == len(plain)
    model, _, _ = flux2_text_model(view, "qwen_3_4b_fp4_mixed.safetensors", torch.float32)
    reference, _, _ = flux2_text_model(plain, "qwen_3_4b.safetensors", torch.float32)
    weights = model.state_dict()
    for key, values in encoded.items():
        assert torch.equal(weights[key.removeprefix("model.")], values), key
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state
    assert (got - want).abs().max().item() < 1e-5  # measured 0.0


def test_a_header_gives_the_logical_shapes() -> None:
    """Meta tensors (a file's header, as Loom's probes read it) come out in the layer's float shape."""
    sd = {"a.weight": torch.empty(32, 8, dtype=torch.uint8, device="meta"),
          "a.weight_scale": torch.empty(128, 4, dtype=torch.float8_e4m3fn, device="meta"),
          "a.weight_scale_2": torch.empty((), device="meta"), "a.comfy_quant": _tag("nvfp4")}
    weight = descaled_fp8(sd)["a.weight"]
    assert weight.is_meta and weight.shape == (32, 16) and weight.dtype == torch.float32


def test_broken_and_unknown_layers_are_refused_by_name() -> None:
    packed, scales, tensor_scale, _ = quantize_nvfp4(torch.randn(32, 64))
    layer = {"a.weight": packed, "a.weight_scale": scales, "a.weight_scale_2": tensor_scale,
             "a.comfy_quant": _tag("nvfp4")}
    assert descaled_fp8(layer)["a.weight"].shape == (32, 64)
    for broken, why in (({k: v for k, v in layer.items() if k != "a.weight_scale_2"}, "no a.weight_scale_2"),
                        ({**layer, "a.pre_quant_scale": torch.ones(64)}, "an AWQ `.pre_quant_scale`"),
                        ({**layer, "a.weight_scale": scales[:64]}, "256 torch.float8_e4m3fn block scales where"),
                        ({**layer, "a.weight": packed.float()}, "a torch.float32 weight")):
        with pytest.raises(CheckpointError, match=f"a is quantized as nvfp4, which Loom cannot read with {why}"):
            descaled_fp8(broken)
    with pytest.raises(CheckpointError, match="a is quantized as svdquant_w4a4, which Loom cannot read .*nvfp4, mxfp8"):
        descaled_fp8({**layer, "a.comfy_quant": _tag("svdquant_w4a4")})


def _quantize_layers(sd: dict[str, torch.Tensor], layers: list[str]) -> dict[str, torch.Tensor]:
    """`sd` with `layers` in ComfyUI's NVFP4 mixed layout; the values they now encode replace the originals in the
    plain copy returned."""
    plain = dict(sd)
    for layer in layers:
        packed, scales, tensor_scale, values = quantize_nvfp4(sd.pop(layer + ".weight").float())
        sd |= {layer + ".weight": packed, layer + ".weight_scale": scales, layer + ".weight_scale_2": tensor_scale,
               layer + ".comfy_quant": _tag("nvfp4")}
        plain[layer + ".weight"] = values.float()
    return plain


def test_an_fp4_mixed_gemma3_file_loads_as_ltx2s_text_encoder(tmp_path) -> None:
    """Comfy-Org's gemma_3_12B_it_fp4_mixed layout through LTX-2's text encoder loader (the file as read, not a view):
    the same prompt features as the encoder built from the weights the NVFP4 layers encode."""
    from ldm.ltx2_text import load_ltx2_text_encoder, tiny_gemma3_state, tiny_projection_state

    sd = {k: v.float() if v.is_floating_point() else v for k, v in tiny_gemma3_state(seed=2).items()}
    plain = _quantize_layers(sd, [f"model.layers.{i}.{name}" for i in range(3)
                                  for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")])
    files = {"fp4": tmp_path / "gemma_3_12B_it_fp4_mixed.safetensors", "plain": tmp_path / "gemma_3_12B_it.safetensors"}
    safetensors.torch.save_file(sd, files["fp4"])
    safetensors.torch.save_file(plain, files["plain"])
    ltx = tmp_path / "ltx-2.safetensors"
    safetensors.torch.save_file(tiny_projection_state(seed=3), ltx)
    quantized, reference = (load_ltx2_text_encoder(files[k], ltx) for k in ("fp4", "plain"))
    assert quantized.unused_keys == reference.unused_keys == []
    prompts = ["a dog runs in the rain", ""]
    with torch.no_grad():
        got, want = quantized.encoder.encode(prompts).cond, reference.encoder.encode(prompts).cond
    assert (got - want).abs().max().item() < 1e-5


def test_an_fp4_mixed_flux2_text_encoder_file_is_read(tmp_path) -> None:
    """FLUX.2's text encoders (mistral_3_small_flux2_fp4_mixed's layout) take NVFP4 layers as read from the file."""
    path = write_tiny_flux2_klein(tmp_path / "qwen_3_4b.safetensors", hidden=32, dtype=torch.float32)
    sd = safetensors.torch.load_file(path)
    plain = _quantize_layers(sd, [f"model.layers.{i}.self_attn.k_proj" for i in range(0, 27, 4)])
    model, _, used = flux2_text_model(sd, "qwen_3_4b_fp4_mixed.safetensors", torch.float32)
    reference, _, _ = flux2_text_model(plain, "qwen_3_4b.safetensors", torch.float32)
    assert {k for k in sd if k.endswith((".weight_scale", ".weight_scale_2", ".comfy_quant"))} <= used
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state
    assert (got - want).abs().max().item() < 1e-5
