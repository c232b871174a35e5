"""The HiDream-I1 transformer (ldm.hidream) against diffusers' HiDreamImageTransformer2DModel with the same weights
(diffusers' names are ComfyUI's file keys, so the state dict loads as it is), and its files (ldm.hidream_files).

diffusers is called as HiDreamImagePipeline calls it: timesteps sigma * 1000, the Llama states layer-major
[layers, B, L, D] (the pipeline's stack of hidden_states[1:]), and its output negated (the pipeline's
`noise_pred = -noise_pred`), which gives the velocity noise - data that Loom's model returns. The twin is in eval
mode: in training mode diffusers' unpatchify returns another layout (its MoE computes the same either way).

Non-square latents: diffusers' own patchify pads their tokens to 4096 (max_resolution 128 x 128) and zeroes the
padding's keys, which changes the result; ComfyUI runs every size without padding, and Loom does as ComfyUI. Those
sizes are compared with diffusers fed the unpadded tokens with their positions and an all-ones mask (its own code
path for given tokens), which is ComfyUI's computation."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import HiDreamImageTransformer2DModel
from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

from ldm.checkpoint import UNET_PREFIX, CheckpointError
from ldm.flux import pad_to_patch
from ldm.flux_files import LATENT_SHIFT
from ldm.hidream import (
    HIDREAM_I1,
    RELEASED_LLAMA_LAYERS,
    HiDreamModel,
    hidream_config_from_state_dict,
    is_hidream,
    patchify,
)
from ldm.hidream_files import (
    TINY_HIDREAM,
    HiDreamFamily,
    is_hidream_file,
    load_hidream_unet,
    peek_hidream,
    random_hidream,
    write_tiny_hidream,
)

LLAMA_LAYERS = 4  # the tiny Llama's decoder layers (TINY_HIDREAM reads layers 3, 0, 2, 2)


@pytest.fixture(scope="module")
def model() -> HiDreamModel:
    return random_hidream(TINY_HIDREAM, seed=0).float()


def diffusers_twin(model: HiDreamModel) -> HiDreamImageTransformer2DModel:
    """diffusers' transformer of `model`'s shape with its weights."""
    c = model.config
    twin = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=c.in_channels, num_layers=c.num_layers, num_single_layers=c.num_single_layers,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, caption_channels=[c.t5_dim, c.llama_dim],
        text_emb_dim=c.text_emb_dim, num_routed_experts=c.num_routed_experts,
        num_activated_experts=c.num_activated_experts, axes_dims_rope=c.axes_dim, llama_layers=list(c.llama_layers))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def pipeline_call(twin: HiDreamImageTransformer2DModel, x, sigma, context, y, llama) -> torch.Tensor:
    """The velocity as HiDreamImagePipeline gets it (see the module docstring). Square latents go in as they are;
    non-square ones as their unpadded tokens (ComfyUI's computation); odd sizes padded as ComfyUI pads them (wrapping
    round) and cropped back."""
    h, w = x.shape[-2:]
    x = pad_to_patch(x, 2)
    rows, cols = x.shape[-2] // 2, x.shape[-1] // 2
    llama = llama.movedim(1, 0)
    if rows == cols:
        out = twin(x, sigma * 1000, context, llama, y, return_dict=False)[0]
    else:
        ids = torch.zeros(rows, cols, 3)
        ids[..., 1], ids[..., 2] = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
        batch = x.shape[0]
        out = twin(patchify(x), sigma * 1000, context, llama, y, img_ids=ids.reshape(1, -1, 3).repeat(batch, 1, 1),
                   img_sizes=[(rows, cols)] * batch, hidden_states_masks=torch.ones(batch, rows * cols),
                   return_dict=False)[0]
    return -out[..., :h, :w]


def inputs(h: int, w: int, t5_tokens: int = 5, llama_tokens: int = 7, batch: int = 2, seed: int = 0):
    c, g = TINY_HIDREAM, torch.Generator().manual_seed(seed)
    return (torch.randn(batch, c.in_channels, h, w, generator=g), torch.rand(batch, generator=g) * 0.8 + 0.1,
            torch.randn(batch, t5_tokens, c.t5_dim, generator=g), torch.randn(batch, c.text_emb_dim, generator=g),
            torch.randn(batch, LLAMA_LAYERS, llama_tokens, c.llama_dim, generator=g))


@pytest.mark.parametrize(("h", "w", "t5_tokens", "llama_tokens"),
                         [(8, 8, 5, 7), (16, 16, 12, 3), (8, 12, 5, 7), (12, 6, 1, 9), (7, 9, 4, 4)])
def test_matches_diffusers(model, h, w, t5_tokens, llama_tokens):
    x, sigma, context, y, llama = inputs(h, w, t5_tokens, llama_tokens)
    with torch.no_grad():
        ours = model(x, sigma, context, y, llama)
        theirs = pipeline_call(diffusers_twin(model), x, sigma, context, y, llama)
    assert ours.shape == x.shape and theirs.abs().max() > 0.5
    assert (ours - theirs).abs().max() <= 1e-4


def test_without_pooled_prompt_as_zeros(model):
    x, sigma, context, y, llama = inputs(8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma, context, None, llama),
                                   model(x, sigma, context, torch.zeros_like(y), llama))


def test_each_block_reads_its_llama_layer(model):
    """The layer no block reads (1) changes nothing; one that a block reads does."""
    x, sigma, context, y, llama = inputs(8, 8)
    with torch.no_grad():
        base = model(x, sigma, context, y, llama)
        unread, read = llama.clone(), llama.clone()
        unread[:, 1] += 1
        read[:, 0] += 1
        torch.testing.assert_close(model(x, sigma, context, y, unread), base)
        assert (model(x, sigma, context, y, read) - base).abs().max() > 1e-3


@pytest.mark.parametrize("training", [False, True])
def test_moe_routes_as_diffusers(training):
    """The experts each token's top 2 gate scores choose, weighted by those scores, as diffusers' eval (moe_infer)
    and training paths compute it; every expert serves some tokens and none serves all."""
    c = TINY_HIDREAM
    ours = random_hidream(c, seed=3).double_stream_blocks[0].block.ff_i.float()
    theirs = MOEFeedForwardSwiGLU(c.hidden_size, 4 * c.hidden_size, c.num_routed_experts, c.num_activated_experts)
    theirs.load_state_dict(ours.state_dict())
    theirs.train(training)
    x = torch.randn(2, 40, c.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chosen = ours.gate(x.reshape(-1, c.hidden_size))[1]
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    served = torch.stack([(chosen == e).any(-1).sum() for e in range(c.num_routed_experts)])
    assert (served > 0).all() and (served < x.shape[0] * x.shape[1]).all()


def test_wrong_inputs_are_refused(model):
    x, sigma, context, y, llama = inputs(8, 8)
    with pytest.raises(ValueError, match="Llama 3.1 hidden states"):
        model(x, sigma, context, y)
    with pytest.raises(ValueError, match="T5-XXL states"):
        model(x, sigma, torch.randn(2, 5, 4096), y, llama)
    with pytest.raises(ValueError, match="layers >= 4"):
        model(x, sigma, context, y, llama[:, :3])
    with pytest.raises(ValueError, match="pooled CLIP-L and CLIP-G"):
        model(x, sigma, context, torch.randn(2, 2048), llama)
    with pytest.raises(ValueError, match="latents"):
        model(torch.randn(2, 4, 8, 8), sigma, context, y, llama)


def test_config_from_state_dict(model):
    sd = model.state_dict()
    c = TINY_HIDREAM
    assert hidream_config_from_state_dict(sd, axes_dim=c.axes_dim, llama_layers=c.llama_layers) == c
    prefixed = {UNET_PREFIX + k: v for k, v in sd.items()}
    assert is_hidream(prefixed, UNET_PREFIX) and not is_hidream(prefixed)
    assert hidream_config_from_state_dict(prefixed, UNET_PREFIX, c.axes_dim, c.llama_layers) == c
    with pytest.raises(ValueError, match="which Llama layer"):
        hidream_config_from_state_dict(sd)


def test_released_shapes():
    """The released config (diffusers' HiDream-I1 transformer config) on the meta device: every weight the shape of
    diffusers' model of that config, about 17B parameters, and the config read back from the shapes alone."""
    assert len(RELEASED_LLAMA_LAYERS) == 48 and RELEASED_LLAMA_LAYERS[-17:] == (31,) * 17
    with torch.device("meta"):
        ours = HiDreamModel(HIDREAM_I1)
        theirs = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=16, num_layers=16, num_single_layers=32, attention_head_dim=128,
            num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
            num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
            llama_layers=list(RELEASED_LLAMA_LAYERS))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert 16.5e9 < sum(v.numel() for v in ours.parameters()) < 17.5e9
    assert hidream_config_from_state_dict(ours.state_dict()) == HIDREAM_I1


