"""FLUX.2 LoRAs on Loom's BFL-layout Flux2 (fused qkv, linear1) in diffusers' / PEFT's, ai-toolkit's, ComfyUI's and
kohya's / musubi-tuner's layouts, against diffusers' Flux2Transformer2DModel (split q, k, v) with the same weights
(moved by diffusers' single-file converter) and the same file read by diffusers' own FLUX.2 loader
(`Flux2LoraLoaderMixin.lora_state_dict`: its converters, kohya's alphas folded in) and merged into its layers by hand
(peft is not installed, so `load_lora_adapter` cannot inject the adapters itself); BFL-named files against the delta
computed here on our layers; FLUX.2 told from Flux.1 both ways; and LoraLoaderModelOnly on a tiny FLUX.2 file."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import Flux2LoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from ldm.flux2 import Flux2
from ldm.flux2_files import TINY_FLUX2, TINY_FLUX2_KLEIN, load_flux2_unet, random_flux2, write_tiny_flux2
from ldm.lora import (
    LoraError,
    apply_lora,
    check_lora_family,
    family_fits,
    load_lora,
    lora_family,
    lora_from_state_dict,
    match_lora,
    unmatched_lora_keys,
)
from ldm.lora_flux2 import flux2_index, is_flux1_lora
from tests.ldm.test_flux2 import diffusers_twin, inputs, pipeline_call

TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
ADALN = "final_layer.adaLN_modulation.1"


@pytest.fixture(scope="module")
def dev() -> Flux2:
    return random_flux2(TINY_FLUX2, seed=3).float()


@pytest.fixture(scope="module")
def klein() -> Flux2:
    return random_flux2(TINY_FLUX2_KLEIN, seed=4).float()


def _pairs(shapes: dict[str, tuple[int, int]], key: str, pair: tuple[str, str], alpha: float | None, seed: int,
           scale: float = 0.15) -> dict[str, torch.Tensor]:
    """A LoRA pair for each layer name -> (out, in), named `key.format(name=..., flat=...)`, ranks 2..4, an alpha of
    `alpha` times about the rank if given."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for n, (name, (out, inp)) in enumerate(shapes.items()):
        rank, key_name = 2 + n % 3, key.format(name=name, flat=name.replace(".", "_"))
        sd[f"{key_name}.{pair[0]}.weight"] = torch.randn(rank, inp, generator=g) * scale
        sd[f"{key_name}.{pair[1]}.weight"] = torch.randn(out, rank, generator=g) * scale
        if alpha is not None:
            sd[f"{key_name}.alpha"] = torch.tensor(alpha * (rank + n % 2))
    return sd


def _diffusers_shapes(model: Flux2, blocks_only: bool = False) -> dict[str, tuple[int, int]]:
    """diffusers' linear layers of `model`'s twin (q, k, v apart), by name -> (out, in)."""
    return {name: tuple(layer.weight.shape) for name, layer in diffusers_twin(model).named_modules()
            if isinstance(layer, torch.nn.Linear) and (not blocks_only or "transformer_blocks." in name)}


def _our_shapes(model: Flux2) -> dict[str, tuple[int, int]]:
    return {path: tuple(layer.weight.shape) for path, layer in model.named_modules()
            if isinstance(layer, torch.nn.Linear)}


def diffusers_merged(model: Flux2, sd: dict[str, torch.Tensor], strength: float) -> tuple[torch.nn.Module, set]:
    """diffusers' twin of `model` with the file as diffusers' FLUX.2 loader reads it, W + strength * B @ A merged into
    each of its layers; and the names of the layers it patched."""
    twin = diffusers_twin(model)
    converted = Flux2LoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    patched = set()
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                twin.get_submodule(name).weight += strength * (converted[f"transformer.{name}.lora_B.weight"] @ down)
                patched.add(f"{name}.weight")
    return twin, patched


def as_diffusers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return convert_flux2_transformer_checkpoint_to_diffusers(dict(model.state_dict()))


