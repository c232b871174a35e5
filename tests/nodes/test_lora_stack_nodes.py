"""The LoRA stack loaders and the bypass loaders (nodes/sd/lora_stack.py) on a tiny random SD1 checkpoint: a stack
equals the same LoRAs chained through LoraLoaderModelOnly / LoraLoader; ComfyUI's dynamic-group rows as its API
prompts and editor files hold them; the bypass leaves every weight as it is and gives the merged LoRA's outputs up to
float rounding (LoRA, LoCon, Tucker LoCon, LoHa, and DoRA, which is merged); declarations and bad input."""

from pathlib import Path

import pytest
import safetensors.torch
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.ui_format import ui_to_api
from ldm.lora import _Bypass, apply_lora, apply_lora_bypass, load_lora
from ldm.presets import PRESETS, make_checkpoint, randomize_
from ldm.unet import UNetModel
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.lora_stack import LoadLoraModel, LoadLoraTextEncoder, LoraLoaderBypass, LoraLoaderBypassModelOnly

UNET_Q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
UNET_V = "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_v"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def write_lora(path: Path, seed: int, modules: tuple[str, ...]) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in modules:
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, 32, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(32, 4, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    safetensors.torch.save_file(tensors, path)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_stack")
    (root / "models" / "loras").mkdir(parents=True)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "tiny.safetensors", seed=1)
    write_lora(root / "models" / "loras" / "a.safetensors", 3, (UNET_Q, TE_Q))
    write_lora(root / "models" / "loras" / "b.safetensors", 4, (UNET_Q, UNET_V, TE_Q))
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


CKPT = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}}


def run(engine, graph, node):
    result = engine.run(parse_api({"1": CKPT, **graph}), outputs=[node], keep=[node])
    assert result.ok, result.error
    return result.values[node]


def rows(*items):
    return {f"loras.{row}.{field}": value for row, (name, strength) in items
            for field, value in (("lora_name", name), ("strength", strength))}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-6)


# --- LoadLoraModel / LoadLoraTextEncoder -------------------------------------------------------------------------


def test_a_model_stack_equals_the_loras_chained_and_skips_empty_and_zero_rows(engine):
    # rows 0 and 3 apply; row 1 is off (strength 0), row 2 is absent (a gap, as ComfyUI's sparse rows)
    stacked = run(engine, {"2": {"class_type": "LoadLoraModel", "inputs": {
        "model": ["1", 0], **rows((0, ("a.safetensors", 0.7)), (1, ("b.safetensors", 0.0)),
                                  (3, ("b.safetensors", -0.4)))}}}, "2")[0]
    chained = run(engine, {
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "a.safetensors",
                                                              "strength_model": 0.7}},
        "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["2", 0], "lora_name": "b.safetensors",
                                                              "strength_model": -0.4}}}, "3")[0]
    base = run(engine, {}, "1")[0]
    same_weights(stacked.unet, chained.unet)
    assert stacked.loras == ("a.safetensors", "b.safetensors")
    assert not torch.equal(stacked.unet.state_dict()["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"],
                           base.unet.state_dict()["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"])


def test_a_text_encoder_stack_equals_lora_loaders_clip(engine):
    stacked = run(engine, {"2": {"class_type": "LoadLoraTextEncoder", "inputs": {
        "clip": ["1", 1], **rows((0, ("a.safetensors", 0.5)), (1, ("b.safetensors", 1.5)))}}}, "2")[0]
    chained = run(engine, {
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "a.safetensors",
                                                     "strength_model": 0.0, "strength_clip": 0.5}},
        "3": {"class_type": "LoraLoader", "inputs": {"model": ["2", 0], "clip": ["2", 1], "lora_name": "b.safetensors",
                                                     "strength_model": 0.0, "strength_clip": 1.5}}}, "3")[1]
    base = run(engine, {}, "1")[1]
    same_weights(stacked.encoder, chained.encoder)
    assert any(not torch.equal(p, base.encoder.state_dict()[k]) for k, p in stacked.encoder.state_dict().items())


def test_rows_a_comfyui_group_refuses_are_named_before_the_run(engine):
    def problems(inputs):
        with pytest.raises(WorkflowInvalid) as caught:
            engine.run(parse_api({"1": CKPT, "2": {"class_type": "LoadLoraModel",
                                                   "inputs": {"model": ["1", 0], **inputs}}}), outputs=["2"])
        return str(caught.value)

    assert "needs at least one LoRA row" in problems({})
    assert "loras.20.lora_name is not a row field" in problems(
        {**rows((0, ("a.safetensors", 1.0))), "loras.20.lora_name": "a.safetensors"})
    assert "row 1 names a.safetensors but has no loras.1.strength" in problems(
        {**rows((0, ("a.safetensors", 1.0))), "loras.1.lora_name": "a.safetensors"})
    assert "missing.safetensors" in problems(rows((0, ("missing.safetensors", 1.0))))
    assert "loras.0.strength" in problems(rows((0, ("a.safetensors", 101.0))))  # past ComfyUI's max of 100


