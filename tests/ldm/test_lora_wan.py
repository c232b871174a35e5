"""Wan LoRAs in ComfyUI's (original names), kohya's / musubi-tuner's and diffusers' / PEFT's layouts on Loom's
original-layout WanModel, against diffusers' WanTransformer3DModel with the same file read by diffusers' own Wan
loader (`WanLoraLoaderMixin.lora_state_dict`: its converters, alphas folded in, `diff_b` as PEFT's lora_B bias) and
merged into its layers by hand (peft is not installed, so the pipeline cannot inject its adapters itself)."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from ldm.lora import (
    LoraError,
    apply_lora,
    check_lora_family,
    load_lora,
    lora_family,
    lora_from_state_dict,
    match_lora,
    peek_lora,
)
from ldm.lora_wan import diffusers_name
from ldm.wan import WanModel
from ldm.wan_files import random_wan, tiny_wan_config
from tests.ldm.test_wan import diffusers_call, diffusers_twin

BLOCK_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")
OUTER_LAYERS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
                "head.head", "img_emb.proj.1", "img_emb.proj.3")


@pytest.fixture(scope="module")
def model() -> WanModel:
    return random_wan(tiny_wan_config("i2v"), seed=3)


def inputs(model: WanModel):
    c, g = model.config, torch.Generator().manual_seed(7)
    return (torch.randn(1, c.in_dim, 2, 4, 4, generator=g), torch.tensor([0.7]),
            torch.randn(1, 512, c.text_dim, generator=g), torch.randn(1, 5, c.clip_dim, generator=g))


def _pair(g: torch.Generator, rank: int, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, inp, generator=g) * 0.4, torch.randn(out, rank, generator=g) * 0.4


def comfy_lora(model: WanModel, pairs: tuple[str, str] = ("lora_down", "lora_up"), seed: int = 5) -> dict:
    """ComfyUI's layout: every block layer with an alpha (ranks 2..4), the embedders and head without (diffusers'
    converter reads no alpha there), a `diff_b` bias change on every other layer."""
    g, sd = torch.Generator().manual_seed(seed), {}
    paths = [f"blocks.{i}.{name}" for i in range(model.config.num_layers) for name in BLOCK_LAYERS] + list(OUTER_LAYERS)
    for n, path in enumerate(paths):
        out, inp = model.get_submodule(path).weight.shape
        rank, key = 2 + n % 3, f"diffusion_model.{path}"
        sd[f"{key}.{pairs[0]}.weight"], sd[f"{key}.{pairs[1]}.weight"] = _pair(g, rank, out, inp)
        if path.startswith("blocks."):
            sd[f"{key}.alpha"] = torch.tensor(float(rank + n % 2))
        if n % 2:
            sd[f"{key}.diff_b"] = torch.randn(out, generator=g) * 0.1
    return sd


def musubi_lora(model: WanModel, seed: int = 6) -> dict:
    """kohya's musubi-tuner layout: every block layer, flattened names, an alpha each."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for i in range(model.config.num_layers):
        for n, name in enumerate(BLOCK_LAYERS):
            out, inp = model.get_submodule(f"blocks.{i}.{name}").weight.shape
            key = f"lora_unet_blocks_{i}_{name.replace('.', '_')}"
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _pair(g, 4, out, inp)
            sd[f"{key}.alpha"] = torch.tensor(2.0 + n % 3)
    return sd


def diffusers_lora(model: WanModel, seed: int = 8) -> dict:
    """diffusers' / PEFT's layout on diffusers' names of the block and embedder layers (no alphas: diffusers takes
    PEFT files' scale from the adapter config, 1 here), with PEFT's `lora_B.bias` (what diffusers makes of `diff_b`)
    on every other layer."""
    g, sd = torch.Generator().manual_seed(seed), {}
    paths = [f"blocks.{i}.{name}" for i in range(model.config.num_layers) for name in BLOCK_LAYERS] + list(OUTER_LAYERS)
    for n, path in enumerate(paths):
        out, inp = model.get_submodule(path).weight.shape
        key = f"transformer.{diffusers_name(path)}"
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = _pair(g, 2 + n % 3, out, inp)
        if n % 2:
            sd[f"{key}.lora_B.bias"] = torch.randn(out, generator=g) * 0.1
    return sd


