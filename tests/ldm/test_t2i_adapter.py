"""T2I-Adapters against diffusers' T2IAdapter and UNet2DConditionModel on identical weights, files in TencentARC's
and diffusers' layouts, where the features go in the UNet (ComfyUI's places), and the Control that applies one."""

from __future__ import annotations

import dataclasses
import re

import pytest
import safetensors.torch
import torch

from ldm.checkpoint import CheckpointError
from ldm.controlnet import Control, ControlNet, _from_diffusers, load_controlnet
from ldm.presets import PRESETS, randomize_
from ldm.t2i_adapter import (
    AdapterConfig,
    T2IAdapter,
    T2IAdapterControl,
    adapter_config_for,
    add_residuals,
    save_t2i_adapter,
)
from ldm.unet import ControlResiduals, UNetModel, block_places, sdxl_adm
from tests.ldm.diffusers_reference import diffusers_unet, rel_err

# UNets with the released models' block layout (SD1.5: four levels, SDXL: three; two res blocks each) at tiny
# widths, so that the adapters' features land where ComfyUI and diffusers put them on the real ones.
UNETS = {
    "sd1": dataclasses.replace(PRESETS["tiny-sd1"][2], num_heads=8, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                               transformer_depth=(1, 1, 1, 0)),
    "sdxl": dataclasses.replace(PRESETS["tiny-sdxl"][2], model_channels=64, num_head_channels=64,
                                channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 1, 1),
                                transformer_depth_middle=1),
}

# diffusers' adapters: (adapter_type, channels as diffusers counts them, res blocks, hint channels, unshuffle)
KINDS = {
    "full": ("full_adapter", [32, 64, 128, 128], 2, 3, 8),
    "full_grey": ("full_adapter", [32, 64, 128, 128], 2, 1, 8),
    "light": ("light_adapter", [32, 64, 128], 4, 3, 8),
    "xl": ("full_adapter_xl", [64, 128, 256, 256], 2, 3, 16),
}


def _reference(kind: str, seed: int = 0):
    """A diffusers T2IAdapter with random weights, biases too (torch's default initialisation)."""
    from diffusers import T2IAdapter as DiffusersAdapter

    adapter_type, channels, res_blocks, hint_channels, unshuffle = KINDS[kind]
    torch.manual_seed(seed)
    return DiffusersAdapter(in_channels=hint_channels, channels=channels, num_res_blocks=res_blocks,
                            downscale_factor=unshuffle, adapter_type=adapter_type).eval()


