"""ldm.merge: weighted, per-key, add and subtract merges against hand computations; inputs never changed."""

import pytest
import torch
from torch import nn

from ldm.merge import MergeError, add, dequantized, merge_modules, prefix_ratios, subtract, weighted_merge
from ldm.presets import build_preset
from ldm.quant import Fp8Linear, is_fp8, quantize_fp8_
from ldm.unet import UNetConfig, UNetModel

CLIP_SKIP = (".position_ids", ".logit_scale")


def parts(preset: str, seed: int) -> tuple[nn.Module, nn.Module]:
    """(unet, text encoder) of a tiny random-weight preset."""
    _, _, unet, _, encoder = build_preset(preset, seed)
    return unet, encoder


@pytest.fixture(scope="module")
def unets() -> tuple[nn.Module, nn.Module]:
    return parts("tiny-sd1", 1)[0], parts("tiny-sd1", 2)[0]


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def expected(w1: torch.Tensor, w2: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The hand computation: in float32, rounded once to model1's dtype."""
    return (w1.float() * a + w2.float() * b).to(w1.dtype)


def test_weighted_merge_is_ratio_of_model1_plus_the_rest_of_model2_and_changes_no_input(unets):
    unet1, unet2 = unets
    before1, before2 = snapshot(unet1), snapshot(unet2)
    merged = weighted_merge(unet1, unet2, 0.3).state_dict()
    first, second = unet1.state_dict(), unet2.state_dict()
    assert merged.keys() == first.keys()
    for key in first:
        assert torch.equal(merged[key], expected(first[key], second[key], 0.3, 0.7)), key
        assert merged[key].data_ptr() != first[key].data_ptr()
    assert_unchanged(unet1, before1)
    assert_unchanged(unet2, before2)


def test_ratio_one_shares_model1s_tensors_in_a_new_module(unets):
    unet1, unet2 = unets
    merged = weighted_merge(unet1, unet2, 1.0)
    assert merged is not unet1
    assert all(m is p for m, p in zip(merged.parameters(), unet1.parameters(), strict=True))
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(merged(x, t, context), unet1(x, t, context))


def test_subtract_is_the_difference_times_the_multiplier_and_add_the_sum(unets):
    unet1, unet2 = unets
    first, second = unet1.state_dict(), unet2.state_dict()
    difference = subtract(unet1, unet2, 0.5).state_dict()
    total = add(unet1, unet2).state_dict()
    for key in first:
        assert torch.equal(difference[key], expected(first[key], second[key], 0.5, -0.5)), key
        assert torch.equal(total[key], expected(first[key], second[key], 1.0, 1.0)), key


def test_prefix_ratios_take_the_longest_matching_prefix():
    ratio = prefix_ratios({"input_blocks.1": 0.2, "input_blocks.1.1.": 0.7, "out": 0.4}, default=0.9)
    assert ratio("input_blocks.1.0.in_layers.0.weight") == 0.2
    assert ratio("input_blocks.1.1.proj_in.weight") == 0.7
    assert ratio("output_blocks.0.0.skip_connection.weight") == 0.4  # "out" is a prefix of both
    assert ratio("out.2.weight") == 0.4
    assert ratio("time_embed.0.weight") == 0.9


def test_per_key_ratios_merge_each_block_by_its_own_ratio(unets):
    unet1, unet2 = unets
    ratio = prefix_ratios({"input_blocks.1.": 0.0, "middle_block.": 0.25}, default=1.0)
    merged = weighted_merge(unet1, unet2, ratio)
    first, second, result = unet1.state_dict(keep_vars=True), unet2.state_dict(), merged.state_dict(keep_vars=True)
    for key in first:
        if key.startswith("input_blocks.1."):
            assert torch.equal(result[key], second[key]), key
        elif key.startswith("middle_block."):
            assert torch.equal(result[key], expected(first[key], second[key], 0.25, 0.75)), key
        else:
            assert result[key] is first[key], key  # untouched keys share model1's tensor


def test_skipped_keys_keep_model1s_tensors():
    encoder1, encoder2 = parts("tiny-sd1", 1)[1], parts("tiny-sd1", 2)[1]
    merged = weighted_merge(encoder1, encoder2, 0.5, skip=("token_embedding.weight",)).state_dict(keep_vars=True)
    first, second = encoder1.state_dict(keep_vars=True), encoder2.state_dict()
    for key in first:
        if key.endswith("token_embedding.weight"):
            assert merged[key] is first[key]
        else:
            assert torch.equal(merged[key], expected(first[key], second[key], 0.5, 0.5)), key


def test_text_encoders_merge_and_still_encode():
    encoder1, encoder2 = parts("tiny-sdxl", 1)[1], parts("tiny-sdxl", 2)[1]
    merged = weighted_merge(encoder1, encoder2, 0.5, CLIP_SKIP)
    first, second, result = encoder1.state_dict(), encoder2.state_dict(), merged.state_dict()
    assert all(torch.equal(result[k], expected(first[k], second[k], 0.5, 0.5)) for k in first)
    encoding = merged.encode(["a red circle"])
    assert torch.isfinite(encoding.cond).all() and encoding.pooled is not None


def test_model1s_dtype_and_device_are_kept():
    unet1, unet2 = parts("tiny-sd1", 1)[0].half(), parts("tiny-sd1", 2)[0]
    merged = weighted_merge(unet1, unet2, 0.5).state_dict()
    first, second = unet1.state_dict(), unet2.state_dict()
    for key in first:
        assert merged[key].dtype == torch.float16 and merged[key].device == first[key].device
        assert torch.equal(merged[key], expected(first[key], second[key], 0.5, 0.5)), key


def test_sd1_and_sdxl_unets_are_refused_naming_the_missing_weights(unets):
    sdxl = parts("tiny-sdxl", 3)[0]
    with pytest.raises(MergeError, match=r"different architectures: \d+ weights of model1 are missing from model2 "
                                         r"\(input_blocks.1.1.norm.bias, .* and \d+ weights of model2 are missing"):
        weighted_merge(unets[0], sdxl, 0.5)


def test_mismatched_shapes_are_refused():
    narrow = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  transformer_depth=(1, 1), num_heads=4, context_dim=32))
    wide = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                transformer_depth=(1, 1), num_heads=4, context_dim=48))
    with pytest.raises(MergeError, match=r"differ in shape \(.*attn2\.to_k\.weight: \(32, 32\) vs \(32, 48\)"):
        add(narrow, wide)


