"""CUDA graphs of the UNet: replays equal the eager module; off CUDA the wrapper is the module itself."""

import pytest
import torch

from ldm.cuda_graphs import GraphedUNet
from ldm.sampling import DiscreteSchedule, sample
from tests.ldm.test_compile import run, small_unet


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replays_match_eager_and_each_shape_is_captured_once():
    unet = small_unet().cuda()
    graphed = GraphedUNet(unet)
    for size in (8, 16, 8):
        assert torch.allclose(run_on_cuda(graphed, size), run_on_cuda(unet, size), atol=1e-5)
    assert len(graphed._graphs) == 2
