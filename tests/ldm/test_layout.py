"""Channels-last UNets (ldm/layout.py): the same numbers as NCHW, and the layout kept from the first
convolution to the last. The engine uses it on CUDA only; these checks run on the CPU, where PyTorch's
convolutions and the layout rules are the same."""

import pytest
import torch
import torch.nn.functional as F

from ldm.layout import GroupNorm, is_channels_last, use_channels_last, use_nchw
from ldm.lora import shallow_copy
from ldm.presets import PRESETS, randomize_
from ldm.unet import UNetModel, sdxl_adm

CL = torch.channels_last


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_group_norm_keeps_channels_last_and_matches_pytorch(dtype, atol):
    generator = torch.Generator().manual_seed(0)
    norm = GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=generator))
        norm.bias.copy_(torch.randn(16, generator=generator))
    norm = norm.to(dtype)
    # An offset mean per channel, as activations have: the folded multiply-add must not lose it.
    x = (torch.randn(2, 16, 6, 5, generator=generator) * 3 + torch.arange(16.0)[:, None, None]).to(dtype)
    expected = F.group_norm(x.float(), 4, norm.weight.float(), norm.bias.float(), 1e-6)
    out = norm(x.contiguous(memory_format=CL))
    assert is_channels_last(out) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=atol)
    assert torch.equal(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, 1e-6))  # NCHW: PyTorch's own


def test_is_channels_last_needs_the_layout_and_not_plain_contiguity():
    x = torch.zeros(1, 8, 4, 4)
    assert not is_channels_last(x)
    assert is_channels_last(x.contiguous(memory_format=CL))
    assert not is_channels_last(torch.zeros(1, 8, 1, 1).contiguous(memory_format=CL))  # both at once
    assert not is_channels_last(torch.zeros(8, 4))


def unet_and_inputs(preset: str) -> tuple[UNetModel, tuple]:
    generator = torch.Generator().manual_seed(0)
    _, _, config, _ = PRESETS[preset]
    unet = randomize_(UNetModel(config), generator).eval()
    x = torch.randn(2, 4, 16, 12, generator=generator)
    context = torch.randn(2, 7, config.context_dim, generator=generator)
    y = None if config.adm_in_channels is None else sdxl_adm(
        torch.randn(2, config.adm_in_channels - 6 * 256, generator=generator), 96, 128)
    return unet, (x, torch.tensor([10.0, 900.0]), context, y)


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_a_channels_last_unet_gives_the_same_output_and_keeps_the_layout_throughout(preset):
    unet, (x, t, context, y) = unet_and_inputs(preset)
    with torch.no_grad():
        expected = unet(x, t, context, y=y)
        use_channels_last(unet)
        layouts = []
        hooks = [block.register_forward_hook(lambda _m, _i, out: layouts.append(is_channels_last(out)))
                 for block in [*unet.input_blocks[1:], unet.middle_block, *unet.output_blocks]]
        out = unet(x, t, context, y=y)
    for hook in hooks:
        hook.remove()
    assert layouts and all(layouts), layouts  # no block hands the next an NCHW tensor to convert again
    assert out.is_contiguous() and out.dtype == x.dtype  # the sampler gets plain latents back
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_use_channels_last_converts_weights_shared_with_a_lora_copy_once():
    unet, _ = unet_and_inputs("tiny-sd1")
    copy = shallow_copy(unet)
    conv = unet.input_blocks[0][0].weight
    use_channels_last(copy)
    assert conv.is_contiguous(memory_format=CL)  # the same parameter object, converted in place
    assert copy.input_blocks[0][0].weight is conv
    pointers = [p.data_ptr() for p in unet.parameters()]
    use_channels_last(unet)  # already converted: nothing moves, so captured CUDA graphs stay valid
    assert [p.data_ptr() for p in unet.parameters()] == pointers
    linear = unet.time_embed[0].weight
    assert linear.dim() == 2 and linear.is_contiguous()


def test_a_channels_last_unet_runs_in_bfloat16():
    unet, (x, t, context, y) = unet_and_inputs("tiny-sdxl")
    unet = unet.to(torch.bfloat16)
    with torch.no_grad():
        expected = unet(x, t, context, y=y)
        out = use_channels_last(unet)(x, t, context, y=y)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - expected).abs().max() < 0.1 * expected.abs().max()


def test_use_nchw_undoes_channels_last_and_leaves_an_nchw_module_alone():
    unet, (x, t, context, y) = unet_and_inputs("tiny-sd1")
    with torch.no_grad():
        expected = unet(x, t, context, y=y)
        pointers = [p.data_ptr() for p in unet.parameters()]
        use_nchw(unet)  # never converted: nothing moves
        assert [p.data_ptr() for p in unet.parameters()] == pointers
        use_nchw(use_channels_last(unet))
        assert all(p.is_contiguous() for p in unet.parameters())
        torch.testing.assert_close(unet(x, t, context, y=y), expected, rtol=0, atol=0)


def test_group_norm_statistics_do_not_overflow_in_fp16():
    # fp16 ends at 65504: the variance of a group with a standard deviation of 300 would not fit.
    x = (torch.randn(1, 64, 8, 8, generator=torch.Generator().manual_seed(0)) * 300).half()
    norm = GroupNorm(32, 64).half()
    out = norm(x.contiguous(memory_format=CL))
    expected = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=1e-2)
