"""The LoRA training nodes through the engine on tiny checkpoints: Train LoRA learns, repeats with its seed and leaves
the model alone; Load LoRA Model, Save LoRA Weights (read back by Load LoRA) and Plot Loss Graph; bad input."""

import shutil

import pytest
import safetensors.torch
import torch
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.training import TrainLoraNode

STEPS = 40


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models train fastest on one thread, the more so on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    for name, preset in (("sd1", "tiny-sd1"), ("sd2", "tiny-sd2"), ("sdxl", "tiny-sdxl")):
        make_checkpoint(preset, root / "models" / "checkpoints" / f"{name}.safetensors", seed=1)
    (root / "models" / "loras").mkdir(parents=True)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def new_engine(paths) -> Executor:
    return Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))


@pytest.fixture(scope="module")
def engine(paths):
    return new_engine(paths)


def workflow(ckpt: str = "sd1", prompts: int = 1, **train) -> dict:
    """Two 64x64 pictures (red, green) encoded by the checkpoint's VAE, one prompt for both or one each, trained
    on in fp32 (fast settings; `train` overrides them)."""
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{ckpt}.safetensors"}},
          "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFF0000}},
          "4": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x00FF00}},
          "5": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["4", 0]}},
          "6": {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["1", 2]}}}
    texts = ["a red square", "a green square", "a blue square"][:prompts]
    for i, text in enumerate(texts):
        wf[f"2{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
    positive = ["20", 0]
    for i in range(1, prompts):
        wf[f"c{i}"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": positive,
                                                                       "conditioning_2": [f"2{i}", 0]}}
        positive = [f"c{i}", 0]
    wf["7"] = {"class_type": "TrainLoraNode", "inputs": {
        "model": ["1", 0], "latents": ["6", 0], "positive": positive, "batch_size": 2, "grad_accumulation_steps": 1,
        "steps": 4, "learning_rate": 0.01, "rank": 4, "optimizer": "AdamW", "loss_function": "MSE", "seed": 0,
        "training_dtype": "fp32", "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": False,
        "existing_lora": "[None]", **train}}
    return wf


def attempt(engine, wf: dict, keep: tuple = ("1", "7")):
    """Run the nodes in `keep` and the workflow's output nodes, keeping the values of those in `keep`."""
    saving = [nid for nid, node in wf.items() if node["class_type"] in ("SaveLoRA", "LossGraphNode")]
    return engine.run(parse_api(wf), keep=list(keep), outputs=[*keep, *saving])


def run(engine, wf: dict, keep: tuple = ("1", "7")):
    result = attempt(engine, wf, keep)
    assert result.ok, result.error
    return result


def unet_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([100.0, 700.0]), context)


@pytest.fixture(scope="module")
def trained(engine):
    """A LoRA trained for STEPS steps (with the model loaded and its weights copied before), saved, its loss
    plotted; the values of the checkpoint loader, the trainer and the run's UI outputs."""
    base = run(engine, workflow(), keep=("1",)).values["1"][0]
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    wf = {**workflow(steps=STEPS),
          "8": {"class_type": "LossGraphNode", "inputs": {"loss": ["7", 2], "filename_prefix": "graphs/loss"}},
          "9": {"class_type": "SaveLoRA", "inputs": {"lora": ["7", 1], "prefix": "loras/trained",
                                                     "steps": ["7", 3]}}}
    result = run(engine, wf)
    return {"base": base, "before": before, "model": result.values["7"][0], "lora": result.values["7"][1],
            "loss": result.values["7"][2]["loss"], "steps": result.values["7"][3], "outputs": result.outputs}


def test_the_loss_falls_over_the_steps(trained):
    loss = trained["loss"]
    assert len(loss) == STEPS and trained["steps"] == STEPS
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_the_input_models_weights_are_unchanged(trained):
    base = trained["base"]
    assert all(torch.equal(trained["before"][k], v) for k, v in base.unet.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in base.unet.parameters())
    assert trained["model"].unet is not base.unet and trained["model"].loras == ("trained LoRA",)


def test_the_same_seed_gives_the_same_lora(paths, engine):
    first = run(new_engine(paths), workflow(seed=7)).values["7"][1]  # new engines: nothing comes from a cache
    again = run(new_engine(paths), workflow(seed=7)).values["7"][1]
    other = run(engine, workflow(seed=8)).values["7"][1]
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_load_lora_model_at_1_is_the_trained_model_and_at_0_the_base(engine, trained):
    wf = {**workflow(steps=STEPS)}
    for node, strength in (("a", 1.0), ("b", 0.0)):
        wf[node] = {"class_type": "LoraModelLoader", "inputs": {"model": ["1", 0], "lora": ["7", 1],
                                                                 "strength_model": strength}}
    values = run(engine, wf, keep=("1", "7", "a", "b")).values  # the trainer's output comes from the cache
    base, model = unet_out(trained["base"]), unet_out(trained["model"])
    assert torch.equal(unet_out(values["a"][0]), model)
    assert values["b"][0] is trained["base"]
    assert torch.equal(unet_out(values["b"][0]), base)
    assert (model - base).abs().max() > 1e-3


