"""RIFE's IFNet and FILM against float64 transcriptions of ComfyUI's forward passes (with a bilinear warp of our own
instead of grid_sample), the key layouts and their detection, refusals, and ComfyUI's interpolation loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.checkpoint import CheckpointError
from ldm.frame_interpolation import (
    FILMNet,
    IFNet,
    film_warp,
    frame_interpolation_model_from_state_dict,
    interpolate_frames,
    load_frame_interpolation_model,
    rife_warp,
)

TINY_RIFE = {"head_channels": 4, "channels": (16, 16, 8, 8, 8)}
TINY_FILM = {"filters": 2, "flow_convs": (2, 1, 1, 1), "flow_filters": (4, 6, 4, 8)}


def randomized(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every weight drawn afresh, so a wrong wiring cannot hide behind the initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def frames(count: int, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def bilinear_at(image: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """`image` [B, C, H, W] sampled at pixel coordinates (px, py) [B, H, W], coordinates clamped to the image:
    the four neighbours gathered by index and weighted by hand."""
    b, c, h, w = image.shape
    px, py = px.clamp(0, w - 1), py.clamp(0, h - 1)
    x0, y0 = px.floor().long(), py.floor().long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    ax, ay = (px - x0)[:, None], (py - y0)[:, None]
    batch = torch.arange(b)[:, None, None]

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return image[batch, :, y, x].permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]

    return ((1 - ay) * ((1 - ax) * at(y0, x0) + ax * at(y0, x1)) + ay * ((1 - ax) * at(y1, x0) + ax * at(y1, x1)))


def warp_reference(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp by a flow in pixels, in the image's dtype."""
    _, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype), torch.arange(w, dtype=flow.dtype), indexing="ij")
    return bilinear_at(image, xs + flow[:, 0], ys + flow[:, 1])


@pytest.mark.parametrize("warp", [rife_warp, film_warp])
def test_the_warps_sample_at_pixel_plus_flow_clamped_to_the_border(warp):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 9, 13, generator=g, dtype=torch.float64)
    flow = torch.randn(2, 2, 9, 13, generator=g, dtype=torch.float64) * 4  # reaches past the edges
    expected = warp_reference(image, flow)
    torch.testing.assert_close(warp(image, flow), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(warp(image, torch.zeros_like(flow)), image, rtol=1e-12, atol=1e-12)
    half = warp(image.half(), flow.half())  # as ComfyUI: fp16 models warp in float32
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), warp_reference(image.half().double(), flow.half().double()),
                               rtol=2e-3, atol=2e-3)


# --- RIFE ---------------------------------------------------------------------------------------------------


def raw_rife_layout(sd: dict) -> dict:
    """A state dict in RIFE's own training layout: `module.` prefix, `blockN.`, plus training-only keys."""
    out = {"module." + k.replace("blocks.", "block", 1): v for k, v in sd.items()}
    out["module.teacher.conv0.0.0.weight"] = torch.zeros(3)
    out["module.caltime.0.weight"] = torch.zeros(3)
    return out


