"""The sampling loop asks nothing of the device's values per step (on a GPU each would stall the queue).

Counted through a dispatch mode: the ops that read a tensor's value on the host (`item`,
`_local_scalar_dense`, `nonzero`, `is_nonzero`, `equal`). Setup may read values once; the count must
not grow with the number of steps. (On the CPU the denoiser reads sigma as a Python float through
`tolist`, which no dispatch mode sees; on a GPU sigma stays a device tensor there.)
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.presets import build_preset
from ldm.sampling import DiscreteSchedule, sample

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
              torch.ops.aten.nonzero.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_READS
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def unet():
    return build_preset("tiny-sd1", text_encoder=False)[2]


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "heun", "uni_pc"])
def test_host_reads_do_not_grow_with_steps(unet, sampler):
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    counts = []
    for steps in (3, 6):
        with torch.inference_mode(), HostReads() as reads:
            sample(unet, DiscreteSchedule(), torch.zeros(1, 4, 8, 8), seed=0, steps=steps, cfg=7.5,
                   sampler_name=sampler, scheduler="normal", positive=[(context, {})],
                   negative=[(context * 0, {})])
        counts.append(reads.count)
    assert counts[0] == counts[1]
