"""A1111 hypernetworks (ldm.hypernetwork): files written in the webui's layout, the patched attention against a
hand-written computation of the webui's formula, strength 0, chaining, and clear errors for bad files."""

import collections
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from ldm.attention import CrossAttention
from ldm.hypernetwork import HypernetworkError, hypernetwork_copy, load_hypernetwork
from ldm.lora import shallow_copy
from ldm.presets import PRESETS, randomize_
from ldm.unet import UNetModel

# The webui's functional activations, by its setting's names ("swish" is its name for Hardswish).
FUNCTIONS = {"linear": lambda x: x, "relu": F.relu, "leakyrelu": F.leaky_relu, "swish": F.hardswish,
             "tanh": torch.tanh, "sigmoid": torch.sigmoid, "mish": F.mish, "elu": F.elu, "softsign": F.softsign}


def mlp_weights(width: int, layers: list[float], activation: str, layer_norm: bool, activate_output: bool,
                dropout: list[float], g: torch.Generator) -> collections.OrderedDict:
    """One MLP's state dict, numbered as the webui's `linear` Sequential numbers its modules: Linear, then the
    activation (not after the last Linear unless activate_output), a LayerNorm, a Dropout, layer after layer."""
    weights = collections.OrderedDict()
    index = 0
    for i in range(len(layers) - 1):
        n_in, n_out = int(width * layers[i]), int(width * layers[i + 1])
        weights[f"linear.{index}.weight"] = torch.randn(n_out, n_in, generator=g) * n_in ** -0.5
        weights[f"linear.{index}.bias"] = torch.randn(n_out, generator=g) * 0.1
        index += 1
        if activation != "linear" and (i < len(layers) - 2 or activate_output):
            index += 1
        if layer_norm:
            weights[f"linear.{index}.weight"] = 1 + 0.1 * torch.randn(n_out, generator=g)
            weights[f"linear.{index}.bias"] = 0.1 * torch.randn(n_out, generator=g)
            index += 1
        if dropout[i + 1] > 0:
            index += 1
    return weights


def write_hypernetwork(path, widths, layers=(1, 2, 1), activation="relu", layer_norm=False, activate_output=False,
                       use_dropout=False, last_layer_dropout=False, seed=0, **extra) -> dict:
    """A file as the webui's Hypernetwork.save writes it; returns what it saved."""
    g = torch.Generator().manual_seed(seed)
    layers = [float(m) for m in layers]
    dropout = [0.0] * len(layers)
    if use_dropout:
        dropout = [0.0, *[0.3] * (len(layers) - 3), 0.3 if last_layer_dropout else 0.0, 0.0]
    data: dict = {width: (mlp_weights(width, layers, activation, layer_norm, activate_output, dropout, g),
                          mlp_weights(width, layers, activation, layer_norm, activate_output, dropout, g))
                  for width in widths}
    data.update({"step": 1234, "name": "test-net", "layer_structure": layers, "activation_func": activation,
                 "is_layer_norm": layer_norm, "weight_initialization": "Normal", "sd_checkpoint": "0123abcd",
                 "sd_checkpoint_name": "v1-5", "activate_output": activate_output, "use_dropout": use_dropout,
                 "dropout_structure": dropout, "last_layer_dropout": last_layer_dropout, "optional_info": None})
    data.update(extra)
    torch.save(data, path)
    return data


def reference(x: torch.Tensor, weights: dict, activation: str, layer_norm: bool, activate_output: bool,
              strength: float) -> torch.Tensor:
    """The webui's HypernetworkModule.forward, x + mlp(x) * multiplier, written out: its Linear and LayerNorm
    weights in file order, a LayerNorm right after each Linear (and its activation) when is_layer_norm."""
    names = [key.removesuffix(".weight") for key in weights if key.endswith(".weight")]
    h, i = x, 0
    while i < len(names):
        last = i == len(names) - (2 if layer_norm else 1)
        h = F.linear(h, weights[f"{names[i]}.weight"], weights[f"{names[i]}.bias"])
        if not last or activate_output:
            h = FUNCTIONS[activation](h)
        if layer_norm:
            i += 1
            h = F.layer_norm(h, h.shape[-1:], weights[f"{names[i]}.weight"], weights[f"{names[i]}.bias"])
        i += 1
    return x + h * strength