# diffusers-named files: PEFT's (every layer), DiffSynth's (bare), ai-toolkit exports of diffusers' block names under
# ComfyUI's prefix (diffusers' converter takes the blocks alone there), OneTrainer's flattened names.
DIFFUSERS_LAYOUTS = {
    "peft": ("transformer.{name}", ("lora_A", "lora_B"), False),
    "ai-toolkit-diffusers-names": ("diffusion_model.{name}", ("lora_A", "lora_B"), True),
    "diffsynth": ("{name}", ("lora_A.default", "lora_B.default"), False),
    "onetrainer": ("lora_transformer_{flat}", ("lora_down", "lora_up"), False),
}


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("variant", ["dev", "klein"])
def test_peft_lora_matches_diffusers_flux2_loader(request, variant: str, strength: float) -> None:
    """A PEFT file on every layer of diffusers' model: attention q, k, v onto rows of our fused qkv, the single
    blocks' to_qkv_mlp_proj / to_out, the SwiGLU MLPs, the shared modulations, embedders, the swapped norm_out."""
    model = request.getfixturevalue(variant)
    shapes = _diffusers_shapes(model)
    sd = _pairs(shapes, "transformer.{name}", ("lora_A", "lora_B"), None, seed=5)
    lora = lora_from_state_dict(sd)
    assert not lora.unknown_keys and not unmatched_lora_keys(lora, model)
    assert lora_family(lora) == "flux2"
    assert set(match_lora(model, lora)) == set(_our_shapes(model))
    reference, patched_names = diffusers_merged(model, sd, strength)
    assert patched_names == {f"{name}.weight" for name in shapes}  # diffusers' loader took every pair
    patched = apply_lora(model, lora, strength)
    ours, merged = as_diffusers(patched), reference.state_dict()
    assert ours.keys() == merged.keys()
    for key, weight in ours.items():
        torch.testing.assert_close(weight, merged[key], **TOLERANCE)
    x, sigma, context = inputs(4, 5)
    guidance = torch.tensor([3.5, 2.0]) if model.config.guidance_embed else None
    with torch.no_grad():
        out = patched(x, sigma, context, None if guidance is None else guidance[:, None])
        base = model(x, sigma, context, None if guidance is None else guidance[:, None])
        theirs = pipeline_call(reference, x, sigma, context, guidance)
    assert (out - base).abs().max() > 0.05
    torch.testing.assert_close(out, theirs, rtol=1e-5, atol=1e-5)  # test_flux2's tolerance


@pytest.mark.parametrize("layout", [k for k in DIFFUSERS_LAYOUTS if k != "peft"])
def test_other_diffusers_spellings_give_the_same_patch(dev, layout: str) -> None:
    key, pair, blocks_only = DIFFUSERS_LAYOUTS[layout]
    shapes = _diffusers_shapes(dev, blocks_only)
    lora = lora_from_state_dict(_pairs(shapes, key, pair, None, seed=6))
    assert not unmatched_lora_keys(lora, dev) and lora_family(lora) == "flux2"
    expected = apply_lora(dev, lora_from_state_dict(_pairs(shapes, "transformer.{name}", ("lora_A", "lora_B"),
                                                            None, seed=6)))
    patched = apply_lora(dev, lora)
    for name, weight in patched.state_dict().items():
        assert torch.equal(weight, expected.state_dict()[name]), name
    if layout == "ai-toolkit-diffusers-names":  # diffusers' converter reads this layout too
        merged = diffusers_merged(dev, _pairs(shapes, key, pair, None, seed=6), 1.0)[0].state_dict()
        for name, weight in as_diffusers(patched).items():
            torch.testing.assert_close(weight, merged[name], **TOLERANCE)


# BFL-named files: ai-toolkit's (ComfyUI's prefix, lora_A / lora_B, no alphas), ComfyUI-saved (lora_down / lora_up),
# PEFT's prefix on BFL names, kohya's / musubi-tuner's flattened names with alphas, SimpleTuner's LyCORIS.
BFL_LAYOUTS = {
    "ai-toolkit": ("diffusion_model.{name}", ("lora_A", "lora_B"), None),
    "comfy": ("diffusion_model.{name}", ("lora_down", "lora_up"), 1.0),
    "peft-bfl": ("base_model.model.{name}", ("lora_A", "lora_B"), None),
    "kohya": ("lora_unet_{flat}", ("lora_down", "lora_up"), 0.5),
    "lycoris": ("lycoris_{flat}", ("lora_down", "lora_up"), 1.0),
}


