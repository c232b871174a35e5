"""The HunyuanVideo 1.5 transformer (ldm.hunyuan_video15) against diffusers' HunyuanVideo15Transformer3DModel with the
same weights: the files' layout is renamed to diffusers' here (`to_diffusers`, after diffusers'
scripts/convert_hunyuan_video1_5_to_diffusers.py, q/k/v split apart), float32 throughout.

diffusers always takes byT5 states and image embeds: Loom's "no byT5" is diffusers fed an all-masked byT5 input,
and Loom's "no image" (text-to-video) diffusers fed all-zero image embeds (which it masks out)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15ByT5TextProjection

from ldm.hunyuan_video15 import (
    HunyuanVideo15,
    HunyuanVideo15Config,
    config_from_state_dict,
    convert_state_dict,
    is_hunyuan_video15,
    tiny_config,
    tiny_state_dict,
)
from ldm.ltx2 import LTX2Model
from ldm.ltx2 import tiny_config as ltx2_tiny
from ldm.wan import WanConfig, WanModel

TOL = 1e-5
B, FRAMES, ROWS, COLS = 2, 2, 4, 6
TEXT_LEN, BYT5_LEN, IMAGE_LEN = 7, 5, 9

_TOP = {"time_in.mlp.0.": "time_embed.timestep_embedder.linear_1.",
        "time_in.mlp.2.": "time_embed.timestep_embedder.linear_2.",
        "time_r_in.mlp.0.": "time_embed.timestep_embedder_r.linear_1.",
        "time_r_in.mlp.2.": "time_embed.timestep_embedder_r.linear_2.",
        "txt_in.t_embedder.mlp.0.": "context_embedder.time_text_embed.timestep_embedder.linear_1.",
        "txt_in.t_embedder.mlp.2.": "context_embedder.time_text_embed.timestep_embedder.linear_2.",
        "txt_in.c_embedder.": "context_embedder.time_text_embed.text_embedder.",
        "txt_in.input_embedder.": "context_embedder.proj_in.",
        "byt5_in.layernorm.": "context_embedder_2.norm.", "byt5_in.fc1.": "context_embedder_2.linear_1.",
        "byt5_in.fc2.": "context_embedder_2.linear_2.", "byt5_in.fc3.": "context_embedder_2.linear_3.",
        "vision_in.proj.0.": "image_embedder.norm_in.", "vision_in.proj.1.": "image_embedder.linear_1.",
        "vision_in.proj.3.": "image_embedder.linear_2.", "vision_in.proj.4.": "image_embedder.norm_out.",
        "img_in.proj.": "x_embedder.proj.", "cond_type_embedding.": "cond_type_embed.",
        "final_layer.linear.": "proj_out."}
_BLOCK = {"img_mod.linear.": "norm1.linear.", "txt_mod.linear.": "norm1_context.linear.",
          "img_attn_q_norm.": "attn.norm_q.", "img_attn_k_norm.": "attn.norm_k.",
          "txt_attn_q_norm.": "attn.norm_added_q.", "txt_attn_k_norm.": "attn.norm_added_k.",
          "img_attn_proj.": "attn.to_out.0.", "txt_attn_proj.": "attn.to_add_out.",
          "img_mlp.fc1.": "ff.net.0.proj.", "img_mlp.fc2.": "ff.net.2.",
          "txt_mlp.fc1.": "ff_context.net.0.proj.", "txt_mlp.fc2.": "ff_context.net.2.",
          "img_attn_qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
          "txt_attn_qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj.")}
_REFINER = {"norm1.": "norm1.", "norm2.": "norm2.", "self_attn_proj.": "attn.to_out.0.", "mlp.fc1.": "ff.net.0.proj.",
            "mlp.fc2.": "ff.net.2.", "adaLN_modulation.1.": "norm_out.linear.",
            "self_attn_qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v.")}


def _rename(rest: str, table: dict, value: torch.Tensor) -> dict[str, torch.Tensor]:
    for old, new in table.items():
        if rest.startswith(old):
            leaf = rest[len(old):]
            if isinstance(new, tuple):
                return {n + leaf: part for n, part in zip(new, value.chunk(3), strict=True)}
            return {new + leaf: value}
    raise KeyError(rest)


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The files' layout -> diffusers' (the conversion script's mapping)."""
    out = {}
    for key, value in sd.items():
        if key.startswith("double_blocks."):
            _, index, rest = key.split(".", 2)
            out.update({f"transformer_blocks.{index}.{k}": v for k, v in _rename(rest, _BLOCK, value).items()})
        elif key.startswith("txt_in.individual_token_refiner.blocks."):
            index, rest = key[len("txt_in.individual_token_refiner.blocks."):].split(".", 1)
            prefix = f"context_embedder.token_refiner.refiner_blocks.{index}."
            out.update({prefix + k: v for k, v in _rename(rest, _REFINER, value).items()})
        elif key.startswith("final_layer.adaLN_modulation.1."):
            shift, scale = value.chunk(2)
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift])
        else:
            out.update(_rename(key, _TOP, value))
    return out


