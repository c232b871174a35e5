"""HunyuanVideo 1.5's 1080p latent upsampler (ldm.hunyuan_video15_upsampler). No diffusers or transformers class
implements it, so its forward is checked against (a) the network written out here from torch.nn.functional calls
alone over the same state dict and (b) diffusers' HunyuanVideo 1.5 VAE layers (causal conv, RMS norm, resnet block)
assembled in the order of Tencent's SRTo1080pUpsampler; plus causality, shapes, the key layout and detection."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import (
    HunyuanVideo15CausalConv3d,
    HunyuanVideo15ResnetBlock,
    HunyuanVideo15RMS_norm,
)
from torch import nn

from ldm import hunyuan_video15_vae
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.hunyuan_video15_upsampler import (
    HunyuanVideo15Upsampler,
    HunyuanVideo15UpsamplerConfig,
    config_from_state_dict,
    is_hunyuan_video15_upsampler,
    load_hunyuan_video15_upsampler,
    peek_hunyuan_video15_upsampler,
    tiny_config,
    tiny_state_dict,
)
from ldm.ltx2_upsampler import LatentUpsampler, LatentUpsamplerConfig
from ldm.wan_vae_files import randomized_

# Measured max abs differences (float32, tiny weights, _latent(), outputs up to ~2.4): 2.8e-6 against the functional
# forward (its norm computed by hand), 0.0 against diffusers' layers (the same ops in the same order).
TOLERANCE = 1e-5


def _latent(frames: int = 3, h: int = 5, w: int = 6, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 32, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _model(seed: int = 0) -> HunyuanVideo15Upsampler:
    return load_hunyuan_video15_upsampler(tiny_state_dict(seed))


# --- the forward, written out -------------------------------------------------------------------------------------


def _causal_conv(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Replicate-pad 1 pixel around and 2 frames in front, then an unpadded 3x3x3 conv."""
    return F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate"), sd[f"{name}.weight"], sd[f"{name}.bias"])


