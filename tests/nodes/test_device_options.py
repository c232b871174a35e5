"""The SD nodes under the engine's device options: low-VRAM streaming, fp8 weights, model placement."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from executor.devices import EngineOptions
from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.offload import streamer_of
from ldm.presets import make_checkpoint
from ldm.quant import is_fp8
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

ROOT = Path(__file__).resolve().parents[2]


def txt2img(ckpt: str = "tiny.safetensors", loader: dict | None = None) -> dict:
    return {
        "4": loader or {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 3, "steps": 4, "cfg": 7.5,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    (root / "models" / "checkpoints").mkdir(parents=True)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "tiny.safetensors", seed=2)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def image(base, options: EngineOptions | None = None, graph: dict | None = None,
          force_cpu: bool = True) -> tuple[torch.Tensor, Services]:
    services = Services.create(base, force_cpu=force_cpu, options=options or EngineOptions())
    engine = Executor(builtin_registry(), services=services)
    result = engine.run(parse_api(graph or txt2img()), keep=["8"])
    assert result.ok, result.error
    return result.values["8"][0], services


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean().clamp(min=1e-20)))


def test_each_node_places_the_model_it_runs(base):
    _, services = image(base)
    kinds = {type(m).__name__ for m in services.devices.resident()}
    assert kinds == {"TextEncoder", "UNetModel", "AutoencoderKL"}
    assert services.devices.moves == 3


def test_lowvram_streams_the_unet_and_makes_the_same_image(base):
    plain, _ = image(base)
    streamed, services = image(base, EngineOptions(lowvram=True))
    torch.testing.assert_close(streamed, plain, rtol=0, atol=0)
    [unet] = [m for m in services.devices.resident() if type(m).__name__ == "UNetModel"]
    streamer = streamer_of(unet)
    assert streamer is not None and streamer.loads == 4 * len(streamer.blocks)  # every block, every step


def _fp8_parts(services: Services) -> tuple[bool, bool]:
    """Whether the resident UNet and text encoder hold fp8 weights."""
    [unet] = [m for m in services.devices.resident() if type(m).__name__ == "UNetModel"]
    [te] = [m for m in services.devices.resident() if hasattr(m, "encoders")]
    fc1 = te.encoders["clip_l"].text_model.encoder.layers[0].mlp.fc1
    return is_fp8(unet.middle_block[1].proj_in), is_fp8(fc1)


def test_fp8_weights_through_the_options_and_the_loader_node(base):
    plain, _ = image(base)
    small, services = image(base, EngineOptions(weights_dtype="fp8"))
    assert _fp8_parts(services) == (True, False)  # the text encoders are a choice of their own
    assert psnr(small, plain) > 30.0
    smaller, services = image(base, EngineOptions(weights_dtype="fp8", te_weights_dtype="fp8"))
    assert _fp8_parts(services) == (True, True)
    assert psnr(smaller, plain) > 30.0 and not torch.equal(smaller, small)
    loader = {"class_type": "CheckpointLoaderWeightDtype",
              "inputs": {"ckpt_name": "tiny.safetensors", "weight_dtype": "fp8_e4m3fn"}}
    by_node, _ = image(base, graph=txt2img(loader=loader))  # a workflow saved before the second input
    torch.testing.assert_close(by_node, small, rtol=0, atol=0)
    loader["inputs"]["text_encoder_dtype"] = "fp8_e4m3fn"
    by_node, _ = image(base, graph=txt2img(loader=loader))
    torch.testing.assert_close(by_node, smaller, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_graphs_make_the_same_image_as_plain_launches(base):
    # Both NCHW: without graphs the UNet stays NCHW (channels-last is for graphs only), and the
    # convolution kernels of the two layouts round differently.
    graphed, services = image(base, EngineOptions(channels_last=False), force_cpu=False)
    [unet] = [m for m in services.devices.resident() if type(m).__name__ == "UNetModel"]
    _, graphs = unet.__dict__["_loom_graphed"]
    assert len(graphs._graphs) == 1 and all(graphs._graphs.values())
    plain, _ = image(base, EngineOptions(cuda_graphs=False), force_cpu=False)
    torch.testing.assert_close(graphed, plain, rtol=0, atol=1e-5)


@pytest.mark.cuda
def test_on_cuda_the_unet_runs_channels_last_and_makes_the_image_of_nchw(base):
    fast, services = image(base, force_cpu=False)
    [unet] = [m for m in services.devices.resident() if type(m).__name__ == "UNetModel"]
    assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    plain, services = image(base, EngineOptions(channels_last=False), force_cpu=False)
    [unet] = [m for m in services.devices.resident() if type(m).__name__ == "UNetModel"]
    assert not unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert psnr(fast, plain) > 35


def test_cli_takes_the_device_options(base, tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(txt2img()))
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "run", str(path), "--json", "--base-dir",
                           str(base.base), "--cpu", "--lowvram", "--weights-dtype", "fp8", "--te-weights-dtype", "fp8",
                           "--vram-budget-gb", "0.5", "--ram-budget-gb", "2", "--no-cuda-graphs",
                           "--no-channels-last"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "success"


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compile_makes_the_same_image_and_later_runs_reuse_it(base):
    """`--compile` on the CPU (inductor's C++ backend): the image matches the eager one, and a run with
    another seed (same shapes) compiles nothing more."""
    from torch._dynamo.utils import counters

    eager, _ = image(base)
    compiled, services = image(base, EngineOptions(compile=True))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    engine = Executor(builtin_registry(), services=services)
    graph = txt2img()
    graph["3"]["inputs"]["seed"] = 4
    result = engine.run(parse_api(graph), keep=["8"])
    assert result.ok, result.error
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_torch_compile_model_node_compiles_that_model_alone(base):
    """ComfyUI's TorchCompileModel: the same image as eager, through the compiled forward of that model's UNet;
    the cudagraphs backend, which needs CUDA, leaves a CPU run eager."""
    from ldm.compile import is_compiled

    eager, _ = image(base)
    for backend, compiled_expected in (("cudagraphs", False), ("inductor", True)):
        graph = txt2img()
        graph["20"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["4", 0], "backend": backend}}
        graph["3"]["inputs"]["model"] = ["20", 0]
        services = Services.create(base, force_cpu=True)
        result = Executor(builtin_registry(), services=services).run(parse_api(graph), keep=["8"])
        assert result.ok, result.error
        torch.testing.assert_close(result.values["8"][0], eager, rtol=0, atol=1e-4)
        [unet] = [m for m in services.devices.resident() if type(m).__name__ == "UNetModel"]
        assert is_compiled(unet) == compiled_expected
