"""HunyuanVideo 1.5 LoRAs (ldm.lora_hunyuan_video15) on Loom's HunyuanVideo15, through the denoiser LoraLoader
patches: diffusers' / PEFT's names against diffusers' HunyuanVideo15Transformer3DModel with the same weights and the
same file merged into its layers by hand (diffusers 0.42 has no HunyuanVideo 1.5 LoRA loader, and peft is not
installed to inject adapters); Tencent's, ComfyUI's and musubi-tuner's names against W + strength * alpha / rank *
up @ down applied by hand. Float32, a tiny random model with every kind of layer (MeanFlow's `time_r_in` included)."""

from __future__ import annotations

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel
from safetensors.torch import save_file
from torch import nn

from ldm.hunyuan_video15 import HunyuanVideo15, tiny_config, tiny_state_dict
from ldm.hunyuan_video15_files import HunyuanVideo15Denoiser
from ldm.hunyuan_video15_text import HunyuanVideo15TextEncoder
from ldm.lora import (
    LoraError,
    apply_lora,
    check_lora_family,
    load_lora,
    lora_family,
    lora_from_state_dict,
    match_lora,
    takes_no_lora,
    unmatched_lora_keys,
)
from ldm.lora_hunyuan_video15 import comfy_name, diffusers_names, spellings, targets
from tests.ldm.test_hunyuan_video15 import loom, to_diffusers, twin

TOL = 1e-5
CONFIG = tiny_config(text_dim=32, byt5_dim=24, byt5_hidden=32, image_dim=40, meanflow=True)
H = CONFIG.hidden_size


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return tiny_state_dict(seed=1, config=CONFIG)


@pytest.fixture(scope="module")
def denoiser(weights) -> HunyuanVideo15Denoiser:
    return HunyuanVideo15Denoiser(loom(CONFIG, weights))


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(2, 6, dtype=torch.bool)
    text_mask[1, 4:] = False
    return {"x": torch.randn(2, CONFIG.in_channels, 2, 3, 4, generator=g), "timesteps": torch.tensor([900.0, 300.0]),
            "timesteps_r": torch.tensor([700.0, 100.0]), "context": torch.randn(2, 6, CONFIG.text_dim, generator=g),
            "context_mask": text_mask, "byt5": torch.randn(2, 3, CONFIG.byt5_dim, generator=g),
            "byt5_mask": torch.ones(2, 3, dtype=torch.bool), "image": torch.randn(2, 5, CONFIG.image_dim, generator=g)}


def run_loom(model: HunyuanVideo15, i: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(i["x"], i["timesteps"], i["context"], i["context_mask"], byt5=i["byt5"],
                     byt5_mask=i["byt5_mask"], image=i["image"], timesteps_r=i["timesteps_r"])


def run_diffusers(model: HunyuanVideo15Transformer3DModel, i: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(i["x"], i["timesteps"], i["context"], i["context_mask"], timestep_r=i["timesteps_r"],
                     encoder_hidden_states_2=i["byt5"], encoder_attention_mask_2=i["byt5_mask"],
                     image_embeds=i["image"], return_dict=False)[0]


def _pair(g: torch.Generator, rank: int, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, inp, generator=g) * 0.2, torch.randn(out, rank, generator=g) * 0.2


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, layer) for name, layer in model.named_modules() if isinstance(layer, nn.Linear)]


# --- diffusers' names against diffusers' model ---------------------------------------------------------------------

