"""XLabs' Flux ControlNets (x-flux's canny/depth/hed v3 layout): a pixel-space hint encoder, and residuals that go
to the model's double-stream blocks in turn (block i gets residual i mod n). diffusers has no XLabs ControlNet, but
its FluxControlNetModel is the same computation once the hint is encoded (`controlnet_x_embedder` is XLabs'
`pos_embed_input`), and its transformer takes XLabs' distribution (`controlnet_blocks_repeat`): the hint encoder
is written out here from x-flux's definition, the rest is diffusers'."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import FluxControlNetModel, FluxPipeline

from ldm.checkpoint import CheckpointError
from ldm.controlnet import load_controlnet
from ldm.controlnet_flux import FluxControl, from_diffusers
from ldm.controlnet_flux_xlabs import XLabsControlNet, repeat
from ldm.sampling.flow import FlowSchedule
from tests.ldm.flux_reference import TINY, diffusers_twin, random_flux
from tests.ldm.test_controlnet_flux import pack

STRIDES = {0: 1, 2: 1, 4: 2, 6: 1, 8: 2, 10: 1, 12: 2, 14: 1}  # x-flux's input_hint_block: convs at even indices


def xlabs_pair(seed: int = 0) -> tuple[FluxControlNetModel, dict[str, torch.Tensor]]:
    """diffusers' ControlNet (2 double blocks, no single ones) and an XLabs file with the same weights: its blocks
    and embedders in BFL's names, `pos_embed_input` and a random 16-channel hint encoder."""
    reference = FluxControlNetModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=0,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TINY.context_dim,
                                    pooled_projection_dim=TINY.vec_in_dim, guidance_embeds=True,
                                    axes_dims_rope=TINY.axes_dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            scale = 0.05 if param.ndim == 1 else param[0].numel() ** -0.5
            param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator) if "norm" in name
                        else scale * torch.randn(param.shape, generator=generator))
    sd = from_diffusers(dict(reference.state_dict()))
    sd["pos_embed_input.weight"] = sd.pop("controlnet_x_embedder.weight")
    sd["pos_embed_input.bias"] = sd.pop("controlnet_x_embedder.bias")
    for index in STRIDES:
        channels = 3 if index == 0 else 16
        sd[f"input_hint_block.{index}.weight"] = torch.randn(16, channels, 3, 3, generator=generator) * (
            channels * 9) ** -0.5
        sd[f"input_hint_block.{index}.bias"] = 0.05 * torch.randn(16, generator=generator)
    return reference.eval(), {k: v.contiguous() for k, v in sd.items()}


def encode_hint(sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """x-flux's input_hint_block on a picture in 0..1 (the pipeline feeds it in -1..1): conv, SiLU, ..., conv."""
    h = pixels * 2 - 1
    for index, stride in STRIDES.items():
        h = F.conv2d(h, sd[f"input_hint_block.{index}.weight"], sd[f"input_hint_block.{index}.bias"], stride=stride,
                     padding=1)
        h = h if index == 14 else F.silu(h)
    return h


def test_xlabs_residuals_and_their_distribution_match_diffusers(tmp_path):
    reference, sd = xlabs_pair(seed=1)
    for key in ("double_blocks.1.img_attn.qkv.weight", "controlnet_blocks.1.weight", "guidance_in.in_layer.weight",
                "pos_embed_input.weight", "input_hint_block.14.bias", "img_in.weight", "vector_in.out_layer.bias"):
        assert key in sd  # x-flux's names
    safetensors.torch.save_file(sd, tmp_path / "flux-canny-controlnet-v3.safetensors")
    loaded = load_controlnet(tmp_path / "flux-canny-controlnet-v3.safetensors")
    assert isinstance(loaded.model, XLabsControlNet) and loaded.family == "flux" and loaded.unused_keys == []
    # A model with 4 double blocks: XLabs' 2 residuals go to blocks 0, 1, 0, 1 (not 0, 0, 1, 1).
    model = random_flux(dataclasses.replace(TINY, depth=4), seed=3)
    control = FluxControl(loaded.model, torch.zeros(1, 3, 48, 64), percent_range=(0.0, 1.0))
    assert control.fit(model, FlowSchedule(1.0)) is None  # the model's RoPE split and block counts
    assert loaded.model.config.axes_dim == TINY.axes_dim and loaded.model.model_blocks == (4, 2)

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 6, 8, generator=generator)
    pixels = torch.rand(2, 3, 48, 64, generator=generator)
    context = torch.randn(2, 5, TINY.context_dim, generator=generator)
    pooled = torch.randn(2, TINY.vec_in_dim, generator=generator)
    sigma, guidance = torch.tensor([0.8, 0.4]), torch.tensor([3.5, 2.0])
    y = torch.cat([pooled, guidance[:, None]], dim=1)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    with torch.no_grad():
        doubles, _ = reference(hidden_states=pack(x), controlnet_cond=pack(encode_hint(sd, pixels)),
                               encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
                               guidance=guidance, img_ids=ids, txt_ids=torch.zeros(5, 3), return_dict=False)
        ours = loaded.model(x, pixels, sigma, context, y, blocks=(2, 0))
    assert len(ours) == 2
    for mine, theirs in zip(ours, doubles, strict=True):
        assert theirs.abs().mean() > 0.05
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)

    transformer = diffusers_twin(model)
    with torch.no_grad():
        residuals = loaded.model(x, pixels, sigma, context, y)
        guided = model(x, sigma, context, y, control=residuals)
        plain = model(x, sigma, context, y)
        expected, consecutive = (FluxPipeline._unpack_latents(transformer(
            hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
            guidance=guidance, img_ids=ids, txt_ids=torch.zeros(5, 3), controlnet_block_samples=list(doubles),
            controlnet_blocks_repeat=rule, return_dict=False)[0], 48, 64, 8) for rule in (True, False))
    assert len(residuals) == 6 and not residuals[4].any() and not residuals[5].any()  # no single-block residuals
    assert (guided - plain).abs().mean() > 1e-2
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)
    assert (guided - consecutive).abs().max() > 1e-3  # the rule matters: InstantX's spread would be caught


def test_repeat_cycles_the_residuals():
    a, b, c = (torch.full((1,), float(i)) for i in range(3))
    assert [float(t) for t in repeat([a, b], 5)] == [0, 1, 0, 1, 0]
    assert [float(t) for t in repeat([a, b, c], 19)][-4:] == [0, 1, 2, 0] and repeat([], 3) == []


def test_incomplete_xlabs_files_are_named(tmp_path):
    _, sd = xlabs_pair()
    cut = {k: v for k, v in sd.items() if not k.startswith("input_hint_block.12.")}
    safetensors.torch.save_file(cut, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match=r"cut.safetensors: an XLabs Flux ControlNet whose hint encoder has "
                                              r"convolutions \[0, 2, 4, 6, 8, 10, 14\]"):
        load_controlnet(tmp_path / "cut.safetensors")
    safetensors.torch.save_file({k: v for k, v in sd.items() if not k.startswith("input_hint_block.")},
                                tmp_path / "mistoline.safetensors")
    with pytest.raises(CheckpointError, match="mistoline.safetensors: an XLabs-layout Flux ControlNet without the"):
        load_controlnet(tmp_path / "mistoline.safetensors")
    safetensors.torch.save_file({k: v for k, v in sd.items() if k != "pos_embed_input.bias"},
                                tmp_path / "nobias.safetensors")
    with pytest.raises(CheckpointError, match="nobias.safetensors: the XLabs Flux ControlNet is missing 1 weights"):
        load_controlnet(tmp_path / "nobias.safetensors")