def by_hand(model: Flux2, sd: dict[str, torch.Tensor], key: str, pair: tuple[str, str],
            strength: float) -> dict[str, torch.Tensor]:
    """Each of our layers' W + strength * alpha / rank * up @ down, computed here."""
    expected = {}
    for path, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            name = key.format(name=path, flat=path.replace(".", "_"))
            down, up = sd[f"{name}.{pair[0]}.weight"], sd[f"{name}.{pair[1]}.weight"]
            scale = float(sd[f"{name}.alpha"]) / down.shape[0] if f"{name}.alpha" in sd else 1.0
            expected[f"{path}.weight"] = layer.weight + strength * scale * (up @ down)
    return expected


@pytest.mark.parametrize("layout", list(BFL_LAYOUTS))
def test_bfl_named_loras_patch_our_layers(dev, layout: str) -> None:
    key, pair, alpha = BFL_LAYOUTS[layout]
    sd = _pairs(_our_shapes(dev), key, pair, alpha, seed=7)
    lora = lora_from_state_dict(sd)
    assert not lora.unknown_keys and not unmatched_lora_keys(lora, dev)
    assert lora_family(lora) == "flux2"  # told by the SwiGLU MLPs' and linear1's shapes
    patched = apply_lora(dev, lora, 0.7).state_dict()
    for name, weight in by_hand(dev, sd, key, pair, 0.7).items():
        torch.testing.assert_close(patched[name], weight, **TOLERANCE)


@pytest.mark.parametrize("layout", ["ai-toolkit", "peft-bfl", "kohya"])
def test_bfl_named_loras_match_diffusers_loader(dev, layout: str) -> None:
    """diffusers' FLUX.2 loader on the same file: its BFL converter (every layer; the final modulation unswapped,
    see below) and its kohya converter (the blocks, img_in, txt_in, time_in, final_layer.linear; it drops the rest
    with a warning)."""
    key, pair, alpha = BFL_LAYOUTS[layout]
    sd = _pairs(_our_shapes(dev), key, pair, alpha, seed=8)
    reference, patched_names = diffusers_merged(dev, sd, 1.0)
    ours = as_diffusers(apply_lora(dev, lora_from_state_dict(sd)))
    merged = reference.state_dict()
    compared = patched_names - {"norm_out.linear.weight"}
    assert len(compared) == (33 if layout == "kohya" else 38)  # of 39 layers (q, k, v apart)
    for name in compared:
        torch.testing.assert_close(ours[name], merged[name], **TOLERANCE)
    if layout != "kohya":
        # diffusers' LoRA converter puts a BFL-named final_layer.adaLN_modulation.1 on norm_out.linear without the
        # (shift, scale) -> (scale, shift) swap its single-file converter makes for the weight itself; Loom patches
        # the layer the file names, so ours is the swapped merge.
        down, up = sd[f"{key.format(name=ADALN)}.lora_A.weight"], sd[f"{key.format(name=ADALN)}.lora_B.weight"]
        h = dev.config.hidden_size
        expected = reference.norm_out.linear.weight - (up @ down) + (up @ down).roll(h, 0)
        torch.testing.assert_close(ours["norm_out.linear.weight"], expected, **TOLERANCE)


def test_bfl_and_kohya_files_give_the_same_patch_as_diffusers_names(dev) -> None:
    """One LoRA written three ways (diffusers' split q, k, v being rows of one fused pair): the same patch."""
    g = torch.Generator().manual_seed(9)
    h, rank = dev.config.hidden_size, 3
    down, up = torch.randn(rank, h, generator=g), torch.randn(3 * h, rank, generator=g)
    bfl = {"diffusion_model.double_blocks.1.txt_attn.qkv.lora_A.weight": down,
           "diffusion_model.double_blocks.1.txt_attn.qkv.lora_B.weight": up}
    kohya = {"lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight": down,
             "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight": up,
             "lora_unet_double_blocks_1_txt_attn_qkv.alpha": torch.tensor(float(rank))}
    split = {}
    for part, rows in zip(("add_q_proj", "add_k_proj", "add_v_proj"), up.chunk(3), strict=True):
        split[f"transformer.transformer_blocks.1.attn.{part}.lora_A.weight"] = down
        split[f"transformer.transformer_blocks.1.attn.{part}.lora_B.weight"] = rows
    patched = [apply_lora(dev, lora_from_state_dict(sd), 0.8).double_blocks[1].txt_attn.qkv.weight
               for sd in (bfl, kohya, split)]
    torch.testing.assert_close(patched[0], dev.double_blocks[1].txt_attn.qkv.weight + 0.8 * up @ down, **TOLERANCE)
    torch.testing.assert_close(patched[1], patched[0], **TOLERANCE)
    torch.testing.assert_close(patched[2], patched[0], **TOLERANCE)


