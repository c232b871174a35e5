"""CUDA graphs of the UNet: replays equal the eager module, stale graphs are dropped; off CUDA the
wrapper calls the module. The CUDA tests run on a GPU machine (scripts/gpu_check.sh), not in CI."""

import copy

import pytest
import torch

from ldm.cuda_graphs import GraphedUNet, graphed_unet, release
from ldm.lora import shallow_copy
from ldm.sampling import DiscreteSchedule, sample
from tests.ldm.test_compile import run, small_unet

cuda = pytest.mark.cuda


def run_on_cuda(unet, size: int) -> torch.Tensor:
    context = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        return sample(unet, DiscreteSchedule(), torch.zeros(1, 4, size, size, device="cuda"), seed=0, steps=3,
                      cfg=7.5, sampler_name="euler", scheduler="normal", positive=[(context, {})],
                      negative=[(context * 0, {})])


def test_off_cuda_the_wrapper_calls_the_module():
    unet = small_unet()
    graphed = GraphedUNet(unet)
    assert torch.equal(run(graphed), run(unet))
    assert not graphed._graphs


def test_graphs_are_kept_per_module_and_dropped_when_weights_move():
    unet = small_unet()
    graphed = graphed_unet(unet)
    assert graphed_unet(unet) is graphed
    graphed._graphs["some shape"] = None
    assert graphed_unet(unet)._graphs  # same weights: kept
    assert graphed_unet(shallow_copy(unet)) is not graphed  # a LoRA copy gets its own
    assert graphed_unet(copy.deepcopy(unet)) is not graphed
    unet.double()  # new weight tensors, as moving to another device makes
    assert graphed_unet(unet) is graphed and not graphed._graphs
    graphed._graphs["some shape"] = None
    release(unet)  # what the device manager does when the module leaves the GPU
    assert not graphed._graphs


def test_shapes_that_take_turns_beyond_the_limit_are_not_captured_again():
    """Area conditioning with many region sizes: a dropped shape that comes back runs without graphs."""
    captured = []

    class Recording(GraphedUNet):
        def _graphable(self, x):
            return True

        def _capture(self, args):
            captured.append(tuple(args[0].shape))
            return None  # as a failed capture: the call runs the module

    unet = small_unet()
    graphed = Recording(unet, max_shapes=2)
    context = torch.zeros(1, 7, 16)
    with torch.inference_mode():
        for size in (8, 16, 24, 8, 16, 24, 24):
            x = torch.zeros(1, 4, size, size)
            assert torch.equal(graphed(x, torch.tensor([500.0]), context), unet(x, torch.tensor([500.0]), context))
    assert [shape[-1] for shape in captured] == [8, 16, 24]  # 8 was dropped for 24, then not captured again
    graphed.new_run()  # the next sampling run (graphed_unet calls it) may capture a dropped shape again
    with torch.inference_mode():
        graphed(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), context)
    assert [shape[-1] for shape in captured] == [8, 16, 24, 8]


@cuda
def test_replays_match_eager_and_each_shape_is_captured_once():
    unet = small_unet().cuda()
    graphed = GraphedUNet(unet)
    for size in (8, 16, 8):
        assert torch.allclose(run_on_cuda(graphed, size), run_on_cuda(unet, size), atol=1e-5)
    assert len(graphed._graphs) == 2 and all(graphed._graphs.values())


@cuda
def test_a_module_moved_away_and_back_is_captured_again():
    unet = small_unet().cuda()
    expected = run_on_cuda(unet, 8)
    run_on_cuda(graphed_unet(unet), 8)
    unet.cpu()
    unet.cuda()  # new addresses: the old graph would read freed memory
    assert torch.allclose(run_on_cuda(graphed_unet(unet), 8), expected, atol=1e-5)