def _rms_norm(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x / ||x||_channels * sqrt(channels) * gamma (F.normalize's 1e-12 floor on the norm)."""
    norm = x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    return x / norm * x.shape[1] ** 0.5 * gamma


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _reference(sd: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """The upsampler from its state dict: conv_in + the latent repeated channel-wise, the stages' resnet blocks,
    norm_out / SiLU / conv_out; stage and block counts read from the keys."""
    width = sd["conv_in.conv.weight"].shape[0]
    x = _causal_conv(z, sd, "conv_in.conv") + z.repeat_interleave(width // z.shape[1], dim=1)
    i = 0
    while f"up.{i}.block.0.norm1.gamma" in sd:
        j = 0
        while (p := f"up.{i}.block.{j}") + ".norm1.gamma" in sd:
            h = _causal_conv(_silu(_rms_norm(x, sd[f"{p}.norm1.gamma"])), sd, f"{p}.conv1.conv")
            h = _causal_conv(_silu(_rms_norm(h, sd[f"{p}.norm2.gamma"])), sd, f"{p}.conv2.conv")
            if f"{p}.nin_shortcut.weight" in sd:
                x = F.conv3d(x, sd[f"{p}.nin_shortcut.weight"], sd[f"{p}.nin_shortcut.bias"])
            x = x + h
            j += 1
        i += 1
    return _causal_conv(_silu(_rms_norm(x, sd["norm_out.gamma"])), sd, "conv_out.conv")


@pytest.mark.parametrize("frames", [1, 3])
@torch.no_grad()
def test_matches_functional_reference(frames):
    sd = tiny_state_dict(3)
    z = _latent(frames)
    out = load_hunyuan_video15_upsampler(sd)(z)
    expected = _reference(sd, z)
    assert out.shape == z.shape
    assert (out - expected).abs().max().item() < TOLERANCE
    assert out.abs().max().item() > 0.1  # a real signal, not a vanishing one


@torch.no_grad()
def test_matches_functional_reference_other_sizes():
    """Three stages, two blocks a stage, a wider first stage (repeat 3) and 16 output channels."""
    config = HunyuanVideo15UpsamplerConfig(block_out_channels=(96, 64, 64), num_res_blocks=1, out_channels=16)
    sd = randomized_(HunyuanVideo15Upsampler(config), 5).state_dict()
    z = _latent(4, 4, 3, batch=1)
    out = load_hunyuan_video15_upsampler(sd)(z)
    assert out.shape == (1, 16, 4, 4, 3)
    assert (out - _reference(sd, z)).abs().max().item() < TOLERANCE


# --- against diffusers' layers ------------------------------------------------------------------------------------


class _DiffusersAssembled(nn.Module):
    """Tencent's SRTo1080pUpsampler built from diffusers' AutoencoderKLHunyuanVideo15 layers; its resnet blocks
    name the 1x1x1 shortcut `conv_shortcut` where the file has `nin_shortcut`."""

    def __init__(self, config: HunyuanVideo15UpsamplerConfig):
        super().__init__()
        widths, self.z_channels, self.width = config.block_out_channels, config.z_channels, config.block_out_channels[0]
        self.conv_in = HunyuanVideo15CausalConv3d(config.z_channels, widths[0], kernel_size=3)
        self.up = nn.ModuleList()
        width = widths[0]
        for out in widths:
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(HunyuanVideo15ResnetBlock(width, out))
                width = out
            self.up.append(stage)
        self.norm_out = HunyuanVideo15RMS_norm(width, images=False)
        self.conv_out = HunyuanVideo15CausalConv3d(width, config.out_channels, kernel_size=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z) + z.repeat_interleave(self.width // self.z_channels, dim=1)
        for stage in self.up:
            for block in stage.block:
                x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


@torch.no_grad()
def test_matches_diffusers_layers():
    sd = tiny_state_dict(4)
    reference = _DiffusersAssembled(tiny_config()).eval()
    reference.load_state_dict({k.replace("nin_shortcut", "conv_shortcut"): v for k, v in sd.items()}, strict=True)
    z = _latent(3)
    diff = (load_hunyuan_video15_upsampler(sd)(z) - reference(z)).abs().max().item()
    assert diff < TOLERANCE


# --- behaviour ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_causal_in_time():
    """Changing frame 2 leaves output frames 0 and 1 as they were and changes frames 2 and 3; the first k output
    frames are what the first k latent frames alone give."""
    model = _model()
    z = _latent(4)
    changed = z.clone()
    changed[:, :, 2] += torch.randn(changed[:, :, 2].shape, generator=torch.Generator().manual_seed(9))
    out, out_changed = model(z), model(changed)
    assert (out[:, :, :2] - out_changed[:, :, :2]).abs().max().item() < 1e-6
    assert (out[:, :, 2:] - out_changed[:, :, 2:]).abs().flatten(3).amax(dim=(0, 1, 3)).min().item() > 1e-3
    assert (model(z[:, :, :2]) - out[:, :, :2]).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("shape", [(1, 32, 1, 1, 1), (2, 32, 2, 3, 7), (1, 32, 5, 8, 4)])
@torch.no_grad()
def test_keeps_shape(shape):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    assert _model().resample_latent(z).shape == shape


@torch.no_grad()
def test_resample_latent_dtype_and_device():
    """The network runs in the model's dtype; the result comes back in the input's dtype, same values as the
    forward (up to the input's rounding)."""
    model = load_hunyuan_video15_upsampler(tiny_state_dict(), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    z = _latent(2)
    out = model.resample_latent(z)
    assert out.dtype == torch.float32 and out.device == z.device
    assert torch.equal(out, model(z.to(torch.bfloat16)).float())


def test_rejects_other_latents():
    with pytest.raises(ValueError, match="32, T, h, w"):
        _model()(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="32, T, h, w"):
        _model()(torch.zeros(1, 32, 2, 2))


# --- the key layout -----------------------------------------------------------------------------------------------


def _meta_state_dict(config: HunyuanVideo15UpsamplerConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return HunyuanVideo15Upsampler(config).state_dict()


def test_file_layout_at_the_real_size():
    """The default config's keys and shapes are the layout the notes give for the Comfy-Org file, and its parameter
    count makes the ~201 MB float32 file (the widths (256, 512) are inferred from that size)."""
    sd = _meta_state_dict(HunyuanVideo15UpsamplerConfig())
    assert sd["conv_in.conv.weight"].shape == (256, 32, 3, 3, 3)
    assert sd["up.0.block.0.norm1.gamma"].shape == (256, 1, 1, 1)
    assert sd["up.1.block.0.conv1.conv.weight"].shape == (512, 256, 3, 3, 3)
    assert sd["up.1.block.0.nin_shortcut.weight"].shape == (512, 256, 1, 1, 1)
    assert sd["up.1.block.2.conv2.conv.bias"].shape == (512,)
    assert sd["norm_out.gamma"].shape == (512, 1, 1, 1)
    assert sd["conv_out.conv.weight"].shape == (32, 512, 3, 3, 3)
    assert not any("nin_shortcut" in k for k in sd if k.startswith("up.0."))
    assert {k.split(".block.")[1].split(".")[0] for k in sd if k.startswith("up.")} == {"0", "1", "2"}
    assert sum(v.numel() for v in sd.values()) == 50_350_112  # x 4 bytes = 201.4 MB
    assert len(sd) == 2 + 2 * 3 * 6 + 2 + 1 + 2


@pytest.mark.parametrize("config", [tiny_config(), HunyuanVideo15UpsamplerConfig(),
                                    HunyuanVideo15UpsamplerConfig((64, 64, 128), 1, 32, 8)])
def test_config_roundtrip(config):
    assert config_from_state_dict(_meta_state_dict(config)) == config


def test_config_from_tiny_state_dict():
    assert config_from_state_dict(tiny_state_dict()) == tiny_config() == HunyuanVideo15UpsamplerConfig((64, 96))


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of the latent channels"):
        HunyuanVideo15UpsamplerConfig((48, 64))
    with pytest.raises(ValueError, match="invalid"):
        HunyuanVideo15UpsamplerConfig(())
    assert dataclasses.is_dataclass(tiny_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_config().num_res_blocks = 3


# --- detection and loading ----------------------------------------------------------------------------------------


def _ltx2_upsampler_state_dict() -> dict[str, torch.Tensor]:
    return LatentUpsampler(LatentUpsamplerConfig(mid_channels=32, blocks_per_stage=1, rational=True)).state_dict()


def test_detection():
    assert is_hunyuan_video15_upsampler(tiny_state_dict())
    assert is_hunyuan_video15_upsampler(set(_meta_state_dict(HunyuanVideo15UpsamplerConfig())))
    assert not is_hunyuan_video15_upsampler(_ltx2_upsampler_state_dict())
    assert not is_hunyuan_video15_upsampler(hunyuan_video15_vae.tiny_state_dict())
    # HunyuanVideo 1.5's 720p SR upsampler (ComfyUI's SRModel3DV2): in_conv, blocks.N.block.{0,2,4}, out_conv
    assert not is_hunyuan_video15_upsampler({"in_conv.conv.weight", "blocks.0.block.0.conv.weight",
                                             "out_conv.conv.weight"})


def test_load_from_file(tmp_path):
    sd = tiny_state_dict(2)
    path = tmp_path / "hunyuanvideo15_latent_upsampler_1080p.safetensors"
    write_safetensors(sd, path, {})
    assert peek_hunyuan_video15_upsampler(path)
    model = load_hunyuan_video15_upsampler(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    half = load_hunyuan_video15_upsampler(path, dtype=torch.float16)
    assert half.dtype == torch.float16


def test_load_comfyui_names():
    """ComfyUI's in-memory names (`nin_shortcut.conv.weight`) load as the file's."""
    sd = tiny_state_dict(2)
    comfy = {k.replace("nin_shortcut", "nin_shortcut.conv"): v for k, v in sd.items()}
    assert any("nin_shortcut.conv." in k for k in comfy)
    model = load_hunyuan_video15_upsampler(comfy)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "ltx-2-spatial-upscaler-x2-1.0.safetensors"
    write_safetensors(_ltx2_upsampler_state_dict(), path, {})
    assert not peek_hunyuan_video15_upsampler(path)
    with pytest.raises(CheckpointError, match="not HunyuanVideo 1.5's latent upsampler"):
        load_hunyuan_video15_upsampler(path)
    with pytest.raises(CheckpointError, match="not HunyuanVideo 1.5's latent upsampler"):
        load_hunyuan_video15_upsampler(hunyuan_video15_vae.tiny_state_dict())
    sd = tiny_state_dict()
    with pytest.raises(CheckpointError, match="missing"):
        load_hunyuan_video15_upsampler({k: v for k, v in sd.items() if k != "up.1.block.2.conv2.conv.bias"})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_hunyuan_video15_upsampler(sd | {"up.0.block.0.nin_shortcut.weight": torch.zeros(64, 64, 1, 1, 1)})
    with pytest.raises(CheckpointError, match="misshapen"):
        load_hunyuan_video15_upsampler(sd | {"norm_out.gamma": torch.ones(96)})