def test_lokr_on_fused_attention_and_comfy_linear1_qkv(dev) -> None:
    """A LoKr on the fused qkv by BFL's name and by diffusers' fused `to_qkv` (its BFL LoKr converter's target) patch
    it alike; ComfyUI's `linear1_qkv` patches the q, k, v rows of a single block's linear1."""
    g = torch.Generator().manual_seed(10)
    h = dev.config.hidden_size
    w1, w2 = torch.randn(3, 4, generator=g), torch.randn(h, h // 4, generator=g) * 0.1
    for name in ("diffusion_model.double_blocks.0.img_attn.qkv", "transformer.transformer_blocks.0.attn.to_qkv"):
        patched = apply_lora(dev, lora_from_state_dict({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2}))
        torch.testing.assert_close(patched.double_blocks[0].img_attn.qkv.weight,
                                   dev.double_blocks[0].img_attn.qkv.weight + torch.kron(w1, w2), **TOLERANCE)
    down, up = torch.randn(2, h, generator=g), torch.randn(3 * h, 2, generator=g)
    patched = apply_lora(dev, lora_from_state_dict({"diffusion_model.single_blocks.1.linear1_qkv.lora_A.weight": down,
                                                    "diffusion_model.single_blocks.1.linear1_qkv.lora_B.weight": up}))
    delta = patched.single_blocks[1].linear1.weight - dev.single_blocks[1].linear1.weight
    torch.testing.assert_close(delta[:3 * h], up @ down, **TOLERANCE)
    assert not delta[3 * h:].any()


def test_each_layer_is_written_back_under_its_bfl_name(klein) -> None:
    """The last `diffusion_model.` name of each layer in the index is BFL's (the name LoRA extraction writes)."""
    written = {path: name for name, path in flux2_index(klein).items() if name.startswith("diffusion_model.")}
    assert written == {path: f"diffusion_model.{path}" for path in _our_shapes(klein)}


def _lora(shapes: dict[str, tuple[int, int]]) -> object:
    return lora_from_state_dict({k: v for name, (out, inp) in shapes.items() for k, v in (
        (f"{name}.lora_down.weight", torch.zeros(1, inp)), (f"{name}.lora_up.weight", torch.zeros(out, 1)))})


# Released widths: FLUX.2 [dev] 6144 (MLP 18432), [klein] 9B 4096, [klein] 4B 3072 (MLP 9216); Flux.1 3072 (12288).
FLUX2_FILES = {
    "names": {"diffusion_model.double_stream_modulation_img.lin": (6 * 3072, 3072),
              "lora_unet_single_stream_modulation_lin": (3 * 3072, 3072),
              "transformer.double_stream_modulation_txt.linear": (6 * 3072, 3072),
              "transformer.transformer_blocks.0.ff.linear_in": (18432, 3072),
              "lycoris_transformer_blocks_2_ff_context_linear_out": (3072, 9216),
              "transformer.single_transformer_blocks.3.attn.to_qkv_mlp_proj": (27648, 3072),
              "diffusion_model.single_transformer_blocks.3.attn.to_out": (3072, 12288)},
    "klein-4b mlp": {"lora_unet_double_blocks_0_img_mlp_0": (18432, 3072)},
    "klein-4b mlp out": {"diffusion_model.double_blocks.4.txt_mlp.2": (3072, 9216)},
    "klein-4b linear1": {"lora_unet_single_blocks_0_linear1": (27648, 3072)},
    "klein-4b linear2": {"diffusion_model.single_blocks.19.linear2": (3072, 12288)},
    "dev attention": {"lora_unet_double_blocks_0_img_attn_qkv": (3 * 6144, 6144)},
    "klein-9b attention": {"diffusion_model.double_blocks.7.txt_attn.proj": (4096, 4096)},
}
FLUX1_FILES = {
    "modulation": {"lora_unet_double_blocks_0_img_mod_lin": (6 * 3072, 3072)},
    "mlp": {"diffusion_model.double_blocks.0.img_mlp.0": (12288, 3072)},
    "linear1": {"lora_unet_single_blocks_0_linear1": (21504, 3072)},
    "linear2": {"diffusion_model.single_blocks.3.linear2": (3072, 15360)},
    "diffusers single": {"transformer.single_transformer_blocks.0.proj_mlp": (12288, 3072)},
    "diffusers ff": {"transformer.transformer_blocks.0.ff.net.0.proj": (12288, 3072),
                     "transformer.transformer_blocks.0.attn.to_q": (3072, 3072)},
    "double block 12": {"lora_unet_double_blocks_12_img_attn_qkv": (9216, 3072)},
    "diffusers block 18": {"transformer.transformer_blocks.18.attn.to_q": (3072, 3072)},
}
# Attention alone at 3072: FLUX.2 [klein] 4B's or Flux.1's.
UNTOLD = {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072), "diffusion_model.double_blocks.1.txt_attn.proj":
          (3072, 3072)}