def diffusers_merged(model: WanModel, sd: dict, strength: float) -> torch.nn.Module:
    """diffusers' transformer twin with the file as diffusers' Wan loader reads it, W + strength * B @ A and
    bias + strength * lora_B.bias merged into each of its layers."""
    reference = diffusers_twin(model)
    converted = WanLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    merged = 0
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                layer = reference.get_submodule(name)
                layer.weight += strength * (converted[f"transformer.{name}.lora_B.weight"] @ down)
                bias = converted.get(f"transformer.{name}.lora_B.bias")
                if bias is not None:
                    layer.bias += strength * bias
                merged += 1
    assert merged == len([k for k in sd if k.endswith(("lora_down.weight", "lora_A.weight"))])
    return reference


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("layout", ["comfy", "comfy-peft", "musubi", "diffusers"])
def test_lora_matches_diffusers_wan_loader(model, layout: str, strength: float) -> None:
    sd = {"comfy": lambda: comfy_lora(model), "comfy-peft": lambda: comfy_lora(model, ("lora_A", "lora_B")),
          "musubi": lambda: musubi_lora(model), "diffusers": lambda: diffusers_lora(model)}[layout]()
    lora = lora_from_state_dict(sd)
    assert not lora.unknown_keys and len(match_lora(model, lora)) == len(lora.weights)
    x, sigma, context, clip_fea = inputs(model)
    patched = apply_lora(model, lora, strength)
    with torch.no_grad():
        ours, base = patched(x, sigma, context, clip_fea=clip_fea), model(x, sigma, context, clip_fea=clip_fea)
    expected = diffusers_call(diffusers_merged(model, sd, strength), x, sigma, context, clip_fea)
    assert (ours - base).abs().max() > 0.05  # the LoRA changes the prediction ...
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)  # ... as diffusers' loader has it
    unchanged = diffusers_call(diffusers_twin(model), x, sigma, context, clip_fea)
    torch.testing.assert_close(base, unchanged, rtol=1e-5, atol=1e-5)  # the loaded model is left as it was


def test_full_weight_differences_patch_norms_and_modulation_tables(model, tmp_path) -> None:
    """The distillation LoRAs' `.diff` on norms (diffusers' loader drops these) and on the modulation tables, which
    are parameters of no layer of their own (ComfyUI patches them by their bare names)."""
    g = torch.Generator().manual_seed(11)
    targets = {"blocks.0.norm3": model.blocks[0].norm3.weight,
               "blocks.1.self_attn.norm_q": model.blocks[1].self_attn.norm_q.weight,
               "blocks.0.modulation": model.blocks[0].modulation, "head.modulation": model.head.modulation,
               "patch_embedding": model.patch_embedding.weight}
    sd = {f"diffusion_model.{path}.diff": torch.randn(weight.shape, generator=g) * 0.1
          for path, weight in targets.items()}
    sd["diffusion_model.blocks.0.norm3.diff_b"] = torch.randn(model.config.dim, generator=g) * 0.1
    path = tmp_path / "distill.safetensors"
    save_file(sd, path)
    lora = load_lora(path)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    patched = apply_lora(model, lora, 0.5)
    state = patched.state_dict()
    for target, weight in targets.items():
        key = target if target.endswith("modulation") else f"{target}.weight"
        torch.testing.assert_close(state[key], weight + 0.5 * sd[f"diffusion_model.{target}.diff"])
    torch.testing.assert_close(state["blocks.0.norm3.bias"],
                               before["blocks.0.norm3.bias"] + 0.5 * sd["diffusion_model.blocks.0.norm3.diff_b"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    x, sigma, context, clip_fea = inputs(model)
    with torch.no_grad():
        change = patched(x, sigma, context, clip_fea=clip_fea) - model(x, sigma, context, clip_fea=clip_fea)
    assert change.abs().max() > 0.01


def test_diffusers_names_are_diffusers_converters(model) -> None:
    """Every diffusers name Loom gives a Wan layer is the one diffusers' single-file converter gives its weight."""
    flf = random_wan(tiny_wan_config("flf2v"), seed=1)
    converted = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in flf.state_dict().items()})
    named = 0
    for key, tensor in flf.state_dict().items():
        path, suffix = (key[:-7], ".weight") if key.endswith(".weight") else (key, "")
        if key.endswith(".bias") or path == "img_emb.emb_pos":  # the converter has no rule for FLF2V's positions
            continue
        assert torch.equal(converted[diffusers_name(path) + suffix], tensor), key
        named += 1
    assert named == 1 + 2 + 3 + 2 * 19 + 2 + 4  # patch, text, time (and projection), 2 blocks, head, image embedder


