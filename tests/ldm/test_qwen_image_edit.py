"""Qwen-Image-Edit's reference latents in Loom's Qwen-Image transformer against diffusers' QwenImageTransformer2DModel
called as QwenImageEditPipeline (one reference) and QwenImageEditPlusPipeline (several; Edit-2511 with zero_cond_t)
call it, with the same weights; ComfyUI's placements (its default "index", "offset", the text after the noisy
latent), Edit-2511's files, and a whole ReferenceLatent workflow against a plain Euler loop over diffusers' model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import safetensors
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import UNET_PREFIX
from ldm.flux_variants import References, reference_placements
from ldm.qwen_image import ZERO_COND_KEY, QwenImageModel, reference_grids
from ldm.qwen_image_files import (
    TINY_QWEN_IMAGE,
    load_qwen_image_unet,
    peek_qwen_image,
    random_qwen_image,
    write_tiny_qwen_image,
)
from ldm.qwen_image_presets import make_qwen_image_files
from ldm.sampling import prepare_noise
from ldm.wan_files import WAN21_MEAN, WAN21_STD
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_flux_variants_nodes import engine, refusal, root  # noqa: F401 (fixtures)
from tests.nodes.test_flux_variants_nodes import workflow as flux_workflow

EDIT_2511 = dataclasses.replace(TINY_QWEN_IMAGE, zero_cond_t=True)


@pytest.fixture(scope="module")
def model() -> QwenImageModel:
    return random_qwen_image(TINY_QWEN_IMAGE, seed=5)


def diffusers_twin(model: QwenImageModel, zero_cond_t: bool = False) -> QwenImageTransformer2DModel:
    """diffusers' transformer with `model`'s weights under its own key names (the released files'), strictly."""
    c = model.config
    reference = QwenImageTransformer2DModel(
        patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.joint_attention_dim,
        axes_dims_rope=c.axes_dim, zero_cond_t=zero_cond_t)
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference.eval()


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w/4, 4C], as the pipelines' _pack_latents."""
    b, ch, h, w = x.shape
    return x.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, ch * 4)


def edit_pipeline_call(reference: QwenImageTransformer2DModel, x: torch.Tensor, sigma: torch.Tensor,
                       context: torch.Tensor, refs: list[torch.Tensor], mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """diffusers' transformer as QwenImageEditPlusPipeline calls it (QwenImageEditPipeline alike, one reference):
    the packed latent then each packed reference along the tokens, img_shapes [(1, h/2, w/2)] for the latent then
    each reference, timestep = t, the prompt's mask; the output's first tokens (the latent's) unpacked."""
    b, ch, h, w = x.shape
    tokens = torch.cat([pack(x), *(pack(r).expand(b, -1, -1) for r in refs)], dim=1)
    shapes = [(1, h // 2, w // 2), *((1, r.shape[-2] // 2, r.shape[-1] // 2) for r in refs)]
    with torch.no_grad():
        out = reference(tokens, encoder_hidden_states=context, encoder_hidden_states_mask=mask, timestep=sigma,
                        img_shapes=[shapes] * b, return_dict=False)[0]
    out = out[:, : h * w // 4]
    return out.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)


def inputs(h: int, w: int, ref_sizes: list[tuple[int, int]], tokens: int = 7, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, h, w, generator=g)
    context = torch.randn(batch, tokens, TINY_QWEN_IMAGE.context_dim, generator=g)
    refs = [torch.randn(1, 16, rh, rw, generator=g) for rh, rw in ref_sizes]
    return x, torch.tensor([0.9, 0.35])[:batch], context, refs


@pytest.mark.parametrize("ref_sizes", [[(8, 12)], [(6, 8)], [(8, 12), (4, 6)], [(6, 10), (8, 12), (4, 4)]])
def test_references_match_edit_pipelines(model, ref_sizes):
    """One reference (Edit), or several (Edit-2509 / Plus), none larger than the latent; odd grids (3 x 5) too."""
    x, sigma, context, refs = inputs(8, 12, ref_sizes)
    expected = edit_pipeline_call(diffusers_twin(model), x, sigma, context, refs)
    with torch.no_grad():
        got = model(x, sigma, context, ref_latents=refs)
        plain = model(x, sigma, context)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)
    assert (got - plain).abs().mean() > 0.01  # the references count


def test_padded_prompt_with_references(model):
    """A batch of two prompts, the second padded (its last 3 tokens masked), as cond and uncond run together: the
    references' tokens are attended to by every prompt, the padding by none."""
    x, sigma, context, refs = inputs(8, 8, [(8, 8), (6, 6)])
    mask = torch.ones(2, context.shape[1], dtype=torch.long)
    mask[1, -3:] = 0
    expected = edit_pipeline_call(diffusers_twin(model), x, sigma, context, refs, mask)
    with torch.no_grad():
        got = model(x, sigma, context, attn_mask=mask, ref_latents=refs)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)


def test_text_after_a_larger_reference(model):
    """A reference larger than the latent (6 x 8 patches beside 4 x 4): ComfyUI starts the text after the latent's
    half-size (2), diffusers after the largest image's (4); `text_after_all_images` is diffusers' choice."""
    x, sigma, context, refs = inputs(8, 8, [(12, 16)])
    expected = edit_pipeline_call(diffusers_twin(model), x, sigma, context, refs)
    with torch.no_grad():
        comfy = model(x, sigma, context, ref_latents=refs)
        got = model(x, sigma, context, ref_latents=refs, text_after_all_images=True)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)
    assert (comfy - expected).abs().mean() > 1e-3


