"""Lumina Image 2.0 LoRAs on Loom's Lumina2Model (fused `attention.qkv`, grouped keys / values): diffusers' / PEFT's
layout (Lumina2Transformer2DModel's names, q / k / v apart) and its kohya / OneTrainer / LyCORIS spellings against
diffusers' transformer with the file as diffusers' Lumina 2 loader reads it (`Lumina2LoraLoaderMixin.lora_state_dict`)
merged into its layers by hand, W + strength * alpha / rank * B @ A (peft is not installed, so `load_lora_adapter`
cannot inject the adapters); the original-layout files (kohya's, ComfyUI's, the `diffusion_model.` ones diffusers'
converter reads, Z-Image's diffusers names as ComfyUI maps them) against the same patches; diffusers' converter of
original-layout files at the released widths; the family checks."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import Lumina2LoraLoaderMixin
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

from ldm.lora import (
    LoraError,
    apply_lora,
    check_lora_family,
    family_fits,
    lora_family,
    lora_from_state_dict,
    match_lora,
    takes_no_lora,
    unmatched_lora_keys,
)
from ldm.lora_lumina2 import diffusers_name
from ldm.lora_z_image import diffusers_name as z_image_name
from ldm.lumina2 import Lumina2Config, Lumina2Model
from ldm.lumina2_files import TINY_LUMINA2, random_lumina2
from tests.ldm.test_lumina2 import diffusers_twin, inputs, pipeline_call

_PARTS = ("to_q", "to_k", "to_v")


@pytest.fixture(scope="module")
def model() -> Lumina2Model:
    return random_lumina2(TINY_LUMINA2, seed=4).float()


def _rows(model: Lumina2Model) -> dict[str, tuple[int, int]]:
    """diffusers' q / k / v -> their (first row, rows) of our fused qkv."""
    c = model.config
    kv = c.num_kv_heads * c.head_dim
    return {"to_q": (0, c.dim), "to_k": (c.dim, kv), "to_v": (c.dim + kv, kv)}