def _tencentarc_names(state: dict[str, torch.Tensor], light: bool) -> dict[str, torch.Tensor]:
    """diffusers' names -> those of TencentARC's released files (ComfyUI's renaming of diffusers' files)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("adapter.")
        if light:
            key = re.sub(r"^body\.(\d+)\.resnets\.", r"body.\1.body.", key)
        else:
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", lambda m: f"body.{2 * int(m[1]) + int(m[2])}.", key)
            key = re.sub(r"^body\.(\d+)\.in_conv\.", lambda m: f"body.{2 * int(m[1])}.in_conv.", key)
        out[key] = value.contiguous()
    return out


def _save(state: dict[str, torch.Tensor], path):
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_features_match_diffusers_from_files_in_both_layouts(kind, tmp_path):
    reference = _reference(kind)
    _, _, _, hint_channels, unshuffle = KINDS[kind]
    diffusers_file = _save(reference.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    original = _tencentarc_names(reference.state_dict(), light=kind == "light")
    original_file = tmp_path / f"t2iadapter_{kind}_sd14v1.pth"
    torch.save(original, original_file)  # the sd14v1 releases are pickles

    hint = torch.rand(2, hint_channels, 128, 192, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(hint)
        outputs = []
        for path in (diffusers_file, original_file):
            loaded = load_controlnet(path)
            assert isinstance(loaded.model, T2IAdapter) and not loaded.unused_keys
            assert loaded.family == ("sdxl" if kind == "xl" else None)
            config = loaded.model.config
            assert (config.hint_channels, config.unshuffle, config.light) == (hint_channels, unshuffle, kind == "light")
            outputs.append(loaded.model(hint))
    assert len(outputs[0]) == len(expected) == 4
    for ours, theirs in zip(outputs[0], expected, strict=True):
        assert ours.shape == theirs.shape and rel_err(ours, theirs) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))


def test_comfyuis_places_for_the_features_on_the_released_models_unets():
    """ComfyUI pads the adapter's features with Nones into a list popped once per input block: SD1.5
    adapters' four after input blocks 2, 5, 8 and 11, SDXL adapters' after blocks 3, 5, 8 and the middle."""
    sd15, sdxl = PRESETS["sd15"][2], PRESETS["sdxl"][2]
    places = block_places(sd15)
    assert [places.index(p) for p in adapter_config_for(sd15).places] == [2, 5, 8, 11]
    assert adapter_config_for(sd15).channels == (320, 640, 1280, 1280)
    xl = adapter_config_for(sdxl, xl=True)
    assert xl.channels == (320, 640, 1280, 1280)
    assert [block_places(sdxl).index(p) for p in xl.places] == [3, 5, 8, 9]  # 9: after the 9 input blocks
    assert [xl.scale(level) for level in range(4)] == [2, 2, 4, 4]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_adapter_in_the_unet_matches_diffusers_down_intrablock_residuals(family, tmp_path):
    from diffusers import ControlNetModel

    config = UNETS[family]
    unet = randomize_(UNetModel(config), torch.Generator().manual_seed(0)).eval()
    reference_unet = diffusers_unet(config, unet.state_dict())
    kind = "xl" if family == "sdxl" else "full"
    reference = _reference(kind, seed=2)
    if kind == "full":  # fit the adapter to this UNet's widths: 32, 64, 128, 128 as diffusers built it
        assert adapter_config_for(config).channels == (32, 64, 128, 128)
    adapter = load_controlnet(_save(reference.state_dict(), tmp_path / "adapter.safetensors")).model
    assert adapter.unet_mismatch(config) is None

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    hint = torch.rand(1, 3, 128, 128, generator=g)  # one hint for the batch of two
    t = torch.tensor([20.0, 600.0])
    context = torch.randn(2, 7, config.context_dim, generator=g)
    y, extra = None, {}
    if config.adm_in_channels:
        pooled = torch.randn(2, config.adm_in_channels - 6 * 256, generator=g)
        y = sdxl_adm(pooled, width=1024, height=1024)
        extra["added_cond_kwargs"] = {"text_embeds": pooled,
                                      "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}
    control = T2IAdapterControl(adapter, hint, strength=0.7)
    with torch.no_grad():
        intrablock = [f * 0.7 for f in reference(hint)]
        ours = unet(x, t, context, y, control=control.residuals(x, 1.0, t, context, y))
        theirs = reference_unet(x, t, encoder_hidden_states=context, **extra,
                                down_intrablock_additional_residuals=[f.expand(2, -1, -1, -1) for f in intrablock]
                                ).sample
        assert rel_err(ours, theirs) < 1e-4
        assert rel_err(ours, unet(x, t, context, y)) > 1e-2  # the features do change the output
        if family == "sdxl":
            return
        # Chained after a ControlNet: its residuals go to the skips, the adapter's features to the blocks.
        reference_controlnet = ControlNetModel.from_unet(reference_unet).eval()
        for param in reference_controlnet.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)
        controlnet = ControlNet(config).eval()
        controlnet.load_state_dict(_from_diffusers(reference_controlnet.state_dict()))
        chained = T2IAdapterControl(adapter, hint, strength=0.7, previous=Control(controlnet, hint, strength=0.5))
        residuals = chained.residuals(x, 1.0, t, context, y)
        assert isinstance(residuals, ControlResiduals) and residuals.skips is not None
        down, mid = reference_controlnet(x, t, encoder_hidden_states=context, conditioning_scale=0.5,
                                         controlnet_cond=hint.expand(2, -1, -1, -1), return_dict=False)
        both = reference_unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid,
                              down_intrablock_additional_residuals=[f.expand(2, -1, -1, -1) for f in intrablock]).sample
        assert rel_err(unet(x, t, context, y, control=residuals), both) < 1e-4


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_odd_latent_sizes_give_features_the_size_of_their_blocks(family):
    config = UNETS[family]
    unet = randomize_(UNetModel(config), torch.Generator().manual_seed(0)).eval()
    adapter = T2IAdapter(adapter_config_for(config, xl=family == "sdxl")).eval()
    x = torch.randn(1, 4, 9, 13)
    sizes = {}
    for index, block in enumerate(unet.input_blocks):  # record each block's output size
        block.register_forward_hook(lambda _m, _i, out, index=index: sizes.__setitem__(index, out.shape[1:]))
    unet.middle_block.register_forward_hook(lambda _m, _i, out: sizes.__setitem__(len(unet.input_blocks),
                                                                                  out.shape[1:]))
    t, context = torch.tensor([500.0]), torch.randn(1, 7, config.context_dim)
    y = sdxl_adm(torch.randn(1, config.adm_in_channels - 6 * 256), 104, 72) if config.adm_in_channels else None
    with torch.no_grad():
        residuals = T2IAdapterControl(adapter, torch.rand(1, 3, 72, 104)).residuals(x, 1.0, t, context, y)
        unet(x, t, context, y, control=residuals)
    places = block_places(config)
    for place, feature in residuals.features.items():
        assert feature.shape[1:] == sizes[places.index(place)], place
    if family == "sdxl":  # the hint was rounded up to whole 16-pixel cells: 80 x 112
        assert residuals.features["down0"].shape[-2:] == (5, 7)


def test_average_pooling_pads_an_odd_side_at_both_ends_counting_the_zeros():
    down = T2IAdapter(AdapterConfig((32, 32), num_res_blocks=1)).body[1].down_opt
    x = torch.ones(1, 32, 3, 4)
    out = down(x)
    assert out.shape[-2:] == (2, 2)
    # Rows: a zero row above, so the first output row averages one real row of two; columns: no padding.
    assert torch.allclose(out[0, 0], torch.tensor([[0.5, 0.5], [1.0, 1.0]]))


class _Counting(T2IAdapter):
    def __init__(self, config):
        super().__init__(config)
        self.hints = []

    def forward(self, hint):
        self.hints.append(hint)
        return super().forward(hint)


def test_the_adapter_runs_once_per_run_and_its_features_scale_with_strength_within_the_range():
    adapter = _Counting(AdapterConfig((32, 64), hint_channels=1)).eval()
    hints = torch.stack([torch.full((3, 32, 32), v) for v in (0.2, 0.8)]) * torch.tensor([1.0, 0.5, 0.0])[:, None, None]
    control = T2IAdapterControl(adapter, hints, strength=0.5, sigma_range=(10.0, 1.0))
    x, context = torch.zeros(6, 4, 4, 4), torch.zeros(6, 7, 8)
    with torch.no_grad():
        first = control.residuals(x, 5.0, torch.zeros(6), context, None, repeats=2)
        second = control.residuals(x, 2.0, torch.zeros(6), context, None, repeats=2)
        assert control.residuals(x, 12.0, torch.zeros(6), context, None, repeats=2) is None  # out of range
    assert len(adapter.hints) == 1  # one run of the adapter for every step
    [grey] = adapter.hints
    assert grey.shape == (2, 1, 32, 32)  # the canny adapter's grey hint: the mean of the channels
    assert torch.allclose(grey[:, 0, 0, 0], torch.tensor([0.2, 0.8]) * 0.5)
    assert all(torch.equal(first.features[p], second.features[p]) for p in first.features)
    full = adapter(grey)
    level0 = first.features["level0"]
    assert level0.shape == (6, 32, 4, 4)
    # The three latents of each copy cycle over the two hints; strength 0.5 scales them.
    for row, hint_index in enumerate([0, 1, 0, 0, 1, 0]):
        torch.testing.assert_close(level0[row], full[0][hint_index] * 0.5)
    control.release()
    assert control._hints == {}


def test_a_chain_with_an_adapter_sums_the_controlnets_residuals_and_the_adapters_features():
    a = ControlResiduals(features={"level0": torch.ones(1)})
    b = ControlResiduals(skips=[torch.ones(1)], features={"level0": torch.ones(1), "level1": torch.ones(1)})
    total = add_residuals(add_residuals(add_residuals(None, [torch.ones(1)]), a), b)
    assert [s.item() for s in total.skips] == [2.0]
    assert {p: f.item() for p, f in total.features.items()} == {"level0": 2.0, "level1": 1.0}
    assert add_residuals([torch.ones(1)], [torch.ones(1)])[0].item() == 2.0  # ControlNets alone: a list still


def test_which_unets_an_adapter_fits():
    sd15, sdxl, tiny = PRESETS["sd15"][2], PRESETS["sdxl"][2], PRESETS["tiny-sd1"][2]
    assert _mismatch(adapter_config_for(tiny), tiny) is None
    assert "level 0 features (32 channels at 1/1" in _mismatch(adapter_config_for(tiny),
                                                                dataclasses.replace(tiny, model_channels=64))
    # An SD1.5 adapter's first three levels fit SDXL's blocks, and the fourth has none: ComfyUI runs it so.
    assert _mismatch(adapter_config_for(sd15), sdxl) is None
    # An SDXL adapter's last features are at 1/4 of the latent's size, and SD1.5's middle block at 1/8.
    assert "level 3 features (1280 channels at 1/4" in _mismatch(adapter_config_for(sdxl, xl=True), sd15)


def _mismatch(config: AdapterConfig, unet) -> str | None:
    with torch.device("meta"):
        return T2IAdapter(config).unet_mismatch(unet)


def test_files_that_are_not_adapters_this_engine_runs_say_what_they_are(tmp_path):
    style = _save({"style_embedding": torch.zeros(1, 8, 4), "proj": torch.zeros(4, 4)}, tmp_path / "style.safetensors")
    with pytest.raises(CheckpointError, match="style.safetensors: a T2I-Adapter style model"):
        load_controlnet(style)
    partial = _save({"body.0.block1.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="partial.safetensors: not a T2I-Adapter that this engine knows"):
        load_controlnet(partial)
    state = T2IAdapter(AdapterConfig((32, 64))).state_dict()
    del state["body.3.block2.bias"]
    with pytest.raises(CheckpointError, match="missing 1 weights: body.3.block2.bias"):
        load_controlnet(_save(state, tmp_path / "truncated.safetensors"))


def test_a_saved_adapter_loads_back_with_unknown_keys_reported(tmp_path):
    model = T2IAdapter(AdapterConfig((32, 64), hint_channels=1, num_res_blocks=3, kernel_size=3,
                                     conv_downsample=True))
    path = save_t2i_adapter(tmp_path / "a.safetensors", model)
    loaded = load_controlnet(path)
    assert loaded.model.config == model.config and not loaded.unused_keys
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values(),
                                                strict=True))
    released = T2IAdapter(AdapterConfig((32, 64))).state_dict()  # two res blocks per level, no metadata
    _save({**released, "extra.weight": torch.zeros(1)}, tmp_path / "b.safetensors")
    assert load_controlnet(tmp_path / "b.safetensors").unused_keys == ["extra.weight"]


def test_an_adapter_given_to_another_loader_is_named_with_where_it_goes():
    from ldm.parts import look_of

    for light in (False, True):
        state = T2IAdapter(AdapterConfig((32, 64), light=light)).state_dict()
        for keys in (state, {f"adapter.{k}" for k in state}):  # roughly diffusers' names: the prefix is what counts
            look = look_of(keys)
            assert look.what == "a T2I-Adapter" and "models/controlnet" in look.advice
