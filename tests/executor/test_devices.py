"""Device manager: dtype choice, LRU placement within a VRAM budget, low-VRAM streaming, OOM recovery."""

import pytest
import torch
from torch import nn

from executor.devices import DeviceManager, EngineOptions, is_out_of_memory, module_bytes
from executor.executor import Executor
from executor.services import ModelCache, Services
from graph.document import parse_api
from ldm.offload import streamer_of
from ldm.presets import build_preset
from nodes.folders import FolderPaths
from nodes.node import Node
from nodes.spec import Int, Output
from tests.support_nodes import test_registry


def test_cpu_runs_in_fp32_and_the_vae_never_in_fp16():
    devices = DeviceManager(force_cpu=True)
    assert devices.device.type == "cpu" and devices.offload_device.type == "cpu"
    assert devices.dtype == torch.float32 and devices.vae_dtype == torch.float32
    assert devices.vram_budget is None  # weights already live where they run
    assert DeviceManager(options=EngineOptions(force_cpu=True)).device.type == "cpu"


def test_fp16_devices_decode_in_fp32():
    class Fp16Card(DeviceManager):
        dtype = torch.float16  # as on a GPU without bf16

    assert Fp16Card(force_cpu=True).vae_dtype == torch.float32


def test_unknown_weights_dtype_is_refused():
    with pytest.raises(ValueError, match="weights dtype"):
        EngineOptions(weights_dtype="fp4")


def test_models_past_the_vram_budget_are_evicted_least_recently_used_first():
    a, b, c = (nn.Linear(64, 64) for _ in range(3))
    size = module_bytes(a)
    devices = DeviceManager(force_cpu=True, options=EngineOptions(vram_budget=2 * size + 1))
    devices.use(a)
    devices.use(b)
    devices.use(a)  # a is now the most recently used
    assert devices.resident() == [b, a]
    devices.use(c)
    assert devices.resident() == [a, c] and devices.evictions == 1
    assert devices.resident_bytes() == 2 * size
    assert devices.free() == 2 * size and devices.resident() == []


def test_models_run_together_are_kept_when_making_room_for_one_another():
    # A ControlNet and its UNet: the UNet comes last, and the least recently used model must not be the
    # ControlNet it is about to run with.
    other, controlnet, unet = (nn.Linear(64, 64) for _ in range(3))
    size = module_bytes(unet)
    devices = DeviceManager(force_cpu=True, options=EngineOptions(vram_budget=2 * size + 1))
    devices.use(other)
    devices.use(controlnet)
    devices.use(unet, keep=(controlnet,))
    assert devices.resident() == [controlnet, unet]
    devices.use(other, keep=(controlnet, unet))  # no room without them: over the budget, with a warning
    assert devices.resident() == [controlnet, unet, other]


def test_an_evicted_model_lets_go_of_its_cuda_graphs():
    from ldm.cuda_graphs import graphed_unet

    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    devices = DeviceManager(force_cpu=True, options=EngineOptions(vram_budget=module_bytes(a) + 1))
    devices.use(a)
    graphs = graphed_unet(a)
    graphs._graphs["a shape"] = None  # stands in for a capture (CPU here): what eviction must drop
    devices.use(b)  # a goes home to make room
    assert devices.resident() == [b] and not graphs._graphs


def test_dropped_models_leave_the_books():
    devices = DeviceManager(force_cpu=True, options=EngineOptions(vram_budget=1 << 20))
    devices.use(nn.Linear(8, 8))  # no reference kept: collected right away
    assert devices.resident() == []


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 32, generator=g)


