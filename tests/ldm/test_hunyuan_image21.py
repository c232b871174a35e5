"""The HunyuanImage 2.1 transformer (ldm.hunyuan_image21) against diffusers' HunyuanImageTransformer2DModel with the
same weights: the files' layout is renamed to diffusers' here (`to_diffusers`, after diffusers'
scripts/convert_hunyuan_image_to_diffusers.py: fused q/k/v and `linear1` split apart, the output modulation's halves
swapped), float32 throughout. The refiner is the same diffusers class with a 3-D patch (as that script builds it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import HunyuanImageTransformer2DModel
from diffusers.models.transformers.transformer_hunyuanimage import HunyuanImageByT5TextProjection

from ldm.hunyuan_image21 import (
    HUNYUAN_IMAGE21,
    HUNYUAN_IMAGE21_DISTILLED,
    HUNYUAN_IMAGE21_REFINER,
    HunyuanImage21,
    HunyuanImage21Config,
    config_from_state_dict,
    convert_state_dict,
    is_hunyuan_image21,
    refiner_tiny_config,
    tiny_config,
    tiny_state_dict,
)
from ldm.hunyuan_video15 import tiny_state_dict as hv15_tiny_state_dict
from ldm.ltx2 import LTX2Model
from ldm.ltx2 import tiny_config as ltx2_tiny
from ldm.wan import WanConfig, WanModel

TOL = 1e-5
B, FRAMES, ROWS, COLS = 2, 2, 4, 6
TEXT_LEN, BYT5_LEN = 7, 5

_TOP = {"time_in.mlp.0.": "time_guidance_embed.timestep_embedder.linear_1.",
        "time_in.mlp.2.": "time_guidance_embed.timestep_embedder.linear_2.",
        "time_r_in.mlp.0.": "time_guidance_embed.timestep_embedder_r.linear_1.",
        "time_r_in.mlp.2.": "time_guidance_embed.timestep_embedder_r.linear_2.",
        "guidance_in.mlp.0.": "time_guidance_embed.guidance_embedder.linear_1.",
        "guidance_in.mlp.2.": "time_guidance_embed.guidance_embedder.linear_2.",
        "txt_in.t_embedder.mlp.0.": "context_embedder.time_text_embed.timestep_embedder.linear_1.",
        "txt_in.t_embedder.mlp.2.": "context_embedder.time_text_embed.timestep_embedder.linear_2.",
        "txt_in.c_embedder.": "context_embedder.time_text_embed.text_embedder.",
        "txt_in.input_embedder.": "context_embedder.proj_in.",
        "byt5_in.layernorm.": "context_embedder_2.norm.", "byt5_in.fc1.": "context_embedder_2.linear_1.",
        "byt5_in.fc2.": "context_embedder_2.linear_2.", "byt5_in.fc3.": "context_embedder_2.linear_3.",
        "img_in.proj.": "x_embedder.proj.", "final_layer.linear.": "proj_out."}
_BLOCK = {"img_mod.linear.": "norm1.linear.", "txt_mod.linear.": "norm1_context.linear.",
          "img_attn_q_norm.": "attn.norm_q.", "img_attn_k_norm.": "attn.norm_k.",
          "txt_attn_q_norm.": "attn.norm_added_q.", "txt_attn_k_norm.": "attn.norm_added_k.",
          "img_attn_proj.": "attn.to_out.0.", "txt_attn_proj.": "attn.to_add_out.",
          "img_mlp.fc1.": "ff.net.0.proj.", "img_mlp.fc2.": "ff.net.2.",
          "txt_mlp.fc1.": "ff_context.net.0.proj.", "txt_mlp.fc2.": "ff_context.net.2.",
          "img_attn_qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
          "txt_attn_qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj.")}
_SINGLE = {"modulation.linear.": "norm.linear.", "q_norm.": "attn.norm_q.", "k_norm.": "attn.norm_k.",
           "linear2.": "proj_out.", "linear1.": ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp.")}
_REFINER = {"norm1.": "norm1.", "norm2.": "norm2.", "self_attn_proj.": "attn.to_out.0.", "mlp.fc1.": "ff.net.0.proj.",
            "mlp.fc2.": "ff.net.2.", "adaLN_modulation.1.": "norm_out.linear.",
            "self_attn_qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v.")}


def _rename(rest: str, table: dict, value: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    for old, new in table.items():
        if rest.startswith(old):
            leaf = rest[len(old):]
            if isinstance(new, tuple):  # q, k, v (each `hidden` rows), then the single blocks' MLP input
                pieces = value.split([hidden, hidden, hidden, value.shape[0] - 3 * hidden][:len(new)])
                return {n + leaf: part for n, part in zip(new, pieces, strict=True)}
            return {new + leaf: value}
    raise KeyError(rest)


def to_diffusers(sd: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """The files' layout -> diffusers' (the conversion script's mapping)."""
    out = {}
    for key, value in sd.items():
        if key.startswith(("double_blocks.", "single_blocks.")):
            kind, index, rest = key.split(".", 2)
            table, name = (_BLOCK, "transformer_blocks") if kind == "double_blocks" else (
                _SINGLE, "single_transformer_blocks")
            out.update({f"{name}.{index}.{k}": v for k, v in _rename(rest, table, value, hidden).items()})
        elif key.startswith("txt_in.individual_token_refiner.blocks."):
            index, rest = key[len("txt_in.individual_token_refiner.blocks."):].split(".", 1)
            prefix = f"context_embedder.token_refiner.refiner_blocks.{index}."
            out.update({prefix + k: v for k, v in _rename(rest, _REFINER, value, hidden).items()})
        elif key.startswith("final_layer.adaLN_modulation.1."):
            shift, scale = value.chunk(2)
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift])
        else:
            out.update(_rename(key, _TOP, value, hidden))
    return out


