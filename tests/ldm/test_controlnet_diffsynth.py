"""DiffSynth's blockwise ControlNets for Qwen-Image: the block and the hint's tokens against a restatement of
DiffSynth's math written here (RMS norms of both inputs, add, linear, GELU, linear; img_in on the 2x2-packed hint),
the patched transformer against a manual loop over its blocks adding the residuals, the file round trip and the
refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.controlnet_diffsynth import (
    TINY_DIFFSYNTH_CONTROLNET,
    BlockwiseControlNet,
    BlockwiseControlNetConfig,
    is_diffsynth_controlnet,
    load_diffsynth_controlnet,
    random_diffsynth_controlnet,
    with_diffsynth_control,
    write_tiny_diffsynth_controlnet,
)
from ldm.flux import rope_angles
from ldm.qwen_image import THETA, QwenImageModel, msrope_ids
from ldm.qwen_image_files import TINY_QWEN_IMAGE, random_qwen_image
from ldm.unet import timestep_embedding

TOL = 1e-5


@pytest.fixture(scope="module")
def model() -> QwenImageModel:
    return random_qwen_image(TINY_QWEN_IMAGE, seed=3)


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def reference_block(cn: BlockwiseControlNet, i: int, img: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    """DiffSynth's BlockWiseControlBlock: output_proj(GELU(input_proj(rms_x(img) + rms_y(hint)))), GELU exact."""
    b = cn.state_dict(prefix="", keep_vars=False)
    key = f"controlnet_blocks.{i}."
    h = rms(img, b[key + "x_rms.weight"]) + rms(hint, b[key + "y_rms.weight"])
    h = h @ b[key + "input_proj.weight"].T + b[key + "input_proj.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ b[key + "output_proj.weight"].T + b[key + "output_proj.bias"]


def pack(x: torch.Tensor) -> torch.Tensor:
    """"B C (H P) (W Q) -> B (H W) (C P Q)" after padding odd sizes round (circular), as ComfyUI pads."""
    x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), mode="circular")
    b, c, h, w = x.shape
    quads = torch.stack([x[:, :, p::2, q::2] for p in (0, 1) for q in (0, 1)], dim=-1)  # [B, C, H/2, W/2, PQ]
    return quads.permute(0, 2, 3, 1, 4).reshape(b, (h // 2) * (w // 2), c * 4)


def reference_tokens(cn: BlockwiseControlNet, hint: torch.Tensor) -> torch.Tensor:
    return pack(hint) @ cn.img_in.weight.T + cn.img_in.bias


def manual_forward(model: QwenImageModel, cn: BlockwiseControlNet | None, x: torch.Tensor, t: torch.Tensor,
                   context: torch.Tensor, hint: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """The transformer run block by block, the reference residual added to the image tokens after each."""
    c, (h, w) = model.config, x.shape[-2:]
    tokens = pack(x)
    rows, cols = (h + 1) // 2, (w + 1) // 2
    img, txt = model.img_in(tokens), model.txt_in(model.txt_norm(context))
    temb = model.time_text_embed.timestep_embedder(timestep_embedding(t * 1000, 256))
    rope = rope_angles(msrope_ids(rows, cols, context.shape[1]), c.axes_dim, THETA)
    hint_tokens = None if cn is None else reference_tokens(cn, hint)
    if hint_tokens is not None and hint_tokens.shape[0] != x.shape[0]:
        hint_tokens = hint_tokens[torch.arange(x.shape[0]) % hint_tokens.shape[0]]
    for i, block in enumerate(model.transformer_blocks):
        img, txt = block(img, txt, temb, rope, None)
        if hint_tokens is not None:
            img = img + strength * reference_block(cn, i, img, hint_tokens)
    out = model.proj_out(model.norm_out(img, temb))
    out = out.view(x.shape[0], rows, cols, c.out_channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(x.shape[0], c.out_channels, rows * 2, cols * 2)[..., :h, :w]


def inputs(h: int, w: int, seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, h, w, generator=generator)
    context = torch.randn(batch, 5, TINY_QWEN_IMAGE.context_dim, generator=generator)
    return x, torch.tensor([0.7, 0.3])[:batch], context


class Hints:
    """An `encode` for tests: fixed random hint latents of each size asked for, counting the calls."""

    def __init__(self, channels: int, batch: int = 2, seed: int = 5):
        self.channels, self.batch, self.seed, self.calls = channels, batch, seed, []

    def latents(self, height: int, width: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 100 * height + width)
        return torch.randn(self.batch, self.channels, height, width, generator=generator)

    def __call__(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        self.calls.append((height, width))
        return self.latents(height, width).to(device)


def test_block_and_hint_tokens_match_diffsynth_math() -> None:
    cn = random_diffsynth_controlnet(dataclasses.replace(TINY_DIFFSYNTH_CONTROLNET, in_channels=68), seed=1)
    generator = torch.Generator().manual_seed(0)
    hint = torch.randn(2, 17, 6, 10, generator=generator)
    img = torch.randn(2, 15, 32, generator=generator)
    with torch.no_grad():
        tokens = cn.hint_tokens(hint)
        assert (tokens - reference_tokens(cn, hint)).abs().max() < TOL
        for i in range(2):
            assert (cn(i, img, tokens) - reference_block(cn, i, img, tokens)).abs().max() < TOL
    assert cn.mask_channels == 1


@pytest.mark.parametrize(("h", "w"), [(8, 8), (6, 10), (7, 9)])
def test_patched_model_matches_manual_loop(model: QwenImageModel, h: int, w: int) -> None:
    cn = random_diffsynth_controlnet(seed=2)
    hints = Hints(16)
    patched = with_diffsynth_control(model, cn, hints, 0.8)
    x, t, context = inputs(h, w)
    with torch.no_grad():
        out = patched(x, t, context)
        expected = manual_forward(model, cn, x, t, context, hints.latents(h, w), 0.8)
        plain = model(x, t, context)
    assert (out - expected).abs().max() < TOL
    assert (out - plain).abs().max() > 1e-2  # the hint does change the prediction
    assert (manual_forward(model, None, x, t, context) - plain).abs().max() < TOL  # the loop is the model's own
    assert hints.calls == [(h, w)]  # encoded once, for every block


def test_hint_batch_cycles_inpaint_width_and_cache_follows_size(model: QwenImageModel) -> None:
    cn = random_diffsynth_controlnet(dataclasses.replace(TINY_DIFFSYNTH_CONTROLNET, in_channels=68), seed=4)
    hints = Hints(17, batch=1)
    patched = with_diffsynth_control(model, cn, hints, -1.5)
    with torch.no_grad():
        for h, w in ((6, 8), (6, 8), (4, 6)):
            x, t, context = inputs(h, w, seed=h)
            out = patched(x, t, context)
            assert (out - manual_forward(model, cn, x, t, context, hints.latents(h, w), -1.5)).abs().max() < TOL
    assert hints.calls == [(6, 8), (4, 6)]
    assert model.block_patches == ()  # the copy is patched, the model not


def test_references_and_a_bf16_controlnet(model: QwenImageModel) -> None:
    cn = random_diffsynth_controlnet(seed=2).to(torch.bfloat16)
    patched = with_diffsynth_control(model, cn, Hints(16), 1.0)
    x, t, context = inputs(6, 8)
    reference = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the hint covers the noisy latent's tokens only, the reference's get no residual
        out = patched(x, t, context, ref_latents=[reference])
        plain = model(x, t, context, ref_latents=[reference])
    assert out.dtype == torch.float32 and out.shape == x.shape and (out - plain).abs().max() > 1e-2


def test_strength_zero_gives_the_unpatched_output(model: QwenImageModel) -> None:
    hints = Hints(16)
    patched = with_diffsynth_control(model, random_diffsynth_controlnet(seed=2), hints, 0.0)
    x, t, context = inputs(6, 8)
    with torch.no_grad():
        assert torch.equal(patched(x, t, context), model(x, t, context))
    assert hints.calls == []


@pytest.mark.parametrize("inpaint", [False, True])
def test_file_round_trip(tmp_path, inpaint: bool) -> None:
    path = write_tiny_diffsynth_controlnet(tmp_path / "cn.safetensors", seed=7, inpaint=inpaint, dtype=torch.float32)
    sd = load_state_dict(path)
    assert is_diffsynth_controlnet(sd)
    assert "controlnet_blocks.1.output_proj.bias" in sd and "img_in.weight" in sd and len(sd) == 2 + 2 * 6
    loaded = load_diffsynth_controlnet(sd, path)
    assert loaded.config == dataclasses.replace(TINY_DIFFSYNTH_CONTROLNET, in_channels=68 if inpaint else 64)
    assert loaded.mask_channels == int(inpaint) and loaded.unused_keys == []
    original = random_diffsynth_controlnet(loaded.config, seed=7).state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
    half = load_diffsynth_controlnet({**sd, "extra.weight": torch.zeros(1)}, path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.unused_keys == ["extra.weight"]


def test_refusals(tmp_path, model: QwenImageModel) -> None:
    path = write_tiny_diffsynth_controlnet(tmp_path / "cn.safetensors")
    sd = load_state_dict(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_state_dict(truncated)
    missing = {k: v for k, v in sd.items() if k != "controlnet_blocks.0.input_proj.weight"}
    with pytest.raises(CheckpointError, match=r"cn.safetensors: .*controlnet_blocks\.0\.input_proj\.weight"):
        load_diffsynth_controlnet(missing, path)
    with pytest.raises(CheckpointError, match="cn.safetensors: .*takes 66 values a token"):
        load_diffsynth_controlnet({**sd, "img_in.weight": torch.zeros(32, 66)}, path)
    with pytest.raises(CheckpointError, match="takes 32 values a token"):
        load_diffsynth_controlnet({**sd, "img_in.weight": torch.zeros(32, 32)}, path)
    assert not is_diffsynth_controlnet(model.state_dict())

    def fitting(**changes) -> BlockwiseControlNet:
        return BlockwiseControlNet(BlockwiseControlNetConfig(**{"dim": 32, "num_blocks": 2, **changes}))

    hints = Hints(16)
    with pytest.raises(ValueError, match="3 blocks and the Qwen-Image model 2"):
        with_diffsynth_control(model, fitting(num_blocks=3), hints, 1.0)
    with pytest.raises(ValueError, match="1 blocks and the Qwen-Image model 2"):
        with_diffsynth_control(model, fitting(num_blocks=1), hints, 1.0)
    with pytest.raises(ValueError, match="64 wide and the Qwen-Image model 32"):
        with_diffsynth_control(model, fitting(dim=64), hints, 1.0)
    narrow = QwenImageModel(dataclasses.replace(TINY_QWEN_IMAGE, in_channels=128))
    with pytest.raises(ValueError, match="takes 64 values a hint token and the Qwen-Image model's latent tokens hold"):
        with_diffsynth_control(narrow, fitting(), hints, 1.0)
    x, t, context = inputs(6, 8)
    with pytest.raises(ValueError, match=r"takes hint latents \[B, 17 \(16 latent \+ 1 keep mask\), h, w\]"):
        with torch.no_grad():
            with_diffsynth_control(model, fitting(in_channels=68), hints, 1.0)(x, t, context)
    with pytest.raises(ValueError, match=r"for latents of 6x8 came as \[2, 16, 4, 4\]"):
        with torch.no_grad():
            with_diffsynth_control(model, fitting(), lambda h, w, d: torch.zeros(2, 16, 4, 4), 1.0)(x, t, context)