def rife_reference(sd: dict, img0: torch.Tensor, img1: torch.Tensor, t: float) -> torch.Tensor:
    """ComfyUI's IFNet forward, written out on the raw keys (`module.blockN.`), in the inputs' dtype."""
    w = {k.removeprefix("module."): v.to(img0.dtype) for k, v in sd.items()}
    lrelu = lambda x: F.leaky_relu(x, 0.2)  # noqa: E731

    def conv(x, name, stride=1):
        return F.conv2d(x, w[name + ".weight"], w[name + ".bias"], stride=stride, padding=1)

    def head(x):
        x = lrelu(conv(lrelu(conv(lrelu(conv(x, "encode.cnn0", 2)), "encode.cnn1")), "encode.cnn2"))
        return F.conv_transpose2d(x, w["encode.cnn3.weight"], w["encode.cnn3.bias"], stride=2, padding=1)

    def block(i, x, flow, scale):
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear")
        if flow is not None:
            x = torch.cat([x, F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear") / scale], 1)
        x = lrelu(conv(lrelu(conv(x, f"block{i}.conv0.0.0", 2)), f"block{i}.conv0.1.0", 2))
        for k in range(8):
            x = lrelu(x + conv(x, f"block{i}.convblock.{k}.conv") * w[f"block{i}.convblock.{k}.beta"])
        x = F.conv_transpose2d(x, w[f"block{i}.lastconv.0.weight"], w[f"block{i}.lastconv.0.bias"], stride=2,
                               padding=1)
        x = F.interpolate(F.pixel_shuffle(x, 2), scale_factor=scale, mode="bilinear")
        return x[:, :4] * scale, x[:, 4:5], x[:, 5:]

    timestep = torch.full_like(img0[:, :1], t)
    f0, f1 = head(img0), head(img1)
    flow, mask, feat = block(0, torch.cat([img0, img1, f0, f1, timestep], 1), None, 16)
    w0, w1 = warp_reference(img0, flow[:, :2]), warp_reference(img1, flow[:, 2:])
    for i, scale in zip(range(1, 5), (8, 4, 2, 1), strict=True):
        x = torch.cat([w0, w1, warp_reference(f0, flow[:, :2]), warp_reference(f1, flow[:, 2:]), timestep, mask,
                       feat], 1)
        change, mask, feat = block(i, x, flow, scale)
        flow = flow + change
        w0, w1 = warp_reference(img0, flow[:, :2]), warp_reference(img1, flow[:, 2:])
    return w1 + torch.sigmoid(mask) * (w0 - w1)


def tiny_rife(seed: int = 3) -> IFNet:
    return randomized(IFNet(**TINY_RIFE), seed)


def test_rife_matches_the_reference_forward_in_float64_from_the_raw_layout():
    raw = raw_rife_layout(tiny_rife().state_dict())
    loaded = frame_interpolation_model_from_state_dict(raw, "flownet.pkl")
    assert loaded.architecture == "RIFE"
    net = loaded.model.double()
    pair = frames(2, 64, 128).double()
    for t in (0.25, 0.5):
        ours = net(pair[:1], pair[1:], torch.full((1, 1, 64, 128), t, dtype=torch.float64))
        expected = rife_reference(raw, pair[:1], pair[1:], t)
        assert ours.shape == (1, 3, 64, 128)
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_rife_batches_timesteps_and_reuses_cached_features():
    net = tiny_rife().double()  # float64: random weights amplify float32's batch-size-dependent rounding
    pair = frames(2).double()
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64).reshape(3, 1, 1, 1).expand(-1, 1, 64, 64)
    with torch.no_grad():
        batched = net(pair[:1].expand(3, -1, -1, -1), pair[1:].expand(3, -1, -1, -1), t,
                      (net.extract_features(pair[:1]), net.extract_features(pair[1:])))
        for k in range(3):
            torch.testing.assert_close(batched[k:k + 1], net(pair[:1], pair[1:], t[k:k + 1]), rtol=1e-9, atol=1e-9)


def test_rife_released_shapes_and_both_layouts_load():
    sd = IFNet().state_dict()  # RIFE 4.2x: head of 4 channels, blocks 192/128/96/64/32 wide
    assert sd["blocks.0.conv0.0.0.weight"].shape == (96, 15, 3, 3)
    assert sd["blocks.1.conv0.0.0.weight"].shape == (64, 28, 3, 3)
    assert sd["blocks.4.lastconv.0.weight"].shape == (32, 52, 4, 4)
    assert sd["blocks.2.convblock.7.beta"].shape == (1, 96, 1, 1)
    small = tiny_rife().state_dict()
    for layout in (small, raw_rife_layout(small), {"flownet." + k: v for k, v in small.items()}):
        model = frame_interpolation_model_from_state_dict(layout).model
        torch.testing.assert_close(model.state_dict()["blocks.3.convblock.2.conv.weight"],
                                   small["blocks.3.convblock.2.conv.weight"])


# --- FILM ---------------------------------------------------------------------------------------------------


def film_reference(sd: dict, img0: torch.Tensor, img1: torch.Tensor, timesteps: list[float]) -> torch.Tensor:
    """ComfyUI's FILMNet forward written out on the keys (7 pyramid levels, 4 sub-levels, 5 fused), every
    sub-tree convolution run as ComfyUI runs it, our own bilinear warp."""
    w = {k: v.to(img0.dtype) for k, v in sd.items()}

    def conv(x, name, size, act=True):
        if size % 2 == 0:
            x = F.pad(x, (0, 1, 0, 1))
        x = F.conv2d(x, w[name + ".conv.weight"], w[name + ".conv.bias"], padding=size // 2 if size % 2 else 0)
        return F.leaky_relu(x, 0.2) if act else x

    def features(image):
        pyramid = [image]
        for _ in range(6):
            pyramid.append(F.avg_pool2d(pyramid[-1], 2, 2))
        subs = []
        for i, level in enumerate(pyramid):
            n, head, out = min(7 - i, 4), level, []
            for j in range(4):
                head = conv(conv(head, f"extract.extract_sublevels.convs.{j}.0", 3),
                            f"extract.extract_sublevels.convs.{j}.1", 3)
                out.append(head)
                if j < n - 1:
                    head = F.avg_pool2d(head, 2, 2)
            subs.append(out)
        feats = []
        for i in range(7):
            f = subs[i][0]
            for j in range(1, 4):
                if j <= i:
                    f = torch.cat([f, subs[i - j][j]], 1)
            feats.append(f)
        return pyramid, feats

    def estimate(prefix, a, b):
        n = len({k for k in w if k.startswith(prefix + "._convs.") and k.endswith(".conv.weight")})
        x = torch.cat([a, b], 1)
        for k in range(n):
            x = conv(x, f"{prefix}._convs.{k}", 3 if k < n - 2 else 1, act=k < n - 1)
        return x

    def residual_flows(fa, fb):
        v = estimate("predict_flow._predictor", fa[-1], fb[-1])
        residuals = [v]
        steps = [(i, "predict_flow._predictor") for i in range(5, 2, -1)]
        steps += [(2 - k, f"predict_flow._predictors.{k}") for k in range(3)]
        for i, prefix in steps:
            v = F.interpolate(v, size=fa[i].shape[2:4], mode="bilinear") * 2
            r = estimate(prefix, fa[i], warp_reference(fb[i], v))
            residuals.append(r)
            v = v + r
        return residuals[::-1]

    def synthesis(residuals):
        flow = residuals[-1]
        out = [flow]
        for r in residuals[:-1][::-1]:
            flow = F.interpolate(flow, size=r.shape[2:4], mode="bilinear") * 2 + r
            out.append(flow)
        return out[::-1]

    def fuse(pyramid):
        net = pyramid[-1]
        for k in range(4):
            i = 3 - k
            net = conv(F.interpolate(net, size=pyramid[i].shape[2:4], mode="nearest"), f"fuse.convs.{k}.0", 2, False)
            net = conv(conv(torch.cat([pyramid[i], net], 1), f"fuse.convs.{k}.1", 3), f"fuse.convs.{k}.2", 3)
        return F.conv2d(net, w["fuse.output_conv.weight"], w["fuse.output_conv.bias"])

    (p0, f0), (p1, f1) = features(img0), features(img1)
    fwd = synthesis(residual_flows(f0, f1))[:5]
    bwd = synthesis(residual_flows(f1, f0))[:5]
    out = []
    for t in timesteps:
        aligned = []
        for i in range(5):
            b, f = bwd[i] * t, fwd[i] * (1 - t)
            aligned.append(torch.cat([warp_reference(torch.cat([p0[i], f0[i]], 1), b),
                                      warp_reference(torch.cat([p1[i], f1[i]], 1), f), b, f], 1))
        out.append(fuse(aligned))
    return torch.cat(out)


def tiny_film(seed: int = 7) -> FILMNet:
    return randomized(FILMNet(**TINY_FILM), seed, std=0.3)


def test_film_matches_the_reference_forward_in_float64():
    sd = tiny_film().state_dict()
    loaded = frame_interpolation_model_from_state_dict(sd, "film.safetensors")
    assert loaded.architecture == "FILM"
    net = loaded.model.double()
    pair = frames(2, 70, 96, seed=2).double()  # not powers of two: the pyramid floors its sizes
    timesteps = [1 / 3, 2 / 3]
    with torch.no_grad():
        ours = net.forward_timesteps(pair[:1], pair[1:], timesteps)
        expected = film_reference(sd, pair[:1], pair[1:], timesteps)
    assert ours.shape == (2, 3, 70, 96)
    assert expected.abs().max() > 1e-3  # the comparison is not between two zeros
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def comfy_film_shapes(filters=64, flow_convs=(3, 3, 3, 3), flow_filters=(32, 64, 128, 256)) -> dict:
    """The weight shapes ComfyUI's FILMNet constructor gives, by its own arithmetic (the running `increase`)."""
    shapes = {}
    cin = 3
    for i in range(4):
        out = filters << i
        shapes[f"extract.extract_sublevels.convs.{i}.0.conv.weight"] = (out, cin, 3, 3)
        shapes[f"extract.extract_sublevels.convs.{i}.1.conv.weight"] = (out, out, 3, 3)
        cin = out
    cin, predictors = filters << 1, []
    for i in range(4):
        convs, c = [], cin
        for _ in range(flow_convs[i]):
            convs.append((flow_filters[i], c, 3, 3))
            c = flow_filters[i]
        convs += [(flow_filters[i] // 2, c, 1, 1), (2, flow_filters[i] // 2, 1, 1)]
        predictors.append(convs)
        cin += filters << (i + 2)
    for name, convs in [("_predictor", predictors[-1])] + [(f"_predictors.{k}", p)
                                                            for k, p in enumerate(predictors[:-1][::-1])]:
        for k, shape in enumerate(convs):
            shapes[f"predict_flow.{name}._convs.{k}.conv.weight"] = shape

    def fusion_channels(level):
        return (sum(filters << i for i in range(level)) + 5) * 2

    shapes["fuse.output_conv.weight"] = (3, filters, 1, 1)
    cin, increase = fusion_channels(4), 0
    for k, i in enumerate(range(4)[::-1]):
        n = (filters << i) if i < 3 else (filters << 3)
        shapes[f"fuse.convs.{k}.0.conv.weight"] = (n, cin, 2, 2)
        shapes[f"fuse.convs.{k}.1.conv.weight"] = (n, cin + (increase or n), 3, 3)
        shapes[f"fuse.convs.{k}.2.conv.weight"] = (n, n, 3, 3)
        cin, increase = n, fusion_channels(i) - n // 2
    return shapes


@pytest.mark.parametrize("config", [{}, TINY_FILM])
def test_film_weights_have_comfyuis_names_and_shapes(config):
    ours = {k: tuple(v.shape) for k, v in FILMNet(**config).state_dict().items() if k.endswith(".weight")}
    assert ours == comfy_film_shapes(**config)


# --- loading and refusals -----------------------------------------------------------------------------------


def test_files_load_from_disk_and_unknown_ones_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(tiny_rife().state_dict(), tmp_path / "rife.safetensors")
    torch.save(raw_rife_layout(tiny_rife().state_dict()), tmp_path / "flownet.pkl")
    save_file(tiny_film().state_dict(), tmp_path / "film.safetensors")
    assert load_frame_interpolation_model(tmp_path / "rife.safetensors").architecture == "RIFE"
    assert load_frame_interpolation_model(tmp_path / "flownet.pkl").architecture == "RIFE"
    assert load_frame_interpolation_model(tmp_path / "film.safetensors").architecture == "FILM"

    with pytest.raises(CheckpointError, match=r"other\.safetensors is not a frame interpolation model .*conv_first"):
        frame_interpolation_model_from_state_dict({"conv_first.weight": torch.zeros(4, 3, 3, 3)}, "other.safetensors")
    four_blocks = {k: v for k, v in tiny_rife().state_dict().items() if not k.startswith("blocks.4.")}
    with pytest.raises(CheckpointError, match="rife.pth: a RIFE model with 4 IFBlocks and a feature head; only"):
        frame_interpolation_model_from_state_dict(four_blocks, "rife.pth")
    headless = {k: v for k, v in raw_rife_layout(tiny_rife().state_dict()).items() if ".encode." not in k}
    with pytest.raises(CheckpointError, match="5 IFBlocks and no feature head; only the RIFE 4.x models with five"):
        frame_interpolation_model_from_state_dict(headless, "flownet.pkl")
    wrong = tiny_rife().state_dict()
    wrong["blocks.2.convblock.0.beta"] = torch.ones(1, 5, 1, 1)
    with pytest.raises(CheckpointError, match="the RIFE weights do not fit"):
        frame_interpolation_model_from_state_dict(wrong, "bad.safetensors")
    partial = {k: v for k, v in tiny_film().state_dict().items() if not k.startswith("fuse.output_conv")}
    with pytest.raises(CheckpointError, match="FILM weights do not fit .*fuse.output_conv"):
        frame_interpolation_model_from_state_dict(partial, "film_part.safetensors")


# --- the loop -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multiplier", [2, 3, 4])
def test_the_loop_keeps_the_originals_and_pads_rife_to_64(multiplier):
    net = tiny_rife().double()
    clip = frames(3, 40, 70, seed=4).double()  # padded to 64 x 128 by reflection, cropped back
    with torch.no_grad():
        out = interpolate_frames(net, clip, multiplier)
        assert out.shape == (2 * multiplier + 1, 3, 40, 70)
        for k in range(3):
            assert torch.equal(out[k * multiplier], clip[k])
        padded = F.pad(clip, (0, 58, 0, 24), mode="reflect")
        for pair in range(2):
            for k in range(1, multiplier):
                t = torch.full((1, 1, 64, 128), k / multiplier, dtype=torch.float64)
                middle = net(padded[pair:pair + 1], padded[pair + 1:pair + 2], t)[..., :40, :70]
                torch.testing.assert_close(out[pair * multiplier + k], middle[0], rtol=1e-9, atol=1e-9)


def test_the_loop_runs_film_at_any_size_and_returns_a_single_frame_unchanged():
    net = tiny_film()
    clip = frames(2, 66, 65, seed=5)
    steps = []
    with torch.no_grad():
        out = interpolate_frames(net, clip, 3, on_step=steps.append)
        expected = net.forward_timesteps(clip[:1], clip[1:], [1 / 3, 2 / 3])
    assert out.shape == (4, 3, 66, 65) and steps == [2]
    assert torch.equal(out[0], clip[0]) and torch.equal(out[3], clip[1])
    torch.testing.assert_close(out[1:3], expected)
    single = frames(1)
    assert interpolate_frames(net, single, 4) is single
    clip = frames(3)
    assert interpolate_frames(tiny_rife(), clip, 1) is clip  # multiplier 1: nothing between