def test_different_module_types_are_refused(unets):
    with pytest.raises(MergeError, match="cannot merge a TextEncoder into a UNetModel"):
        add(unets[0], parts("tiny-sd1", 1)[1])


def test_a_subclass_of_the_same_architecture_merges():
    """E.g. SDXL's text encoders loaded from part files (ldm.parts) with those of a checkpoint."""
    encoder1, encoder2 = parts("tiny-sdxl", 1)[1], parts("tiny-sdxl", 2)[1]

    class FromParts(type(encoder2)):
        pass

    encoder2.__class__ = FromParts
    merged = add(encoder1, encoder2)
    assert type(merged) is type(encoder1)
    first, second = encoder1.state_dict(), encoder2.state_dict()
    assert all(torch.equal(merged.state_dict()[k], expected(first[k], second[k], 1, 1)) for k in first)


def test_fp8_layers_merge_dequantized_into_plain_layers_leaving_model1_in_fp8(unets):
    quantized = quantize_fp8_(parts("tiny-sd1", 1)[0])
    plain = unets[1]
    layers = {name: layer for name, layer in quantized.named_modules() if is_fp8(layer)}
    assert layers
    before = snapshot(quantized)
    merged = weighted_merge(quantized, plain, 0.5)
    result, second = merged.state_dict(), plain.state_dict()
    assert not any(key.endswith("weight_scale") for key in result)
    for name, layer in layers.items():
        dense = layer.weight.float() * layer.weight_scale.float()
        assert torch.equal(result[f"{name}.weight"], expected(dense, second[f"{name}.weight"], 0.5, 0.5)), name
        assert type(merged.get_submodule(name)) in (nn.Linear, nn.Conv2d)
        assert is_fp8(layer)  # model1's own layer is untouched
    assert_unchanged(quantized, before)


