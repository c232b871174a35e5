"""GLIGEN against diffusers' gated UNet (`attention_type="gated"`) on identical weights: the position net's grounding
tokens and a grounded UNet call; then the loader's checks and the guider's routing of grounded prompts."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ldm.attention import BasicTransformerBlock
from ldm.gligen import (
    MAX_OBJECTS,
    GatedSelfAttention,
    GligenError,
    PositionNet,
    grounded_unet,
    load_gligen,
)
from ldm.presets import PRESETS, randomize_
from ldm.sampling import CFGGuider, Conditioning, Denoiser, DiscreteSchedule
from ldm.unet import UNetConfig, UNetModel
from tests.ldm.diffusers_reference import diffusers_unet, rel_err


def gligen_state(unet: UNetModel, phrase_dim: int, seed: int = 0) -> dict[str, Tensor]:
    """A random-weight GLIGEN text-box model for `unet`, in ComfyUI's file layout, with gates open enough to
    matter (tanh(0.8) on attention, tanh(0.6) on the feed-forward)."""
    g = torch.Generator().manual_seed(seed)
    context_dim = unet.config.context_dim
    state = {f"position_net.{k}": v for k, v in
             randomize_(PositionNet(phrase_dim, context_dim), g, std=0.2).state_dict().items()}
    for name, block in unet.named_modules():
        if isinstance(block, BasicTransformerBlock):
            fuser = randomize_(GatedSelfAttention(block.norm1.normalized_shape[0], context_dim), g, std=0.2)
            fuser.alpha_attn.data.fill_(0.8)
            fuser.alpha_dense.data.fill_(0.6)
            state |= {f"{name}.fuser.{k}": v for k, v in fuser.state_dict().items()}
    return state


def _to_diffusers(state: dict[str, Tensor], unet: UNetModel, reference: torch.nn.Module) -> dict[str, Tensor]:
    """ComfyUI's GLIGEN keys under diffusers' names: the position net's are the same; the fusers go to diffusers'
    transformer blocks in order (down, mid, up as LDM's input, middle, output)."""
    ours = [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    theirs = [n for n, m in reference.named_modules() if hasattr(m, "fuser")]
    theirs.sort(key=lambda n: ("down_blocks", "mid_block", "up_blocks").index(n.split(".")[0]))  # stable sort
    assert len(ours) == len(theirs)
    out = {k: v for k, v in state.items() if k.startswith("position_net.")}
    for mine, their in zip(ours, theirs, strict=True):
        prefix = f"{mine}.fuser."
        out |= {f"{their}.fuser.{k.removeprefix(prefix)}": v for k, v in state.items() if k.startswith(prefix)}
    return out


def _setup(seed: int = 0):
    config = PRESETS["tiny-sd1"][2]
    unet = randomize_(UNetModel(config), torch.Generator().manual_seed(seed)).eval()
    state = gligen_state(unet, phrase_dim=config.context_dim, seed=seed + 1)
    base = diffusers_unet(config, unet.state_dict())
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel(**{**base.config, "attention_type": "gated"}).eval()
    missing, unexpected = reference.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".fuser." in k or k.startswith("position_net.") for k in missing)
    missing, unexpected = reference.load_state_dict(_to_diffusers(state, unet, reference), strict=False)
    assert not unexpected and not [k for k in missing if ".fuser." in k or k.startswith("position_net.")]
    return unet, load_gligen(state), reference


def _phrases(dim: int) -> list[tuple[Tensor, float, float, float, float]]:
    g = torch.Generator().manual_seed(5)
    # (pooled, height, width, top, left) in latent pixels, as GLIGENTextboxApply stores them
    return [(torch.randn(1, dim, generator=g), 8.0, 6.0, 2.0, 1.0),
            (torch.randn(1, dim, generator=g), 4.0, 12.0, 10.0, 3.0)]


def _diffusers_grounding(phrases, height: int, width: int, dim: int) -> dict[str, Tensor]:
    boxes = torch.zeros(1, MAX_OBJECTS, 4)
    embeddings = torch.zeros(1, MAX_OBJECTS, dim)
    masks = torch.zeros(1, MAX_OBJECTS)
    for i, (pooled, h, w, top, left) in enumerate(phrases):
        boxes[0, i] = torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height])
        embeddings[0, i] = pooled[0]
        masks[0, i] = 1
    return {"boxes": boxes, "positive_embeddings": embeddings, "masks": masks}