def test_lowvram_streams_each_unet_block_and_gives_the_same_output():
    _, _, unet, _, _ = build_preset("tiny-sd1", text_encoder=False)
    x, t, context = _unet_inputs()
    with torch.inference_mode():
        expected = unet(x, t, context)
    devices = DeviceManager(force_cpu=True, options=EngineOptions(lowvram=True))
    assert devices.use(unet) is unet
    streamer = streamer_of(unet)
    blocks = len(unet.input_blocks) + 1 + len(unet.output_blocks)
    assert streamer is not None and len(streamer.blocks) == blocks
    with torch.inference_mode():
        out = unet(x, t, context)
        unet(x, t, context)
    assert streamer.loads == 2 * blocks  # every block fetched once per forward, none kept
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Between calls every block's weights are their home (offload) tensors.
    weight = unet.output_blocks[0][0].in_layers[2].weight
    assert weight.data_ptr() == streamer.home[id(weight)].data_ptr()
    devices.free()
    assert streamer_of(unet) is None and not unet.input_blocks[1]._forward_pre_hooks
    with torch.inference_mode():
        torch.testing.assert_close(unet(x, t, context), expected, rtol=0, atol=0)
    assert streamer.loads == 2 * blocks  # hooks gone


def test_lowvram_serves_a_lora_copy_that_shares_the_base_blocks():
    from ldm.lora import shallow_copy

    _, _, unet, _, _ = build_preset("tiny-sd1", text_encoder=False)
    x, t, context = _unet_inputs()
    devices = DeviceManager(force_cpu=True, options=EngineOptions(lowvram=True))
    devices.use(unet)
    copy = shallow_copy(unet)
    layer = copy.input_blocks[1][0].in_layers[2]
    layer._parameters["weight"] = nn.Parameter(layer.weight * 2, requires_grad=False)
    devices.use(copy)
    with torch.inference_mode():
        patched = copy(x, t, context)
        base = unet(x, t, context)
    assert not torch.allclose(patched, base)
    devices.free()
    devices.use(unet)  # the base streams again after the copy's hooks were removed
    with torch.inference_mode():
        torch.testing.assert_close(unet(x, t, context), base, rtol=0, atol=0)


def test_model_cache_keeps_within_its_byte_budget():
    size = module_bytes(nn.Linear(32, 32))
    cache = ModelCache(max_models=10, budget_bytes=2 * size)
    for key in "abc":
        cache.get_or_load(key, lambda: nn.Linear(32, 32))
    assert len(cache) == 2 and cache.total_bytes == 2 * size
    cache.get_or_load("big", lambda: nn.Linear(64, 64))  # alone over budget: still kept, as the newest
    assert len(cache) == 1


def test_torch_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


FAILURES = {"left": 0}


class RunsOutOfMemory(Node):
    """Raises torch's out-of-memory error `times` times (across runs), then returns its input."""

    times = Int(1, min=0, max=100)
    outputs = (Output("INT"),)

    def execute(self, times: int) -> tuple[int]:
        if FAILURES["left"] > 0:
            FAILURES["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return (times,)


def _engine(tmp_path):
    registry = test_registry()
    registry.register(RunsOutOfMemory, "tests")
    services = Services.create(FolderPaths(base=tmp_path), force_cpu=True)
    return Executor(registry, services=services), services


def _graph(times: int) -> dict:
    return {"1": {"class_type": "RunsOutOfMemory", "inputs": {"times": times}},
            "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}


def test_an_out_of_memory_node_is_retried_once_after_freeing(tmp_path):
    engine, services = _engine(tmp_path)
    held = nn.Linear(16, 16)
    services.devices.use(held)
    FAILURES["left"] = 1
    result = engine.run(parse_api(_graph(1)))
    assert result.ok, result.error
    assert services.oom_recoveries == 1 and services.devices.resident() == []  # freed before the retry


def test_a_second_out_of_memory_error_fails_the_run_clearly_and_the_engine_goes_on(tmp_path):
    engine, services = _engine(tmp_path)
    FAILURES["left"] = 2
    result = engine.run(parse_api(_graph(2)))
    assert result.status == "error"
    assert result.error.exception_type == "OutOfMemory"
    assert "ran out of memory twice" in result.error.exception_message
    assert "--lowvram" in result.error.exception_message
    assert services.oom_recoveries == 2
    assert engine.run(parse_api(_graph(3))).ok  # the next prompt runs


def test_other_errors_are_not_retried(tmp_path):
    engine, services = _engine(tmp_path)
    graph = {"1": {"class_type": "Add", "inputs": {"a": 1}},
             "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
             "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    result = engine.run(parse_api(graph))
    assert result.status == "error" and result.error.exception_type == "RuntimeError"
    assert services.oom_recoveries == 0