def attention_reference(layer: CrossAttention, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    q, k, v = (t.unflatten(-1, (layer.heads, -1)).transpose(1, 2)
               for t in (layer.to_q(x), layer.to_k(keys), layer.to_v(values)))
    attended = F.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
    return layer.to_out(attended.transpose(1, 2).flatten(2))


@pytest.fixture(scope="module")
def unet():
    """tiny-sd1 (self-attention at widths 32 and 64, cross-attention over a 32-wide context), with weights large
    enough that the attention layers' outputs tell their inputs apart."""
    unet = UNetModel(PRESETS["tiny-sd1"][2])
    return randomize_(unet, torch.Generator().manual_seed(0), std=0.2).eval().requires_grad_(False)


SETTINGS = [
    dict(layers=(1, 2, 1), activation="linear"),
    dict(layers=(1, 2, 1), activation="relu", layer_norm=True),
    dict(layers=(1, 1.5, 2, 1), activation="swish", activate_output=True, use_dropout=True),
    dict(layers=(1, 2, 2, 1), activation="tanh", layer_norm=True, use_dropout=True, last_layer_dropout=True),
    dict(layers=(1, 0.5, 1), activation="mish", layer_norm=True, activate_output=True),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_attention_layers_see_keys_and_values_through_the_webui_formula(unet, tmp_path, settings):
    saved = write_hypernetwork(tmp_path / "net.pt", (32, 64), **settings)
    hypernetwork = load_hypernetwork(tmp_path / "net.pt")
    assert (hypernetwork.name, hypernetwork.step, hypernetwork.widths) == ("test-net", 1234, [32, 64])
    patched = hypernetwork_copy(unet, hypernetwork, 0.7)
    g = torch.Generator().manual_seed(1)
    context = torch.randn(2, 7, 32, generator=g)
    knobs = {k: settings.get(k, False) for k in ("layer_norm", "activate_output")}
    for name in ("input_blocks.1.1.transformer_blocks.0.attn2", "output_blocks.1.1.transformer_blocks.0.attn1",
                 "middle_block.1.transformer_blocks.0.attn1"):
        layer = patched.get_submodule(name)
        x = torch.randn(2, 20, layer.to_q.in_features, generator=g)
        source = context if name.endswith("attn2") else x
        k_weights, v_weights = saved[source.shape[-1]]
        keys = reference(source, k_weights, settings["activation"], strength=0.7, **knobs)
        values = reference(source, v_weights, settings["activation"], strength=0.7, **knobs)
        with torch.no_grad():
            out = layer(x, context if name.endswith("attn2") else None)
            expected = attention_reference(layer, x, keys, values)
            assert (out - expected).abs().max() < 1e-5
            assert (out - unet.get_submodule(name)(x, context if name.endswith("attn2") else None)).abs().max() > 0.05


def test_strength_zero_changes_nothing_and_the_original_is_left_alone(unet, tmp_path):
    write_hypernetwork(tmp_path / "net.pt", (32, 64), layer_norm=True)
    hypernetwork = load_hypernetwork(tmp_path / "net.pt")
    g = torch.Generator().manual_seed(2)
    x, t, context = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400.0]), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        plain = unet(x, t, context)
        assert torch.equal(hypernetwork_copy(unet, hypernetwork, 0.0)(x, t, context), plain)
        patched = hypernetwork_copy(unet, hypernetwork, 1.0)
        assert (patched(x, t, context) - plain).abs().max() > 0.1
        assert torch.equal(unet(x, t, context), plain)
    assert not any(m.hypernetworks for m in unet.modules() if isinstance(m, CrossAttention))
    # Its weights move with the patched UNet, but saving the UNet saves the model alone.
    assert set(patched.state_dict()) == set(unet.state_dict())
    assert {id(p) for p in hypernetwork.parameters()} <= {id(p) for p in patched.parameters()}


def test_weights_follow_the_unet_through_later_copies(unet, tmp_path):
    """A LoRA applied after the hypernetwork makes another shallow copy; moving it (in place, as .to() moves
    parameters) moves the hypernetwork's weights that its attention layers use."""
    write_hypernetwork(tmp_path / "net.pt", (32, 64))
    later = shallow_copy(hypernetwork_copy(copy.deepcopy(unet), load_hypernetwork(tmp_path / "net.pt"), 1.0))
    later.to(torch.float64)
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(1, 4, 8, 8, generator=g).double(), torch.randn(1, 7, 32, generator=g).double()
    with torch.no_grad():
        assert later(x, torch.tensor([400.0]), context).dtype == torch.float64