def test_edit_2511_matches_zero_cond_t(model):
    """Edit-2511: diffusers' zero_cond_t (references modulated at timestep 0) is ComfyUI's "index_timestep_zero",
    the default of a model whose file carries the marker, and a method the prompts may choose for any model."""
    x, sigma, context, refs = inputs(8, 12, [(8, 12), (4, 6)])
    expected = edit_pipeline_call(diffusers_twin(model, zero_cond_t=True), x, sigma, context, refs)
    edit_2511 = QwenImageModel(EDIT_2511).eval()
    edit_2511.load_state_dict(model.state_dict())
    with torch.no_grad():
        by_default = edit_2511(x, sigma, context, ref_latents=refs)
        chosen = model(x, sigma, context, ref_latents=References(tuple(refs), "index_timestep_zero"))
        index = edit_2511(x, sigma, context, ref_latents=References(tuple(refs), "index"))
        without = edit_2511(x, sigma, context)
    torch.testing.assert_close(by_default, expected, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(chosen, expected, atol=3e-5, rtol=1e-4)
    assert (index - expected).abs().mean() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(without, model(x, sigma, context))  # no references: the plain model


def test_comfyuis_placements():
    """(frame, row offset, column offset in patches) by ComfyUI's methods for Qwen-Image: "index" at frames 1, 2;
    "offset" (and "uxo", which ComfyUI's Qwen-Image places the same way) at frame 1, the second below the first."""
    sizes = [(4, 6), (6, 4)]
    assert reference_grids(sizes, "index") == reference_grids(sizes, "index_timestep_zero") == [(1, 0, 0), (2, 0, 0)]
    assert reference_grids(sizes, "offset") == reference_grids(sizes, "uxo") == [(1, 0, 0), (1, 2, 0)]
    with pytest.raises(ValueError, match="'index_timestep_zero' .*Loom's Flux places references by one of"):
        reference_placements(sizes, 3, 4, "index_timestep_zero")  # Flux's placements: refused, not run as "index"


def test_offset_method_moves_the_references(model):
    x, sigma, context, refs = inputs(8, 8, [(8, 8), (8, 8)])
    with torch.no_grad():
        index = model(x, sigma, context, ref_latents=References(tuple(refs), "index"))
        offset = model(x, sigma, context, ref_latents=References(tuple(refs), "offset"))
    assert (index - offset).abs().mean() > 1e-3


def test_reference_shapes(model):
    """One-frame 5-D references (Wan 2.1's VAE makes those) and odd sizes are taken; more frames, other channels or
    another batch are refused by name."""
    x, sigma, context, refs = inputs(8, 8, [(8, 8)])
    with torch.no_grad():
        four = model(x, sigma, context, ref_latents=refs)
        five = model(x[:, :, None], sigma, context, ref_latents=[refs[0][:, :, None]])
        assert five.shape == (2, 16, 1, 8, 8)
        torch.testing.assert_close(five[:, :, 0], four)
        assert torch.isfinite(model(x, sigma, context, ref_latents=[torch.randn(1, 16, 7, 9)])).all()
    for bad, words in ((torch.randn(1, 16, 2, 8, 8), "reference latents of 2 frames"),
                       (torch.randn(1, 4, 8, 8), r"reference latents \[B, 16, H, W\]"),
                       (torch.randn(3, 16, 8, 8), "a batch of 3 reference latents for a batch of 2")):
        with pytest.raises(ValueError, match=words):
            model(x, sigma, context, ref_latents=[bad])


@pytest.mark.parametrize("prefix", ["", UNET_PREFIX])
def test_edit_2511_files(tmp_path, prefix):
    """Comfy-Org's Edit-2511 files are Qwen-Image's keys and the empty `__index_timestep_zero__` marker: the config
    reads it (references at timestep 0 by default), the marker is not an unused key; Edit and 2509 files are plain
    Qwen-Image files."""
    path = write_tiny_qwen_image(tmp_path / "qwen_image_edit_2511.safetensors", dtype=torch.float32, prefix=prefix,
                                 config=EDIT_2511)
    with safetensors.safe_open(path, "pt") as f:
        assert f.get_tensor(prefix + ZERO_COND_KEY).shape == (0,)
    loaded = load_qwen_image_unet(path, dtype=torch.float32)
    assert loaded.family.unet_config == EDIT_2511 == peek_qwen_image(path).unet_config
    assert loaded.family.unet_config.reference_method == "index_timestep_zero"
    assert loaded.unused_keys == []
    plain = load_qwen_image_unet(write_tiny_qwen_image(tmp_path / "qwen_image_edit_2509.safetensors", prefix=prefix))
    assert plain.family.unet_config == TINY_QWEN_IMAGE and plain.family.unet_config.reference_method == "index"


# A whole run: ComfyUI's Qwen-Image-Edit graph on tiny files, against a plain Euler loop over diffusers' model.
WIDTH, HEIGHT, SEED, STEPS, SHIFT = 48, 32, 4, 2, 3.1  # 2 steps: `simple` takes 1 - i / 2 before the shift


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("qwen_edit")
    paths = FolderPaths(base=base)
    made = make_qwen_image_files(base / "models", seed=7, dtype=torch.float32)
    paths.input.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in (("photo.png", (WIDTH, HEIGHT)), ("style.png", (32, 32))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths.input / name)
    set_paths(paths)
    yield paths, made
    set_paths(FolderPaths())


def workflow(made: dict, references: tuple[str, ...] = ("photo.png",), method: str | None = None,
             unet: str | None = None) -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet or made["unet"].name,
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": made["qwen25vl"].name, "type": "qwen_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": made["vae"].name}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": SHIFT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "make the sky red"}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["7", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    positive = ["5", 0]
    for i, name in enumerate(references):
        doc[f"2{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        doc[f"3{i}"] = {"class_type": "VAEEncode", "inputs": {"pixels": [f"2{i}", 0], "vae": ["3", 0]}}
        doc[f"4{i}"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": positive, "latent": [f"3{i}", 0]}}
        positive = [f"4{i}", 0]
    if method is not None:
        doc["50"] = {"class_type": "FluxKontextMultiReferenceLatentMethod",
                     "inputs": {"conditioning": positive, "reference_latents_method": method}}
        positive = ["50", 0]
    doc["8"]["inputs"]["positive"] = doc["8"]["inputs"]["negative"] = positive
    return doc


def run(paths: FolderPaths, doc: dict, keep: list[str]) -> list:
    result = Executor(builtin_registry(), services=Services.create(paths)).run(parse_api(doc), keep=keep)
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def euler_over_diffusers(made: dict, states: torch.Tensor, refs: list[torch.Tensor],
                         zero_cond_t: bool = False) -> torch.Tensor:
    """The flow Euler loop over diffusers' transformer as the edit pipelines call it: the noise at the first level,
    x += (next - level) * v at `simple`'s levels shifted by diffusers' scheduler; the result unscaled by Wan 2.1's
    statistics, as a LATENT holds it."""
    transformer = diffusers_twin(load_qwen_image_unet(made["unet"], dtype=torch.float32).unet, zero_cond_t)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    scheduler.set_timesteps(sigmas=[1 - i / STEPS for i in range(STEPS)])
    levels = scheduler.sigmas
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1) for v in (WAN21_MEAN, WAN21_STD))
    x = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED) * levels[0]
    scaled = [(r - mean) / std for r in refs]
    for level, following in zip(levels[:-1], levels[1:], strict=True):
        v = edit_pipeline_call(transformer, x, level.reshape(1), states, scaled)
        x = x + (following - level) * v
    return x * std + mean