def test_position_net_tokens_match_diffusers() -> None:
    unet, gligen, reference = _setup()
    phrases = _phrases(unet.config.context_dim)
    with torch.no_grad():
        ours = gligen.tokens(phrases, 16, 16)
        theirs = reference.position_net(**_diffusers_grounding(phrases, 16, 16, unet.config.context_dim))
    assert ours.shape == (1, MAX_OBJECTS, unet.config.context_dim)
    assert (ours - theirs).abs().max() < 1e-5
    assert not torch.allclose(ours[0, 0], ours[0, 2])  # a real object differs from the null ones
    assert torch.allclose(ours[0, 2], ours[0, -1])  # null objects are all alike


def test_grounded_unet_matches_diffusers_and_leaves_the_original() -> None:
    unet, gligen, reference = _setup()
    config = unet.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 7, config.context_dim, generator=g)
    phrases = _phrases(config.context_dim)
    grounding = _diffusers_grounding(phrases, 16, 16, config.context_dim)
    grounding = {k: v.expand(2, *v.shape[1:]) for k, v in grounding.items()}
    with torch.no_grad():
        plain = unet(x, t, context)
        ours = grounded_unet(unet, gligen, phrases, 16, 16)(x, t, context)
        theirs = reference(x, t, encoder_hidden_states=context, cross_attention_kwargs={"gligen": grounding}).sample
        again = unet(x, t, context)
    assert rel_err(ours, theirs) < 1e-5, rel_err(ours, theirs)
    assert rel_err(ours, plain) > 1e-3  # the grounding changes the prediction
    assert torch.equal(plain, again)  # the original UNet runs no fuser


def test_a_unet_of_another_dtype_leaves_the_loaded_gligen_model_as_it_was() -> None:
    """A bf16 UNet runs a bf16 copy of the fusers; the loaded model (a cache's) keeps its own dtype."""
    unet, gligen, _ = _setup()
    half = UNetModel(unet.config).to(torch.bfloat16)
    half.load_state_dict(unet.state_dict())
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
    context = torch.randn(1, 7, unet.config.context_dim)
    phrases = _phrases(unet.config.context_dim)
    with torch.no_grad():
        ours = grounded_unet(half, gligen, phrases, 16, 16)(x, t, context)
        full = grounded_unet(unet, gligen, phrases, 16, 16)(x, t, context)
    assert {p.dtype for p in gligen.parameters()} == {torch.float32}
    assert rel_err(ours.float(), full) < 5e-2  # bf16 rounding only


def test_a_gligen_file_for_another_width_is_refused() -> None:
    unet, gligen, _ = _setup()
    wider = randomize_(UNetModel(UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1), num_heads=4,
        context_dim=32)), torch.Generator().manual_seed(0))
    with pytest.raises(GligenError, match="wide at input_blocks.1.1.transformer_blocks.0"):
        grounded_unet(wider, gligen, [], 8, 8)
    deeper = UNetModel(UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=2, transformer_depth=(1, 1), num_heads=4,
        context_dim=32))
    with pytest.raises(GligenError, match="made for another model"):
        grounded_unet(deeper, gligen, [], 8, 8)
    with pytest.raises(GligenError, match="at most 30"):
        gligen.tokens(_phrases(32) * 16, 8, 8)
    with pytest.raises(GligenError, match="takes 32"):
        gligen.tokens([(torch.zeros(1, 768), 1.0, 1.0, 0.0, 0.0)], 8, 8)
    with pytest.raises(GligenError, match="no position_net"):
        load_gligen(unet.state_dict())


def test_the_guider_runs_grounded_prompts_by_their_copy_and_others_by_the_plain_unet() -> None:
    unet, gligen, _ = _setup()
    schedule = DiscreteSchedule()
    denoiser = Denoiser(unet, schedule)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 16, 16, generator=g)
    positive = torch.randn(1, 7, 32, generator=g)
    negative = torch.randn(1, 7, 32, generator=g)
    phrases = _phrases(32)
    sigma = torch.full((1,), 3.0)
    grounded = [(positive, {"gligen": ("position", gligen, phrases)})]
    with torch.no_grad():
        out = CFGGuider(denoiser, grounded, [(negative, {})], 5.0, module=unet)(x, sigma)
        copy = grounded_unet(unet, gligen, phrases, 16, 16)
        cond = Denoiser(copy, schedule)(x, sigma, Conditioning(positive))
        uncond = denoiser(x, sigma, Conditioning(negative))
    assert (out - torch.lerp(uncond, cond, 5.0)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="not given the UNet module"):
        CFGGuider(denoiser, grounded, [(negative, {})], 5.0)(x, sigma)

