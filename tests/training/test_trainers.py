"""Short training runs on tiny models: loss falls, resume is exact, autocast and checkpointing run, files load back."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.checkpoint import load_checkpoint, load_vae
from ldm.training.data import shapes_dataset
from ldm.training.loop import LoopConfig
from ldm.training.unet_trainer import (
    TextEncoderSize,
    UNetTrainConfig,
    encode_text,
    generate,
    token_ids,
    train_unet,
)
from ldm.training.vae_trainer import VAETrainConfig, calibrate_latent_scale, train_vae
from ldm.unet import UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig

SIZE = 16
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                       num_heads=2, context_dim=32)
TINY_TEXT = TextEncoderSize(hidden=32, layers=1, intermediate=64)
CPU = torch.device("cpu")


def loop(steps: int, **kw) -> LoopConfig:
    settings = {"batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "log_every": 1, "sample_every": 10_000,
                "save_every": 10_000, **kw}
    return LoopConfig(max_steps=steps, **settings)


@pytest.fixture(scope="module")
def data():
    return shapes_dataset(32, seed=3, size=SIZE)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(TINY_VAE).eval()


def test_vae_loss_falls_and_file_loads_back(tmp_path, data):
    torch.manual_seed(0)
    config = VAETrainConfig(vae=TINY_VAE, loop=loop(80, batch_size=8))
    vae = train_vae(data, tmp_path, config, CPU)
    losses = torch.load(tmp_path / "vae-state.pt", weights_only=True)["history_losses"]
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10
    assert (tmp_path / "vae-loss.png").is_file() and (tmp_path / "vae-samples.png").is_file()
    loaded = load_vae(tmp_path / "vae.safetensors").vae
    pixels = data.pixels[:2]
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(pixels).mean), vae.decode(vae.encode(pixels).mean))


def test_latent_calibration_keeps_reconstructions(data, vae):
    calibrated = AutoencoderKL(TINY_VAE)
    calibrated.load_state_dict(vae.state_dict())
    with torch.no_grad():
        k = calibrate_latent_scale(calibrated, [data.pixels])
        before = vae.decode(vae.encode(data.pixels[:4]).mean)
        z = calibrated.encode(data.pixels).mean
        after = calibrated.decode(calibrated.encode(data.pixels[:4]).mean)
    assert k > 0
    assert float(z.std() * calibrated.scaling_factor) == pytest.approx(1.0, rel=1e-3)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("train_encoder", [True, False])
def test_fine_tuning_a_loaded_vae(tmp_path, data, train_encoder):
    """A VAE read back from a file (frozen, as the loader hands it out) trains; decoder-only keeps
    the latents."""
    torch.manual_seed(0)
    first = train_vae(data, tmp_path / "first", VAETrainConfig(vae=TINY_VAE, loop=loop(5)), CPU)
    base = load_vae(tmp_path / "first" / "vae.safetensors").vae
    assert not any(p.requires_grad for p in base.parameters())
    config = VAETrainConfig(vae=TINY_VAE, loop=loop(20, ema_decay=0.0), train_encoder=train_encoder)
    tuned = train_vae(data, tmp_path / "tuned", config, CPU, base)
    changed = {name: not torch.equal(p, dict(first.named_parameters())[name]) for name, p in tuned.named_parameters()}
    assert changed["decoder.conv_out.weight"]
    assert changed["encoder.conv_in.weight"] is train_encoder
    if not train_encoder:
        assert not any(v for k, v in changed.items() if k.startswith(("encoder.", "quant_conv.")))
        with torch.no_grad():
            torch.testing.assert_close(tuned.encode(data.pixels[:4]).mean, first.encode(data.pixels[:4]).mean,
                                       rtol=0, atol=0)


def unet_config(steps: int, **kw) -> UNetTrainConfig:
    return UNetTrainConfig(unet=TINY_UNET, text=TINY_TEXT, loop=loop(steps, **kw))


def test_unet_loss_falls(tmp_path, data, vae):
    torch.manual_seed(0)
    train_unet(data, tmp_path, unet_config(40, lr=2e-3), CPU, vae, save_dtype=None)
    losses = torch.load(tmp_path / "unet-state.pt", weights_only=True)["history_losses"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_offset_noise_shifts_each_channel_by_a_constant():
    from ldm.training.unet_trainer import training_noise

    plain = training_noise(torch.Size([4096, 4, 8, 8]), 0.0, torch.Generator().manual_seed(0))
    offset = training_noise(torch.Size([4096, 4, 8, 8]), 0.5, torch.Generator().manual_seed(0))
    # The spatial mean of 64 unit normals has std 1/8; a constant of std 0.5 adds its variance to it.
    assert float(plain.mean(dim=(2, 3)).std()) == pytest.approx(1 / 8, rel=0.05)
    assert float(offset.mean(dim=(2, 3)).std()) == pytest.approx((1 / 64 + 0.25) ** 0.5, rel=0.05)
    centred = offset - offset.mean(dim=(2, 3), keepdim=True)
    assert float(centred.std()) == pytest.approx(float((plain - plain.mean(dim=(2, 3), keepdim=True)).std()), rel=0.02)


def test_v_prediction_with_offset_noise_learns(tmp_path, data, vae):
    torch.manual_seed(0)
    config = dataclasses.replace(unet_config(40, lr=2e-3), prediction="v", offset_noise=0.1)
    _, path = train_unet(data, tmp_path, config, CPU, vae, save_dtype=None)
    losses = torch.load(tmp_path / "unet-state.pt", weights_only=True)["history_losses"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert load_checkpoint(path).metadata["loom.prediction"] == "v"


def test_resume_matches_an_uninterrupted_run(tmp_path, data, vae):
    torch.manual_seed(0)
    whole, _ = train_unet(data, tmp_path / "whole", unet_config(6), CPU, vae, save_dtype=None)
    torch.manual_seed(0)
    train_unet(data, tmp_path / "split", unet_config(3), CPU, vae, save_dtype=None)
    torch.manual_seed(1)  # the resumed run must not depend on the fresh model's initialisation
    resumed, _ = train_unet(data, tmp_path / "split", unet_config(6), CPU, vae, save_dtype=None)
    for a, b in zip(whole.unet.state_dict().values(), resumed.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(whole.text_encoder.state_dict().values(), resumed.text_encoder.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path, data, vae):
    torch.manual_seed(0)
    config = unet_config(2, precision="bf16", grad_checkpointing=True)
    model, _ = train_unet(data, tmp_path, config, CPU, vae, save_dtype=None)
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())
    vae_config = VAETrainConfig(vae=TINY_VAE, loop=loop(2, precision="bf16", grad_checkpointing=True))
    train_vae(data, tmp_path / "vae", vae_config, CPU)


def test_checkpointing_gives_the_same_gradients(data, vae):
    from ldm.training.unet_trainer import checkpoint_unet, new_unet

    torch.manual_seed(0)
    plain = new_unet(TINY_UNET)
    torch.nn.init.normal_(plain.out[2].weight)  # non-zero so gradients reach every block
    wrapped = new_unet(TINY_UNET)
    wrapped.load_state_dict(plain.state_dict())
    checkpoint_unet(wrapped)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32)
    plain(x, t, context).square().mean().backward()
    wrapped(x, t, context).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_saved_checkpoint_loads_with_identical_outputs(tmp_path, data, vae):
    torch.manual_seed(0)
    model, path = train_unet(data, tmp_path, unet_config(2), CPU, vae, save_dtype=None)
    loaded = load_checkpoint(path)
    assert loaded.family.name == "sd1" and loaded.unused_keys == []
    assert loaded.metadata["loom.prediction"] == "eps" and "loom.training" in loaded.metadata
    prompts = ["a red circle on a blue background", ""]
    ids, index = token_ids(model.text_encoder, prompts)
    with torch.no_grad():
        ours = encode_text(model.text_encoder, ids)[index]
        theirs = loaded.text_encoder.encode(prompts).cond
        torch.testing.assert_close(theirs, ours, atol=0, rtol=0)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0])
        assert torch.equal(loaded.unet(x, t, theirs), model.unet(x, t, ours))
        assert torch.equal(loaded.vae.decode(x), vae.decode(x))


def test_generate_and_fine_tune_from_a_checkpoint(tmp_path, data, vae):
    torch.manual_seed(0)
    _, path = train_unet(data, tmp_path / "base", unet_config(2), CPU, vae, save_dtype=None)
    loaded = load_checkpoint(path)
    config = dataclasses.replace(unet_config(2), train_text_encoder=False)
    model, _ = train_unet(data, tmp_path / "tuned", config, CPU, loaded.vae, loaded.unet, loaded.text_encoder)
    images = generate(model, ["a red circle on a blue background"], steps=2, width=SIZE, height=SIZE)
    assert images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(images).all()
    for a, b in zip(model.text_encoder.parameters(), loaded.text_encoder.parameters(), strict=True):
        assert torch.equal(a, b)


def test_demo_model_is_an_sd1_file_under_16_mib(tmp_path):
    from ldm.checkpoint import save_checkpoint
    from ldm.training.unet_trainer import new_text_encoder, new_unet

    config = UNetTrainConfig()
    text_encoder = new_text_encoder(config.text)
    unet = new_unet(dataclasses.replace(config.unet, context_dim=text_encoder.config.context_dim))
    path = save_checkpoint(tmp_path / "demo.safetensors", unet, AutoencoderKL(VAETrainConfig().vae), text_encoder,
                           {"loom.prediction": "eps"}, dtype=torch.float16)
    assert path.stat().st_size < 16 * 2**20  # also what a device run can hand back in one file
    loaded = load_checkpoint(path)
    assert loaded.family.name == "sd1" and loaded.family.vae_config.downscale == 8
    assert loaded.family.unet_config == unet.config and loaded.unused_keys == []
    assert loaded.text_encoder.encode(["a red circle on a blue background"]).cond.shape == (1, 77, 48)

