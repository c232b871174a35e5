"""Flux's 16-channel autoencoder (BFL's ae.safetensors layout: LDM's names, no quant convolutions) against diffusers'
AutoencoderKL configured as FluxPipeline's, with the weights renamed by diffusers' own LDM conversion."""

from __future__ import annotations

import safetensors.torch
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from ldm.checkpoint import load_vae
from ldm.flux_files import FLUX_VAE
from ldm.presets import randomize_
from ldm.vae import AutoencoderKL, VAEConfig

TINY_AE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, scaling_factor=0.3611,
                    use_quant_conv=False)


def random_ae(seed: int = 0) -> AutoencoderKL:
    model = randomize_(AutoencoderKL(TINY_AE), torch.Generator().manual_seed(seed))
    with torch.no_grad():  # norms not at 1 and 0, so a slip in their mapping shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model.eval()


def diffusers_twin(model: AutoencoderKL) -> DiffusersVAE:
    reference = DiffusersVAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                             layers_per_block=1, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                             use_quant_conv=False, use_post_quant_conv=False)
    state = convert_ldm_vae_checkpoint(dict(model.state_dict()), dict(reference.config))
    missing, unexpected = reference.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return reference.eval()


def test_bfl_ae_file_loads_with_flux_scale_and_no_quant_convs(tmp_path) -> None:
    model = random_ae()
    assert not any("quant_conv" in k for k in model.state_dict())
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "ae.safetensors")
    loaded = load_vae(tmp_path / "ae.safetensors")
    assert loaded.vae.config == TINY_AE and loaded.unused_keys == [] and loaded.vae.scaling_factor == 0.3611
    assert FLUX_VAE.z_channels == 16 and not FLUX_VAE.use_quant_conv and FLUX_VAE.ch_mult == (1, 2, 4, 4)


def test_matches_diffusers_autoencoder() -> None:
    model = random_ae()
    reference = diffusers_twin(model)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(1, 3, 32, 48, generator=generator) * 2 - 1
    z = torch.randn(1, 16, 8, 12, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(pixels).mean, reference.encode(pixels).latent_dist.mean,
                                   rtol=1e-5, atol=1e-5)
        decoded, expected = model.decode(z), reference.decode(z).sample
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-5)