@pytest.mark.parametrize("prefix", ["", UNET_PREFIX])
def test_tiny_file_loads(model, tmp_path, prefix):
    path = write_tiny_hidream(tmp_path / "hidream_i1_tiny.safetensors", seed=0, dtype=torch.float32, prefix=prefix)
    assert is_hidream_file(path)
    family = peek_hidream(path)
    assert family == HiDreamFamily(TINY_HIDREAM)
    assert (family.name, family.shift, family.prediction, family.latent_channels) == ("hidream", 3.0, "flow", 16)
    assert (family.latent_scale_factor, family.latent_shift) == (0.3611, LATENT_SHIFT)
    loaded = load_hidream_unet(path, dtype=torch.float32)
    assert loaded.unused_keys == [] and loaded.family == family
    x, sigma, context, y, llama = inputs(8, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, sigma, context, y, llama), model(x, sigma, context, y, llama))


def test_bf16_file_runs(tmp_path):
    loaded = load_hidream_unet(write_tiny_hidream(tmp_path / "tiny_bf16.safetensors", seed=0))
    assert loaded.unet.dtype == torch.bfloat16
    x, sigma, context, y, llama = inputs(6, 10)
    with torch.no_grad():
        out = loaded.unet(x, sigma, context, y, llama)
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_fp8_and_scaled_fp8_files_load(tmp_path):
    path = write_tiny_hidream(tmp_path / "hidream_fp8_e4m3fn.safetensors", seed=1, dtype=torch.float8_e4m3fn)
    fp8 = safetensors.torch.load_file(path)
    weight = "double_stream_blocks.0.block.ff_i.experts.1.w2.weight"
    scaled = dict(fp8)
    scaled[weight] = (fp8[weight].float() * 4).to(torch.float8_e4m3fn)  # a power of two: exact in fp8
    scaled[weight.replace(".weight", ".scale_weight")] = torch.tensor(0.25)
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    scaled_path = tmp_path / "hidream_scaled.safetensors"
    safetensors.torch.save_file(scaled, scaled_path, metadata=safetensors.safe_open(path, "pt").metadata())
    plain, descaled = (load_hidream_unet(p, dtype=torch.float32) for p in (path, scaled_path))
    assert descaled.unused_keys == []
    assert torch.equal(descaled.unet.state_dict()[weight], plain.unet.state_dict()[weight])
    assert descaled.unet.state_dict()[weight].abs().max() > 0


def test_other_files_are_refused(tmp_path):
    extra = write_tiny_hidream(tmp_path / "extra.safetensors", seed=0, dtype=torch.float16)
    weights = safetensors.torch.load_file(extra) | {"something.else": torch.zeros(2)}
    safetensors.torch.save_file(weights, extra, metadata=safetensors.safe_open(extra, "pt").metadata())
    assert load_hidream_unet(extra).unused_keys == ["something.else"]
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"img_in.weight": torch.zeros(2, 2)}, other)
    assert not is_hidream_file(other) and peek_hidream(other) is None
    with pytest.raises(CheckpointError, match="not a HiDream-I1 diffusion model"):
        load_hidream_unet(other)
    unknown = tmp_path / "unknown_layout.safetensors"
    state = random_hidream(dataclasses.replace(TINY_HIDREAM, llama_layers=(0, 1, 2, 3))).state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, unknown)
    with pytest.raises(CheckpointError, match="which Llama layer"):
        load_hidream_unet(unknown)