def test_family_is_told_from_flux1_by_names_and_shapes() -> None:
    for what, shapes in FLUX2_FILES.items():
        lora = _lora(shapes)
        assert lora_family(lora) == "flux2", what
        assert not is_flux1_lora(lora.weights), what
        check_lora_family(lora, "flux2")
        for family in ("flux", "chroma", "z_image", "qwen_image", "sdxl"):
            with pytest.raises(LoraError, match=f"is a FLUX2 LoRA; it does not fit a {family.upper()} model"):
                check_lora_family(lora, family)
    for what, shapes in FLUX1_FILES.items():
        lora = _lora(shapes)
        assert lora_family(lora) == "flux" and is_flux1_lora(lora.weights), what
        check_lora_family(lora, "flux")
        with pytest.raises(LoraError, match="is a FLUX LoRA; it does not fit a FLUX2 model"):
            check_lora_family(lora, "flux2")
    untold = _lora(UNTOLD)
    assert lora_family(untold) == "flux" and not is_flux1_lora(untold.weights)
    check_lora_family(untold, "flux2")  # as a file of no known family: applied where its names and shapes fit
    check_lora_family(untold, "flux")
    assert family_fits("flux", "flux2") and not family_fits("flux2", "flux") and not family_fits("flux2", "chroma")


def test_other_families_read_as_before() -> None:
    """FLUX.2's rules come first in lora_family: the marks of the other transformer families still tell them."""
    others = {"lora_unet_double_blocks_0_img_attn_qkv": "flux", "transformer.single_transformer_blocks.3.attn.to_q":
              "flux", "diffusion_model.transformer_blocks.0.img_mod.1": "qwen_image",
              "diffusion_model.transformer_blocks.0.attn.to_q": "qwen_image",
              "diffusion_model.blocks.0.self_attn.q": "wan", "lora_unet_joint_blocks_0_x_block_attn_qkv": "sd3",
              "diffusion_model.layers.0.attention.to_q": "z_image", "transformer.transformer_blocks.0.attn1.q_norm":
              "ltxv"}
    assert {name: lora_family(_lora({name: (8, 8)})) for name in others} == others


