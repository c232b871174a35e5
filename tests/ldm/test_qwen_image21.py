"""Qwen-Image 2.1's transformer against diffusers' QwenImage21Transformer2DModel (the same weights, the fused SwiGLU
split into diffusers' names), called as QwenImage21Pipeline calls it: text-to-image, references spliced in the
prompt, batches; the layout conversion, the config read from a tiny file, and the prefix key-value cache."""

from __future__ import annotations

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel

from ldm.qwen_image21 import (
    AXES_KEY,
    TINY_QWEN_IMAGE21,
    PrefixKV,
    QwenImage21Config,
    QwenImage21Model,
    config_from_state_dict,
    image_ids,
    is_qwen_image21,
    random_qwen_image21,
    to_loom_layout,
    write_tiny_qwen_image21,
)

TOLERANCE = 1e-5  # float32, same weights; the differences seen are below 1e-6


@pytest.fixture(scope="module")
def model() -> QwenImage21Model:
    return random_qwen_image21(TINY_QWEN_IMAGE21, seed=3)


def diffusers_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released layout's weights under diffusers' names: `img_mlp.gate_up` [gate; up] split in two."""
    out = {}
    for key, value in sd.items():
        if key.endswith("img_mlp.gate_up.weight"):
            base = key.removesuffix("gate_up.weight")
            out[base + "gate_layer.weight"], out[base + "proj.weight"] = value.chunk(2, dim=0)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def twin(model) -> QwenImage21Transformer2DModel:
    c = model.config
    reference = QwenImage21Transformer2DModel(
        in_channels=c.channels, out_channels=c.channels, num_layers=c.num_layers, attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads, context_in_dim=c.text_dim, mlp_ratio=c.mlp_ratio, axes_dims_rope=c.axes_dim)
    reference.load_state_dict(diffusers_layout(model.state_dict()), strict=True)
    return reference.eval()


def pipeline_call(twin, x, sigma, context, mask=None, refs=(), slots=()):
    """diffusers' transformer as QwenImage21Pipeline calls it: the prompt states with each reference's image pads
    (h * w / 4 of them, whose states diffusers overwrites: here noise) at its slot, the references' latents then the
    target's flattened row by row, img_mask marking the pads and the target's slots."""
    batch, length = x.shape[0], context.shape[1]
    mask = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.bool().expand(batch, -1)
    context = context.expand(batch, -1, -1)
    refs = [r.expand(batch, -1, -1, -1) for r in refs]
    bounds = [0, *slots, length]
    states, pads, valid = [], [], []
    g = torch.Generator().manual_seed(11)
    for i in range(len(refs) + 1):
        states.append(context[:, bounds[i]:bounds[i + 1]])
        valid.append(mask[:, bounds[i]:bounds[i + 1]])
        pads += [False] * (bounds[i + 1] - bounds[i])
        if i < len(refs):
            n = refs[i].shape[-2] * refs[i].shape[-1] // 4
            states.append(100 * torch.randn(batch, n, context.shape[-1], generator=g))
            valid.append(torch.ones(batch, n, dtype=torch.bool))
            pads += [True] * n
    rows, cols = x.shape[-2:]
    img_mask = torch.tensor(pads + [True] * (rows * cols // 4))[None].expand(batch, -1)
    latents = torch.cat([image.flatten(2).transpose(1, 2) for image in [*refs, x]], dim=1)
    shapes = [[(1, *r.shape[-2:]) for r in refs] + [(1, rows, cols)]] * batch
    with torch.no_grad():
        out = twin(hidden_states=latents, encoder_hidden_states=torch.cat(states, dim=1), timestep=sigma,
                   img_shapes=shapes, img_mask=img_mask, encoder_hidden_states_mask=torch.cat(valid, dim=1),
                   return_dict=False)[0]
    return out[:, -rows * cols:].transpose(1, 2).reshape(x.shape)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _compare(model, twin, x, sigma, context, mask=None, refs=(), slots=()):
    with torch.no_grad():
        ours = model(x, sigma, context, attn_mask=mask, ref_latents=list(refs), image_slots=list(slots))
    theirs = pipeline_call(twin, x, sigma, context, mask, refs, slots)
    diff = (ours - theirs).abs().max().item()
    assert diff < TOLERANCE, diff
    assert theirs.abs().max() > 0.1  # a real signal, not two zeros
    return diff


@pytest.mark.parametrize("size", [(4, 6), (3, 4)])
def test_text_to_image_with_prompt_mask(model, twin, size):
    x, context = _randn(2, 64, *size, seed=0), _randn(2, 7, 32, seed=1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])  # the second prompt padded on the right
    _compare(model, twin, x, torch.tensor([0.7, 0.3]), context, mask)


def test_one_reference_inside_the_prompt(model, twin):
    x, context = _randn(1, 64, 4, 4, seed=2), _randn(1, 9, 32, seed=3)
    ref = _randn(1, 64, 2, 6, seed=4)
    _compare(model, twin, x, torch.tensor([0.5]), context, refs=[ref], slots=[3])


@pytest.mark.parametrize("slots", [(2, 6), (4, 4), (0, 9)])
def test_two_references_odd_sides(model, twin, slots):
    """An odd-sided target with references of its parity, at slots apart, together (two blocks side by side, each
    its own) and at the prompt's ends."""
    x, context = _randn(1, 64, 3, 4, seed=5), _randn(1, 9, 32, seed=6)
    refs = [_randn(1, 64, 5, 4, seed=7), _randn(1, 64, 1, 8, seed=8)]
    _compare(model, twin, x, torch.tensor([0.9]), context, refs=refs, slots=slots)