def test_the_saved_lora_loads_with_load_lora_as_load_lora_model_applies_it(paths, engine, trained):
    [entry] = trained["outputs"]["9"]["files"]
    assert entry == {"filename": f"trained_{STEPS}_steps_00001_.safetensors", "subfolder": "loras", "type": "output"}
    saved = paths.output / "loras" / entry["filename"]
    tensors = safetensors.torch.load_file(saved)
    assert tensors.keys() == trained["lora"].keys()
    assert any(k.endswith(".lora_down.weight") for k in tensors) and any(k.endswith(".diff_b") for k in tensors)
    shutil.copy(saved, paths.base / "models" / "loras" / entry["filename"])
    wf = {**workflow(steps=STEPS),
          "a": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                       "lora_name": entry["filename"], "strength_model": 0.7,
                                                       "strength_clip": 1.0}},
          "b": {"class_type": "LoraModelLoader", "inputs": {"model": ["1", 0], "lora": ["7", 1],
                                                            "strength_model": 0.7}}}
    values = run(engine, wf, keep=("a", "b")).values
    assert torch.equal(unet_out(values["a"][0]), unet_out(values["b"][0]))


def test_the_loss_graph_is_a_png_in_the_output_folder(paths, trained):
    [entry] = trained["outputs"]["8"]["images"]
    assert entry == {"filename": "loss_00001_.png", "subfolder": "graphs", "type": "output"}
    with Image.open(paths.output / "graphs" / entry["filename"]) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (800, 480), "RGB")
        assert "prompt" in image.info  # the workflow, as SaveImage keeps it
        pixels = list(image.get_flattened_data())
        assert sum(pixel == (0x1F, 0x77, 0xB4) for pixel in pixels) > 500  # the curve


def test_an_existing_lora_is_continued_and_its_steps_counted(paths, engine, trained):
    name = f"trained_{STEPS}_steps_00001_.safetensors"
    shutil.copy(paths.output / "loras" / name, paths.base / "models" / "loras" / name)
    # One SGD step at the smallest learning rate: the LoRA that comes out is the one that went in.
    values = run(engine, workflow(steps=1, optimizer="SGD", learning_rate=1e-7, existing_lora=name)).values["7"]
    assert values[3] == STEPS + 1
    assert values[1].keys() == trained["lora"].keys()
    for key, tensor in values[1].items():
        torch.testing.assert_close(tensor, trained["lora"][key], rtol=0, atol=1e-6)
    assert values[2]["loss"][0] < trained["loss"][0]


@pytest.mark.parametrize("ckpt", ["sd2", "sdxl"])
def test_v_prediction_and_sdxl_models_train(engine, ckpt):
    values = run(engine, workflow(ckpt, steps=3, training_dtype="bf16", lora_dtype="bf16",
                                  gradient_checkpointing=True)).values
    base, model = values["1"][0], values["7"][0]
    assert len(values["7"][2]["loss"]) == 3 and all(v > 0 for v in values["7"][2]["loss"])
    assert all(t.dtype == torch.bfloat16 for k, t in values["7"][1].items() if not k.endswith(".alpha"))
    if ckpt == "sd2":  # SDXL's UNet takes a size vector as well: its change is seen in the trained copy's weights
        assert (unet_out(model) - unet_out(base)).abs().max() > 0
    assert any(not torch.equal(a, b) for a, b in zip(model.unet.parameters(), base.unet.parameters(), strict=True))


def test_one_prompt_per_latent_trains(engine):
    assert len(run(engine, workflow(prompts=2, steps=2)).values["7"][2]["loss"]) == 2


def test_bad_input_is_refused_clearly(engine, tmp_path):
    with pytest.raises(WorkflowInvalid, match="Loom trains LoRA"):
        attempt(engine, workflow(algorithm="LoHa"))
    result = attempt(engine, workflow(prompts=3))
    assert not result.ok and "3 positive prompts for 2 latents" in result.error.exception_message
    masked = {**workflow(), "m": {"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": ["20", 0], "width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0}}}
    masked["7"]["inputs"]["positive"] = ["m", 0]
    result = attempt(engine, masked)
    assert not result.ok and "carries area" in result.error.exception_message
    node = TrainLoraNode()
    node.ctx = NodeContext()
    empty = {"samples": torch.zeros(0, 4, 8, 8)}
    with pytest.raises(ValueError, match="holds no latents"):
        node.execute(model=[None], latents=[empty], positive=[[]], batch_size=[1], grad_accumulation_steps=[1],
                     steps=[1], learning_rate=[1e-3], rank=[4], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
                     training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"],
                     gradient_checkpointing=[False], existing_lora=["[None]"])


def test_an_existing_lora_of_a_kind_training_cannot_continue_is_refused(paths, engine):
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    loha = {f"{key}.hada_w1_a": torch.randn(32, 2, generator=g), f"{key}.hada_w1_b": torch.randn(2, 32, generator=g),
            f"{key}.hada_w2_a": torch.randn(32, 2, generator=g), f"{key}.hada_w2_b": torch.randn(2, 32, generator=g)}
    safetensors.torch.save_file(loha, paths.base / "models" / "loras" / "loha.safetensors")
    result = attempt(engine, workflow(existing_lora="loha.safetensors"))
    assert not result.ok and "loha.safetensors holds LoHa weights" in result.error.exception_message