def test_flux1_lora_on_flux2_is_refused_and_an_untold_one_applies(dev) -> None:
    """A Flux.1 file of the tiny width (its GELU MLP 4 x wide) is refused by family; a file of attention alone
    patches the FLUX.2 model where its names and shapes fit."""
    h = dev.config.hidden_size
    flux1 = _lora({"diffusion_model.double_blocks.0.img_attn.qkv": (3 * h, h),
                   "diffusion_model.double_blocks.0.img_mlp.0": (4 * h, h)})
    with pytest.raises(LoraError, match="is a FLUX LoRA; it does not fit a FLUX2 model"):
        check_lora_family(flux1, "flux2")
    untold = lora_from_state_dict(_pairs({"double_blocks.0.img_attn.qkv": (3 * h, h)}, "lora_unet_{flat}",
                                         ("lora_down", "lora_up"), 1.0, seed=2))
    check_lora_family(untold, "flux2")
    assert set(match_lora(dev, untold)) == {"double_blocks.0.img_attn.qkv"}
    wrong = _lora({"diffusion_model.double_blocks.0.img_mlp.0": (4 * h, h)})
    with pytest.raises(LoraError, match="does not fit this model"):
        match_lora(dev, wrong)


def test_lora_loader_model_only_patches_a_flux2_file(tmp_path) -> None:
    """UNETLoader (a tiny FLUX.2 [klein] file) -> LoraLoaderModelOnly: the model's transformer is patched as
    apply_lora patches it; a FLUX.2 LoRA is refused on Flux.1 at validation, a Flux.1 one on FLUX.2 when it runs."""
    from executor.executor import Executor, WorkflowInvalid
    from executor.services import Services
    from graph.document import parse_api
    from nodes.folders import FolderPaths, set_paths
    from nodes.registry import builtin_registry
    from nodes.sd.loaders import LoraLoaderModelOnly

    models = tmp_path / "models"
    unet = write_tiny_flux2(models / "diffusion_models" / "flux2_klein_tiny.safetensors", seed=5,
                            dtype=torch.float32, config=TINY_FLUX2_KLEIN)
    (models / "loras").mkdir(parents=True)
    base = load_flux2_unet(unet, dtype=torch.float32).unet
    save_file(_pairs(_diffusers_shapes(base), "transformer.{name}", ("lora_A", "lora_B"), None, seed=3),
              models / "loras" / "style_flux2.safetensors")
    h = TINY_FLUX2.hidden_size
    save_file(_pairs({"double_blocks.0.img_mlp.0": (4 * h, h)}, "lora_unet_{flat}", ("lora_down", "lora_up"), 1.0,
                     seed=4), models / "loras" / "style_flux1.safetensors")
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    try:
        engine = Executor(builtin_registry(), services=Services.create(paths))

        def run(lora_name: str):
            doc = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet.name, "weight_dtype": "default"}},
                   "2": {"class_type": "LoraLoaderModelOnly", "inputs": {
                       "model": ["1", 0], "lora_name": lora_name, "strength_model": 0.6}}}
            return engine.run(parse_api(doc), keep=["2"], outputs=["2"])

        result = run("style_flux2.safetensors")
        assert result.ok, result.error
        model = result.values["2"][0]
        assert model.family.name == "flux2"
        expected = apply_lora(base, load_lora(models / "loras" / "style_flux2.safetensors"), 0.6).state_dict()
        patched = model.unet.state_dict()
        assert expected.keys() == patched.keys()
        for key, weight in expected.items():
            torch.testing.assert_close(patched[key].float(), weight, **TOLERANCE)
        assert (patched["double_blocks.0.img_attn.qkv.weight"].float() - base.double_blocks[0].img_attn.qkv.weight
                ).abs().max() > 0.01
        # refused at validation: its header tells a Flux.1 LoRA (a double block FLUX.2 does not have the shape of)
        with pytest.raises(WorkflowInvalid, match="style_flux1.safetensors is a FLUX.1 LoRA; it does not fit the "
                                                  "FLUX2 model it is applied to"):
            run("style_flux1.safetensors")
        said = {(name[6:11], family): LoraLoaderModelOnly.check_links({"lora_name": name},
                                                                      {"model": {"family": family}})
                for name in ("style_flux2.safetensors", "style_flux1.safetensors") for family in ("flux", "flux2")}
        assert said == {("flux2", "flux"): "style_flux2.safetensors is a FLUX2 LoRA; it does not fit the FLUX model "
                                           "it is applied to", ("flux2", "flux2"): None, ("flux1", "flux"): None,
                        ("flux1", "flux2"): "style_flux1.safetensors is a FLUX.1 LoRA; it does not fit the FLUX2 "
                                            "model it is applied to"}
    finally:
        set_paths(FolderPaths())
