"""Model inputs carried in the conditioning (`ldm.sampling.cond_jobs.MODEL_INPUTS`, HiDream's Llama states): each
job holds them at the latent's batch, jobs share a model call only where they concatenate, and the call passes them
to the model by keyword."""

from __future__ import annotations

import torch

from ldm.sampling.cond_jobs import MODEL_INPUTS, batched_inputs, batches_of, entry_job


def _job(side: int, llama_tokens: int | None, x: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    options = {} if llama_tokens is None else {"conditioning_llama3": torch.randn(1, 4, llama_tokens, 8, generator=g)}
    return entry_job(side, torch.randn(1, 5, 8, generator=g), options, x, feather=0)


def test_inputs_batch_where_they_concatenate() -> None:
    assert MODEL_INPUTS["conditioning_llama3"] == "llama"
    x = torch.zeros(2, 16, 4, 4)
    positive, negative = _job(0, 128, x, 1), _job(1, 128, x, 2)
    assert positive.inputs["llama"].shape == (2, 4, 128, 8)  # repeated to the latent's batch
    [group] = batches_of([positive, negative])
    inputs = batched_inputs(group)
    torch.testing.assert_close(inputs["llama"], torch.cat([positive.inputs["llama"], negative.inputs["llama"]]))
    # a longer prompt's states (Llama is never cut) or none at all: separate calls
    assert len(batches_of([positive, _job(1, 140, x, 3)])) == 2
    plain = _job(1, None, x, 4)
    assert plain.inputs is None and len(batches_of([positive, plain])) == 2
    assert batched_inputs([plain]) is None


def test_an_area_pair_carries_the_other_sides_prompt_whole() -> None:
    """ComfyUI pairs an area prompt with the other side's prompt over that area, with everything that prompt takes
    to the model: its ControlNet prompt (CLIPTextEncodeControlnet's) and its model inputs too."""
    from ldm.sampling.cond_jobs import entry_job, pair_areas

    x = torch.zeros(1, 4, 8, 8)
    negative_cnet = torch.randn(1, 5, 16)
    area = entry_job(0, torch.randn(1, 3, 16), {"area": (4, 4, 0, 0)}, x, 8)
    whole = entry_job(1, torch.randn(1, 3, 16), {"cross_attn_controlnet": negative_cnet}, x, 8)
    [pair] = [j for j in pair_areas([area, whole]) if j not in (area, whole)]
    assert pair.side == 1 and pair.region == area.region and pair.context is whole.context
    assert torch.equal(pair.control_context, negative_cnet)