def test_an_fp8_layer_left_at_ratio_one_stays_fp8(unets):
    quantized = quantize_fp8_(parts("tiny-sd1", 1)[0])
    merged = weighted_merge(quantized, unets[1], prefix_ratios({"middle_block.": 0.5}, default=1.0))
    kinds = {name: is_fp8(layer) for name, layer in merged.named_modules()}
    originals = {name: is_fp8(layer) for name, layer in quantized.named_modules()}
    assert any(originals.values())
    for name, was_fp8 in originals.items():
        assert kinds[name] == (was_fp8 and not name.startswith("middle_block.")), name


def test_dequantized_gives_plain_layers_computing_the_same_and_leaves_the_model_alone():
    quantized = quantize_fp8_(parts("tiny-sd1", 1)[0])
    plain = dequantized(quantized)
    assert not any(isinstance(layer, Fp8Linear) for layer in plain.modules())
    assert any(isinstance(layer, Fp8Linear) and is_fp8(layer) for layer in quantized.modules())
    assert not any(key.endswith("weight_scale") for key in plain.state_dict())
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(plain(x, t, context), quantized(x, t, context))
    unquantized = parts("tiny-sd1", 2)[0]
    assert dequantized(unquantized) is unquantized


def test_quantized_tensor_subclasses_are_refused(unets):
    class Int8Weight(torch.Tensor):
        """Stands for torchao's quantized weight tensors, which cannot be read back exactly."""

    odd = parts("tiny-sd1", 1)[0]
    layer = odd.get_submodule("middle_block.1.proj_in")
    layer.weight = nn.Parameter(layer.weight.detach().as_subclass(Int8Weight), requires_grad=False)
    with pytest.raises(MergeError, match="quantized.*middle_block.1.proj_in.weight"):
        weighted_merge(odd, unets[1], 0.5)


def test_factors_of_one_and_zero_never_read_model2():
    """As ComfyUI, a factor of 0 adds nothing: not even model2's NaNs."""
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    with torch.no_grad():
        second.weight.fill_(float("nan"))
    merged = merge_modules(first, second, lambda key: (2.0, 0.0) if key == "weight" else (1.0, 1.0))
    assert torch.equal(merged.weight, first.weight * 2)
    assert torch.equal(merged.bias, first.bias + second.bias)


def test_a_hypernetwork_patched_model1_merges_and_keeps_its_patch(tmp_path):
    """A hypernetwork's MLPs hang on the patched copy but are not weights (not in its state_dict): the models still
    merge, and the merged model keeps model1's patch, as ComfyUI's merge keeps model1's patches."""
    from ldm.hypernetwork import hypernetwork_copy, load_hypernetwork
    from tests.ldm.test_hypernetwork import write_hypernetwork

    config = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                        num_heads=4, context_dim=32)
    torch.manual_seed(0)
    plain, other = UNetModel(config).eval(), UNetModel(config).eval()
    write_hypernetwork(tmp_path / "net.pt", widths=(32, 64), layers=(1, 2, 1))
    patched = hypernetwork_copy(plain, load_hypernetwork(tmp_path / "net.pt"), strength=1.0)
    merged = weighted_merge(patched, other, 0.5)
    unpatched_merge = weighted_merge(plain, other, 0.5)
    assert merged.state_dict().keys() == plain.state_dict().keys()
    for key, value in unpatched_merge.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = hypernetwork_copy(unpatched_merge, load_hypernetwork(tmp_path / "net.pt"), 1.0)(x, t, context)
        assert torch.allclose(merged(x, t, context), expected, atol=1e-6)
        assert not torch.allclose(merged(x, t, context), unpatched_merge(x, t, context), atol=1e-4)
