"""ComfyUI's ModelComputeDtype, ModelAttentionBackend and wanBlockSwap, run through the executor on tiny random-weight
models."""

import copy
import logging

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.ui_format import ui_to_api
from ldm.checkpoint import write_safetensors
from ldm.flux import config_metadata
from ldm.flux_presets import random_flux, tiny_flux_config
from ldm.presets import make_checkpoint
from ldm.quant import FP8, Fp8Linear
from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.model_advanced import ModelComputeDtype

MODULES = ("nodes.builtin.utils", "nodes.sd.loaders", "nodes.sd.part_loaders", "nodes.sd.conditioning",
           "nodes.sd.latent", "nodes.sd.sampling", "nodes.sd.model_advanced")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_advanced")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "a.safetensors", seed=1)
    config = tiny_flux_config("dev")
    folder = root / "models" / "diffusion_models"
    folder.mkdir(parents=True)
    write_safetensors(random_flux(config, 1).state_dict(), folder / "flux.safetensors", config_metadata(config),
                      torch.float16)
    set_paths(FolderPaths(base=root))
    yield root
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(root):
    return Executor(builtin_registry(MODULES), services=Services.create(FolderPaths(base=root), force_cpu=True))


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


CHECKPOINT = {"ckpt": node("CheckpointLoaderSimple", ckpt_name="a.safetensors")}


def sampled(model: list, tag: str) -> dict:
    """A KSampler on `model` with the checkpoint's prompts; the KSampler is node `tag`."""
    return {f"{tag}p": node("CLIPTextEncode", text="a red circle", clip=["ckpt", 1]),
            f"{tag}n": node("CLIPTextEncode", text="blurry", clip=["ckpt", 1]),
            f"{tag}l": node("EmptyLatentImage", width=64, height=64, batch_size=1),
            tag: node("KSampler", model=model, seed=3, steps=3, cfg=5.0, sampler_name="euler", scheduler="karras",
                      positive=[f"{tag}p", 0], negative=[f"{tag}n", 0], latent_image=[f"{tag}l", 0], denoise=1.0)}


def run(engine, graph: dict, *nodes: str) -> list:
    graph = {**graph, **{f"show_{n}": node("PreviewAny", source=[n, 0]) for n in nodes}}
    result = engine.run(parse_api(graph), keep=list(nodes))
    assert result.ok, result.error
    return [result.values[n] for n in nodes]


# --- declarations (ComfyUI's, transcribed) ---------------------------------------------------------------

def info(name: str) -> dict:
    return builtin_registry(["nodes.sd.model_advanced"]).get(name).object_info()


def test_model_compute_dtype_is_declared_as_comfyuis():
    found = info("ModelComputeDtype")
    assert list(found["input"]["required"]) == ["model", "dtype"]
    assert found["input"]["required"]["model"] == ["MODEL", {}]
    choices, options = found["input"]["required"]["dtype"]
    assert choices == ["default", "fp32", "fp16", "bf16"] and options["advanced"] is True
    assert (found["output"], found["output_name"], found["category"]) == (["MODEL"], ["MODEL"], "advanced/debug")


def test_model_attention_backend_is_declared_as_comfyuis():
    found = info("ModelAttentionBackend")
    assert found["display_name"] == "Model Attention Backend" and found["category"] == "model/patch"
    assert found["description"] == ("Selects the dense attention implementation for the model. When used with Block "
                                    "Sparse Attention, this backend is used whenever sparse attention is inactive or "
                                    "unsupported.")
    assert list(found["input"]["required"]) == ["model", "attention"]
    assert found["input"]["required"]["model"] == ["MODEL", {"tooltip": "The model to patch."}]
    choices, options = found["input"]["required"]["attention"]
    assert choices == ["pytorch attention"]
    assert options == {"default": "pytorch attention", "display_name": "backend",
                       "tooltip": "The dense attention backend. Comfy Kitchen attention uses quantized INT8 attention "
                                  "and is available only on Nvidia and AMD GPUs."}
    assert (found["output"], found["output_name"]) == (["MODEL"], ["model"])
    assert found["output_tooltips"] == ["The model with the selected attention backend."]


def test_wan_block_swap_is_declared_as_comfyuis():
    found = info("wanBlockSwap")
    assert found["input"]["required"] == {"model": ["MODEL", {}]} and found["input"]["optional"] == {}
    assert (found["output"], found["category"]) == (["MODEL"], "")
    assert found["description"] == "Intercept wanBlockSwap custom node that causes major instability and make it no-op."


# --- ModelComputeDtype ---------------------------------------------------------------------------------

