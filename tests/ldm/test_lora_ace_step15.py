"""ACE-Step 1.5 LoRAs on Loom's AceStep15Model (as LoraLoader receives it, wrapped in AceStep15Denoiser) in ACE-Step's
trainer's (PEFT on the decoder), its LoKr (LyCORIS), ComfyUI's, kohya's and diffusers' layouts: every linear layer's
merged weight against W + strength * alpha / rank * up @ down computed by hand, and the decoder against diffusers'
AceStepTransformer1DModel with the same weights and the file as diffusers' own ACE-Step loader reads it
(`AceStepLoraLoaderMixin.lora_state_dict`, which renames ACE-Step's names) merged into its layers by hand (peft is not
installed, so `load_lora_adapter` cannot inject the adapters); the family checks; the text encoder left alone;
LoraLoaderModelOnly and LoraLoader on the tiny ACE-Step 1.5 files."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.loaders import AceStepLoraLoaderMixin
from safetensors.torch import save_file

from ldm.ace_step15 import TINY_ACE_STEP15, AceStep15Model, random_ace_step15
from ldm.ace_step15_files import AceStep15Denoiser, load_ace_step15_unet
from ldm.ace_step15_text import AceStep15TextEncoder
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
from ldm.lora_ace_step15 import ace_step15_index, diffusers_name, targets
from tests.ldm.test_ace_step15 import diffusers_name as diffusers_key
from tests.ldm.test_ace_step15 import diffusers_parts


@pytest.fixture(scope="module")
def denoiser() -> AceStep15Denoiser:
    return AceStep15Denoiser(random_ace_step15(TINY_ACE_STEP15, seed=4).float().requires_grad_(False))


def _linears(model: AceStep15Model, decoder_only: bool = False) -> list[str]:
    return [p for p, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (p.startswith("decoder.") or not decoder_only)]


def factors(paths: list[str], model: AceStep15Model, seed: int = 5, scale: float = 0.15) -> dict[str, tuple]:
    """A random LoRA on each of `paths`: its path -> (down, up, alpha), ranks 2..4, alphas that are not the rank."""
    g, out = torch.Generator().manual_seed(seed), {}
    for n, path in enumerate(paths):
        weight = model.get_submodule(path).weight
        rank = 2 + n % 3
        out[path] = (torch.randn(rank, weight.shape[1], generator=g) * scale,
                     torch.randn(weight.shape[0], rank, generator=g) * scale, float(rank + n % 2))
    return out


def _own(path: str) -> str:
    return path.removeprefix("decoder.")


# Layout -> (a path's name in the file, the pair's names, whether the file has alphas, decoder layers alone).
LAYOUTS = {
    "ace-step-peft": (lambda p: "base_model.model." + _own(p), ("lora_A", "lora_B"), False, True),
    "ace-step-peft-adapter": (lambda p: "base_model.model." + _own(p), ("lora_A.default", "lora_B.default"), False,
                              True),
    "diffusers": (lambda p: "transformer." + diffusers_name(_own(p)), ("lora_A", "lora_B"), False, True),
    "bare": (_own, ("lora_A", "lora_B"), False, True),
    "lycoris": (lambda p: "lycoris_" + _own(p).replace(".", "_"), ("lora_down", "lora_up"), True, True),
    "comfy": (lambda p: "diffusion_model." + p, ("lora_down", "lora_up"), True, False),
    "comfy-peft": (lambda p: "diffusion_model." + p, ("lora_A", "lora_B"), False, False),
    "kohya": (lambda p: "lora_unet_" + p.replace(".", "_"), ("lora_down", "lora_up"), True, False),
}
# The layouts diffusers' ACE-Step loader reads itself.
DIFFUSERS_READS = ("ace-step-peft", "diffusers", "bare")


def lora_file(lora: dict[str, tuple], layout: str) -> dict:
    """The LoRA in `layout`; without alphas each scale is folded into its up factor (PEFT's files carry none)."""
    name, pairs, alphas, _ = LAYOUTS[layout]
    sd = {}
    for path, (down, up, alpha) in lora.items():
        key = name(path)
        sd[f"{key}.{pairs[0]}.weight"] = down
        sd[f"{key}.{pairs[1]}.weight"] = up if alphas else up * (alpha / down.shape[0])
        if alphas:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def by_hand(model: AceStep15Model, lora: dict[str, tuple], strength: float) -> dict[str, torch.Tensor]:
    """The model's state dict with W + strength * alpha / rank * up @ down on each of the LoRA's layers."""
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for path, (down, up, alpha) in lora.items():
        expected[f"{path}.weight"] += strength * alpha / down.shape[0] * (up @ down)
    return expected


def _max_error(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[k] - theirs[k]).abs().max().item() for k in theirs)