def test_an_editor_files_rows_become_the_prompts_row_inputs(registry):
    def ui(values):
        doc = {"nodes": [{"id": 1, "type": "LoadLoraModel", "mode": 0, "widgets_values": values,
                          "inputs": [{"name": "model", "type": "MODEL", "link": None}],
                          "outputs": [{"name": "MODEL", "type": "MODEL", "links": []}]}], "links": []}
        return ui_to_api(doc, registry)["1"]["inputs"]

    # ComfyUI's layout: the row count, then each row's widgets; the rows not in the file stay off (no file)
    inputs = ui([2, "a.safetensors", 0.5, "b.safetensors", 1.25])
    assert {k: v for k, v in inputs.items() if k.endswith("lora_name")} == {
        "loras.0.lora_name": "a.safetensors", "loras.1.lora_name": "b.safetensors"}
    assert inputs["loras.0.strength"] == 0.5 and inputs["loras.1.strength"] == 1.25
    # Loom's editor saves every row's two widgets in order
    loom = ui([value for row in range(20) for value in (f"{row}.safetensors", row / 10)])
    assert loom["loras.19.lora_name"] == "19.safetensors" and loom["loras.19.strength"] == 1.9
    assert LoadLoraModel.widgets_from_ui(["a.safetensors", 1.0]) is None


def test_stack_declarations_match_comfyuis():
    for cls, socket in ((LoadLoraModel, "model"), (LoadLoraTextEncoder, "clip")):
        info = cls.object_info()
        assert info["category"] == "model/loaders"
        assert list(cls.inputs)[:5] == [socket, "loras.0.lora_name", "loras.0.strength", "loras.1.lora_name",
                                        "loras.1.strength"]
        assert list(cls.inputs)[-1] == "loras.19.strength" and len(cls.inputs) == 41
        strength = info["input"]["optional"]["loras.0.strength"][1]
        assert (strength["default"], strength["min"], strength["max"], strength["step"]) == (1.0, -100.0, 100.0, 0.01)
        assert info["input"]["optional"]["loras.1.strength"][1]["default"] == 0.0  # off in Loom's editor
        assert info["output"] == [socket.upper()]
    assert LoadLoraModel.display_name == "Load LoRA (Model)"
    assert LoadLoraTextEncoder.display_name == "Load LoRA (Text Encoder)"


# --- LoraLoaderBypass ---------------------------------------------------------------------------------------------


def test_bypass_keeps_the_weights_and_gives_the_merged_loras_outputs(engine):
    bypass = run(engine, {"2": {"class_type": "LoraLoaderBypass", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "b.safetensors", "strength_model": 4.0,
        "strength_clip": 1.2}}}, "2")
    merged = run(engine, {"2": {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "b.safetensors", "strength_model": 4.0,
        "strength_clip": 1.2}}}, "2")
    base = run(engine, {}, "1")
    for ours, plain in zip((bypass[0].unet, bypass[1].encoder), (base[0].unet, base[1].encoder), strict=True):
        plain_params = dict(plain.named_parameters())
        assert all(p is plain_params[name] for name, p in ours.named_parameters())  # no weight copied or changed
        # the cached base model stays plain (transformers' CLIP has output-capturing hooks of its own)
        assert not any(isinstance(h, _Bypass) for m in plain.modules() for h in m._forward_hooks.values())
        assert any(isinstance(h, _Bypass) for m in ours.modules() for h in m._forward_hooks.values())
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([400.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        out, expected, plain = (m(x, t, ctx) for m in (bypass[0].unet, merged[0].unet, base[0].unet))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)
        assert (expected - plain).abs().max() > 5e-4
        q = "text_model.encoder.layers.0.self_attn.q_proj"
        q = next(name for name, _ in base[1].encoder.named_modules() if name.endswith(q))
        h = torch.randn(2, 7, 32)
        torch.testing.assert_close(bypass[1].encoder.get_submodule(q)(h), merged[1].encoder.get_submodule(q)(h))
        assert not torch.allclose(bypass[1].encoder.get_submodule(q)(h), base[1].encoder.get_submodule(q)(h))
    assert bypass[0].loras == ("b.safetensors",)


def test_bypass_model_only_and_a_merge_on_top(engine):
    graph = {"2": {"class_type": "LoraLoaderBypassModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": "a.safetensors", "strength_model": 0.6}},
             "3": {"class_type": "LoraLoaderModelOnly", "inputs": {
                 "model": ["2", 0], "lora_name": "b.safetensors", "strength_model": 0.9}}}
    ours = run(engine, graph, "3")[0]
    merged = run(engine, {
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "a.safetensors",
                                                              "strength_model": 0.6}},
        "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["2", 0], "lora_name": "b.safetensors",
                                                              "strength_model": 0.9}}}, "3")[0]
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = merged.unet(x, t, ctx)
        torch.testing.assert_close(ours.unet(x, t, ctx), expected, rtol=1e-5, atol=2e-6)
        assert (expected - run(engine, {}, "1")[0].unet(x, t, ctx)).abs().max() > 5e-4