def test_family_is_told_by_names_and_width() -> None:
    def lora(*names: str, out: int = 8) -> object:
        sd = {}
        for name in names:
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.zeros(2, 8), torch.zeros(out, 2)
        return lora_from_state_dict(sd)

    wan = ("diffusion_model.blocks.0.self_attn.q", "lora_unet_blocks_3_cross_attn_k_img", "lora_unet__blocks_0_ffn_2",
           "transformer.blocks.1.attn2.add_k_proj", "blocks.0.attn1.to_out.0", "transformer.blocks.0.ffn.net.0.proj")
    for name in wan:
        assert lora_family(lora(name)) == "wan", name
    assert lora_family(lora("diffusion_model.blocks.0.self_attn.q", out=5120)) == "wan21"
    assert lora_family(lora("transformer.blocks.0.attn1.to_q", out=3072)) == "wan22"
    assert lora_family(lora("lora_unet_blocks_0_self_attn_q", out=1536)) == "wan21"
    others = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": None,
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": None,
              "transformer.transformer_blocks.0.attn.to_q": None,
              "lora_unet_double_blocks_0_img_attn_qkv": "flux",
              "diffusion_model.blocks.0.self_attn.q_proj": None}  # Cosmos' names: not Wan's one-letter ones
    assert {name: lora_family(lora(name)) for name in others} == others
    check_lora_family(lora(*wan), "wan21")
    check_lora_family(lora(*wan), "wan22")
    with pytest.raises(LoraError, match="is a WAN LoRA; it does not fit a FLUX model"):
        check_lora_family(lora(*wan), "flux")
    with pytest.raises(LoraError, match="is a WAN LoRA; it does not fit a SD1 model"):
        check_lora_family(lora(*wan), "sd1")
    with pytest.raises(LoraError, match="is a WAN22 LoRA; it does not fit a WAN21 model"):
        check_lora_family(lora("transformer.blocks.0.attn1.to_q", out=3072), "wan21")
    with pytest.raises(LoraError, match="is a FLUX LoRA; it does not fit a WAN21 model"):
        check_lora_family(lora("lora_unet_double_blocks_0_img_attn_qkv"), "wan21")


def test_header_alone_tells_the_family_and_a_wider_lora_is_refused(model, tmp_path) -> None:
    g = torch.Generator().manual_seed(2)
    down, up = _pair(g, 4, 5120, 5120)
    path = tmp_path / "wan14b.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down.contiguous(),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up.contiguous(),
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0)}, path)
    assert lora_family(peek_lora(path)) == "wan21"
    with pytest.raises(LoraError, match=r"wan14b.safetensors does not fit this model .*self_attn.q"):
        apply_lora(model, load_lora(path))


def test_peft_lora_bias_is_scaled_with_its_pair(model) -> None:
    """PEFT's lora_B is a layer whose bias its scale (alpha / rank) multiplies as it does B @ A."""
    g, key = torch.Generator().manual_seed(3), "transformer.blocks.0.attn1.to_q"
    down, up = _pair(g, 4, 32, 32)
    bias = torch.randn(32, generator=g)
    lora = lora_from_state_dict({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up,
                                 f"{key}.lora_B.bias": bias, f"{key}.alpha": torch.tensor(2.0)})
    patched = apply_lora(model, lora, 0.5)
    q = model.blocks[0].self_attn.q
    torch.testing.assert_close(patched.blocks[0].self_attn.q.weight, q.weight + 0.5 * 0.5 * up @ down)
    torch.testing.assert_close(patched.blocks[0].self_attn.q.bias, q.bias + 0.5 * 0.5 * bias)