def diffusers_merged(model: AceStep15Model, sd: dict, strength: float) -> torch.nn.Module:
    """diffusers' AceStepTransformer1DModel with our decoder's weights and the file as diffusers' ACE-Step loader reads
    it, W + strength * B @ A merged into each named layer."""
    reference = diffusers_parts(TINY_ACE_STEP15)["transformer"].eval().requires_grad_(False)
    weights = {diffusers_key(k).removeprefix("transformer."): v for k, v in model.state_dict().items()
               if k.startswith("decoder.")}
    reference.load_state_dict(weights, strict=True)
    converted = AceStepLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                reference.get_submodule(name).weight += strength * (
                    converted[f"transformer.{name}.lora_B.weight"] @ down)
    return reference


def _decoder_inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x, context_latents = torch.randn(2, 21, 64, generator=g), torch.randn(2, 21, 128, generator=g)
    states, t = torch.randn(2, 11, TINY_ACE_STEP15.encoder.hidden, generator=g), torch.rand(2, generator=g)
    return x, t, t, states, context_latents


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_patch_every_linear_layer_as_by_hand(denoiser, layout: str, strength: float) -> None:
    """Every layout patches each of its layers (the decoder's, or the whole model's for ComfyUI's names), W + strength *
    alpha / rank * up @ down, and nothing else."""
    model = denoiser.model
    lora = factors(_linears(model, decoder_only=LAYOUTS[layout][3]), model)
    loaded = lora_from_state_dict(lora_file(lora, layout))
    assert not loaded.unknown_keys and not unmatched_lora_keys(loaded, denoiser)
    assert lora_family(loaded) == "ace_step15"
    assert set(match_lora(denoiser, loaded)) == {f"model.{p}" for p in lora}
    patched = apply_lora(denoiser, loaded, strength)
    error = _max_error(patched.model.state_dict(), by_hand(model, lora, strength))
    assert error < 1e-6, error
    assert torch.equal(denoiser.model.decoder.layers[0].self_attn.q_proj.weight,
                       model.state_dict()["decoder.layers.0.self_attn.q_proj.weight"])  # the base is left as it was


@pytest.mark.parametrize("layout", DIFFUSERS_READS)
def test_decoder_matches_diffusers_with_its_loaders_reading(denoiser, layout: str) -> None:
    """The files diffusers' ACE-Step loader reads (the trainer's PEFT names, diffusers' own, ACE-Step's bare): our
    patched decoder predicts as diffusers' transformer so patched."""
    model = denoiser.model
    lora = factors(_linears(model, decoder_only=True), model, seed=6)
    sd = lora_file(lora, layout)
    patched = apply_lora(denoiser, lora_from_state_dict(sd), 0.8)
    reference = diffusers_merged(model, sd, 0.8)
    inputs = _decoder_inputs()
    with torch.no_grad():
        out, base = patched.model.decoder(*inputs), model.decoder(*inputs)
        theirs = reference(*inputs, return_dict=False)[0]
    assert (out - base).abs().max() > 0.05  # the LoRA changes the prediction ...
    assert (out - theirs).abs().max() < 1e-5  # ... as diffusers' loader has it (test_ace_step15's tolerance)


def test_lokr_and_norm_differences_by_lycoris_names(denoiser) -> None:
    """ACE-Step's LoKr adapters (LyCORIS on the decoder): W + kron(w1, w2) on a cross-attention projection, and a
    full-weight difference on a q norm, as added by hand."""
    model, g = denoiser.model, torch.Generator().manual_seed(7)
    w1, w2, diff = torch.randn(4, 4, generator=g), torch.randn(16, 16, generator=g) * 0.1, torch.randn(4, generator=g)
    sd = {"lycoris_layers_0_cross_attn_k_proj.lokr_w1": w1[:2, :4], "lycoris_layers_0_cross_attn_k_proj.lokr_w2": w2,
          "lycoris_layers_1_self_attn_q_proj.lokr_w1": w1, "lycoris_layers_1_self_attn_q_proj.lokr_w2": w2,
          "lycoris_layers_1_self_attn_q_norm.diff": diff}
    loaded = lora_from_state_dict(sd)
    assert lora_family(loaded) == "ace_step15" and not unmatched_lora_keys(loaded, denoiser)
    patched = apply_lora(denoiser, loaded, 0.5)
    layer = "decoder.layers.{}.{}.weight"
    expected = {layer.format(0, "cross_attn.k_proj"): torch.kron(w1[:2, :4], w2),
                layer.format(1, "self_attn.q_proj"): torch.kron(w1, w2), layer.format(1, "self_attn.q_norm"): diff}
    ours, base = patched.model.state_dict(), model.state_dict()
    for key, delta in expected.items():
        torch.testing.assert_close(ours[key], base[key] + 0.5 * delta, rtol=0, atol=1e-6)
    assert sum(not torch.equal(ours[k], base[k]) for k in base) == len(expected)


