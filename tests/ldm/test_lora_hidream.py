"""HiDream-I1 LoRAs on Loom's HiDreamModel (diffusers' names) in diffusers' / PEFT's, ai-toolkit's (ComfyUI's),
kohya's, LyCORIS' and OneTrainer's layouts, against diffusers' HiDreamImageTransformer2DModel with the same weights and
the file as diffusers' own HiDream loader reads it (`HiDreamImageLoraLoaderMixin.lora_state_dict`: its converter of
`diffusion_model.` files) merged into its layers by hand, W + strength * alpha / rank * B @ A (peft is not installed,
so `load_lora_adapter` cannot inject the adapters); the experts' gates and the q / k norms by name; the family checks;
the text encoders left alone; LoraLoaderModelOnly and LoraLoader on the tiny HiDream files."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.loaders import HiDreamImageLoraLoaderMixin
from safetensors.torch import save_file

from ldm.hidream import HiDreamModel, MoEGate
from ldm.hidream_files import TINY_HIDREAM, load_hidream_unet, random_hidream
from ldm.hidream_text import HiDreamTextEncoder
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
from ldm.lora_hidream import hidream_index, targets
from tests.ldm.test_hidream import diffusers_twin, inputs, pipeline_call


@pytest.fixture(scope="module")
def model() -> HiDreamModel:
    return random_hidream(TINY_HIDREAM, seed=4).float()


def _linears(model: HiDreamModel) -> dict[str, torch.nn.Linear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def factors(model: HiDreamModel, seed: int = 5, scale: float = 0.15) -> dict[str, tuple]:
    """A random LoRA on every linear layer (the experts' each, the shared experts', the text stream's): its name ->
    (down, up, alpha), ranks 2..4, alphas that are not the rank."""
    g, out = torch.Generator().manual_seed(seed), {}
    for n, (path, layer) in enumerate(_linears(model).items()):
        rank = 2 + n % 3
        out[path] = (torch.randn(rank, layer.weight.shape[1], generator=g) * scale,
                     torch.randn(layer.weight.shape[0], rank, generator=g) * scale, float(rank + n % 2))
    return out


def lora_file(lora: dict[str, tuple], key: str, pairs: tuple[str, str], alphas: bool) -> dict:
    """The LoRA with each name spelled `key.format(name=..., flat=...)`; without `alphas` each scale is folded into its
    up factor (PEFT's files carry no alphas)."""
    sd = {}
    for name, (down, up, alpha) in lora.items():
        k = key.format(name=name, flat=name.replace(".", "_"))
        sd[f"{k}.{pairs[0]}.weight"] = down
        sd[f"{k}.{pairs[1]}.weight"] = up if alphas else up * (alpha / down.shape[0])
        if alphas:
            sd[f"{k}.alpha"] = torch.tensor(alpha)
    return sd


def diffusers_merged(model: HiDreamModel, sd: dict, strength: float) -> torch.nn.Module:
    """diffusers' twin with a file diffusers' HiDream loader reads (PEFT's or `diffusion_model.` names, lora_A /
    lora_B) as it reads it, W + strength * B @ A merged into each named layer."""
    reference = diffusers_twin(model)
    converted = HiDreamImageLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                reference.get_submodule(name).weight += strength * (
                    converted[f"transformer.{name}.lora_B.weight"] @ down)
    return reference


PEFT = ("transformer.{name}", ("lora_A", "lora_B"), False)
LAYOUTS = {
    "peft": PEFT,
    "peft-base-model": ("base_model.model.{name}", ("lora_A", "lora_B"), False),
    "ai-toolkit": ("diffusion_model.{name}", ("lora_A", "lora_B"), False),
    "comfy": ("diffusion_model.{name}", ("lora_down", "lora_up"), True),
    "bare": ("{name}", ("lora_A", "lora_B"), False),
    "kohya": ("lora_unet_{flat}", ("lora_down", "lora_up"), True),
    "kohya-dotted": ("lora_unet_{flat}", ("lora.down", "lora.up"), True),
    "simpletuner-lycoris": ("lycoris_{flat}", ("lora_down", "lora_up"), True),
    "onetrainer": ("lora_transformer_{flat}", ("lora_down", "lora_up"), True),
}


def _max_error(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[k] - theirs[k]).abs().max().item() for k in theirs)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_diffusers(model, layout: str, strength: float) -> None:
    """Every layout patches every linear layer (each expert by its own name) as diffusers' loader patches the PEFT
    file, and the prediction follows."""
    lora = factors(model)
    sd = lora_file(lora, *LAYOUTS[layout])
    loaded = lora_from_state_dict(sd)
    assert not loaded.unknown_keys and not unmatched_lora_keys(loaded, model)
    assert lora_family(loaded) == "hidream"
    assert set(match_lora(model, loaded)) == set(_linears(model))
    patched = apply_lora(model, loaded, strength)
    # diffusers reads PEFT's names and ai-toolkit's `diffusion_model.` ones itself; the rest are the PEFT file's
    # weights spelled otherwise
    reference = diffusers_merged(model, sd if layout in ("peft", "ai-toolkit") else lora_file(lora, *PEFT), strength)
    weight_error = _max_error(diffusers_twin(patched).state_dict(), reference.state_dict())
    assert weight_error < 1e-6, weight_error
    x, sigma, context, y, llama = inputs(8, 8)
    with torch.no_grad():
        out, base = patched(x, sigma, context, y, llama), model(x, sigma, context, y, llama)
        theirs = pipeline_call(reference, x, sigma, context, y, llama)
    assert (out - base).abs().max() > 0.05  # the LoRA changes the prediction ...
    assert (out - theirs).abs().max() < 1e-4  # ... as diffusers' loader has it (test_hidream's tolerance)


def test_spellings_patch_identically(model) -> None:
    """One file's pairs and alphas under kohya's, ComfyUI's, diffusers' and the LyCORIS names: the same weights, bit
    for bit."""
    lora = factors(model, seed=7)
    patched = [apply_lora(model, lora_from_state_dict(lora_file(lora, key, ("lora_down", "lora_up"), True)),
                          0.8).state_dict()
               for key in ("lora_unet_{flat}", "diffusion_model.{name}", "transformer.{name}", "lycoris_{flat}")]
    assert all(torch.equal(other[k], patched[0][k]) for other in patched[1:] for k in patched[0])
    changed = "single_stream_blocks.1.block.ff_i.experts.2.w3.weight"
    assert not torch.equal(patched[0][changed], model.state_dict()[changed])


def test_diffusers_reads_ai_toolkit_files_as_peft_ones(model) -> None:
    """diffusers' converter of `diffusion_model.` files only swaps the prefix: the same names as Loom reads."""
    lora = factors(model, seed=6)
    converted = HiDreamImageLoraLoaderMixin.lora_state_dict(lora_file(lora, *LAYOUTS["ai-toolkit"]))
    assert converted.keys() == lora_file(lora, *PEFT).keys()


def test_every_spelling_names_one_layer(model) -> None:
    """Seven spellings of each target (linear layers, gates, RMS norms), none shared by two layers."""
    paths = targets(model)
    gates = [p for p in paths if isinstance(model.get_submodule(p), MoEGate)]
    assert len(gates) == TINY_HIDREAM.num_layers + TINY_HIDREAM.num_single_layers
    assert len(hidream_index(model)) == 7 * len(paths)
    index = hidream_index(model)
    for name, path in (("lora_unet_double_stream_blocks_1_block_ff_i_experts_3_w2",
                        "double_stream_blocks.1.block.ff_i.experts.3.w2"),
                       ("lora_unet_single_stream_blocks_0_block_ff_i_shared_experts_w1",
                        "single_stream_blocks.0.block.ff_i.shared_experts.w1"),
                       ("lora_unet_double_stream_blocks_0_block_attn1_to_out_t",
                        "double_stream_blocks.0.block.attn1.to_out_t"),
                       ("lycoris_double_stream_blocks_0_block_ff_i_gate", "double_stream_blocks.0.block.ff_i.gate"),
                       ("transformer.caption_projection.4.linear", "caption_projection.4.linear")):
        assert index[name] == path


def test_gates_and_norms_by_name(model) -> None:
    """A low-rank pair and a full-weight difference on experts' gates, full-weight differences on q / k norms: the
    weights as added by hand, and diffusers' twin so merged routes the tokens alike."""
    g, dim, experts = torch.Generator().manual_seed(7), TINY_HIDREAM.hidden_size, TINY_HIDREAM.num_routed_experts
    down, up = torch.randn(2, dim, generator=g), torch.randn(experts, 2, generator=g)
    sd = {"diffusion_model.double_stream_blocks.0.block.ff_i.gate.lora_A.weight": down,
          "diffusion_model.double_stream_blocks.0.block.ff_i.gate.lora_B.weight": up,
          "transformer.single_stream_blocks.1.block.ff_i.gate.diff": torch.randn(experts, dim, generator=g),
          "lycoris_double_stream_blocks_1_block_attn1_q_rms_norm_t.diff": torch.randn(dim, generator=g) * 0.3,
          "lora_unet_single_stream_blocks_0_block_attn1_k_rms_norm.diff": torch.randn(dim, generator=g) * 0.3}
    loaded = lora_from_state_dict(sd)
    assert lora_family(loaded) == "hidream" and not unmatched_lora_keys(loaded, model)
    patched = apply_lora(model, loaded, 0.5)
    deltas = {"double_stream_blocks.0.block.ff_i.gate": up @ down}
    for key, patch in sd.items():
        if key.endswith(".diff"):
            path = hidream_index(model)[key.removesuffix(".diff")]
            deltas[path] = patch
    reference = diffusers_twin(model)
    with torch.no_grad():
        for path, delta in deltas.items():
            expected = model.get_submodule(path).weight + 0.5 * delta
            torch.testing.assert_close(patched.get_submodule(path).weight, expected, rtol=0, atol=1e-6)
            reference.get_submodule(path).weight.copy_(expected)
        x, sigma, context, y, llama = inputs(8, 8, seed=2)
        out, base = patched(x, sigma, context, y, llama), model(x, sigma, context, y, llama)
        theirs = pipeline_call(reference, x, sigma, context, y, llama)
    assert (out - base).abs().max() > 0.05
    assert (out - theirs).abs().max() < 1e-4


def _lora(*names: str, out: int = 8, inp: int = 8):
    sd = {}
    for name in names:
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.zeros(2, inp), torch.zeros(out, 2)
    return lora_from_state_dict(sd)


OTHERS = {"FLUX": "lora_unet_double_blocks_0_img_attn_qkv",
          "QWEN_IMAGE": "diffusion_model.transformer_blocks.0.img_mod.1",
          "Z_IMAGE": "diffusion_model.layers.0.feed_forward.w1", "LUMINA2": "transformer.layers.0.attn.to_q",
          "FLUX2": "diffusion_model.double_stream_modulation_img.lin", "LTXV": "diffusion_model.patchify_proj"}


def test_family_is_told_and_checked(model) -> None:
    for name in ("transformer.double_stream_blocks.0.block.attn1.to_q",
                 "lora_unet_single_stream_blocks_31_block_ff_i_experts_0_w1",
                 "diffusion_model.double_stream_blocks.15.block.ff_t.w3",
                 "single_stream_blocks.2.block.adaLN_modulation.1",
                 "lycoris_double_stream_blocks_0_block_ff_i_gate", "base_model.model.caption_projection.48.linear",
                 "lora_transformer_p_embedder_pooled_embedder_linear_1"):
        assert lora_family(_lora(name)) == "hidream", name
    hidream = _lora("transformer.double_stream_blocks.0.block.attn1.to_q")
    check_lora_family(hidream, "hidream")
    for family in ("flux", "flux2", "sd3", "sdxl", "qwen_image", "lumina2", "z_image", "wan21", "ltxv"):
        with pytest.raises(LoraError, match=f"is a HIDREAM LoRA; it does not fit a {family.upper()} model"):
            check_lora_family(hidream, family)
    for family, name in OTHERS.items():
        other = _lora(name)
        assert lora_family(other) == family.lower(), name
        with pytest.raises(LoraError, match=f"is a {family} LoRA; it does not fit a HIDREAM model"):
            check_lora_family(other, "hidream")
        assert not match_lora(model, other)  # and nothing of HiDream's by those names


def test_text_encoders_take_no_lora(model) -> None:
    """A file with CLIP-L / T5 keys besides the transformer's: the text encoder takes none of them (as diffusers'
    loader patches the transformer alone), which the file's unmatched keys name."""
    encoder = HiDreamTextEncoder.__new__(HiDreamTextEncoder)
    assert takes_no_lora(encoder)
    lora = factors(model, seed=8)
    sd = lora_file(lora, *LAYOUTS["kohya"])
    text = ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te3_encoder_block_0_layer_0_SelfAttention_q")
    for name in text:
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.ones(2, 32), torch.ones(32, 2)
    loaded = lora_from_state_dict(sd)
    assert lora_family(loaded) == "hidream"
    assert unmatched_lora_keys(loaded, model, encoder) == sorted(f"{n}.{part}.weight" for n in text
                                                                 for part in ("lora_down", "lora_up"))
    assert apply_lora(encoder, loaded) is encoder


def test_lora_loaders_on_the_tiny_hidream_files(tmp_path, caplog) -> None:
    """UNETLoader -> LoraLoaderModelOnly (an ai-toolkit file): the transformer patched as apply_lora patches it;
    QuadrupleCLIPLoader -> LoraLoader: the same model, the prompt the plain text encoder's; a Flux LoRA refused."""
    from executor.executor import Executor
    from executor.services import Services
    from graph.document import parse_api
    from ldm.hidream_presets import make_hidream_files
    from nodes.folders import FolderPaths, set_paths
    from nodes.registry import builtin_registry
    from nodes.sd.loaders import LoraLoaderModelOnly

    files = make_hidream_files(tmp_path / "models", seed=2, dtype=torch.float32)
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    base = load_hidream_unet(files["unet"], dtype=torch.float32).unet
    sd = lora_file(factors(base, seed=9), *LAYOUTS["ai-toolkit"])
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.ones(2, 32)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.ones(32, 2)
    save_file(sd, loras / "style_hidream.safetensors")
    flux = {"double_blocks.0.img_attn.qkv": (torch.zeros(2, 3072), torch.zeros(9216, 2), 2.0)}
    save_file(lora_file(flux, *LAYOUTS["kohya"]), loras / "style_flux.safetensors")
    clips = {f"clip_name{i}": files[part].name for i, part in enumerate(("clip_l", "clip_g", "t5xxl", "llama"), 1)}
    nodes = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"].name, "weight_dtype": "default"}},
             "2": {"class_type": "QuadrupleCLIPLoader", "inputs": clips},
             "3": {"class_type": "LoraLoaderModelOnly", "inputs": {
                 "model": ["1", 0], "lora_name": "style_hidream.safetensors", "strength_model": 0.7}},
             "4": {"class_type": "LoraLoader", "inputs": {
                 "model": ["1", 0], "clip": ["2", 0], "lora_name": "style_hidream.safetensors", "strength_model": 0.7,
                 "strength_clip": 1.0}},
             "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red fox"}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red fox"}}}
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    try:
        engine = Executor(builtin_registry(), services=Services.create(paths))
        with caplog.at_level(logging.WARNING):
            result = engine.run(parse_api(nodes), keep=["2", "3", "4", "5", "6"],
                                outputs=["3", "4", "5", "6"])
        assert result.ok, result.error
        said = {name: LoraLoaderModelOnly.check_links({"lora_name": name}, {"model": {"family": "hidream"}})
                for name in ("style_hidream.safetensors", "style_flux.safetensors")}
    finally:
        set_paths(FolderPaths())
    expected = apply_lora(base, load_lora(loras / "style_hidream.safetensors"), 0.7).state_dict()
    for node in ("3", "4"):
        model = result.values[node][0]
        assert model.family.name == "hidream"
        assert _max_error(model.unet.state_dict(), expected) == 0
    weight = "double_stream_blocks.0.block.ff_i.experts.1.w1.weight"
    assert (result.values["3"][0].unet.state_dict()[weight] - base.state_dict()[weight]).abs().max() > 0.01
    assert "its text encoder takes no LoRA" in caplog.text and "lora_te1_text_model" in caplog.text
    assert result.values["4"][1].encoder is result.values["2"][0].encoder
    assert torch.equal(result.values["5"][0][0][0], result.values["6"][0][0][0])
    assert said == {"style_hidream.safetensors": None,
                    "style_flux.safetensors": "style_flux.safetensors is a FLUX LoRA; it does not fit the HIDREAM "
                                              "model it is applied to"}