def test_bypass_of_each_lora_kind_equals_the_merge(tmp_path):
    """LoRA, LoCon (3x3 down kernel), Tucker LoCon and LoHa run as forward hooks; DoRA and a bias-only full
    difference are merged (a sum cannot renormalise); all together equal apply_lora up to float rounding."""
    base = randomize_(UNetModel(PRESETS["tiny-sd1"][2]), torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    t = {}
    q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    t |= {f"{q}.lora_down.weight": rand(4, 32), f"{q}.lora_up.weight": rand(32, 4), f"{q}.alpha": torch.tensor(2.0)}
    c = "lora_unet_input_blocks_1_0_in_layers_2"
    t |= {f"{c}.lora_down.weight": rand(2, 32, 3, 3), f"{c}.lora_up.weight": rand(32, 2, 1, 1)}
    k = "lora_unet_output_blocks_0_0_in_layers_2"
    t |= {f"{k}.lora_down.weight": rand(2, 128, 1, 1), f"{k}.lora_mid.weight": rand(2, 2, 3, 3),
          f"{k}.lora_up.weight": rand(64, 2, 1, 1)}
    h = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    t |= {f"{h}.hada_w1_a": rand(32, 2), f"{h}.hada_w1_b": rand(2, 32), f"{h}.hada_w2_a": rand(32, 2),
          f"{h}.hada_w2_b": rand(2, 32)}
    d = "lora_unet_input_blocks_1_1_proj_in"
    t |= {f"{d}.lora_down.weight": rand(4, 32), f"{d}.lora_up.weight": rand(32, 4),
          f"{d}.dora_scale": torch.rand(32, 1, generator=g) + 0.5}
    safetensors.torch.save_file(t, tmp_path / "kinds.safetensors")
    lora = load_lora(tmp_path / "kinds.safetensors")
    bypassed = apply_lora_bypass(base, lora, 0.8)
    hooked = {name for name, m in bypassed.named_modules() if any(isinstance(h, _Bypass)
                                                                   for h in m._forward_hooks.values())}
    assert hooked == {"input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2",
                      "output_blocks.0.0.in_layers.2", "input_blocks.1.1.transformer_blocks.0.attn2.to_k"}
    assert bypassed.get_submodule("input_blocks.1.1.proj_in").weight is not base.get_submodule(
        "input_blocks.1.1.proj_in").weight  # DoRA: merged
    x, ts, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        plain = base(x, ts, ctx)
        expected = apply_lora(base, lora, 0.8)(x, ts, ctx)
        torch.testing.assert_close(bypassed(x, ts, ctx), expected, rtol=1e-4, atol=1e-5)
        assert (expected - plain).abs().max() > 1e-2
        torch.testing.assert_close(base(x, ts, ctx), plain, rtol=0, atol=0)  # the base is untouched
    assert apply_lora_bypass(base, lora, 0.0) is base


def test_bypass_declarations_match_comfyuis():
    info = LoraLoaderBypass.object_info()
    assert list(LoraLoaderBypass.inputs) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert info["input"]["required"]["strength_clip"][1]["min"] == -100.0
    assert info["output"] == ["MODEL", "CLIP"] and info["category"] == "model/loaders"
    assert list(LoraLoaderBypassModelOnly.inputs) == ["model", "lora_name", "strength_model"]
    assert LoraLoaderBypassModelOnly.object_info()["output"] == ["MODEL"]
    assert LoraLoaderBypass.display_name == "Load LoRA (Bypass) (For debugging)"
    assert LoraLoaderBypassModelOnly.display_name == "Load LoRA (Bypass, Model Only) (for debugging)"