def test_every_spelling_names_one_layer(denoiser) -> None:
    """Decoder layers go by six names (ComfyUI's two, the trainer's, LyCORIS', diffusers' and the bare one), the rest
    of the model by ComfyUI's two, none shared by two layers."""
    model = denoiser.model
    paths = targets(model)
    decoder = [p for p in paths if p.startswith("decoder.")]
    renamed = [p for p in decoder if diffusers_name(p) != p]
    assert len(renamed) == 6 * TINY_ACE_STEP15.decoder_layers * 2  # q / k / v / o and two norms, two attentions
    index = ace_step15_index(denoiser)
    assert len(index) == 2 * len(paths) + 4 * len(decoder)
    assert ace_step15_index(model) == {k: v.removeprefix("model.") for k, v in index.items()}
    for name, path in (("lora_unet_decoder_layers_0_self_attn_q_proj", "decoder.layers.0.self_attn.q_proj"),
                       ("base_model.model.layers.1.cross_attn.o_proj", "decoder.layers.1.cross_attn.o_proj"),
                       ("transformer.layers.1.cross_attn.to_out.0", "decoder.layers.1.cross_attn.o_proj"),
                       ("transformer.layers.0.self_attn.norm_k", "decoder.layers.0.self_attn.k_norm"),
                       ("lycoris_time_embed_r_time_proj", "decoder.time_embed_r.time_proj"),
                       ("condition_embedder", "decoder.condition_embedder"),
                       ("diffusion_model.encoder.lyric_encoder.layers.0.mlp.down_proj",
                        "encoder.lyric_encoder.layers.0.mlp.down_proj"),
                       ("lora_unet_detokenizer_proj_out", "detokenizer.proj_out")):
        assert index[name] == f"model.{path}", name


def _lora(*names: str, out: int = 8, inp: int = 8):
    sd = {}
    for name in names:
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.zeros(2, inp), torch.zeros(out, 2)
    return lora_from_state_dict(sd)


OTHERS = {"FLUX": "lora_unet_double_blocks_0_img_attn_qkv",
          "QWEN_IMAGE": "diffusion_model.transformer_blocks.0.img_mod.1",
          "Z_IMAGE": "diffusion_model.layers.0.feed_forward.w1", "LUMINA2": "transformer.layers.0.attn.to_q",
          "FLUX2": "diffusion_model.double_stream_modulation_img.lin", "LTXV": "diffusion_model.patchify_proj",
          "HIDREAM": "transformer.double_stream_blocks.0.block.attn1.to_q", "WAN": "diffusion_model.blocks.0.ffn.0"}


def test_family_is_told_and_checked(denoiser) -> None:
    for name in ("base_model.model.layers.0.self_attn.q_proj", "base_model.model.layers.7.mlp.gate_proj",
                 "lycoris_layers_23_cross_attn_v_proj", "transformer.layers.0.cross_attn.to_out.0",
                 "layers.3.cross_attn.k_proj", "diffusion_model.decoder.layers.0.mlp.up_proj",
                 "lora_unet_decoder_layers_5_self_attn_o_proj",
                 "diffusion_model.encoder.lyric_encoder.layers.0.mlp.up_proj",
                 "lora_unet_encoder_timbre_encoder_embed_tokens", "diffusion_model.detokenizer.proj_out",
                 "lora_unet_tokenizer_attention_pooler_layers_0_self_attn_q_proj"):
        assert lora_family(_lora(name)) == "ace_step15", name
    ace = _lora("base_model.model.layers.0.self_attn.q_proj")
    check_lora_family(ace, "ace_step15")
    for family in ("flux", "sd3", "sdxl", "qwen_image", "lumina2", "z_image", "wan21", "hidream"):
        with pytest.raises(LoraError, match=f"is a ACE_STEP15 LoRA; it does not fit a {family.upper()} model"):
            check_lora_family(ace, family)
    for family, name in OTHERS.items():
        other = _lora(name)
        assert lora_family(other) == family.lower(), name
        with pytest.raises(LoraError, match=f"is a {family} LoRA; it does not fit a ACE_STEP15 model"):
            check_lora_family(other, "ace_step15")
        assert not match_lora(denoiser, other)  # and nothing of ACE-Step's by those names


