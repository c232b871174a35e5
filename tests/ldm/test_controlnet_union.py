"""ControlNet Union against diffusers' ControlNetUnionModel on identical weights, read from a diffusers-layout
file through `load_controlnet`: every control type, auto, types the file does not have, and plain ControlNets
left as they were."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch

from ldm.checkpoint import CheckpointError
from ldm.controlnet import Control, ControlNet, load_controlnet
from ldm.controlnet_union import CONTROL_TYPES, UnionControlNet
from ldm.presets import PRESETS, make_controlnet, randomize_
from ldm.unet import UNetModel, sdxl_adm
from tests.ldm.diffusers_reference import diffusers_unet, rel_err

# SDXL's standard head layout (what a diffusers file is read with) at a tiny width.
CONFIG = dataclasses.replace(PRESETS["tiny-sdxl"][2], model_channels=64, num_head_channels=64)


def _randomize_all_(module: torch.nn.Module, seed: int) -> None:
    """Every weight random, zero convolutions and union parts too (diffusers initialises those to zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 0.3 if param.ndim == 1 else min(0.2, param[0].numel() ** -0.5)
            unit = "norm" in name or ".ln_" in name
            param.copy_(torch.randn(param.shape, generator=generator) * scale
                        + (1.0 if unit and name.endswith("weight") else 0.0))
        module.task_embedding.mul_(5.0)  # as large as the averaged hint features, as in the released files


def _reference(types: int, seed: int):
    """A diffusers ControlNetUnionModel for CONFIG with `types` control types and its condition transformer as
    wide as the hint features (320 in the released files, 64 here), random weights."""
    from diffusers import ControlNetUnionModel

    unet = diffusers_unet(CONFIG, randomize_(UNetModel(CONFIG), torch.Generator().manual_seed(0)).state_dict())
    base = ControlNetUnionModel.from_unet(unet, load_weights_from_unet=False)
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    config.update(num_control_type=types, num_trans_channel=CONFIG.model_channels,
                  num_proj_channel=CONFIG.model_channels)
    reference = ControlNetUnionModel(**config).eval()
    _randomize_all_(reference, seed)
    return reference


def _save(reference, path):
    safetensors.torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    return path


def _inputs(batch: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, size, size, generator=g)
    hint = torch.rand(batch, 3, size * 8, size * 8, generator=g)
    t = torch.tensor([20.0, 600.0][:batch])
    context = torch.randn(batch, 7, CONFIG.context_dim, generator=g)
    pooled = torch.randn(batch, CONFIG.adm_in_channels - 6 * 256, generator=g)
    y = sdxl_adm(pooled, width=1024, height=768, crop_w=16, crop_h=32)
    time_ids = torch.tensor([[768, 1024, 32, 16, 768, 1024]] * batch, dtype=torch.float32)
    return x, hint, t, context, y, {"text_embeds": pooled, "time_ids": time_ids}


def _diffusers_residuals(reference, inputs, control_type: int | None) -> list[torch.Tensor]:
    """diffusers' residuals, one sample at a time (its condition transformer attends across the batch), with
    `control_type` as its one-hot vector (all zeros for None) and that type's task embedding (the first's
    for None: callers make it irrelevant)."""
    x, hint, t, context, _, added = inputs
    rows = []
    for b in range(x.shape[0]):
        one_hot = torch.zeros(1, reference.config.num_control_type)
        if control_type is not None:
            one_hot[0, control_type] = 1.0
        down, mid = reference(x[b:b + 1], t[b:b + 1], encoder_hidden_states=context[b:b + 1],
                              controlnet_cond=[hint[b:b + 1]], control_type=one_hot,
                              control_type_idx=[control_type or 0], return_dict=False,
                              added_cond_kwargs={k: v[b:b + 1] for k, v in added.items()})
        rows.append([*down, mid])
    return [torch.cat(parts) for parts in zip(*rows, strict=True)]


@pytest.fixture(scope="module")
def promax(tmp_path_factory):
    """(the diffusers model, the same weights loaded from a diffusers-layout file): eight types, like promax."""
    reference = _reference(types=8, seed=1)
    path = _save(reference, tmp_path_factory.mktemp("union") / "diffusion_pytorch_model_promax.safetensors")
    return reference, load_controlnet(path)


def test_a_union_file_loads_as_a_union_controlnet_with_every_key_used(promax):
    _, loaded = promax
    assert isinstance(loaded.model, UnionControlNet) and loaded.model.types == 8
    assert loaded.family == "sdxl" and loaded.model.config == CONFIG and not loaded.unused_keys


@pytest.mark.parametrize("control_type", [0, 3, 6, 7])  # openpose, canny, and promax's tile and repaint
def test_each_control_type_matches_diffusers(promax, control_type):
    reference, loaded = promax
    inputs = _inputs()
    x, hint, t, context, y, _ = inputs
    with torch.no_grad():
        ours = loaded.model(x, hint, t, context, y=y, control_type=control_type)
        expected = _diffusers_residuals(reference, inputs, control_type)
        assert len(ours) == len(expected)
        for a, b in zip(ours, expected, strict=True):
            assert rel_err(a, b) < 1e-5
        # Each type is its own: another type, or none, changes the residuals.
        other = loaded.model(x, hint, t, context, y=y, control_type=(control_type + 1) % 8)
        auto = loaded.model(x, hint, t, context, y=y)
        assert rel_err(other[0], ours[0]) > 1e-2 and rel_err(auto[0], ours[0]) > 1e-2


def test_auto_adds_the_hint_features_as_they_are_with_the_all_zero_type_embedding(promax):
    """ComfyUI's "auto": no task embedding and no transformer offset; diffusers gives the same when its
    offset projection is zero and its one-hot vector is all zeros."""
    reference, loaded = promax
    no_offset = _reference(types=8, seed=1)
    with torch.no_grad():
        no_offset.spatial_ch_projs.weight.zero_()
        no_offset.spatial_ch_projs.bias.zero_()
        inputs = _inputs()
        x, hint, t, context, y, _ = inputs
        ours = loaded.model(x, hint, t, context, y=y, control_type=None)
        for a, b in zip(ours, _diffusers_residuals(no_offset, inputs, None), strict=True):
            assert rel_err(a, b) < 1e-5


def test_a_sample_gets_the_same_residuals_whatever_shares_its_batch(promax):
    _, loaded = promax
    x, hint, t, context, y, _ = _inputs()
    with torch.no_grad():
        both = loaded.model(x, hint, t, context, y=y, control_type=2)
        alone = loaded.model(x[1:], hint[1:], t[1:], context[1:], y=y[1:], control_type=2)
    for a, b in zip(both, alone, strict=True):
        assert rel_err(a[1:], b) < 1e-5


def test_the_first_release_has_six_types_and_refuses_tile_and_repaint(tmp_path):
    reference = _reference(types=6, seed=4)
    loaded = load_controlnet(_save(reference, tmp_path / "diffusion_pytorch_model.safetensors"))
    assert loaded.model.types == 6 and not loaded.unused_keys
    inputs = _inputs(batch=1)
    x, hint, t, context, y, _ = inputs
    with torch.no_grad():
        ours = loaded.model(x, hint, t, context, y=y, control_type=5)
        for a, b in zip(ours, _diffusers_residuals(reference, inputs, 5), strict=True):
            assert rel_err(a, b) < 1e-5
        for control_type, name in ((6, "tile"), (7, "repaint")):
            with pytest.raises(ValueError, match=f"control type '{name}' needs a ControlNet Union with at least "
                                                 f"{control_type + 1} control types .* this one has 6"):
                loaded.model(x, hint, t, context, y=y, control_type=control_type)
        with pytest.raises(ValueError, match="control type '-1'"):
            loaded.model(x, hint, t, context, y=y, control_type=-1)


def test_a_control_passes_its_control_type_and_controls_share_the_model(promax):
    _, loaded = promax
    x, hint, t, context, y, _ = _inputs()
    with torch.no_grad():
        depth = Control(loaded.model, hint, model_kwargs={"control_type": 1}).residuals(x, 1.0, t, context, y)
        auto = Control(loaded.model, hint).residuals(x, 1.0, t, context, y)
        direct = loaded.model(x, hint, t, context, y=y, control_type=1)
    assert all(torch.equal(a, b) for a, b in zip(depth, direct, strict=True))
    assert rel_err(auto[0], depth[0]) > 1e-2


def test_a_union_whose_types_are_not_as_wide_as_its_hint_features_is_refused(tmp_path):
    reference = _reference(types=6, seed=5)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    state["task_embedding"] = torch.zeros(6, 32)
    safetensors.torch.save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="odd.safetensors: a ControlNet Union whose control types are 32 wide"):
        load_controlnet(tmp_path / "odd.safetensors")


def test_plain_controlnets_load_and_run_as_before(tmp_path):
    from diffusers import ControlNetModel

    loaded = load_controlnet(make_controlnet("tiny-sdxl", tmp_path / "plain.safetensors"))
    assert type(loaded.model) is ControlNet and not loaded.unused_keys
    # A diffusers-layout SDXL ControlNet is still a ControlNet and still matches diffusers' own.
    unet = diffusers_unet(CONFIG, UNetModel(CONFIG).state_dict())
    reference = ControlNetModel.from_unet(unet).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.05)
    loaded = load_controlnet(_save(reference, tmp_path / "diffusion_pytorch_model.safetensors"))
    assert type(loaded.model) is ControlNet and not loaded.unused_keys
    x, hint, t, context, y, added = _inputs()
    with torch.no_grad():
        ours = Control(loaded.model, hint).residuals(x, 1.0, t, context, y)
        down, mid = reference(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False,
                              added_cond_kwargs=added)
    for a, b in zip(ours, [*down, mid], strict=True):
        assert rel_err(a, b) < 1e-4


def test_the_control_types_are_comfyuis():
    assert CONTROL_TYPES == ("openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd",
                             "normal", "segment", "tile", "repaint")