def test_reference_workflow_matches_euler_over_diffusers(files):
    """UNETLoader, CLIPTextEncode, VAEEncode -> ReferenceLatent (ComfyUI's default "index"), KSampler euler: the
    reference reaches the model as diffusers' edit pipelines give it; without it the result is another."""
    paths, made = files
    latent, conditioning, reference = run(paths, workflow(made), ["8", "40", "30"])
    [(states, options)] = conditioning
    assert [r.shape for r in options["reference_latents"]] == [(1, 16, 1, HEIGHT // 8, WIDTH // 8)]
    expected = euler_over_diffusers(made, states, [reference["samples"][:, :, 0]])
    assert expected.std() > 0.1
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    plain = run(paths, workflow(made, references=()), ["8"])[0]
    assert (plain["samples"] - latent["samples"]).abs().mean() > 1e-2


def test_two_references_workflow(files):
    """Two ReferenceLatent nodes (Edit-2509 / Plus), of two sizes: frames 1 and 2, as diffusers' Plus pipeline.
    An Edit-2511 file (the same weights and the marker) loads through UNETLoader and samples as diffusers' model with
    zero_cond_t, as the plain file does when the prompts choose "index_timestep_zero"."""
    paths, made = files
    latent, conditioning, first, second = run(paths, workflow(made, ("photo.png", "style.png")),
                                              ["8", "41", "30", "31"])
    states = conditioning[0][0]
    refs = [first["samples"][:, :, 0], second["samples"][:, :, 0]]
    expected = euler_over_diffusers(made, states, refs)
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    edit_2511 = write_tiny_qwen_image(made["unet"].with_name("qwen_image_edit_2511-tiny.safetensors"), seed=7,
                                      dtype=torch.float32, config=EDIT_2511)
    by_default = run(paths, workflow(made, ("photo.png", "style.png"), unet=edit_2511.name), ["8"])[0]
    chosen = run(paths, workflow(made, ("photo.png", "style.png"), "index_timestep_zero"), ["8"])[0]
    zero_cond_t = euler_over_diffusers(made, states, refs, zero_cond_t=True)
    torch.testing.assert_close(by_default["samples"], zero_cond_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chosen["samples"], zero_cond_t, rtol=1e-4, atol=1e-4)
    assert (zero_cond_t - expected).abs().mean() > 1e-3


def test_model_save_keeps_the_2511_marker(files):
    """ModelSave writes Edit-2511's marker beside the weights (as ComfyUI's files carry it), and none for others."""
    paths, made = files
    edit_2511 = write_tiny_qwen_image(made["unet"].with_name("qwen_image_edit_2511-save.safetensors"), seed=7,
                                      config=EDIT_2511)
    for unet, prefix, marked in ((edit_2511.name, "edit_2511", True), (made["unet"].name, "plain", False)):
        doc = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
               "2": {"class_type": "ModelSave", "inputs": {"model": ["1", 0], "filename_prefix": prefix}}}
        run(paths, doc, [])
        [saved] = paths.output.glob(f"{prefix}*.safetensors")
        with safetensors.safe_open(saved, "pt") as f:
            assert (UNET_PREFIX + ZERO_COND_KEY in f.keys()) is marked
            assert UNET_PREFIX + "img_in.weight" in f.keys()


def test_flux_refuses_timestep_zero_references(engine):  # noqa: F811 (the fixture)
    """Edit-2511's method chosen for Flux Kontext is refused by name, not run as "index"."""
    doc = flux_workflow("kontext")
    doc["20"] = {"class_type": "FluxKontextMultiReferenceLatentMethod",
                 "inputs": {"conditioning": ["12", 0], "reference_latents_method": "index_timestep_zero"}}
    doc["8"]["inputs"]["positive"] = ["20", 0]
    assert ("the prompts place their reference latents by 'index_timestep_zero' (Qwen-Image-Edit-2511's method); "
            "flux1-tiny-kontext.safetensors is Flux") in refusal(engine, doc)