def diffusers_lora(reference: HunyuanVideo15Transformer3DModel, seed: int = 4) -> dict[str, torch.Tensor]:
    """PEFT's layout on every linear layer of diffusers' model (ranks 2..4, no alphas: PEFT files take their scale
    from the adapter config, 1 here), PEFT's `lora_B.bias` on every third."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for n, (name, layer) in enumerate(_linears(reference)):
        key = f"transformer.{name}"
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = _pair(g, 2 + n % 3, *layer.weight.shape)
        if n % 3 == 0:
            sd[f"{key}.lora_B.bias"] = torch.randn(layer.weight.shape[0], generator=g) * 0.1
    return sd


def diffusers_merged(weights: dict, sd: dict, strength: float) -> HunyuanVideo15Transformer3DModel:
    """diffusers' twin with W + strength * B @ A (and bias + strength * lora_B.bias) merged into each layer."""
    reference = twin(CONFIG, weights)
    with torch.no_grad():
        for name, layer in _linears(reference):
            key = f"transformer.{name}"
            layer.weight += strength * (sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"])
            if f"{key}.lora_B.bias" in sd:
                layer.bias += strength * sd[f"{key}.lora_B.bias"]
    return reference


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_diffusers_lora_matches_diffusers(denoiser, weights, strength: float) -> None:
    sd = diffusers_lora(twin(CONFIG, weights))
    lora = lora_from_state_dict(sd)
    assert not lora.unknown_keys and not unmatched_lora_keys(lora, denoiser)  # every layer's name is understood
    assert lora_family(lora) == "hunyuan_video15"
    patched = apply_lora(denoiser, lora, strength)
    i = inputs()
    ours, base = run_loom(patched.model, i), run_loom(denoiser.model, i)
    expected = run_diffusers(diffusers_merged(weights, sd, strength), i)
    assert (ours - base).abs().max() > 0.05  # the LoRA changes the prediction ...
    assert (ours - expected).abs().max() < TOL  # ... as the same LoRA merged into diffusers' layers does
    assert (base - run_diffusers(twin(CONFIG, weights), i)).abs().max() < TOL  # the loaded model is left as it was


def test_diffusers_names_are_the_conversion_scripts(weights) -> None:
    """Each diffusers name (whole or a third of a fused q / k / v) names the same weight as diffusers' conversion
    script's renaming (the test of ldm.hunyuan_video15's `to_diffusers`); the output modulation is a rolled slot."""
    theirs = to_diffusers(weights)
    named = 0
    for path in targets(HunyuanVideo15(CONFIG)):
        for name, part in diffusers_names(path):
            ours = weights[f"{path}.weight"]
            assert torch.equal(theirs[f"{name}.weight"], ours if part is None else ours.chunk(3)[part]), path
            named += 1
    shift, scale = weights["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(theirs["norm_out.linear.weight"], torch.cat([scale, shift]))
    assert named + 1 == len([k for k in theirs if k.endswith(".weight")])  # every diffusers weight is named


# --- Tencent's, ComfyUI's and kohya's names against the hand-applied sum -------------------------------------------

LAYOUTS = ("tencent", "diffusion-pipe", "comfy", "musubi")


def original_lora(model: HunyuanVideo15, layout: str, seed: int = 7) -> tuple[dict, dict[str, list]]:
    """A LoRA on every linear layer (and the patch embedding) in one of the original layouts, and for each weight of
    the model the (rows, alpha / rank, up, down) terms it adds. "tencent": ComfyUI's `diffusion_model.` + Tencent's
    names, kohya's pair names and alphas; "diffusion-pipe": `transformer.` + Tencent's, PEFT's pair names, no alphas;
    "comfy": ComfyUI's own names, alphas; "musubi": kohya's flattened names with each double block's q, k, v apart."""
    g, sd, terms = torch.Generator().manual_seed(seed), {}, {}
    pairs = ("lora_A", "lora_B") if layout == "diffusion-pipe" else ("lora_down", "lora_up")
    paths = [path for path, layer in model.named_modules() if isinstance(layer, nn.Linear | nn.Conv3d)]
    for n, path in enumerate(paths):
        weight = model.get_submodule(path).weight
        parts = [(path, slice(None))]
        if layout == "musubi" and path.endswith("_attn_qkv") and path.startswith("double_blocks"):
            parts = [(path.removesuffix("qkv") + letter, slice(k * H, (k + 1) * H)) for k, letter in enumerate("qkv")]
        for m, (name, rows) in enumerate(parts):
            rank = 2 + (n + m) % 3
            down, up = _pair(g, rank, weight[rows].shape[0], weight[0].numel())
            key = {"tencent": f"diffusion_model.{name}", "diffusion-pipe": f"transformer.{name}",
                   "comfy": f"diffusion_model.{comfy_name(name)}",
                   "musubi": "lora_unet_" + name.replace(".", "_")}[layout]
            sd[f"{key}.{pairs[0]}.weight"], sd[f"{key}.{pairs[1]}.weight"] = down, up
            alpha = None if layout == "diffusion-pipe" else float(rank + (n + m) % 2)
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(alpha)
            terms.setdefault(f"{path}.weight", []).append((rows, 1.0 if alpha is None else alpha / rank, up, down))
    return sd, terms


def by_hand(weights: dict, terms: dict, strength: float) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in weights.items()}
    for key, parts in terms.items():
        for rows, scale, up, down in parts:
            out[key][rows] += strength * scale * (up @ down.flatten(1)).reshape(out[key][rows].shape)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_original_names_match_the_sum_by_hand(denoiser, weights, layout: str) -> None:
    strength = 0.8
    sd, terms = original_lora(denoiser.model, layout)
    lora = lora_from_state_dict(sd)
    assert not lora.unknown_keys and not unmatched_lora_keys(lora, denoiser)
    assert lora_family(lora) == "hunyuan_video15"
    patched = apply_lora(denoiser, lora, strength)
    expected = by_hand(weights, terms, strength)
    state = patched.model.state_dict()
    assert max((state[k] - v).abs().max().item() for k, v in expected.items()) < TOL
    i = inputs(1)
    ours, reference = run_loom(patched.model, i), run_loom(loom(CONFIG, expected), i)
    assert (ours - run_loom(denoiser.model, i)).abs().max() > 0.05
    assert (ours - reference).abs().max() < TOL
    assert all(torch.equal(denoiser.model.state_dict()[k], v) for k, v in weights.items())  # the original untouched


def test_full_weight_differences_patch_norms_embeddings_and_biases(denoiser, weights, tmp_path) -> None:
    """Distillation-style full differences (`.diff`, `.diff_b`) by Tencent's and ComfyUI's names: norms (ComfyUI's q
    norm by its `scale` parameter), the type embedding, the patch embedding, a bias."""
    g = torch.Generator().manual_seed(11)
    refiner = "txt_in.individual_token_refiner.blocks.0.norm1"
    changes = {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale": "double_blocks.0.img_attn_q_norm",
               "diffusion_model.double_blocks.1.txt_attn_k_norm": "double_blocks.1.txt_attn_k_norm",
               f"diffusion_model.{refiner}": refiner, "diffusion_model.byt5_in.layernorm": "byt5_in.layernorm",
               "diffusion_model.cond_type_embedding": "cond_type_embedding",
               "diffusion_model.img_in.proj": "img_in.proj"}
    sd = {f"{name}.diff": torch.randn(weights[f"{path}.weight"].shape, generator=g) * 0.1
          for name, path in changes.items()}
    sd["diffusion_model.byt5_in.layernorm.diff_b"] = torch.randn(CONFIG.byt5_dim, generator=g) * 0.1
    save_file(sd, tmp_path / "distill.safetensors")
    lora = load_lora(tmp_path / "distill.safetensors")
    assert lora_family(lora) == "hunyuan_video15" and not unmatched_lora_keys(lora, denoiser)
    patched = apply_lora(denoiser, lora, 0.5)
    state = patched.model.state_dict()
    for name, path in changes.items():
        assert (state[f"{path}.weight"] - weights[f"{path}.weight"] - 0.5 * sd[f"{name}.diff"]).abs().max() < TOL
    bias = "byt5_in.layernorm.bias"
    assert (state[bias] - weights[bias] - 0.5 * sd["diffusion_model.byt5_in.layernorm.diff_b"]).abs().max() < TOL
    i = inputs(2)
    assert (run_loom(patched.model, i) - run_loom(denoiser.model, i)).abs().max() > 0.01


def test_every_spelling_names_one_layer(denoiser) -> None:
    seen: dict[str, str] = {}
    for path in targets(denoiser.model):
        for name in spellings(path):
            assert seen.setdefault(name, path) == path, name
    assert {"lora_unet_double_blocks_0_img_mod_linear", "lora_unet_double_blocks_0_img_mod_lin",
            "transformer.double_blocks.0.img_mlp.fc1", "diffusion_model.time_in.in_layer",
            "transformer.transformer_blocks.1.ff_context.net.2", "lora_transformer_context_embedder_2_linear_1",
            "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn.qkv"} <= seen.keys()


# --- family and text encoder ---------------------------------------------------------------------------------------

def _lora(*names: str, width: int = 2048) -> object:
    sd = {}
    for name in names:
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.zeros(2, width), torch.zeros(width, 2)
    return lora_from_state_dict(sd)


def test_family_is_told_by_names_and_width() -> None:
    ours = ("diffusion_model.double_blocks.0.img_attn_qkv", "transformer.double_blocks.3.txt_mlp.fc2",
            "lora_unet_double_blocks_0_img_mod_linear", "lora_unet_double_blocks_2_txt_attn_v",
            "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn.qkv", "diffusion_model.byt5_in.fc1",
            "transformer.context_embedder_2.linear_1", "transformer.cond_type_embed",
            "transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q")
    for name in ours:
        assert lora_family(_lora(name)) == "hunyuan_video15", name
    # Flux's (ComfyUI's) and diffusers' double-block names alone: the width tells.
    for name in ("diffusion_model.double_blocks.0.img_attn.qkv", "lora_unet_double_blocks_0_img_attn_qkv",
                 "transformer.transformer_blocks.0.attn.add_q_proj"):
        assert lora_family(_lora(name)) == "hunyuan_video15", name
        assert lora_family(_lora(name, width=3072)) == "flux", name
    # HunyuanVideo 1.0's and HunyuanImage 2.1's (single blocks, or their widths) are not ours: Flux's block names.
    assert lora_family(_lora("diffusion_model.double_blocks.0.img_attn_qkv", "diffusion_model.single_blocks.0.linear1",
                             width=3072)) == "flux"
    assert lora_family(_lora("diffusion_model.double_blocks.0.img_mod.linear", width=3584)) == "flux"
    others = {"lora_unet_single_blocks_0_linear1": "flux", "diffusion_model.blocks.0.self_attn.q": "wan",
              "transformer.transformer_blocks.0.attn.to_q": None}
    assert {name: lora_family(_lora(name)) for name in others} == others
    check_lora_family(_lora(*ours), "hunyuan_video15")
    with pytest.raises(LoraError, match="is a HUNYUAN_VIDEO15 LoRA; it does not fit a FLUX model"):
        check_lora_family(_lora(*ours), "flux")
    with pytest.raises(LoraError, match="is a FLUX LoRA; it does not fit a HUNYUAN_VIDEO15 model"):
        check_lora_family(_lora("lora_unet_single_blocks_0_linear1", width=3072), "hunyuan_video15")


def test_a_lora_of_another_width_is_refused(denoiser) -> None:
    lora = _lora("diffusion_model.double_blocks.0.img_attn_proj")
    with pytest.raises(LoraError, match="does not fit this model"):
        match_lora(denoiser, lora)


def test_text_encoder_takes_no_lora(denoiser) -> None:
    encoder = HunyuanVideo15TextEncoder(nn.Linear(2, 2))
    assert takes_no_lora(encoder)
    lora = _lora("text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj", width=8)
    assert apply_lora(encoder, lora) is encoder
    assert unmatched_lora_keys(lora, denoiser, encoder) == sorted(k for keys in lora.sources.values() for k in keys)
