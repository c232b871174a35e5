"""LTX-2 LoRAs (ldm/lora_ltx2.py) on Loom's LTX2Model and the LTX2Denoiser LoraLoader hands them: Lightricks' PEFT
layout (`diffusion_model.<module>.lora_A` / `lora_B`, `.alpha`) merged as W + strength * alpha / rank * B @ A, checked
by hand; the same pairs in DiffSynth's, kohya's and diffusers' spellings; diffusers 0.42.1's own LTX-2 loader
(`LTX2LoraLoaderMixin.lora_state_dict`) merging a file into its LTX2VideoTransformer3DModel / connectors with
identical weights (peft is not installed: merged by hand); the family a file reads as; LoraLoaderModelOnly itself."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import LTX2LoraLoaderMixin
from safetensors.torch import save_file

from ldm.lora import (
    LoraError,
    apply_lora,
    check_lora_family,
    family_fits,
    load_lora,
    lora_family,
    lora_from_state_dict,
    match_lora,
    peek_lora,
    takes_no_lora,
    unmatched_lora_keys,
)
from ldm.lora_ltx2 import diffusers_name
from ldm.ltx2 import LTX2Model, convert_diffusers_state_dict, tiny_config, tiny_config_23
from ldm.ltx2_files import LTX2Denoiser, LTX2Family
from tests.ldm.test_ltx2 import _references

# Each kind of layer an LTX-2 LoRA targets, in two blocks: video and audio attention, the audio-video
# cross-attentions, both streams' MLPs.
BLOCK_LAYERS = ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "audio_attn1.to_v", "audio_attn2.to_out.0",
                "audio_to_video_attn.to_q", "audio_to_video_attn.to_k", "video_to_audio_attn.to_v",
                "video_to_audio_attn.to_out.0", "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2")
PATHS = [f"transformer_blocks.{i}.{name}" for i in range(2) for name in BLOCK_LAYERS] + [
    "patchify_proj", "av_ca_a2v_gate_adaln_single.linear", "audio_proj_out"]
TOL = 1e-6


@pytest.fixture(scope="module")
def denoiser() -> LTX2Denoiser:
    torch.manual_seed(0)
    model = LTX2Model(tiny_config()).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return LTX2Denoiser(model).eval()


def pairs(model: LTX2Model, paths: list[str], seed: int = 5) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """path -> (down [rank, in], up [out, rank], alpha), ranks 2-4."""
    g, out = torch.Generator().manual_seed(seed), {}
    for n, path in enumerate(paths):
        rows, cols = model.get_submodule(path).weight.shape
        rank = 2 + n % 3
        out[path] = (torch.randn(rank, cols, generator=g) * 0.3, torch.randn(rows, rank, generator=g) * 0.3,
                     float(1 + n % 4))
    return out


def peft_file(lora: dict, layout: str = "lightricks") -> dict[str, torch.Tensor]:
    """The pairs as a file: Lightricks' / ComfyUI's (`diffusion_model.`, lora_A / lora_B, .alpha), DiffSynth's (bare,
    PEFT's `.default` adapter), kohya's (`lora_unet_` flattened, lora_down / lora_up) or diffusers' (`transformer.`
    then its names)."""
    sd = {}
    for path, (down, up, alpha) in lora.items():
        if layout == "kohya":
            key, a, b = f"lora_unet_{path.replace('.', '_')}", "lora_down.weight", "lora_up.weight"
        else:
            key = {"lightricks": f"diffusion_model.{path}", "diffsynth": path,
                   "diffusers": f"transformer.{diffusers_name(path)}"}[layout]
            a, b = ("lora_A.default.weight", "lora_B.default.weight") if layout == "diffsynth" else (
                "lora_A.weight", "lora_B.weight")
        sd[f"{key}.{a}"], sd[f"{key}.{b}"], sd[f"{key}.alpha"] = down, up, torch.tensor(alpha)
    return sd


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_peft_lora_merges_as_alpha_over_rank_up_down(denoiser, strength: float) -> None:
    lora = pairs(denoiser.model, PATHS)
    loaded = lora_from_state_dict(peft_file(lora))
    assert not loaded.unknown_keys and len(match_lora(denoiser, loaded)) == len(PATHS)
    patched = apply_lora(denoiser, loaded, strength)
    worst = 0.0
    for path, (down, up, alpha) in lora.items():
        base = denoiser.model.get_submodule(path).weight
        expected = base.double() + strength * alpha / down.shape[0] * (up.double() @ down.double())
        worst = max(worst, (patched.model.get_submodule(path).weight.double() - expected).abs().max().item())
        assert not torch.equal(patched.model.get_submodule(path).weight, base)
    assert worst < TOL, worst  # measured: 1.1e-7 (strength 1), 5.6e-8 (0.5)
    ours, theirs = patched.state_dict(keep_vars=True), denoiser.state_dict(keep_vars=True)
    untouched = [k for k in theirs if k.removeprefix("model.").removesuffix(".weight") not in lora]
    assert untouched and all(ours[k] is theirs[k] for k in untouched)  # shared, not copied
    assert isinstance(patched, LTX2Denoiser) and patched is not denoiser


def test_every_spelling_patches_the_same_layers(denoiser) -> None:
    lora = pairs(denoiser.model, PATHS + ["adaln_single.linear",
                                          "video_embeddings_connector.transformer_1d_blocks.0.attn1.to_k"])
    lightricks = apply_lora(denoiser, lora_from_state_dict(peft_file(lora)), 0.7).state_dict()
    for layout in ("diffsynth", "kohya", "diffusers"):
        sd = peft_file(lora, layout)
        if layout == "diffusers":  # the connectors are diffusers' LTX2TextConnectors, under `connectors.`
            sd = {k.replace("transformer.video_connector.", "connectors.video_connector."): v for k, v in sd.items()}
        loaded = lora_from_state_dict(sd)
        assert not loaded.unknown_keys and len(match_lora(denoiser, loaded)) == len(lora), layout
        other = apply_lora(denoiser, loaded, 0.7).state_dict()
        assert all(torch.equal(other[k], v) for k, v in lightricks.items()), layout


def test_file_merged_by_diffusers_ltx2_loader(denoiser) -> None:
    """A Lightricks-layout file on every transformer layer, read by diffusers' LTX-2 loader (which renames it to its
    own names) and merged into diffusers' transformer, equals ours after converting diffusers' weights back."""
    ref, video, audio, model = _references(tiny_config())
    paths = [p for p, layer in model.named_modules() if isinstance(layer, torch.nn.Linear)
             and not p.startswith(("video_embeddings_connector", "audio_embeddings_connector"))]
    lora = pairs(model, paths, seed=8)
    sd = peft_file(lora)
    converted = LTX2LoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    assert len(converted) == len(sd)
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                alpha = converted[f"transformer.{name}.alpha"].item()
                ref.get_submodule(name).weight += (0.5 * alpha / down.shape[0]
                                                   * converted[f"transformer.{name}.lora_B.weight"] @ down)
    expected = convert_diffusers_state_dict(
        {**ref.state_dict(), **{f"video_connector.{k}": v for k, v in video.state_dict().items()},
         **{f"audio_connector.{k}": v for k, v in audio.state_dict().items()}})
    patched = apply_lora(LTX2Denoiser(model), lora_from_state_dict(sd), 0.5).model.state_dict()
    assert len(lora) > 80 and set(expected) == set(patched)
    worst = max((patched[k] - v).abs().max().item() for k, v in expected.items())
    assert worst < TOL, worst  # measured: 6.0e-8


def test_diffusers_names_patch_diffusers_layers(denoiser) -> None:
    """A file in diffusers' names, taken from its LTX2VideoTransformer3DModel's and LTX2ConnectorTransformer1d's own
    layers (`transformer.`, `connectors.video_connector.` / `connectors.audio_connector.`), merged into them by hand,
    equals ours."""
    ref, video, audio, model = _references(tiny_config())
    modules = {"transformer": ref, "connectors.video_connector": video, "connectors.audio_connector": audio}
    g, sd = torch.Generator().manual_seed(9), {}
    with torch.no_grad():
        for prefix, module in modules.items():
            for name, layer in module.named_modules():
                if isinstance(layer, torch.nn.Linear):
                    down = torch.randn(3, layer.in_features, generator=g) * 0.3
                    up = torch.randn(layer.out_features, 3, generator=g) * 0.3
                    sd[f"{prefix}.{name}.lora_A.weight"], sd[f"{prefix}.{name}.lora_B.weight"] = down, up
                    layer.weight += 1.5 * up @ down
    patched = apply_lora(model, lora_from_state_dict(sd), 1.5).state_dict()
    expected = convert_diffusers_state_dict(
        {**ref.state_dict(), **{f"video_connector.{k}": v for k, v in video.state_dict().items()},
         **{f"audio_connector.{k}": v for k, v in audio.state_dict().items()}})
    assert len(sd) > 200 and not unmatched_lora_keys(lora_from_state_dict(sd), model)
    worst = max((patched[k] - v).abs().max().item() for k, v in expected.items())
    assert worst < TOL, worst  # measured: 2.4e-7


def test_diffusers_names_are_diffusers_converters() -> None:
    ref, video, _, model = _references(tiny_config_23())
    diffusers = {**ref.state_dict(), **{f"video_connector.{k}": v for k, v in video.state_dict().items()}}
    ours = convert_diffusers_state_dict(diffusers)
    assert len(ours) == len(diffusers) and model.state_dict().keys() >= set(ours)
    for key, tensor in ours.items():
        path, _, suffix = key.rpartition(".") if key.endswith((".weight", ".bias")) else (key, "", "")
        assert torch.equal(diffusers[diffusers_name(path) + (f".{suffix}" if suffix else "")], tensor), key


def test_tables_norms_and_registers_take_full_weight_differences(denoiser) -> None:
    m = denoiser.model
    torch.manual_seed(2)
    diffs = {"transformer_blocks.1.scale_shift_table_a2v_ca_audio": torch.randn(5, 32),
             "audio_scale_shift_table": torch.randn(2, 32),
             "transformer_blocks.0.audio_attn2.q_norm": torch.randn(32),
             "video_embeddings_connector.learnable_registers": torch.randn(8, 48)}
    patched = apply_lora(denoiser, lora_from_state_dict({f"diffusion_model.{k}.diff": v for k, v in diffs.items()}),
                         0.5).model
    for path, diff in diffs.items():
        before = m.get_parameter(path) if not path.endswith("norm") else m.get_submodule(path).weight
        after = patched.get_parameter(path) if not path.endswith("norm") else patched.get_submodule(path).weight
        torch.testing.assert_close(after, before + 0.5 * diff, atol=TOL, rtol=0)


def test_ltx23_gates_and_prompt_modulation() -> None:
    torch.manual_seed(1)
    model = LTX2Model(tiny_config_23()).eval()
    paths = ["transformer_blocks.0.attn1.to_gate_logits", "transformer_blocks.1.audio_to_video_attn.to_gate_logits",
             "prompt_adaln_single.linear", "audio_prompt_adaln_single.emb.timestep_embedder.linear_1"]
    lora = pairs(model, paths)
    loaded = lora_from_state_dict(peft_file(lora))
    assert lora_family(loaded) == "ltx2"
    patched = apply_lora(LTX2Denoiser(model), loaded, 1.0).model
    for path, (down, up, alpha) in lora.items():
        expected = model.get_submodule(path).weight + alpha / down.shape[0] * up @ down
        torch.testing.assert_close(patched.get_submodule(path).weight, expected, atol=TOL, rtol=0)


def _of(*names: str, width: int = 8) -> object:
    return lora_from_state_dict({k: v for name in names for k, v in (
        (f"{name}.lora_A.weight", torch.zeros(2, width)), (f"{name}.lora_B.weight", torch.zeros(width, 2)))})


def test_family() -> None:
    for names in (["diffusion_model.transformer_blocks.3.audio_attn1.to_q", "diffusion_model.transformer_blocks.3"
                   ".attn1.to_q"],
                  ["diffusion_model.transformer_blocks.0.audio_to_video_attn.to_k"],
                  ["transformer_blocks.7.video_to_audio_attn.to_out.0"],
                  ["diffusion_model.transformer_blocks.0.audio_ff.net.2"],
                  ["lora_unet_transformer_blocks_0_audio_attn2_to_v"],
                  ["diffusion_model.av_ca_video_scale_shift_adaln_single.linear"],
                  ["diffusion_model.audio_patchify_proj"], ["transformer.audio_proj_in"],
                  ["transformer.av_cross_attn_audio_v2a_gate.linear"], ["transformer.audio_time_embed.linear"],
                  ["connectors.video_connector.transformer_blocks.0.attn1.to_q"],
                  ["diffusion_model.video_embeddings_connector.transformer_1d_blocks.1.ff.net.2"],
                  ["diffusion_model.transformer_blocks.2.attn2.to_gate_logits"],
                  ["diffusion_model.prompt_adaln_single.linear"]):
        assert lora_family(_of(*names)) == "ltx2", names
    # LTX-Video's names alone (LTX-2's video stream, at LTX-Video 13B's width too): LTX-Video's, fitting LTX-2
    video_only = _of("diffusion_model.transformer_blocks.0.attn1.to_q", width=4096)
    assert lora_family(video_only) == "ltxv" and lora_family(_of("diffusion_model.patchify_proj")) == "ltxv"
    check_lora_family(video_only, "ltx2")
    check_lora_family(video_only, "ltxv")
    assert family_fits("ltxv", "ltx2") and not family_fits("ltx2", "ltxv")
    audio = _of("diffusion_model.transformer_blocks.0.audio_attn1.to_q")
    check_lora_family(audio, "ltx2")
    with pytest.raises(LoraError, match="is a LTX2 LoRA; it does not fit a LTXV model"):
        check_lora_family(audio, "ltxv")
    with pytest.raises(LoraError, match="is a LTX2 LoRA; it does not fit a WAN21 model"):
        check_lora_family(audio, "wan21")
    with pytest.raises(LoraError, match="is a WAN LoRA; it does not fit a LTX2 model"):
        check_lora_family(_of("diffusion_model.blocks.0.self_attn.q"), "ltx2")
    assert lora_family(_of("transformer.transformer_blocks.0.attn.to_q", width=3072)) == "flux"


def test_lora_loader_model_only(denoiser, tmp_path, monkeypatch) -> None:
    """The node on an LTX-2 MODEL: the header's family passes its link check (an LTX-Video MODEL's refuses it), its
    MODEL samples as the weights merged by hand do, and the text encoder (LoraLoader's CLIP side) takes none."""
    from nodes.context import NodeContext
    from nodes.sd import loaders
    from nodes.sd.models import DiffusionModel

    lora = pairs(denoiser.model, PATHS, seed=11)
    sd = peft_file(lora) | {"text_embedding_projection.aggregate_embed.lora_A.weight": torch.zeros(2, 8),
                            "text_embedding_projection.aggregate_embed.lora_B.weight": torch.zeros(8, 2)}
    path = tmp_path / "ltx-2-19b-tiny-lora.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    monkeypatch.setattr(loaders, "get_paths", lambda: type("Paths", (), {"find_model": lambda _, kind, name: path})())
    assert loaders.header_family("loras", path.name) == lora_family(peek_lora(path)) == "ltx2"
    node = loaders.LoraLoaderModelOnly()
    node.ctx = NodeContext()
    assert node.check_links({"lora_name": path.name}, {"model": {"family": "ltx2"}}) is None
    assert "is a LTX2 LoRA" in node.check_links({"lora_name": path.name}, {"model": {"family": "ltxv"}})
    model = DiffusionModel(unet=denoiser, family=LTX2Family(tiny_config()), source="tiny")
    (patched,) = node.execute(model, path.name, 0.8)
    assert patched.loras == (path.name,) and model.unet is denoiser
    merged = LTX2Model(tiny_config()).eval()
    state = {k: v.clone() for k, v in denoiser.model.state_dict().items()}
    for layer, (down, up, alpha) in lora.items():
        state[f"{layer}.weight"] += 0.8 * alpha / down.shape[0] * up @ down
    merged.load_state_dict(state)
    torch.manual_seed(3)
    parts = [torch.randn(1, 16, 2, 3, 4), torch.randn(1, 8, 5, 16)]
    context, audio_context = torch.randn(1, 6, 48), torch.randn(1, 6, 48)
    with torch.no_grad():
        ours = patched.unet(parts, torch.tensor([0.6]), context, audio_context=audio_context)
        hand = LTX2Denoiser(merged)(parts, torch.tensor([0.6]), context, audio_context=audio_context)
        base = denoiser(parts, torch.tensor([0.6]), context, audio_context=audio_context)
    for o, h, b in zip(ours, hand, base, strict=True):
        assert (o - b).abs().max() > 1e-3
        assert (o - h).abs().max() < 1e-5, (o - h).abs().max()  # measured: 8.9e-7 (video), 5.4e-7 (audio)
    # LoraLoader's text-encoder side: LTX-2's Gemma 3 and projection take no LoRA; their keys patch nothing
    from ldm.ltx2_text import ltx2_text_encoder_from_state_dicts, tiny_gemma3_state, tiny_projection_state

    encoder = ltx2_text_encoder_from_state_dicts(tiny_gemma3_state(seed=1), tiny_projection_state(seed=2)).encoder
    loaded = load_lora(path)
    assert takes_no_lora(encoder) and apply_lora(encoder, loaded, 1.0) is encoder
    assert unmatched_lora_keys(loaded, denoiser, encoder) == sorted(k for k in sd if k.startswith("text_embedding"))
