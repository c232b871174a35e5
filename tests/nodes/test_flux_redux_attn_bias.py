"""Apply Style Model's strength_type attn_bias on Flux Redux: ComfyUI's attention mask (log(strength) on the text and
image queries' scores for the style tokens), carried to Flux's joint attention; checked against the same model with
the bias added by hand in scaled_dot_product_attention."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

import ldm.flux
from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.flux import joint_bias
from ldm.flux_redux import style_attention_mask
from nodes.folders import get_paths
from nodes.registry import builtin_registry
from tests.nodes import test_flux_redux_nodes as redux_nodes

engine = redux_nodes.engine  # the fixture: tiny Flux, SigLIP and Redux files
redux_workflow = redux_nodes.redux_workflow

STYLE_TOKENS = 16  # the tiny SigLIP's tokens, one Redux token each
HALF = math.log(0.5)


def run(engine: Executor, doc: dict) -> tuple[torch.Tensor, list, list]:
    result = engine.run(parse_api(doc), keep=["6", "8", "14"])
    assert result.ok, result.error
    return result.values["8"][0]["samples"], result.values["6"][0], result.values.get("14", [None])[0]


def test_strength_1_is_todays_result_with_no_mask(engine) -> None:
    plain, _, styled = run(engine, redux_workflow(1.0, "multiply"))
    biased, _, biased_styled = run(engine, redux_workflow(1.0, "attn_bias"))
    assert "attention_mask" not in styled[0][1] and "attention_mask" not in biased_styled[0][1]
    assert torch.equal(plain, biased)


def test_the_mask_is_comfyuis(engine) -> None:
    _, prompt, styled = run(engine, redux_workflow(0.5, "attn_bias"))
    t = prompt[0][0].shape[1]
    mask = styled[0][1]["attention_mask"]
    size = t + STYLE_TOKENS + 1  # the last entry stands for every image token
    assert mask.shape == (1, size, size)
    expected = torch.zeros(1, size, size)
    expected[:, :t, t:t + STYLE_TOKENS] = HALF  # text queries -> style keys
    expected[:, -1:, t:t + STYLE_TOKENS] = HALF  # image queries -> style keys; the style queries get none
    assert torch.equal(mask, expected)


def test_half_strength_equals_the_bias_added_by_hand_and_differs_from_multiply(engine, monkeypatch) -> None:
    biased, prompt, _ = run(engine, redux_workflow(0.5, "attn_bias"))
    multiplied, _, _ = run(engine, redux_workflow(0.5, "multiply"))
    assert (biased - multiplied).abs().mean() > 1e-4
    t = prompt[0][0].shape[1]
    sdpa = F.scaled_dot_product_attention
    calls = []

    def by_hand(q, k, v, attn_mask=None, **kwargs):
        length = q.shape[2]
        if attn_mask is None and length > t + STYLE_TOKENS:  # the styled prompt's call: text, style, image
            bias = torch.zeros(1, 1, length, length, dtype=q.dtype)
            bias[..., :t, t:t + STYLE_TOKENS] = HALF
            bias[..., t + STYLE_TOKENS:, t:t + STYLE_TOKENS] = HALF
            attn_mask = bias
            calls.append(length)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    # Flux's module sees a functional namespace whose attention adds the bias; the styled prompt goes in unbiased
    # (strength 1), through a fresh engine (the first's cache holds that run's result).
    monkeypatch.setattr(ldm.flux, "F", types.SimpleNamespace(**{**vars(F), "scaled_dot_product_attention": by_hand}))
    fresh = Executor(builtin_registry(), services=Services.create(get_paths(), force_cpu=True))
    expected, _, _ = run(fresh, redux_workflow(1.0, "attn_bias"))
    assert calls  # every block of every step
    torch.testing.assert_close(biased, expected, rtol=1e-6, atol=1e-6)


def test_strength_0_shuts_the_tokens_out(engine) -> None:
    """log(0) = -inf: no text or image token attends to the style tokens, so the image is the unstyled prompt's."""
    shut, _, _ = run(engine, redux_workflow(0.0, "attn_bias"))
    doc = redux_workflow()
    doc["8"]["inputs"]["positive"] = ["6", 0]
    unstyled, _, _ = run(engine, doc)
    assert torch.isfinite(shut).all()
    torch.testing.assert_close(shut, unstyled, rtol=1e-5, atol=1e-5)


def test_a_second_style_model_grows_the_mask() -> None:
    """ComfyUI's order: the first style tokens count as prompt for the second, whose own queries get no bias."""
    t, n1, n2 = 3, 2, 4
    first = style_attention_mask(None, t, n1, 0.5, 1)
    second = style_attention_mask(first, t + n1, n2, 2.0, 1)
    assert second.shape == (1, t + n1 + n2 + 1, t + n1 + n2 + 1)
    queries_of = {"text": slice(0, t), "style1": slice(t, t + n1), "style2": slice(t + n1, t + n1 + n2),
                  "image": slice(t + n1 + n2, None)}
    for name, rows in queries_of.items():
        block = second[0, rows]
        assert torch.all(block[:, t:t + n1] == (HALF if name in ("text", "image") else 0))
        assert torch.all(block[:, t + n1:t + n1 + n2] == (math.log(2.0) if name != "style2" else 0))
        assert torch.all(block[:, :t] == 0) and torch.all(block[:, -1] == 0)
    # A bool mask is read as ComfyUI reads it: True 0, False -inf.
    keep = torch.ones(1, t + 1, t + 1, dtype=torch.bool)
    keep[0, 0, 1] = False
    assert style_attention_mask(keep, t, n1, 1.0, 1)[0, 0, 1] == -math.inf


def test_joint_bias_stands_the_last_entry_for_every_image_token() -> None:
    t, image = 3, 5
    mask = torch.randn(2, t + 1, t + 1)
    full = joint_bias(mask, t, image, torch.float32)
    assert full.shape == (2, 1, t + image, t + image)
    for q in range(t + image):
        for k in range(t + image):
            assert full[:, 0, q, k].equal(mask[:, min(q, t), min(k, t)])
    assert joint_bias(full[:, 0], t, image, torch.float32).equal(full)  # a full mask is taken as it is
    with pytest.raises(ValueError, match=r"an attention mask of shape \[2, 5, 5\] for 3 text and 5 image tokens"):
        joint_bias(torch.zeros(2, 5, 5), t, image, torch.float32)


def test_chroma_refuses_the_bias_clearly() -> None:
    from nodes.sd.chroma import chroma_conditioning

    mask = style_attention_mask(None, 3, 2, 0.5, 1)
    with pytest.raises(ValueError, match="the positive prompt carries Apply Style Model's attn_bias .* use "
                                         "strength_type multiply"):
        chroma_conditioning([(torch.zeros(1, 5, 8), {"attention_mask": mask})],
                            types.SimpleNamespace(source="chroma.safetensors"))
