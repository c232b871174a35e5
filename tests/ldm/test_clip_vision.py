"""CLIP vision towers: both file layouts read into transformers' model, checked against transformers' own model with
its CLIPImageProcessor and against open_clip's visual tower, on tiny random-weight towers in the real key layouts."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from ldm.checkpoint import CheckpointError
from ldm.clip_vision import (
    UNCLIP_PREFIX,
    ClipVisionOutput,
    clip_vision_config,
    load_clip_vision,
    open_clip_state_dict,
    preprocess,
)
from tests.ldm.open_clip_ref import open_clip_module


@torch.no_grad()
def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every weight random, biases too (so a q/k/v mix-up shows), LayerNorm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        scale = isinstance(module.get_submodule(name.rpartition(".")[0]), nn.LayerNorm) and name.endswith("weight")
        param.copy_(1 + 0.1 * noise if scale else 0.05 * noise)
    return module.eval()


def _reference(seed: int = 0, activation: str = "quick_gelu"):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16, hidden_act=activation,
                              layer_norm_eps=1e-5)
    return _randomize(CLIPVisionModelWithProjection(config), seed)


def _smooth_image(seed: int, height: int, width: int) -> torch.Tensor:
    """An IMAGE [1, H, W, 3] of 8-bit values, smooth as photographs are (resizing filters differ most on noise)."""
    coarse = torch.rand(1, 3, 6, 9, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear").permute(0, 2, 3, 1)
    return (image * 255).round() / 255


def _processed(image: torch.Tensor, crop: bool = True) -> torch.Tensor:
    """transformers' CLIPImageProcessor (the PIL one: torchvision is not installed) on the same 8-bit picture."""
    from transformers import CLIPImageProcessorPil

    options = ({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}} if crop
               else {"size": {"height": 32, "width": 32}, "do_center_crop": False})
    pixels = (image[0].numpy() * 255).round().astype(np.uint8)
    return CLIPImageProcessorPil(**options)(images=pixels, return_tensors="pt")["pixel_values"]


def test_a_transformers_file_encodes_as_transformers_with_its_processor(tmp_path):
    reference = _reference()
    extra = {"logit_scale": torch.tensor(4.6), "text_model.final_layer_norm.weight": torch.ones(8),
             "vision_model.embeddings.position_ids": torch.arange(17)[None]}
    safetensors.torch.save_file({**reference.state_dict(), **extra}, tmp_path / "vit.safetensors")
    loaded = load_clip_vision(tmp_path / "vit.safetensors")
    assert loaded.unused_keys == ["logit_scale", "text_model.final_layer_norm.weight"]  # position_ids: rebuilt
    assert (loaded.model.config.width, loaded.model.config.layers, loaded.model.config.heads) == (32, 3, 2)
    assert (loaded.model.config.image_size, loaded.model.config.projection_dim) == (32, 16)
    for height, width in ((32, 32), (64, 64), (48, 80), (90, 40)):
        image = _smooth_image(height + width, height, width)
        ours = loaded.model.encode(image)
        pixels = _processed(image)
        # Resizing: torch's antialiased bicubic against PIL's, each rounded to 8 bits: a level apart at most.
        assert (preprocess(image, 32) - pixels).abs().max() <= 1.01 / 255 / 0.2613
        with torch.no_grad():
            theirs = reference(pixel_values=pixels, output_hidden_states=True)
            exact = reference(pixel_values=preprocess(image, 32), output_hidden_states=True)
        assert torch.allclose(ours.image_embeds, theirs.image_embeds, rtol=0,
                              atol=2e-3 * theirs.image_embeds.abs().max())
        # Given our pixels, the encodings are transformers' own, to rounding.
        torch.testing.assert_close(ours.image_embeds, exact.image_embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.last_hidden_state, exact.last_hidden_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.penultimate_hidden_states, exact.hidden_states[-2], rtol=1e-5, atol=1e-5)
        if height == width == 32:  # no resizing: the same pixels exactly
            assert torch.equal(preprocess(image, 32), pixels)