def twin(config: HunyuanVideo15Config, sd: dict[str, torch.Tensor]) -> HunyuanVideo15Transformer3DModel:
    c = config
    model = HunyuanVideo15Transformer3DModel(
        in_channels=c.in_channels, out_channels=c.out_channels, num_attention_heads=c.num_heads,
        attention_head_dim=c.head_dim, num_layers=c.depth, num_refiner_layers=c.refiner_depth,
        mlp_ratio=c.mlp_ratio, patch_size=c.patch_size[1], patch_size_t=c.patch_size[0], text_embed_dim=c.text_dim,
        text_embed_2_dim=c.byt5_dim, image_embed_dim=c.image_dim, rope_theta=float(c.rope_theta),
        rope_axes_dim=c.rope_axes, use_meanflow=c.meanflow)
    if c.byt5_hidden != 2048:  # diffusers fixes the byT5 projection's hidden width at the released 2048
        model.context_embedder_2 = HunyuanVideo15ByT5TextProjection(c.byt5_dim, c.byt5_hidden, c.hidden_size)
    model.load_state_dict(to_diffusers(sd), strict=True)
    return model.eval()


def loom(config: HunyuanVideo15Config, sd: dict[str, torch.Tensor]) -> HunyuanVideo15:
    model = HunyuanVideo15(config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[HunyuanVideo15, HunyuanVideo15Transformer3DModel]:
    config = tiny_config()
    sd = tiny_state_dict(seed=1, config=config)
    return loom(config, sd), twin(config, sd)


def _inputs(config: HunyuanVideo15Config, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(B, TEXT_LEN, dtype=torch.bool)
    text_mask[1, 4:] = False
    byt5_mask = torch.zeros(B, BYT5_LEN, dtype=torch.bool)
    byt5_mask[0, :3] = True
    byt5_mask[1, :1] = True
    return {"x": torch.randn(B, config.in_channels, FRAMES, ROWS, COLS, generator=g),
            "timesteps": torch.tensor([937.0, 250.0]),
            "context": torch.randn(B, TEXT_LEN, config.text_dim, generator=g), "context_mask": text_mask,
            "byt5": torch.randn(B, BYT5_LEN, config.byt5_dim, generator=g), "byt5_mask": byt5_mask,
            "image": torch.randn(B, IMAGE_LEN, config.image_dim, generator=g)}


def _diffusers(model: HunyuanVideo15Transformer3DModel, i: dict, byt5: bool, image: bool,
               timesteps_r: torch.Tensor | None = None) -> torch.Tensor:
    byt5_states = i["byt5"] if byt5 else torch.zeros_like(i["byt5"])
    byt5_mask = i["byt5_mask"] if byt5 else torch.zeros_like(i["byt5_mask"])
    with torch.no_grad():
        return model(i["x"], i["timesteps"], i["context"], i["context_mask"], timestep_r=timesteps_r,
                     encoder_hidden_states_2=byt5_states, encoder_attention_mask_2=byt5_mask,
                     image_embeds=i["image"] if image else torch.zeros_like(i["image"]), return_dict=False)[0]


def _loom(model: HunyuanVideo15, i: dict, byt5: bool, image: bool,
          timesteps_r: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(i["x"], i["timesteps"], i["context"], i["context_mask"], byt5=i["byt5"] if byt5 else None,
                     byt5_mask=i["byt5_mask"] if byt5 else None, image=i["image"] if image else None,
                     timesteps_r=timesteps_r)


@pytest.mark.parametrize(("byt5", "image"), [(False, False), (True, False), (False, True), (True, True)])
def test_matches_diffusers(pair, byt5: bool, image: bool) -> None:
    model, reference = pair
    i = _inputs(model.config)
    out = _loom(model, i, byt5, image)
    assert out.shape == (B, model.config.out_channels, FRAMES, ROWS, COLS)
    assert (out - _diffusers(reference, i, byt5, image)).abs().max() < TOL


def test_no_padding_masks_are_all_valid(pair) -> None:
    model, reference = pair
    i = _inputs(model.config, seed=3)
    i["context_mask"] = torch.ones_like(i["context_mask"])
    i["byt5_mask"] = torch.ones_like(i["byt5_mask"])
    out = _loom(model, {**i, "context_mask": None}, byt5=True, image=True)
    assert torch.equal(out, _loom(model, i, byt5=True, image=True))
    assert (out - _diffusers(reference, i, byt5=True, image=True)).abs().max() < TOL


def test_padding_is_ignored(pair) -> None:
    """Whatever the masked prompt and byT5 tokens hold, the output is the same."""
    model, _ = pair
    i = _inputs(model.config, seed=4)
    changed = {**i, "context": i["context"].clone(), "byt5": i["byt5"].clone()}
    changed["context"][~i["context_mask"]] = 7.0
    changed["byt5"][~i["byt5_mask"]] = -3.0
    assert torch.allclose(_loom(model, i, True, True), _loom(model, changed, True, True), atol=1e-6)


def test_meanflow_matches_diffusers() -> None:
    config = tiny_config(meanflow=True, in_channels=98)
    sd = tiny_state_dict(seed=2, config=config)
    model, reference = loom(config, sd), twin(config, sd)
    i = _inputs(config, seed=5)
    r = torch.tensor([875.0, 0.0])
    out = _loom(model, i, True, False, timesteps_r=r)
    assert (out - _diffusers(reference, i, True, False, timesteps_r=r)).abs().max() < TOL
    assert not torch.allclose(out, _loom(model, i, True, False))


def test_patch_2_matches_diffusers() -> None:
    config = tiny_config(patch_size=(1, 2, 2))
    sd = tiny_state_dict(seed=6, config=config)
    i = _inputs(config, seed=6)
    out = _loom(loom(config, sd), i, True, True)
    assert (out - _diffusers(twin(config, sd), i, True, True)).abs().max() < TOL


def test_config_from_state_dict_roundtrip() -> None:
    for config in (tiny_config(), tiny_config(meanflow=True, in_channels=98, depth=3),
                   tiny_config(byt5_dim=None, image_dim=None, refiner_depth=2, patch_size=(1, 2, 2))):
        sd = tiny_state_dict(config=config)
        assert config_from_state_dict(sd) == config
        assert config_from_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()},
                                      "model.diffusion_model.") == config
    assert config_from_state_dict({k: torch.empty(0) for k in ()} | _released_shapes()) == HunyuanVideo15Config()


def _released_shapes() -> dict[str, torch.Tensor]:
    """The shapes that tell the released 720p / 480p model's config (meta tensors)."""
    meta = {"img_in.proj.weight": (2048, 65, 1, 1, 1), "final_layer.linear.weight": (32, 2048),
            "double_blocks.0.img_attn_q_norm.weight": (128,), "double_blocks.0.img_mlp.fc1.weight": (8192, 2048),
            "txt_in.input_embedder.weight": (2048, 3584), "byt5_in.fc1.weight": (2048, 1472),
            "vision_in.proj.0.weight": (1152,)}
    meta |= {f"double_blocks.{i}.img_mod.linear.weight": (12288, 2048) for i in range(54)}
    meta |= {f"txt_in.individual_token_refiner.blocks.{i}.norm1.weight": (2048,) for i in range(2)}
    return {k: torch.empty(shape, device="meta") for k, shape in meta.items()}


def test_convert_state_dict_layouts() -> None:
    sd = tiny_state_dict(seed=7)
    assert convert_state_dict(sd) == sd
    back = convert_state_dict(to_diffusers(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    split = {}
    for key, value in sd.items():
        if "_attn_qkv." in key and key.startswith("double_blocks."):
            for part, chunk in zip("qkv", value.chunk(3), strict=True):
                split[key.replace("_attn_qkv.", f"_attn_{part}.")] = chunk
        else:
            split[key] = value
    tencent = convert_state_dict(split)
    assert tencent.keys() == sd.keys() and all(torch.equal(tencent[k], sd[k]) for k in sd)


def test_is_hunyuan_video15() -> None:
    sd = tiny_state_dict()
    assert is_hunyuan_video15(sd)
    assert is_hunyuan_video15(to_diffusers(sd))
    assert is_hunyuan_video15({"model.diffusion_model." + k for k in sd}, "model.diffusion_model.")
    hv1 = {k for k in sd if not k.startswith(("cond_type", "byt5_in", "vision_in"))}
    assert not is_hunyuan_video15(hv1 | {"single_blocks.0.linear1.weight", "vector_in.in_layer.weight"})
    assert not is_hunyuan_video15(set(sd) | {"single_blocks.0.linear1.weight"})


def test_is_hunyuan_video15_rejects_other_dits() -> None:
    assert not is_hunyuan_video15(LTX2Model(ltx2_tiny()).state_dict())
    wan = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=1, text_dim=32, freq_dim=32)
    assert not is_hunyuan_video15(WanModel(wan).state_dict())


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_config().depth = 3  # type: ignore[misc]