def test_bf16_compute_casts_a_copy_that_runs_as_a_bf16_loaded_unet(engine):
    graph = {**CHECKPOINT, "bf16": node("ModelComputeDtype", model=["ckpt", 0], dtype="bf16"),
             **sampled(["bf16", 0], "low"), **sampled(["ckpt", 0], "full")}
    (loaded, _, _), (cast,), (low,), (full,) = run(engine, graph, "ckpt", "bf16", "low", "full")
    before, after = loaded.unet.state_dict(), cast.unet.state_dict()
    assert all(t.dtype == torch.float32 for t in before.values() if t.is_floating_point())  # the cached one, as it was
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor.to(torch.bfloat16)), key
    assert cast.unet.dtype == torch.bfloat16 and cast.family is loaded.family and cast.own_bytes > 0
    # A forward of the copy is that of the UNet cast as a bf16 loader casts it.
    by_hand = copy.deepcopy(loaded.unet).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, loaded.unet.config.context_dim, generator=generator)
    with torch.no_grad():
        assert torch.equal(cast.unet(x, torch.tensor([500.0]), context), by_hand(x, torch.tensor([500.0]), context))
    assert torch.isfinite(low["samples"]).all() and not torch.equal(low["samples"], full["samples"])
    assert (low["samples"] - full["samples"]).norm() < 0.02 * full["samples"].norm()  # bf16 rounding only


def test_default_and_the_loaded_dtype_pass_the_model_through(engine):
    graph = {**CHECKPOINT, "default": node("ModelComputeDtype", model=["ckpt", 0], dtype="default"),
             "same": node("ModelComputeDtype", model=["ckpt", 0], dtype="fp32")}
    (loaded, _, _), (default,), (same,) = run(engine, graph, "ckpt", "default", "same")
    assert default is loaded and same is loaded


def test_fp8_weights_stay_fp8_and_compute_in_the_new_dtype(engine):
    graph = {"unet": node("UNETLoader", unet_name="flux.safetensors", weight_dtype="fp8_e4m3fn"),
             "half": node("ModelComputeDtype", model=["unet", 0], dtype="bf16")}
    (loaded,), (cast,) = run(engine, graph, "unet", "half")
    layers = {name: layer for name, layer in cast.unet.named_modules() if isinstance(layer, Fp8Linear)}
    assert layers
    originals = dict(loaded.unet.named_modules())
    for name, layer in layers.items():
        assert layer.weight.dtype == FP8 and layer.weight is originals[name].weight, name
        assert layer.weight_scale.dtype == torch.bfloat16 and originals[name].weight_scale.dtype == torch.float32
        # What the fp32 layer computes with from a bf16 input: the fp8 weight and its scale, each in bf16.
        assert torch.equal(layer.dequantized_weight(), originals[name].dequantized_weight(torch.bfloat16))
    assert cast.unet.dtype == torch.bfloat16 and loaded.unet.dtype == torch.float32


def test_an_unknown_dtype_is_refused(engine):
    graph = {**CHECKPOINT, "m": node("ModelComputeDtype", model=["ckpt", 0], dtype="fp64"),
             "show": node("PreviewAny", source=["m", 0])}
    with pytest.raises(WorkflowInvalid, match="fp64"):
        engine.run(parse_api(graph))
    (model, _, _), = run(engine, CHECKPOINT, "ckpt")
    direct = ModelComputeDtype()
    direct.ctx = NodeContext()
    with pytest.raises(ValueError, match="ModelComputeDtype: dtype must be one of default, fp32, fp16, bf16"):
        direct.execute(model=model, dtype="fp64")


# --- ModelAttentionBackend and wanBlockSwap ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["pytorch attention", "comfy kitchen attention"])
def test_attention_backend_keeps_loom_attention_and_says_so(engine, backend, caplog):
    graph = {**CHECKPOINT, "m": node("ModelAttentionBackend", model=["ckpt", 0], attention=backend)}
    with caplog.at_level(logging.INFO, logger="nodes.sd.model_advanced"):
        (loaded, _, _), (patched,) = run(engine, graph, "ckpt", "m")
    assert patched is loaded
    assert "Attention backend enabled: using pytorch attention" in caplog.text
    assert ("'comfy kitchen attention' is unavailable in Loom" in caplog.text) == (backend != "pytorch attention")


def test_wan_block_swap_passes_the_model_through_from_api_and_ui_workflows(engine, caplog):
    """The custom node's own widgets (blocks_to_swap...) are ignored, as ComfyUI ignores them."""
    graph = {**CHECKPOINT, "swap": node("wanBlockSwap", model=["ckpt", 0], blocks_to_swap=20, offload_img_emb=False,
                                        offload_txt_emb=False)}
    with caplog.at_level(logging.INFO, logger="nodes.sd.model_advanced"):
        (loaded, _, _), (swapped,) = run(engine, graph, "ckpt", "swap")
    assert swapped is loaded and "wanBlockSwap: the MODEL passes through unchanged" in caplog.text
    document = {"links": [[1, 1, 0, 2, 0, "MODEL"]], "nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "widgets_values": ["a.safetensors"],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}]},
        {"id": 2, "type": "wanBlockSwap", "widgets_values": [20, False, False, True],
         "inputs": [{"name": "model", "type": "MODEL", "link": 1}], "outputs": [{"name": "MODEL", "type": "MODEL"}]}]}
    api = ui_to_api(document, builtin_registry(MODULES))
    assert api["2"]["inputs"] == {"model": ["1", 0]}