def test_batch_of_two_with_references_and_mask(model, twin):
    x, context = _randn(2, 64, 4, 2, seed=9), _randn(1, 8, 32, seed=10)
    refs = [_randn(1, 64, 2, 2, seed=11)]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    _compare(model, twin, x, torch.tensor([0.8, 0.15]), context, mask, refs, slots=[2])


def test_references_without_slots_go_after_the_prompt(model):
    x, context, ref = _randn(1, 64, 2, 2, seed=12), _randn(1, 5, 32, seed=13), _randn(1, 64, 2, 4, seed=14)
    with torch.no_grad():
        no_slots = model(x, torch.tensor([0.4]), context, ref_latents=[ref])
        at_end = model(x, torch.tensor([0.4]), context, ref_latents=[ref], image_slots=[5])
    assert torch.equal(no_slots, at_end)


def test_reference_of_other_parity_centres_on_the_target():
    """ComfyUI's half-token offset: a 3-row reference of a 4-row target sits at rows -1.5 .. 0.5, centred like the
    target's -2 .. 1; a reference of the target's parity is not moved (diffusers' positions)."""
    target, other, same = image_ids(4, 4, 7, 4, 4), image_ids(3, 2, 7, 4, 4), image_ids(2, 6, 7, 4, 4)
    assert target[:, 1].unique().tolist() == [-2, -1, 0, 1]
    assert other[:, 1].unique().tolist() == [-1.5, -0.5, 0.5]
    assert other[:, 2].unique().tolist() == [-1, 0]
    assert same[:, 2].unique().tolist() == [-3, -2, -1, 0, 1, 2]
    assert (other[:, 0] == 7).all()


def test_layout_conversion_round_trip(model):
    released = model.state_dict()
    split = diffusers_layout(released)
    assert "transformer_blocks.0.img_mlp.gate_layer.weight" in split and not any("gate_up" in k for k in split)
    converted = to_loom_layout(split)
    assert converted.keys() == released.keys()
    assert all(torch.equal(converted[k], released[k]) for k in released)
    prefixed = to_loom_layout({"model.diffusion_model." + k: v for k, v in split.items()}, "model.diffusion_model.")
    assert prefixed.keys() == {"model.diffusion_model." + k for k in released}
    assert to_loom_layout(released).keys() == released.keys()  # the released layout is left as it is


def test_detection_and_config_both_layouts(model):
    for sd in (model.state_dict(), diffusers_layout(model.state_dict())):
        assert is_qwen_image21(sd)
        assert config_from_state_dict(sd, TINY_QWEN_IMAGE21.axes_dim) == TINY_QWEN_IMAGE21
    assert is_qwen_image21({"diffusion_model." + k: v for k, v in model.state_dict().items()}, "diffusion_model.")


def test_other_families_are_not_qwen_image21():
    from ldm.flux2_files import random_flux2
    from ldm.flux_presets import random_flux
    from ldm.qwen_image_files import random_qwen_image
    from ldm.z_image_files import random_z_image

    for other in (random_qwen_image(seed=0), random_z_image(seed=0), random_flux(seed=0),
                  random_flux2(seed=0)):
        assert not is_qwen_image21(other.state_dict())


def test_config_of_the_tiny_file(tmp_path):
    path = write_tiny_qwen_image21(tmp_path / "qwen_image_2.1_tiny.safetensors", seed=5)
    sd = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, "pt") as f:
        axes = tuple(int(a) for a in f.metadata()[AXES_KEY].split(","))
    config = config_from_state_dict(sd, axes)
    assert config == TINY_QWEN_IMAGE21
    assert sd["transformer_blocks.1.img_mlp.gate_up.weight"].shape == (2 * 3 * 64, 64)
    assert sd["txt_in.in_layer.weight"].shape == (64, 32) and sd["img_in.weight"].dtype == torch.bfloat16
    QwenImage21Model(config).load_state_dict(sd, strict=True)
    with pytest.raises(ValueError, match="RoPE"):
        config_from_state_dict(sd)


def test_released_defaults():
    c = QwenImage21Config()
    assert (c.num_layers, c.dim, c.mlp_hidden, c.in_channels, c.context_dim, c.axes_dim) == (
        32, 4096, 12288, 64, 4096, (16, 56, 56))


def test_prefix_cache_gives_the_uncached_velocities():
    """Three calls of a run (new latents and noise levels each), for two prefixes in turn (a positive and a negative
    prompt): the cached calls equal the uncached forward, compute the target's rows alone after the first, and the
    cache holds one entry per prefix."""
    model = random_qwen_image21(TINY_QWEN_IMAGE21, seed=4)
    context, negative = _randn(2, 6, 32, seed=20), _randn(2, 4, 32, seed=21)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    refs = [_randn(1, 64, 3, 2, seed=22), _randn(2, 64, 2, 2, seed=23)]
    store, rows = PrefixKV(), []
    model.transformer_blocks[0].attn.to_q.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    worst = 0.0
    with torch.no_grad():
        for step, sigma in enumerate([1.0, 0.6, 0.2]):
            x, t = _randn(2, 64, 4, 3, seed=30 + step), torch.tensor([sigma, sigma * 0.9])
            for prompt, prompt_mask in ((context, mask), (negative, None)):
                args = dict(attn_mask=prompt_mask, ref_latents=refs, image_slots=[1, 3])
                cached = model(x, t, prompt, prefix_kv=store, **args)
                assert rows.pop(0) == (12 if step else prompt.shape[1] + 6 + 4 + 12)  # the target's rows alone
                plain = model(x, t, prompt, **args)
                rows.pop(0)
                worst = max(worst, (cached - plain).abs().max().item())
            assert len(store._entries) == 2
    assert worst < 1e-5, worst