def test_hypernetworks_chain_in_order(unet, tmp_path):
    first = write_hypernetwork(tmp_path / "a.pt", (32,), seed=1)
    second = write_hypernetwork(tmp_path / "b.pt", (32,), activation="tanh", seed=2)
    patched = hypernetwork_copy(hypernetwork_copy(unet, load_hypernetwork(tmp_path / "a.pt"), 0.5),
                                load_hypernetwork(tmp_path / "b.pt"), 2.0)
    assert len(patched.hypernetwork_weights) == 2
    layer = patched.get_submodule("input_blocks.1.1.transformer_blocks.0.attn2")
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))
    x = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(4))
    keys = reference(reference(context, first[32][0], "relu", False, False, 0.5), second[32][0], "tanh", False,
                     False, 2.0)
    values = reference(reference(context, first[32][1], "relu", False, False, 0.5), second[32][1], "tanh", False,
                       False, 2.0)
    with torch.no_grad():
        assert (layer(x, context) - attention_reference(layer, x, keys, values)).abs().max() < 1e-5


def test_novelai_keys_and_missing_settings_take_the_webui_defaults(tmp_path):
    """The early files: linear1/linear2 and no settings: layer_structure 1, 2, 1 and no activation."""
    g = torch.Generator().manual_seed(0)
    pair = [{"linear1.weight": torch.randn(64, 32, generator=g), "linear1.bias": torch.randn(64, generator=g),
             "linear2.weight": torch.randn(32, 64, generator=g), "linear2.bias": torch.randn(32, generator=g)}
            for _ in range(2)]
    torch.save({32: pair}, tmp_path / "nai.pt")
    hypernetwork = load_hypernetwork(tmp_path / "nai.pt")
    x = torch.randn(3, 32, generator=g)
    expected = x + F.linear(F.linear(x, pair[0]["linear1.weight"], pair[0]["linear1.bias"]),
                            pair[0]["linear2.weight"], pair[0]["linear2.bias"])
    keys, _ = hypernetwork.layers["32"](x, x, 1.0)
    assert (keys - expected).abs().max() < 1e-5 and hypernetwork.name == "nai"


class Settings:
    """Any class: unpickling it would mean importing and building whatever a file names."""


def _error(tmp_path, data, name="bad.pt") -> str:
    torch.save(data, tmp_path / name)
    with pytest.raises(HypernetworkError) as caught:
        load_hypernetwork(tmp_path / name)
    return str(caught.value)


def test_bad_files_get_errors_naming_the_problem(unet, tmp_path):
    path = tmp_path / "net.pt"
    good = write_hypernetwork(path, (32,))
    assert "activation_func 'prelu' is not supported" in _error(tmp_path, {**good, "activation_func": "prelu"})
    wrong = {**good, 32: (mlp_weights(48, [1, 2, 1], "relu", False, False, [0, 0, 0], torch.Generator()),) * 2}
    message = _error(tmp_path, wrong)
    assert "width 32" in message and "linear.0.weight is [96, 48]" in message and "needs [64, 32]" in message
    message = _error(tmp_path, {**good, "is_layer_norm": True})  # settings that do not fit the weights
    assert "do not fit the file's settings" in message and "missing ['linear.3.bias'" in message
    assert "layer_structure [2, 1]" in _error(tmp_path, {**good, "layer_structure": [2, 1]})
    assert "no per-width weights" in _error(tmp_path, {"768": good[32], "name": "x"})
    assert "pair of state dicts" in _error(tmp_path, {**good, 32: good[32][0]})
    assert "holds a Tensor" in _error(tmp_path, torch.zeros(3))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(HypernetworkError, match="junk.pt"):
        load_hypernetwork(tmp_path / "junk.pt")
    # A pickle that would build an arbitrary object is refused, not run.
    buffer = io.BytesIO()
    torch.save({32: good[32], "settings": Settings()}, buffer)
    (tmp_path / "unsafe.pt").write_bytes(buffer.getvalue())
    with pytest.raises(HypernetworkError, match=r"refusing to load.*\(tests.ldm.test_hypernetwork.Settings\)"):
        load_hypernetwork(tmp_path / "unsafe.pt")
    # Widths that no attention layer of the model takes: a hypernetwork for another kind of model.
    write_hypernetwork(path, (768, 1024))
    with pytest.raises(HypernetworkError, match=r"widths \[768, 1024\].*take \[32, 64\]"):
        hypernetwork_copy(unet, load_hypernetwork(path), 1.0)


def test_weights_only_reads_what_the_webui_saves(tmp_path):
    """State dicts are OrderedDicts with a `_metadata` attribute, the pairs tuples, settings None, floats, lists."""
    torch.save({32: tuple(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
                          .state_dict(prefix="linear.") for _ in range(2)),
                "layer_structure": [1.0, 2.0, 1.0], "activation_func": "relu", "activate_output": False,
                "optional_info": None, "sd_checkpoint": None}, tmp_path / "net.pt")
    hypernetwork = load_hypernetwork(tmp_path / "net.pt")
    assert hypernetwork.widths == [32] and hypernetwork.structure.activation == "relu"