def factors(model: Lumina2Model, seed: int = 5, scale: float = 0.15) -> dict[str, tuple]:
    """A random LoRA on every linear layer of diffusers' twin: its name -> (down, up, alpha, our path), ranks 2..4,
    alphas that are not the rank."""
    g, out, rows = torch.Generator().manual_seed(seed), {}, _rows(model)
    for n, (path, layer) in enumerate((p, m) for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        names = ([(f"{path.removesuffix('.attention.qkv')}.attn.{part}", rows[part][1]) for part in _PARTS]
                 if path.endswith(".qkv") else [(diffusers_name(path), layer.weight.shape[0])])
        for i, (name, width) in enumerate(names):
            rank = 2 + (n + i) % 3
            out[name] = (torch.randn(rank, layer.weight.shape[1], generator=g) * scale,
                         torch.randn(width, rank, generator=g) * scale, float(rank + (n + i) % 2), path)
    return out


def diffusers_file(lora: dict[str, tuple], key: str, pairs: tuple[str, str], alphas: bool) -> dict:
    """The LoRA under diffusers' names, each `key.format(name=..., flat=...)`; without `alphas` each scale is folded
    into its up factor (PEFT's files carry no alphas)."""
    sd = {}
    for name, (down, up, alpha, _) in lora.items():
        k = key.format(name=name, flat=name.replace(".", "_"))
        sd[f"{k}.{pairs[0]}.weight"] = down
        sd[f"{k}.{pairs[1]}.weight"] = up if alphas else up * (alpha / down.shape[0])
        if alphas:
            sd[f"{k}.alpha"] = torch.tensor(alpha)
    return sd


def original_file(model: Lumina2Model, lora: dict[str, tuple], key: str, pairs: tuple[str, str], alphas: bool,
                  names=lambda path: path) -> dict:
    """The same LoRA on the original module tree (`names(path)`, spelled by `key`): the q, k and v of each block as
    one fused pair (their downs stacked, their ups block-diagonal, the scales folded in), the rest as they are."""
    fused: dict[str, list] = {}
    sd = {}
    for down, up, alpha, path in lora.values():
        fused.setdefault(path, []).append((down, up * (alpha / down.shape[0])))
    for path, parts in fused.items():
        down, up = torch.cat([d for d, _ in parts]), torch.block_diag(*[u for _, u in parts])
        k = key.format(name=names(path), flat=names(path).replace(".", "_"))
        sd[f"{k}.{pairs[0]}.weight"], sd[f"{k}.{pairs[1]}.weight"] = down, up
        if alphas:
            sd[f"{k}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1
    return sd


DIFFUSERS_LAYOUTS = {
    "peft": ("transformer.{name}", ("lora_A", "lora_B"), False),
    "peft-base-model": ("base_model.model.{name}", ("lora_A", "lora_B"), False),
    "onetrainer": ("lora_transformer_{flat}", ("lora_down", "lora_up"), True),
    "simpletuner-lycoris": ("lycoris_{flat}", ("lora_down", "lora_up"), True),
    "comfy-diffusers-names": ("diffusion_model.{name}", ("lora_down", "lora_up"), True),
}


def diffusers_merged(model: Lumina2Model, sd: dict, strength: float) -> torch.nn.Module:
    """diffusers' twin with a PEFT-layout file as diffusers' Lumina 2 loader reads it, W + strength * B @ A merged
    into each of its layers."""
    reference = diffusers_twin(model)
    converted = Lumina2LoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    assert converted.keys() == sd.keys()  # diffusers' own names: read as they are
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                reference.get_submodule(name).weight += strength * (
                    converted[f"transformer.{name}.lora_B.weight"] @ down)
    return reference


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("layout", list(DIFFUSERS_LAYOUTS))
def test_diffusers_layout_matches_diffusers(model, layout: str, strength: float) -> None:
    lora = factors(model)
    sd = diffusers_file(lora, *DIFFUSERS_LAYOUTS[layout])
    loaded = lora_from_state_dict(sd)
    assert not loaded.unknown_keys and not unmatched_lora_keys(loaded, model)
    assert lora_family(loaded) == "lumina2"
    linears = {p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(match_lora(model, loaded)) == linears  # q, k and v land on the fused qkv
    patched = apply_lora(model, loaded, strength)
    reference = diffusers_merged(model, diffusers_file(lora, *DIFFUSERS_LAYOUTS["peft"]), strength)
    merged, ours = reference.state_dict(), diffusers_twin(patched).state_dict()
    assert ours.keys() == merged.keys()
    weight_error = max((ours[k] - merged[k]).abs().max().item() for k in merged)
    assert weight_error < 1e-6, weight_error
    x, sigma, context = inputs(8, 10)
    with torch.no_grad():
        out, base = patched(x, sigma, context), model(x, sigma, context)
        theirs = pipeline_call(reference, x, sigma, context)
    assert (out - base).abs().max() > 0.05  # the LoRA changes the prediction ...
    assert (out - theirs).abs().max() < 1e-5  # ... as diffusers' loader has it


ORIGINAL_LAYOUTS = {
    "kohya": ("lora_unet_{flat}", ("lora_down", "lora_up"), True, lambda path: path),
    "comfy": ("diffusion_model.{name}", ("lora_down", "lora_up"), True, lambda path: path),
    "diffusers-non-diffusers": ("diffusion_model.{name}", ("lora_A", "lora_B"), False, lambda path: path),
    "kohya-dotted": ("lora_unet_{flat}", ("lora.down", "lora.up"), True, lambda path: path),
    # Z-Image's diffusers names (ComfyUI maps them for Lumina 2): the whole layers here; q / k / v below
    "comfy-z-image-names": ("diffusion_model.{name}", ("lora_A", "lora_B"), False, z_image_name),
}


@pytest.mark.parametrize("layout", list(ORIGINAL_LAYOUTS))
def test_original_layouts_patch_as_diffusers_layout(model, layout: str) -> None:
    """A file on the original module tree (the q, k and v fused) gives the diffusers-layout file's weights."""
    key, pairs, alphas, names = ORIGINAL_LAYOUTS[layout]
    lora = factors(model, seed=8)
    loaded = lora_from_state_dict(original_file(model, lora, key, pairs, alphas, names))
    assert not loaded.unknown_keys and not unmatched_lora_keys(loaded, model)
    assert lora_family(loaded) == "lumina2"  # told by the grouped keys / values of its fused qkv
    ours = apply_lora(model, loaded, 0.8).state_dict()
    expected = apply_lora(model, lora_from_state_dict(diffusers_file(lora, *DIFFUSERS_LAYOUTS["peft"])), 0.8)
    error = max((ours[k] - v).abs().max().item() for k, v in expected.state_dict().items())
    assert error < 1e-6, error


def test_z_image_split_names_patch_the_grouped_rows(model) -> None:
    """ComfyUI's Z-Image names for the split attention (`attention.to_k`) take the key rows of Lumina 2's grouped
    attention, as diffusers' `attn.to_k` does."""
    lora = factors(model, seed=9)
    peft = diffusers_file(lora, *DIFFUSERS_LAYOUTS["peft"])
    renamed = {k.replace("transformer.", "diffusion_model.").replace(".attn.to_q.", ".attention.to_q.")
               .replace(".attn.to_k.", ".attention.to_k.").replace(".attn.to_v.", ".attention.to_v."): v
               for k, v in peft.items()}
    assert renamed.keys() != peft.keys()
    ours = apply_lora(model, lora_from_state_dict(renamed)).state_dict()
    expected = apply_lora(model, lora_from_state_dict(peft)).state_dict()
    assert max((ours[k] - v).abs().max().item() for k, v in expected.items()) < 1e-6


def test_twice_written_attention_keeps_the_split_parts(model) -> None:
    """A file with both the fused qkv / bare out and diffusers' q, k, v / to_out.0: the fused ones are repeats."""
    lora = factors(model, seed=10)
    split = diffusers_file(lora, "lora_unet_{flat}", ("lora_down", "lora_up"), True)
    fused = original_file(model, factors(model, seed=11), "lora_unet_{flat}", ("lora_down", "lora_up"), True)
    both = {**split, **{k: v for k, v in fused.items() if "_attention_qkv." in k or "_attention_out." in k}}
    ours = apply_lora(model, lora_from_state_dict(both)).state_dict()
    expected = apply_lora(model, lora_from_state_dict(split)).state_dict()
    assert max((ours[k] - v).abs().max().item() for k, v in expected.items()) < 1e-6


def test_diffusers_converter_at_the_released_widths() -> None:
    """diffusers' converter of `diffusion_model.` files (which splits q / k / v at the released 2304 / 768 / 768 rows)
    and Loom read one file alike: the converted file and the original give the same change to every layer of a
    released-width model (on the meta device: only the LoRA's tensors are real)."""
    with torch.device("meta"):
        released = Lumina2Model(Lumina2Config(num_layers=1, num_refiner_layers=1))
    g, sd = torch.Generator().manual_seed(3), {}
    for block in ("layers.0", "noise_refiner.0", "context_refiner.0"):
        for name, layer in released.get_submodule(block).named_modules():
            if isinstance(layer, torch.nn.Linear):
                out, inp = layer.weight.shape
                sd[f"diffusion_model.{block}.{name}.lora_A.weight"] = torch.randn(2, inp, generator=g)
                sd[f"diffusion_model.{block}.{name}.lora_B.weight"] = torch.randn(out, 2, generator=g)
    converted = _convert_non_diffusers_lumina2_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    original, theirs = lora_from_state_dict(sd), lora_from_state_dict(converted)
    assert lora_family(original) == lora_family(theirs) == "lumina2"
    ours, via_diffusers = match_lora(released, original), match_lora(released, theirs)
    assert set(ours) == set(via_diffusers) and len(ours) == 6 + 6 + 5  # the context refiner has no modulation
    for path, patch in ours.items():
        shape = released.get_submodule(path).weight.shape
        a, b = sd[f"diffusion_model.{path}.lora_A.weight"], sd[f"diffusion_model.{path}.lora_B.weight"]
        torch.testing.assert_close(patch.delta(shape), b @ a)
        torch.testing.assert_close(via_diffusers[path].delta(shape), b @ a)


def test_full_weight_differences_patch_norms(model) -> None:
    """LyCORIS full-weight differences on the RMS norms, by our names and diffusers' (`norm1.norm`, a context
    refiner's `norm1`)."""
    g = torch.Generator().manual_seed(11)
    dim = TINY_LUMINA2.dim
    sd = {"transformer.layers.1.norm1.norm.diff": torch.randn(dim, generator=g),
          "transformer.context_refiner.0.norm1.diff": torch.randn(dim, generator=g),
          "diffusion_model.layers.0.attention.q_norm.diff": torch.randn(TINY_LUMINA2.head_dim, generator=g)}
    patched = apply_lora(model, lora_from_state_dict(sd), 0.5)
    for key, path in (("transformer.layers.1.norm1.norm", "layers.1.attention_norm1"),
                      ("transformer.context_refiner.0.norm1", "context_refiner.0.attention_norm1"),
                      ("diffusion_model.layers.0.attention.q_norm", "layers.0.attention.q_norm")):
        torch.testing.assert_close(patched.get_submodule(path).weight,
                                   model.get_submodule(path).weight + 0.5 * sd[f"{key}.diff"])


def _lora(*names: str, out: int = 8, inp: int = 8) -> object:
    sd = {}
    for name in names:
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.zeros(2, inp), torch.zeros(out, 2)
    return lora_from_state_dict(sd)


def test_family_is_told_by_names_and_shapes() -> None:
    for name in ("transformer.layers.0.attn.to_q", "lora_transformer_noise_refiner_0_feed_forward_linear_1",
                 "transformer.layers.3.norm1.linear", "transformer.time_caption_embed.caption_embedder.1",
                 "diffusion_model.norm_out.linear_2", "lycoris_context_refiner_1_attn_to_out_0"):
        assert lora_family(_lora(name)) == "lumina2", name
    grouped = {"lora_unet_layers_0_attention_qkv": (40, 24), "diffusion_model.layers.0.attention.to_k": (8, 24),
               "transformer.layers.5.attention.to_q": (2304, 2304)}
    for name, (out, inp) in grouped.items():
        assert lora_family(_lora(name, out=out, inp=inp)) == "lumina2", name
    # Z-Image's widths (or shapes that tell nothing) read as Z-Image's, which may go onto Lumina 2 ...
    assert lora_family(_lora("lora_unet_layers_0_attention_qkv", out=3 * 3840, inp=3840)) == "z_image"
    assert lora_family(_lora("diffusion_model.layers.0.feed_forward.w1")) == "z_image"
    check_lora_family(_lora("diffusion_model.layers.0.feed_forward.w1"), "lumina2")
    assert family_fits("z_image", "lumina2") and not family_fits("lumina2", "z_image")
    # ... while one that tells Lumina 2's is refused elsewhere
    for family in ("z_image", "flux", "sdxl", "qwen_image"):
        with pytest.raises(LoraError, match=f"is a LUMINA2 LoRA; it does not fit a {family.upper()} model"):
            check_lora_family(_lora("transformer.layers.0.attn.to_q"), family)


def test_a_z_image_lora_is_refused_by_its_shapes(model) -> None:
    g = torch.Generator().manual_seed(2)
    sd = {"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.randn(4, 3840, generator=g),
          "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.randn(3 * 3840, 4, generator=g)}
    with pytest.raises(LoraError, match=r"does not fit this model .*attention.qkv"):
        apply_lora(model, lora_from_state_dict(sd))


def test_text_encoder_takes_no_lora() -> None:
    from ldm.gemma_text import Lumina2TextEncoder

    assert takes_no_lora(Lumina2TextEncoder.__new__(Lumina2TextEncoder))
