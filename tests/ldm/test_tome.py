"""Token merging (ldm.tome): the matching against tomesd's, the patched UNet's attention against a reference built
on tomesd's merge, exactness at ratio 0, determinism, and no host reads (what CUDA graphs need)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tomesd.merge import bipartite_soft_matching_random2d

from ldm.attention import CrossAttention
from ldm.presets import PRESETS, build_preset, randomize_
from ldm.sampling import DiscreteSchedule, sample
from ldm.tome import TokenMerging, bipartite_soft_matching, draw_cells
from ldm.unet import UNetModel
from tests.ldm.test_no_sync import HostReads


def by_first_channel(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens in a canonical order: the sets A and B keep raster order here, tomesd's (unstable) sort another."""
    return tokens.gather(1, tokens[..., :1].argsort(dim=1).expand_as(tokens))


@pytest.mark.parametrize(("height", "width", "r", "batch"), [(8, 8, 20, 2), (7, 9, 25, 3), (6, 10, 45, 1),
                                                              (5, 5, 100, 2), (16, 12, 57, 1)])
def test_matching_equals_tomesd(height, width, r, batch):
    """Same destinations (tomesd draws them with torch.randint from its generator: drawn here alike), same
    merge and unmerge; odd sides leave a partial region of sources, and r beyond A's size is clamped."""
    g = torch.Generator().manual_seed(height * width)
    metric, x = torch.randn(batch, height * width, 16, generator=g), torch.randn(batch, height * width, 16, generator=g)
    merge, unmerge = bipartite_soft_matching_random2d(metric, width, height, 2, 2, r,
                                                      generator=torch.Generator().manual_seed(5))
    cells = torch.randint(4, size=(height // 2, width // 2, 1), generator=torch.Generator().manual_seed(5))
    ours = bipartite_soft_matching(metric, height, width, r, cells[..., 0])
    merged = ours.merge(x)
    assert merged.shape == (batch, height * width - min(r, height * width - (height // 2) * (width // 2)), 16)
    assert torch.equal(by_first_channel(merged), by_first_channel(merge(x)))
    assert torch.equal(ours.unmerge(merged * 2 + 1), unmerge(merge(x) * 2 + 1))


def test_partition_takes_the_drawn_cell_of_each_region_and_merges_the_most_similar():
    # 5 x 4 grid: regions of 2 x 2 on the top 4 rows, the last row all sources.
    cells = torch.tensor([[0, 3], [1, 2]])
    metric = torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(0))
    metric[0, 5] = metric[0, 0] * 3  # token 5 points the way token 0 (a destination) does: merged first
    matching = bipartite_soft_matching(metric, 5, 4, 1, cells)
    assert matching.dst.tolist() == [0, 7, 9, 14]  # (0,0), (1,3), (2,1), (3,2)
    assert sorted(matching.src.tolist()) == sorted(set(range(20)) - {0, 7, 9, 14})
    assert matching.src[matching.merged].tolist() == [[5]] and matching.dst[matching.into].tolist() == [[0]]
    x = torch.arange(20.0).reshape(1, 20, 1)
    merged = matching.merge(x)
    assert merged.shape == (1, 19, 1) and merged[0, -4, 0] == 2.5  # B's first token: the mean of tokens 0 and 5
    restored = matching.unmerge(merged)
    assert restored[0, 5, 0] == 2.5 and restored[0, 0, 0] == 2.5
    others = [i for i in range(20) if i not in (0, 5)]
    assert torch.equal(restored[0, others], x[0, others])
    assert bipartite_soft_matching(metric, 5, 4, 0, cells) is None
    assert bipartite_soft_matching(metric, 1, 20, 3, cells[:0]) is None


def test_cells_are_spread_evenly_and_change_with_the_step_and_the_layer():
    cells = draw_cells(torch.tensor([999.0, 999.0]), 0, 4096, 4)
    assert torch.equal(cells, draw_cells(torch.tensor([999.0]), 0, 4096, 4))  # a function of its inputs alone
    assert all(900 < n < 1150 for n in torch.bincount(cells, minlength=4).tolist())
    for other in (draw_cells(torch.tensor([998.0]), 0, 4096, 4), draw_cells(torch.tensor([999.0]), 1, 4096, 4)):
        assert 0.2 < (other == cells).float().mean() < 0.3  # independent draws agree on a quarter of the cells
    assert draw_cells(torch.tensor([-1.25]), 3, 8, 4).min() >= 0  # EDM's timesteps can be negative


# Two levels with transformers: 16 x 16 tokens at the first, 8 x 8 at the second and in the middle.
CONFIG = PRESETS["tiny-sd1"][2]


@pytest.fixture(scope="module")
def unet():
    return randomize_(UNetModel(CONFIG), torch.Generator().manual_seed(0), std=0.2).eval().requires_grad_(False)


def _inputs(step: float = 500.0):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([step, step]),
            torch.randn(2, 7, CONFIG.context_dim, generator=g))


def test_ratio_zero_changes_nothing_and_a_ratio_changes_the_output_a_little(unet):
    with torch.no_grad():
        plain = unet(*_inputs())
        assert torch.equal(TokenMerging(0.0).patch(unet)(*_inputs()), plain)
        merged = TokenMerging(0.5).patch(unet)
        out = merged(*_inputs())
        assert torch.equal(merged(*_inputs()), out)  # the same draw for the same step: reproducible
        error = ((out - plain).norm() / plain.norm()).item()
        assert 0.01 < error < 0.1, error
        assert torch.equal(unet(*_inputs()), plain)  # the original is left as it was
    assert not unet.input_block_patches and len(merged.input_block_patches) == 1
    assert all(a is b for a, b in zip(unet.parameters(), merged.parameters(), strict=True))
    assert getattr(merged, "cuda_graphs_safe", True)


def test_only_full_resolution_self_attention_merges_queries_as_comfyui_does(unet, monkeypatch):
    """Each layer's output against a reference on tomesd's matching, with ComfyUI's semantics: the queries of the
    merged tokens over every token's keys and values, the output unmerged; the layers at 8 x 8 are untouched."""
    patched = TokenMerging(0.4).patch(unet)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, out):
            inputs[name], outputs[name] = args[0], out
        return hook

    # A shallow copy shares its layers' hook dicts with the original: the hooks go once they have run.
    handles = [layer.register_forward_hook(keep(name)) for name, layer in patched.named_modules()
               if isinstance(layer, CrossAttention) and name.endswith("attn1")]
    x, t, context = _inputs(step=321.0)
    with torch.no_grad():
        patched(x, t, context)
    for handle in handles:
        handle.remove()
    assert len(inputs) == 7  # input blocks 1 and 3, the middle block, output blocks 0 to 3
    salts = {name: i for i, name in enumerate(inputs)}  # the layers' order in the module, which the patch numbers
    assert list(salts) == [name for name, m in patched.named_modules() if isinstance(m, CrossAttention)
                           and name.endswith("attn1")]
    for name, n in inputs.items():
        plain = unet.get_submodule(name)
        with torch.no_grad():
            if n.shape[1] != 16 * 16:
                assert torch.equal(outputs[name], plain(n))
                continue
            cells = draw_cells(t, salts[name], 64, 4).reshape(8, 8, 1)
            monkeypatch.setattr(torch, "randint", lambda *a, cells=cells, **k: cells)
            merge, unmerge = bipartite_soft_matching_random2d(n, 16, 16, 2, 2, int(256 * 0.4),
                                                              generator=torch.Generator())
            monkeypatch.undo()
            q = plain.to_q(merge(n)).unflatten(-1, (plain.heads, -1)).transpose(1, 2)
            k, v = (proj(n).unflatten(-1, (plain.heads, -1)).transpose(1, 2) for proj in (plain.to_k, plain.to_v))
            attended = F.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
            expected = unmerge(plain.to_out(attended.transpose(1, 2).flatten(2)))
            assert (outputs[name] - expected).abs().max() < 1e-5
            assert (outputs[name] - plain(n)).abs().max() > 1e-3
    assert sum(n.shape[1] == 256 for n in inputs.values()) == 3


def test_sdxl_has_no_transformer_at_full_resolution():
    unet = build_preset("tiny-sdxl", text_encoder=False)[2]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([700.0])
    context, y = torch.randn(1, 5, unet.config.context_dim, generator=g), torch.randn(1, unet.config.adm_in_channels)
    with torch.no_grad():
        assert torch.equal(TokenMerging(1.0).patch(unet)(x, t, context, y), unet(x, t, context, y))


def test_nothing_is_read_back_to_the_host(unet):
    """What a CUDA graph needs (it replays the device's work, not the host's): no reads of values, whatever
    the step; so the copy keeps `cuda_graphs_safe` (the next test replays it on a GPU)."""
    patched = TokenMerging(0.5).patch(unet)
    with torch.inference_mode(), HostReads() as reads:
        patched(*_inputs())
    assert reads.count == 0


@pytest.mark.cuda
def test_cuda_graph_replays_equal_the_eager_run(unet):
    """A captured graph replays the draw with each step's timestep: the run equals the eager one."""
    from ldm.cuda_graphs import graphed_unet

    plain = copy.deepcopy(unet).cuda()
    patched = TokenMerging(0.5).patch(plain)
    context = torch.randn(1, 7, CONFIG.context_dim, generator=torch.Generator().manual_seed(1)).cuda()

    def run(module):
        with torch.inference_mode():
            return sample(module, DiscreteSchedule(), torch.zeros(1, 4, 32, 32, device="cuda"), seed=0, steps=6,
                          cfg=7.5, sampler_name="euler", scheduler="normal", positive=[(context, {})],
                          negative=[(context * 0, {})])

    eager = run(patched)
    graphed = graphed_unet(patched)
    replayed = run(graphed)
    assert any(graph is not None for graph in graphed._graphs.values())  # captured, not run eagerly
    assert (replayed - eager).abs().max() < 1e-4 * eager.abs().max()
    assert (run(plain) - eager).abs().max() > 0.01 * eager.abs().max()  # ToMe changes the run (by ~7% on CPU)


def test_patch_on_a_patched_copy_keeps_both_patches(unet):
    """ToMe over HyperTile's copy: tiled layers see tiles, not the whole latent, and are left unmerged."""
    from ldm.patches import HyperTile

    tiled = HyperTile(CONFIG.model_channels, 64, 1, 0, False).patch(unet)
    both = TokenMerging(0.5).patch(tiled)
    assert len(both.input_block_patches) == 2 and not getattr(both, "cuda_graphs_safe", True)
    with torch.no_grad():
        assert torch.equal(both(*_inputs()), tiled(*_inputs()))