def test_text_encoder_takes_no_lora(denoiser) -> None:
    """A file with text-encoder keys besides the decoder's: the text encoder takes none of them (as diffusers' loader
    patches the transformer alone), which the file's unmatched keys name."""
    encoder = AceStep15TextEncoder.__new__(AceStep15TextEncoder)
    assert takes_no_lora(encoder)
    model = denoiser.model
    sd = lora_file(factors(_linears(model, decoder_only=True), model, seed=8), "ace-step-peft")
    text = "lora_te_model_layers_0_self_attn_q_proj"
    sd[f"{text}.lora_A.weight"], sd[f"{text}.lora_B.weight"] = torch.ones(2, 32), torch.ones(32, 2)
    loaded = lora_from_state_dict(sd)
    assert lora_family(loaded) == "ace_step15"
    assert unmatched_lora_keys(loaded, denoiser, encoder) == [f"{text}.lora_A.weight", f"{text}.lora_B.weight"]
    assert apply_lora(encoder, loaded) is encoder


def test_lora_loaders_on_the_tiny_ace_step15_files(tmp_path, caplog) -> None:
    """UNETLoader -> LoraLoaderModelOnly (ACE-Step's trainer's file): the model patched as apply_lora patches it;
    DualCLIPLoader type ace -> LoraLoader: the same model, the text encoder untouched; a Flux LoRA refused."""
    from executor.executor import Executor
    from executor.services import Services
    from graph.document import parse_api
    from ldm.ace_step15_presets import make_ace_step15_files
    from nodes.folders import FolderPaths, set_paths
    from nodes.registry import builtin_registry
    from nodes.sd.loaders import LoraLoaderModelOnly

    files = make_ace_step15_files(tmp_path / "models", seed=2)
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    base = load_ace_step15_unet(files["diffusion_model"], dtype=torch.float32).unet
    sd = lora_file(factors(_linears(base.model, decoder_only=True), base.model, seed=9), "ace-step-peft")
    sd["lora_te_model_layers_0_self_attn_q_proj.lora_down.weight"] = torch.ones(2, 32)
    sd["lora_te_model_layers_0_self_attn_q_proj.lora_up.weight"] = torch.ones(32, 2)
    save_file(sd, loras / "style_ace.safetensors")
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 3072),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 2)},
              loras / "style_flux.safetensors")
    nodes = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["diffusion_model"].name,
                                                          "weight_dtype": "default"}},
             "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": files["text_encoder"].name,
                                                              "clip_name2": files["lm"].name, "type": "ace"}},
             "3": {"class_type": "LoraLoaderModelOnly", "inputs": {
                 "model": ["1", 0], "lora_name": "style_ace.safetensors", "strength_model": 0.7}},
             "4": {"class_type": "LoraLoader", "inputs": {
                 "model": ["1", 0], "clip": ["2", 0], "lora_name": "style_ace.safetensors", "strength_model": 0.7,
                 "strength_clip": 1.0}}}
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    try:
        engine = Executor(builtin_registry(), services=Services.create(paths))
        with caplog.at_level(logging.WARNING):
            result = engine.run(parse_api(nodes), keep=["2", "3", "4"], outputs=["3", "4"])
        assert result.ok, result.error
        said = {name: LoraLoaderModelOnly.check_links({"lora_name": name}, {"model": {"family": "ace_step15"}})
                for name in ("style_ace.safetensors", "style_flux.safetensors")}
    finally:
        set_paths(FolderPaths())
    expected = apply_lora(base, load_lora(loras / "style_ace.safetensors"), 0.7).state_dict()
    for node in ("3", "4"):
        model = result.values[node][0]
        assert model.family.name == "ace_step15"
        assert _max_error(model.unet.state_dict(), expected) == 0
    weight = "model.decoder.layers.1.cross_attn.v_proj.weight"
    assert (result.values["3"][0].unet.state_dict()[weight] - base.state_dict()[weight]).abs().max() > 0.01
    assert "its text encoder takes no LoRA" in caplog.text and "lora_te_model_layers_0" in caplog.text
    assert result.values["4"][1].encoder is result.values["2"][0].encoder
    assert said == {"style_ace.safetensors": None,
                    "style_flux.safetensors": "style_flux.safetensors is a FLUX LoRA; it does not fit the ACE_STEP15 "
                                              "model it is applied to"}