def test_crop_none_squashes_the_whole_image_as_the_processor_without_its_centre_crop():
    image = _smooth_image(3, 48, 80)
    squashed, cropped = preprocess(image, 32, crop=False), preprocess(image, 32)
    assert (squashed - _processed(image, crop=False)).abs().max() <= 1.01 / 255 / 0.2613
    assert (squashed - cropped).abs().max() > 0.1
    grey = preprocess(image[..., :1], 32)  # a one-channel picture is seen as grey
    torch.testing.assert_close(grey[:, 0] * 0.26862954 + 0.48145466, grey[:, 2] * 0.27577711 + 0.40821073)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_the_open_clip_layout_encodes_as_open_clip_visual_tower(tmp_path, activation):
    transformer = open_clip_module("transformer")
    act = transformer.QuickGELU if activation == "quick_gelu" else nn.GELU
    visual = _randomize(transformer.VisionTransformer(image_size=32, patch_size=8, width=32, layers=3, heads=2,
                                                      mlp_ratio=2.0, output_dim=16, act_layer=act), seed=1)
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    text_half = {"logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.zeros(10, 8),
                 "transformer.resblocks.0.ln_1.weight": torch.ones(8)}  # the CLIP model's other half: no report
    safetensors.torch.save_file({**state, **text_half}, tmp_path / "open_clip.safetensors")
    # The width alone would say QuickGELU (OpenAI's towers): a 32-wide GELU tower needs saying so.
    loaded = load_clip_vision(tmp_path / "open_clip.safetensors", activation=activation)
    assert loaded.unused_keys == []
    blocks = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: blocks.append(out))
             for block in visual.transformer.resblocks]
    image = _smooth_image(7, 40, 56)
    pixels = preprocess(image, 32)
    with torch.no_grad():
        embeds = visual(pixels)
    for hook in hooks:
        hook.remove()
    ours = loaded.model.encode(image)
    torch.testing.assert_close(ours.image_embeds, embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.last_hidden_state, blocks[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.penultimate_hidden_states, blocks[-2], rtol=1e-5, atol=1e-5)
    # Written back in open_clip's layout, the weights are the file's.
    again = open_clip_state_dict(loaded.model)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_an_unclip_checkpoints_encoder_is_read_and_only_its_part_reported(tmp_path):
    reference = _reference(seed=2)
    checkpoint = {**open_clip_state_dict(_as_ours(reference), UNCLIP_PREFIX),
                  "embedder.model.logit_scale": torch.tensor(4.6), "noise_augmentor.betas": torch.ones(4),
                  "embedder.model.ln_final.weight": torch.ones(8), "embedder.model.visual.head.weight": torch.ones(2),
                  "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}
    safetensors.torch.save_file(checkpoint, tmp_path / "unclip.safetensors")
    loaded = load_clip_vision(tmp_path / "unclip.safetensors")
    # The CLIP model's text half, which the embedder keeps beside its tower, is known: not reported.
    assert loaded.unused_keys == ["embedder.model.visual.head.weight"]
    image = _smooth_image(11, 32, 48)
    with torch.no_grad():
        expected = reference(pixel_values=preprocess(image, 32)).image_embeds
    torch.testing.assert_close(loaded.model.encode(image).image_embeds, expected, rtol=1e-5, atol=1e-5)


def test_the_shapes_of_the_released_towers_give_their_configurations():
    def shapes(width: int, layers: int, patch: int, grid: int, projection: int) -> dict[str, torch.Tensor]:
        sd = {"vision_model.embeddings.class_embedding": torch.empty(width, device="meta"),
              "vision_model.embeddings.patch_embedding.weight": torch.empty(width, 3, patch, patch, device="meta"),
              "vision_model.embeddings.position_embedding.weight": torch.empty(grid * grid + 1, width, device="meta"),
              "visual_projection.weight": torch.empty(projection, width, device="meta")}
        for i in range(layers):
            sd[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"] = torch.empty(width * 4, width, device="meta")
        return sd

    vit_l = clip_vision_config(shapes(1024, 24, 14, 16, 768))
    vit_h = clip_vision_config(shapes(1280, 32, 14, 16, 1024))
    vit_g = clip_vision_config(shapes(1664, 48, 14, 16, 1280))
    vit_l_336 = clip_vision_config(shapes(1024, 24, 14, 24, 768))
    assert (vit_l.heads, vit_l.image_size, vit_l.activation) == (16, 224, "quick_gelu")
    assert (vit_h.heads, vit_h.layers, vit_h.projection_dim, vit_h.activation) == (16, 32, 1024, "gelu")
    assert (vit_g.heads, vit_g.layers, vit_g.activation) == (16, 48, "gelu")
    assert vit_l_336.image_size == 336


def test_files_that_hold_no_tower_are_named_for_what_they_are(tmp_path):
    files = {
        "sd.safetensors": {"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)},
        "text.safetensors": {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)},
        "other.safetensors": {"style_embedding": torch.zeros(1, 8, 32)},
    }
    expected = {"sd.safetensors": "unCLIPCheckpointLoader", "text.safetensors": "Load CLIP",
                "other.safetensors": "no vision_model"}
    for name, tensors in files.items():
        safetensors.torch.save_file(tensors, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"{name}: not a CLIP vision model: .*{expected[name]}"):
            load_clip_vision(tmp_path / name)
    broken = {k: v for k, v in open_clip_state_dict(_as_ours(_reference())).items()
              if "resblocks.1.mlp" not in k}
    safetensors.torch.save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken.safetensors: incomplete CLIP vision model: no visual\."
                                              r"transformer\.resblocks\.1\.mlp"):
        load_clip_vision(tmp_path / "broken.safetensors")


def _as_ours(reference):
    from ldm.clip_vision import ClipVisionConfig, ClipVisionModel

    ours = ClipVisionModel(ClipVisionConfig(32, 3, 2, 8, 32, 16, 64, "quick_gelu"))
    ours.model.load_state_dict(reference.state_dict())
    return ours


def test_the_output_reads_as_comfyuis_and_knows_its_size():
    out = ClipVisionOutput(torch.zeros(1, 5, 4), torch.ones(1, 3), torch.zeros(1, 5, 4))
    assert out["image_embeds"] is out.image_embeds and out["mm_projected"] is None
    out["image_embeds"] = torch.zeros(2, 3)
    assert out.image_embeds.shape == (2, 3)
    assert out.cache_size() == (20 + 6 + 20) * 4
