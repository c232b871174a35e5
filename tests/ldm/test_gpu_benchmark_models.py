"""The models benchmarks.gpu builds: the full-size SDXL preset's shape, and diffusers' copies of ours."""

import torch

from benchmarks.gpu_diffusers import diffusers_pipeline
from ldm.presets import PRESETS, build_preset
from ldm.text_encoders import random_text_encoder_config
from ldm.unet import UNetModel, sdxl_adm


def test_sdxl_preset_has_the_published_shape():
    _, _, unet_config, vae_config = PRESETS["sdxl"]
    with torch.device("meta"):
        unet = UNetModel(unet_config)
    params = sum(p.numel() for p in unet.parameters())
    assert abs(params - 2_567_463_684) / 2_567_463_684 < 0.001  # SDXL base UNet
    te = random_text_encoder_config("sdxl")
    assert te.context_dim == unet_config.context_dim == 2048
    assert te.pooled_dim + 6 * 256 == unet_config.adm_in_channels
    assert vae_config.scaling_factor == 0.13025


def test_diffusers_sdxl_pipeline_holds_our_weights():
    family, prediction, unet, vae, te = build_preset("tiny-sdxl", seed=4)
    states = {"unet": unet.state_dict(), "vae": vae.state_dict(),
              **{name: enc.state_dict() for name, enc in te.encoders.items()}}
    pipe = diffusers_pipeline(family, prediction, unet.config, vae.config, te, states)
    with torch.inference_mode():
        ours = te.encode(["a red circle"])
        cond, _, pooled, _ = pipe.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
        torch.testing.assert_close(cond, ours.cond, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pooled, ours.pooled, rtol=1e-4, atol=1e-4)
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([400.0])
        y = sdxl_adm(ours.pooled, 64, 64)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        theirs = pipe.unet(x, t, encoder_hidden_states=ours.cond,
                           added_cond_kwargs={"text_embeds": ours.pooled, "time_ids": time_ids}).sample
        torch.testing.assert_close(theirs, unet(x, t, ours.cond, y=y), rtol=1e-4, atol=1e-4)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(pipe.vae.decode(z).sample, vae.decode(z), rtol=1e-4, atol=1e-4)