def twin(config: HunyuanImage21Config, sd: dict[str, torch.Tensor]) -> HunyuanImageTransformer2DModel:
    c = config
    model = HunyuanImageTransformer2DModel(
        in_channels=c.in_channels, out_channels=c.out_channels, num_attention_heads=c.num_heads,
        attention_head_dim=c.head_dim, num_layers=c.depth, num_single_layers=c.depth_single,
        num_refiner_layers=c.refiner_depth, mlp_ratio=c.mlp_ratio, patch_size=c.patch_size,
        guidance_embeds=c.guidance_embed, text_embed_dim=c.text_dim, text_embed_2_dim=c.byt5_dim,
        rope_theta=float(c.rope_theta), rope_axes_dim=c.rope_axes, use_meanflow=c.meanflow)
    if c.byt5_dim is not None and c.byt5_hidden != 2048:  # diffusers fixes the byT5 projection's width at 2048
        model.context_embedder_2 = HunyuanImageByT5TextProjection(c.byt5_dim, c.byt5_hidden, c.hidden_size)
    model.load_state_dict(to_diffusers(sd, c.hidden_size), strict=True)
    return model.eval()


def loom(config: HunyuanImage21Config, sd: dict[str, torch.Tensor]) -> HunyuanImage21:
    model = HunyuanImage21(config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[HunyuanImage21, HunyuanImageTransformer2DModel]:
    config = tiny_config()
    sd = tiny_state_dict(seed=1, config=config)
    return loom(config, sd), twin(config, sd)


def _inputs(config: HunyuanImage21Config, seed: int = 0, frames: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(B, TEXT_LEN, dtype=torch.bool)
    text_mask[1, 4:] = False
    byt5_mask = torch.zeros(B, BYT5_LEN, dtype=torch.bool)
    byt5_mask[0, :3] = True
    byt5_mask[1, :1] = True
    size = (ROWS, COLS) if frames is None else (frames, ROWS, COLS)
    return {"x": torch.randn(B, config.in_channels, *size, generator=g),
            "timesteps": torch.tensor([937.0, 250.0]),
            "context": torch.randn(B, TEXT_LEN, config.text_dim, generator=g), "context_mask": text_mask,
            "byt5": torch.randn(B, BYT5_LEN, config.byt5_dim or 1472, generator=g), "byt5_mask": byt5_mask,
            "guidance": torch.tensor([3500.0, 6000.0])}


def _diffusers(model: HunyuanImageTransformer2DModel, i: dict, byt5: bool,
               timesteps_r: torch.Tensor | None = None) -> torch.Tensor:
    guidance = i["guidance"] if model.config.guidance_embeds else None
    with torch.no_grad():
        return model(i["x"], i["timesteps"], i["context"], i["context_mask"], timestep_r=timesteps_r,
                     encoder_hidden_states_2=i["byt5"] if byt5 else None,
                     encoder_attention_mask_2=i["byt5_mask"] if byt5 else None, guidance=guidance,
                     return_dict=False)[0]


def _loom(model: HunyuanImage21, i: dict, byt5: bool, timesteps_r: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(i["x"], i["timesteps"], i["context"], i["context_mask"], byt5=i["byt5"] if byt5 else None,
                     byt5_mask=i["byt5_mask"] if byt5 else None, guidance=i["guidance"], timesteps_r=timesteps_r)


@pytest.mark.parametrize("byt5", [False, True])
def test_matches_diffusers(pair, byt5: bool) -> None:
    model, reference = pair
    i = _inputs(model.config)
    out = _loom(model, i, byt5)
    assert out.shape == (B, model.config.out_channels, ROWS, COLS)
    assert (out - _diffusers(reference, i, byt5)).abs().max() < TOL


def test_no_padding_masks_are_all_valid(pair) -> None:
    model, reference = pair
    i = _inputs(model.config, seed=3)
    i["context_mask"] = torch.ones_like(i["context_mask"])
    i["byt5_mask"] = torch.ones_like(i["byt5_mask"])
    out = _loom(model, {**i, "context_mask": None, "byt5_mask": None}, byt5=True)
    assert torch.equal(out, _loom(model, i, byt5=True))
    assert (out - _diffusers(reference, i, byt5=True)).abs().max() < TOL


def test_padding_is_ignored(pair) -> None:
    """Whatever the masked prompt and byT5 tokens hold, the output is the same."""
    model, _ = pair
    i = _inputs(model.config, seed=4)
    changed = {**i, "context": i["context"].clone(), "byt5": i["byt5"].clone()}
    changed["context"][~i["context_mask"]] = 7.0
    changed["byt5"][~i["byt5_mask"]] = -3.0
    assert torch.allclose(_loom(model, i, True), _loom(model, changed, True), atol=1e-6)


def test_distilled_matches_diffusers() -> None:
    """The distilled model's guidance embedding and MeanFlow end time, each of which changes the output."""
    config = tiny_config(guidance_embed=True, meanflow=True)
    sd = tiny_state_dict(seed=2, config=config)
    model, reference = loom(config, sd), twin(config, sd)
    i = _inputs(config, seed=5)
    r = torch.tensor([875.0, 0.0])
    out = _loom(model, i, True, timesteps_r=r)
    assert (out - _diffusers(reference, i, True, timesteps_r=r)).abs().max() < TOL
    assert (_loom(model, i, True) - _diffusers(reference, i, True)).abs().max() < TOL
    assert not torch.allclose(out, _loom(model, i, True))
    assert not torch.allclose(out, _loom(model, {**i, "guidance": i["guidance"] / 2}, True, timesteps_r=r))
    with pytest.raises(ValueError, match="guidance"):
        model(i["x"], i["timesteps"], i["context"])


@pytest.mark.parametrize("frames", [1, FRAMES])
def test_refiner_matches_diffusers(frames: int) -> None:
    config = refiner_tiny_config()
    sd = tiny_state_dict(seed=6, config=config)
    model, reference = loom(config, sd), twin(config, sd)
    i = _inputs(config, seed=6, frames=frames)
    out = _loom(model, i, False)
    assert out.shape == (B, 64, frames, ROWS, COLS)
    assert (out - _diffusers(reference, i, False)).abs().max() < TOL
    with pytest.raises(ValueError, match="byT5"):
        _loom(model, i, True)
    with pytest.raises(ValueError, match="5-D"):
        model(i["x"][:, :, 0], i["timesteps"], i["context"], guidance=i["guidance"])


def test_patch_2_matches_diffusers() -> None:
    config = tiny_config(patch_size=(2, 2))
    sd = tiny_state_dict(seed=7, config=config)
    i = _inputs(config, seed=7)
    out = _loom(loom(config, sd), i, True)
    assert out.shape == (B, 64, ROWS, COLS)
    assert (out - _diffusers(twin(config, sd), i, True)).abs().max() < TOL


def test_config_from_state_dict_roundtrip() -> None:
    for config in (tiny_config(), tiny_config(guidance_embed=True, meanflow=True, depth=3, depth_single=1),
                   refiner_tiny_config(refiner_depth=2), tiny_config(patch_size=(2, 2), byt5_dim=None)):
        sd = tiny_state_dict(config=config)
        assert config_from_state_dict(sd) == config
        assert config_from_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()},
                                      "model.diffusion_model.") == config
    for released in (HUNYUAN_IMAGE21, HUNYUAN_IMAGE21_DISTILLED, HUNYUAN_IMAGE21_REFINER):
        assert config_from_state_dict(_released_shapes(released)) == released


def _released_shapes(c: HunyuanImage21Config) -> dict[str, torch.Tensor]:
    """The shapes that tell a released model's config (meta tensors)."""
    h = c.hidden_size
    meta = {"img_in.proj.weight": (h, c.in_channels, *c.patch_size), "final_layer.linear.weight": (c.out_channels, h),
            "single_blocks.0.q_norm.weight": (128,), "single_blocks.0.linear2.weight": (h, 5 * h),
            "txt_in.input_embedder.weight": (h, 3584)}
    meta |= {f"double_blocks.{i}.img_mod.linear.weight": (6 * h, h) for i in range(20)}
    meta |= {f"single_blocks.{i}.modulation.linear.weight": (3 * h, h) for i in range(40)}
    meta |= {f"txt_in.individual_token_refiner.blocks.{i}.norm1.weight": (h,) for i in range(2)}
    if c.byt5_dim:
        meta["byt5_in.fc1.weight"] = (2048, 1472)
    if c.guidance_embed:
        meta["guidance_in.mlp.0.weight"] = (h, 256)
    if c.meanflow:
        meta["time_r_in.mlp.0.weight"] = (h, 256)
    return {k: torch.empty(shape, device="meta") for k, shape in meta.items()}


def _tencent(sd: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """The files' layout -> Tencent's release (q, k, v and the MLP input apart, `linear2.fc`)."""
    out = {}
    for key, value in sd.items():
        if "_attn_qkv." in key and key.startswith("double_blocks."):
            for part, chunk in zip("qkv", value.chunk(3), strict=True):
                out[key.replace("_attn_qkv.", f"_attn_{part}.")] = chunk
        elif ".linear1." in key:
            pieces = value.split([hidden, hidden, hidden, value.shape[0] - 3 * hidden])
            for part, chunk in zip(("q", "k", "v", "mlp"), pieces, strict=True):
                out[key.replace(".linear1.", f".linear1_{part}.")] = chunk
        else:
            out[key.replace(".linear2.", ".linear2.fc.")] = value
    return out


@pytest.mark.parametrize("config", [tiny_config(guidance_embed=True, meanflow=True), refiner_tiny_config()])
def test_convert_state_dict_layouts(config: HunyuanImage21Config) -> None:
    sd = tiny_state_dict(seed=8, config=config)
    assert convert_state_dict(sd) == sd
    for other in (to_diffusers(sd, config.hidden_size), _tencent(sd, config.hidden_size)):
        back = convert_state_dict(other)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    incomplete = {k: v for k, v in _tencent(sd, config.hidden_size).items() if ".linear1_mlp." not in k}
    with pytest.raises(ValueError, match="linear1"):
        convert_state_dict(incomplete)


def test_is_hunyuan_image21() -> None:
    for config in (tiny_config(), tiny_config(guidance_embed=True, meanflow=True), refiner_tiny_config()):
        sd = tiny_state_dict(config=config)
        assert is_hunyuan_image21(sd)
        assert is_hunyuan_image21(to_diffusers(sd, config.hidden_size))
        assert is_hunyuan_image21(_tencent(sd, config.hidden_size))
        assert is_hunyuan_image21({"model.diffusion_model." + k for k in sd}, "model.diffusion_model.")
    sd = tiny_state_dict()
    assert not is_hunyuan_image21(set(sd) | {"vector_in.in_layer.weight"})  # HunyuanVideo 1.0
    assert not is_hunyuan_image21(set(sd) | {"cond_type_embedding.weight"})


def test_is_hunyuan_image21_rejects_other_dits() -> None:
    assert not is_hunyuan_image21(hv15_tiny_state_dict())
    assert not is_hunyuan_image21(LTX2Model(ltx2_tiny()).state_dict())
    wan = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=1, text_dim=32, freq_dim=32)
    assert not is_hunyuan_image21(WanModel(wan).state_dict())
    with pytest.raises(ValueError, match="HunyuanVideo"):
        config_from_state_dict(hv15_tiny_state_dict())


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_config().depth = 3  # type: ignore[misc]
