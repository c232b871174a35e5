"""FLUX.2 [klein] 9B KV's reference key-value cache (ldm.flux2.ReferenceKV, ComfyUI's FluxKVCache) against diffusers'
Flux2Transformer2DModel in its "extract" and "cached" modes (as Flux2KleinKVPipeline runs them), same weights and
inputs, float32."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from ldm.flux2 import ReferenceKV, ReferenceKVRun, with_reference_kv
from ldm.flux2_files import TINY_FLUX2_KLEIN, random_flux2
from ldm.flux_variants import References
from tests.ldm.test_flux2 import TOLERANCE, diffusers_twin, inputs


@pytest.fixture(scope="module")
def klein():
    return random_flux2(TINY_FLUX2_KLEIN, seed=3).float()


def kv_twin(model):
    """`diffusers_twin` with the KV attention processors Flux2KleinKVPipeline sets."""
    twin = diffusers_twin(model)
    for block in twin.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in twin.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return twin


@pytest.fixture(scope="module")
def twin(klein):
    return kv_twin(klein)


def _references(sizes=((4, 6), (3, 5)), seed=7):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 128, *size, generator=g) for size in sizes)


def kv_pipeline_calls(twin, x, sigmas, context, refs):
    """The velocities Flux2KleinKVPipeline gets at `sigmas` for the same latent `x`: the references' tokens before the
    latent's in the first call ("extract"), then the latent's alone with the cache ("cached")."""
    batch, channels, h, w = x.shape
    tokens, ids = Flux2Pipeline._pack_latents(x), Flux2Pipeline._prepare_latent_ids(x)
    ref_tokens = torch.cat([Flux2Pipeline._pack_latents(r) for r in refs], dim=1).expand(batch, -1, -1)
    ref_ids = Flux2Pipeline._prepare_image_ids(list(refs)).expand(batch, -1, -1)
    txt_ids = Flux2Pipeline._prepare_text_ids(context)
    outs, cache = [], None
    for i, sigma in enumerate(sigmas):
        if i == 0:
            out, cache = twin(hidden_states=torch.cat([ref_tokens, tokens], dim=1), encoder_hidden_states=context,
                              timestep=sigma, img_ids=torch.cat([ref_ids, ids], dim=1), txt_ids=txt_ids,
                              guidance=None, return_dict=False, kv_cache_mode="extract",
                              num_ref_tokens=ref_tokens.shape[1])
        else:
            out = twin(hidden_states=tokens, encoder_hidden_states=context, timestep=sigma, img_ids=ids,
                       txt_ids=txt_ids, guidance=None, return_dict=False, kv_cache=cache,
                       kv_cache_mode="cached")[0]
        outs.append(out.transpose(1, 2).reshape(batch, channels, h, w))
    return outs


def test_extract_then_cached_matches_diffusers(klein, twin):
    x, _, context = inputs(5, 6)
    refs = _references()
    sigmas = [torch.tensor([1.0, 1.0]), torch.tensor([0.6, 0.6]), torch.tensor([0.25, 0.25])]
    store = ReferenceKV()
    with torch.no_grad():
        theirs = kv_pipeline_calls(twin, x, sigmas, context, refs)
        ours = [klein(x, sigma, context, ref_latents=References(refs, "index"), reference_kv=store)
                for sigma in sigmas]
        plain = klein(x, sigmas[1], context, ref_latents=References(refs, "index"))
    for a, b in zip(ours, theirs, strict=True):
        assert b.abs().max() > 0.5
        torch.testing.assert_close(a, b, **TOLERANCE)
    # the KV model's references (timestep 0, self-attending) are not the plain model's
    assert (ours[1] - plain).abs().max() > 1e-3


def test_cached_calls_equal_recomputed_ones(klein):
    """The cache is exact: a cached call gives what the same call with the references' tokens recomputed gives."""
    x, sigma, context = inputs(4, 4)
    refs = References(_references(((4, 4),)), "index")
    warm = ReferenceKV()
    with torch.no_grad():
        klein(x, sigma, context, ref_latents=refs, reference_kv=warm)
        cached = klein(x, sigma * 0.5, context, ref_latents=refs, reference_kv=warm)
        fresh = klein(x, sigma * 0.5, context, ref_latents=refs, reference_kv=ReferenceKV())
    torch.testing.assert_close(cached, fresh, **TOLERANCE)


def test_entries_are_matched_by_value_batch_and_capacity(klein):
    x, sigma, context = inputs(4, 4)
    refs = _references(((4, 4),))
    store = ReferenceKV(capacity=2)
    with torch.no_grad():
        klein(x, sigma, context, ref_latents=References(refs, "index"), reference_kv=store)
        # the same values in new tensors (a batched call concatenates its rows' references at every step) hit
        again = References(tuple(r.clone() for r in refs), "index")
        assert store.find(again, None, 2) is not None
        assert store.find(again, None, 1) is None
        other = References(tuple(r + 1 for r in refs), "index")
        assert store.find(other, None, 2) is None
        klein(x, sigma, context, ref_latents=other, reference_kv=store)
        klein(x[:1], sigma[:1], context[:1], ref_latents=other, reference_kv=store)
    assert store.find(again, None, 2) is None  # the oldest of three was forgotten
    assert store.find(other, None, 1) is not None and store.find(other, None, 2) is not None
    blocks = store.find(other, None, 2)
    assert len(blocks) == len(klein.double_blocks) + len(klein.single_blocks)
    assert blocks[0].k.shape == (2, klein.config.num_heads, 16, klein.config.head_dim)


def test_run_wrapper_and_patched_copy(klein):
    """with_reference_kv shares the weights and leaves the model as it was; ReferenceKVRun gives each run one store
    and passes calls without references straight through."""
    patched = with_reference_kv(klein)
    assert patched is not klein and patched.reference_kv and not hasattr(klein, "reference_kv")
    assert patched.img_in.weight is klein.img_in.weight
    x, sigma, context = inputs(4, 4)
    refs = References(_references(((4, 4),)), "index")
    run = ReferenceKVRun(patched, patched)
    with torch.no_grad():
        torch.testing.assert_close(run(x, sigma, context), klein(x, sigma, context))
        first = run(x, sigma, context, ref_latents=refs)
        expected = klein(x, sigma, context, ref_latents=refs, reference_kv=ReferenceKV())
    torch.testing.assert_close(first, expected)
    assert run.store.find(refs, None, 2) is not None
    with pytest.raises(TypeError, match="FLUX.2"):
        with_reference_kv(torch.nn.Linear(2, 2))
