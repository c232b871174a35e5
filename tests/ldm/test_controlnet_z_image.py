"""alibaba-pai's Z-Image Fun ControlNet (ldm.controlnet_z_image) against diffusers' ZImageControlNetModel and
ZImageTransformer2DModel with the same weights (the file's keys are diffusers'), fed per sample as its pipelines do
(latents [16, 1, H, W], the prompt's real tokens, 1 - sigma, the output negated).

diffusers' transformer takes the control layers' hints only; the refiner hints of the 2.x files (VideoX-Fun adds them
after the model's noise-refiner layers, and so does ComfyUI) stay inside diffusers' ControlNet, so for the 2.x
layouts they are taken from its refiner stage and added to the transformer's noise refiner by forward hooks."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import ZImageControlNetModel, ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.controlnet_z_image import (
    ZImageFunControlNet,
    control_context,
    control_places,
    fun_control_problem,
    is_z_image_fun_controlnet,
    load_z_image_fun_controlnet,
    random_fun_controlnet,
    to_videox,
    with_fun_control,
    write_tiny_z_image_fun_controlnet,
)
from ldm.z_image import ZImageModel
from ldm.z_image_files import TINY_Z_IMAGE, random_z_image

# Four layers, so that control layers spread over them (2 of them: after layers 0 and 2).
CONFIG = dataclasses.replace(TINY_Z_IMAGE, num_layers=4, num_refiner_layers=2)
MODES = {"plain": None, "control": "control_noise_refiner", "layers": "control_layers"}


@pytest.fixture(scope="module")
def model() -> ZImageModel:
    return random_z_image(CONFIG, seed=0).float()


def twins(model: ZImageModel, controlnet: ZImageFunControlNet):
    """diffusers' transformer and ControlNet of the models' shapes, with their weights."""
    c, f = model.config, controlnet.config
    transformer = ZImageTransformer2DModel(in_channels=c.in_channels, dim=c.dim, n_layers=c.num_layers,
                                           n_refiner_layers=c.num_refiner_layers, n_heads=c.num_heads,
                                           n_kv_heads=c.num_heads, cap_feat_dim=c.cap_feat_dim,
                                           axes_dims=list(c.axes_dim), axes_lens=[1024, 512, 512]).eval()
    transformer.load_state_dict(convert_z_image_transformer_checkpoint_to_diffusers(
        {k: v.clone() for k, v in model.state_dict().items()}))
    twin = ZImageControlNetModel(control_layers_places=control_places(f.num_control_layers, c.num_layers),
                                 control_refiner_layers_places=list(range(c.num_refiner_layers)),
                                 control_in_dim=f.control_in_dim, add_control_noise_refiner=MODES[f.refiner],
                                 dim=c.dim, n_refiner_layers=c.num_refiner_layers, n_heads=c.num_heads,
                                 n_kv_heads=c.num_heads).eval()
    weights = {k: v for k, v in to_videox(controlnet.state_dict()).items()
               if f.refiner != "layers" or not k.startswith("control_noise_refiner.")}
    twin.load_state_dict(weights)
    return transformer, ZImageControlNetModel.from_transformer(twin, transformer)


def reference(transformer, twin, x, sigma, context, control, scale, mask=None):
    """(velocity, control layers' hints) as diffusers' pipelines compute them, the refiner hints added as
    VideoX-Fun does."""
    mask = torch.ones(context.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    xs, caps = [s[:, None] for s in x], [c[m] for c, m in zip(context, mask, strict=True)]
    refiner_hints = []
    stage = twin.control_noise_refiner if twin.add_control_noise_refiner == "control_noise_refiner" else \
        twin.control_layers
    if twin.add_control_noise_refiner:  # the refiner stage's stacked outputs: [hints..., control tokens]
        handle = stage[-1].register_forward_hook(
            lambda module, args, out: refiner_hints.append(out) if len(refiner_hints) == 0 else None)
    hints = twin(xs, 1 - sigma, caps, [s[:, None] for s in control], conditioning_scale=scale)
    hooks = []
    if twin.add_control_noise_refiner:
        handle.remove()
        stacked = refiner_hints[0]
        for i, layer in enumerate(transformer.noise_refiner):
            hooks.append(layer.register_forward_hook(
                lambda module, args, out, i=i: out + stacked[i] * scale))
    out = transformer(xs, 1 - sigma, caps, controlnet_block_samples=hints, return_dict=False)[0]
    for hook in hooks:
        hook.remove()
    return -torch.stack(out)[:, :, 0], hints


def inputs(h: int, w: int, tokens: int, in_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, h, w, generator=g), torch.rand(2, generator=g) * 0.8 + 0.1,
            torch.randn(2, tokens, CONFIG.cap_feat_dim, generator=g), torch.randn(2, in_dim, h, w, generator=g))


def fixed(context: torch.Tensor):
    """An `encode` for with_fun_control that gives `context` (and checks the size it is asked for)."""
    def encode(height: int, width: int, device: torch.device) -> torch.Tensor:
        assert (height, width) == tuple(context.shape[-2:])
        return context
    return encode


@pytest.mark.parametrize("version", ["1.0", "2.0", "2.1"])
@pytest.mark.parametrize(("h", "w", "tokens"), [(8, 8, 7), (6, 10, 40)])
def test_matches_diffusers(model, version, h, w, tokens):
    """The hints match diffusers' ControlNet's and the patched model its transformer's, square and not, the image
    and the prompt padded to 32 tokens or not."""
    controlnet = random_fun_controlnet(CONFIG, seed=1, version=version, control_layers=2).float()
    transformer, twin = twins(model, controlnet)
    x, sigma, context, control = inputs(h, w, tokens, controlnet.config.control_in_dim)
    patched = with_fun_control(model, controlnet, fixed(control), strength=0.75)
    with torch.no_grad():
        theirs, their_hints = reference(transformer, twin, x, sigma, context, control, 0.75)
        ours = patched(x, sigma, context)
        plain = model(x, sigma, context)
    assert (ours - plain).abs().max() > 0.05  # the hints change the prediction
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5)
    hints = _our_hints(patched, x, sigma, context)
    assert sorted(hints) == sorted(their_hints) == [0, 2]
    for place, hint in hints.items():
        assert hint.abs().max() > 0.01
        torch.testing.assert_close(hint, their_hints[place], rtol=1e-5, atol=1e-5)


def _our_hints(patched: ZImageModel, x, sigma, context) -> dict[int, torch.Tensor]:
    """The scaled hints the patched model adds after each of its layers (a hook on the bound control's stream)."""
    bound = patched.fun_controls[0]
    found: dict[int, torch.Tensor] = {}
    original = bound.layer_hints

    def recording(*args):
        for place, hint in original(*args):
            found[place] = hint
            yield place, hint

    bound.layer_hints = recording
    try:
        with torch.no_grad():
            patched(x, sigma, context)
    finally:
        del bound.layer_hints
    return found


def test_batch_of_different_prompts_runs_per_sample(model):
    """Prompts with different real tokens run one sample at a time, each with its own row of the control context."""
    controlnet = random_fun_controlnet(CONFIG, seed=2, version="2.1", control_layers=2).float()
    transformer, twin = twins(model, controlnet)
    x, sigma, context, control = inputs(8, 12, 9, controlnet.config.control_in_dim, seed=3)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    patched = with_fun_control(model, controlnet, fixed(control), strength=1.0)
    with torch.no_grad():
        theirs, _ = reference(transformer, twin, x, sigma, context, control, 1.0, mask)
        ours = patched(x, sigma, context, attn_mask=mask)
        alone = patched(x[1:], sigma[1:], context[1:, :4])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5)
    # a batch of fewer samples than the context's rows takes its first rows
    with torch.no_grad():
        first_row = with_fun_control(model, controlnet, fixed(control[:1]))(x[1:], sigma[1:], context[1:, :4])
    torch.testing.assert_close(alone, first_row, rtol=0, atol=0)


def test_unpatched_model_and_strength_zero_are_unchanged(model):
    controlnet = random_fun_controlnet(CONFIG, seed=1, version="1.0", control_layers=2).float()
    x, sigma, context, control = inputs(8, 8, 7, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(x, sigma, context)
        zero = with_fun_control(model, controlnet, fixed(control), strength=0.0)(x, sigma, context)
    assert model.fun_controls == () and getattr(model, "cuda_graphs_safe", True)
    # a second Fun ControlNet on a patched model adds its hints after the first's: at strength 0, none
    inpainting = random_fun_controlnet(CONFIG, seed=5, version="2.1", control_layers=2).float()
    first = with_fun_control(model, inpainting, fixed(torch.randn(1, 33, 8, 8)), strength=0.5)
    both = with_fun_control(first, controlnet, fixed(control), strength=0.0)
    with torch.no_grad():
        torch.testing.assert_close(both(x, sigma, context), first(x, sigma, context), rtol=0, atol=0)
    assert len(both.fun_controls) == 2 and len(first.fun_controls) == 1
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_encode_is_called_once_per_size(model):
    controlnet = random_fun_controlnet(CONFIG, seed=1, version="1.0", control_layers=2).float()
    calls = []

    def encode(height, width, device):
        calls.append((height, width))
        return torch.ones(1, 16, height, width)

    patched = with_fun_control(model, controlnet, encode)
    with torch.no_grad():
        for h, w in ((8, 8), (8, 8), (6, 10)):
            x, sigma, context, _ = inputs(h, w, 7, 16)
            patched(x, sigma, context)
    assert calls == [(8, 8), (6, 10)]


def test_control_context_layout():
    g = torch.Generator().manual_seed(0)
    control, inpaint = torch.randn(2, 16, 4, 6, generator=g), torch.randn(1, 16, 4, 6, generator=g)
    keep = torch.zeros(2, 1, 32, 48)
    keep[:, :, :16] = 1  # the top half kept
    assert torch.equal(control_context(control), control)
    full = control_context(control, inpaint, keep)
    assert full.shape == (2, 33, 4, 6)
    assert torch.equal(full[:, :16], control) and torch.equal(full[:, 17:], inpaint.expand(2, -1, -1, -1))
    assert torch.equal(full[:, 16], torch.tensor([[1.0] * 6] * 2 + [[0.0] * 6] * 2).expand(2, -1, -1))
    # what is missing is zeros, as diffusers' control pipeline fills the inpainting channels
    only_control = control_context(control, in_dim=33)
    assert torch.equal(only_control[:, :16], control) and not only_control[:, 16:].any()
    only_inpaint = control_context(inpaint=inpaint, mask=keep[:1, 0])
    assert not only_inpaint[:, :16].any() and torch.equal(only_inpaint[:, 17:], inpaint)
    with pytest.raises(ValueError, match="needs the control image"):
        control_context(inpaint=inpaint, in_dim=16)
    with pytest.raises(ValueError, match="16 or 33"):
        control_context(control, in_dim=20)
    with pytest.raises(ValueError, match="one size"):
        control_context(control, torch.randn(1, 16, 4, 4))


@pytest.mark.parametrize("version", ["1.0", "2.0", "2.1"])
def test_file_round_trip(tmp_path, model, version):
    path = write_tiny_z_image_fun_controlnet(tmp_path / f"fun_{version}.safetensors", CONFIG, seed=4,
                                             version=version, control_layers=2, dtype=torch.float32)
    sd = load_state_dict(path)
    assert is_z_image_fun_controlnet(sd)
    assert "control_layers.0.attention.to_q.weight" in sd and "control_layers.0.attention.norm_q.weight" in sd
    loaded = load_z_image_fun_controlnet(sd, path, "cpu", torch.float32)
    written = random_fun_controlnet(CONFIG, seed=4, version=version, control_layers=2)
    assert loaded.config == written.config
    assert loaded.inpaints == (version != "1.0")
    assert {"1.0": "plain", "2.0": "layers", "2.1": "control"}[version] == loaded.config.refiner
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in written.state_dict().items() if k in state)
    assert list(loaded.unused_keys) == ([] if version != "2.0" else
                                        sorted(k for k in sd if k.startswith("control_noise_refiner.")))
    assert fun_control_problem(model, loaded) is None
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata()["loom.seed"] == "4"


def test_bf16_file_runs(tmp_path):
    path = write_tiny_z_image_fun_controlnet(tmp_path / "fun.safetensors", CONFIG, version="2.1", control_layers=2)
    loaded = load_z_image_fun_controlnet(load_state_dict(path), path, "cpu", torch.bfloat16)
    model = random_z_image(CONFIG, seed=0).to(torch.bfloat16)
    x, sigma, context, control = inputs(8, 8, 7, 33)
    with torch.no_grad():
        out = with_fun_control(model, loaded, fixed(control))(x, sigma, context)
        plain = model(x, sigma, context)
    assert out.dtype == torch.float32 and out.isfinite().all() and (out - plain).abs().max() > 0.05


def test_refusals(tmp_path, model):
    path = write_tiny_z_image_fun_controlnet(tmp_path / "fun.safetensors", CONFIG, version="1.0", control_layers=2)
    sd = load_state_dict(path)
    truncated = {k: v for k, v in sd.items() if not k.startswith("control_layers.1.feed_forward")}
    with pytest.raises(CheckpointError, match=r"fun\.safetensors.*missing"):
        load_z_image_fun_controlnet(truncated, path, "cpu", torch.float32)
    no_head = {k: v for k, v in sd.items() if not k.startswith("control_layers.0.attention.norm_q")}
    with pytest.raises(CheckpointError, match="no weight"):
        load_z_image_fun_controlnet(no_head, path, "cpu", torch.float32)
    gap = {k: v for k, v in sd.items() if not k.startswith("control_layers.0.")}
    with pytest.raises(CheckpointError):
        load_z_image_fun_controlnet(gap, path, "cpu", torch.float32)
    assert not is_z_image_fun_controlnet({k: v for k, v in sd.items() if "x_embedder" not in k})
    # a ControlNet for a wider model, one with more control layers than the model has, another model's kind
    wide = random_fun_controlnet(dataclasses.replace(CONFIG, num_heads=3), version="1.0", control_layers=2)
    with pytest.raises(ValueError, match="dim 48.*has 32"):
        with_fun_control(model, wide, fixed(torch.zeros(1, 16, 8, 8)))
    deep = random_fun_controlnet(dataclasses.replace(CONFIG, num_layers=8), version="2.1")  # 4 control layers
    assert fun_control_problem(model, deep) is None
    assert "5 control layers for a model of 4" in fun_control_problem(
        model, random_fun_controlnet(CONFIG, version="1.0", control_layers=5))
    two_refiners = random_fun_controlnet(CONFIG, version="2.1", control_layers=2)
    one_refiner = random_z_image(dataclasses.replace(CONFIG, num_refiner_layers=1))
    assert "2 refiner blocks for a model of 1" in fun_control_problem(one_refiner, two_refiners)
    assert "Z-Image models only" in fun_control_problem(torch.nn.Linear(2, 2), deep)
    patched = with_fun_control(model, random_fun_controlnet(CONFIG, version="2.1", control_layers=2),
                               fixed(torch.zeros(1, 16, 8, 8)))  # a 1.0 context for a 2.x ControlNet
    x, sigma, context, _ = inputs(8, 8, 7, 16)
    with pytest.raises(ValueError, match=r"takes \[B, 33, 8, 8\]"):
        patched(x, sigma, context)


def test_places():
    assert control_places(6, 30) == [0, 5, 10, 15, 20, 25]
    assert control_places(15, 30) == list(range(0, 30, 2))
    assert control_places(3, 30) == [0, 10, 20]
    assert control_places(2, 4) == [0, 2] and control_places(3, 4) == [0, 1, 2]
    with pytest.raises(ValueError, match="do not spread"):
        control_places(5, 4)
