"""`python -m benchmarks.unet_profile` runs (on the CPU: the tiny presets) and reports each side."""

from benchmarks import unet_profile


def test_unet_profile_times_ours_its_variants_and_diffusers_and_sums_kernels_by_kind(capsys):
    [result] = unet_profile.main(["--preset", "sdxl"]).values()
    out = capsys.readouterr().out
    assert "tiny-sdxl at 64 px" in out and "kernel time by kind" in out and "top kernels, diffusers" in out
    assert set(result["ms"]) == {"ours eager", "ours NCHW (--no-channels-last), eager",
                                 "ours fused self-attention qkv, eager", "diffusers eager"}
    assert all(ms > 0 for ms in result["ms"].values())
    # Both variants compute the same function as ours: only the layout or the matmul grouping differs.
    assert result["max_diff"] and all(diff < 1e-4 for diff in result["max_diff"].values())
    assert set(result["kernel_ms_by_kind"]) == {"ours", "NCHW (--no-channels-last)", "diffusers"}
    assert result["kernel_ms_by_kind"]["ours"]["conv"] > 0


def test_kernels_are_sorted_by_kind_from_their_names():
    assert unet_profile.kind("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>") == "conv layout copy"
    assert unet_profile.kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv"
    assert unet_profile.kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT") == "matmul"
    assert unet_profile.kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert unet_profile.kind("void at::native::RowwiseMomentsCUDAKernel<c10::BFloat16>") == "group norm"
    assert unet_profile.kind("something else") == "other"


def test_the_fused_elementwise_variant_computes_the_same_unet_and_is_undone():
    # On the GPU this variant is timed (CUDA_ONLY); here inductor's CPU build only checks what it computes.
    import torch

    from ldm.presets import PRESETS, randomize_
    from ldm.unet import UNetModel

    unet = randomize_(UNetModel(PRESETS["tiny-sd1"][2]), torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0]), torch.randn(2, 7, 32)
    with torch.inference_mode():
        base = unet(x, t, context)
        with unet_profile.fused_elementwise(unet):
            fused = unet(x, t, context)
        again = unet(x, t, context)
    torch.testing.assert_close(fused, base, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, base) and not any("forward" in vars(m) for m in unet.modules())
