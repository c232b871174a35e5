"""ScaleROPE as ComfyUI runs it, on tiny Flux.1, FLUX.2 and Wan transformers loaded by UNETLoader: its declaration,
defaults that leave the model's output bit-identical, the image positions a scale and shift give (recorded as the
model computes its RoPE) against a transcription of ComfyUI's position code (Flux's process_img, which FLUX.2 shares;
Wan's rope_encode), the loaded model left as it was, and a model Loom cannot scale refused."""

from __future__ import annotations

import pytest
import torch

import ldm.flux
import ldm.flux2
import ldm.wan
from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.flux2_files import write_tiny_flux2
from ldm.flux_presets import make_flux_files
from ldm.flux_variants import References
from ldm.presets import make_checkpoint
from ldm.wan_files import write_tiny_wan
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

SCALED = {"scale_x": 0.5, "shift_x": 3.0, "scale_y": 1.7, "shift_y": -1.5, "scale_t": 2.5, "shift_t": 0.75}
IDENTITY = {"scale_x": 1.0, "shift_x": 0.0, "scale_y": 1.0, "shift_y": 0.0, "scale_t": 1.0, "shift_t": 0.0}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_rope")
    models = root / "models"
    make_flux_files(models, "dev", seed=3, dtype=torch.float32)
    write_tiny_wan(models / "diffusion_models" / "wan-tiny.safetensors", "t2v", seed=5, dtype=torch.float32)
    write_tiny_flux2(models / "diffusion_models" / "flux2-tiny.safetensors", seed=6, dtype=torch.float32)
    make_checkpoint("tiny-sd1", models / "checkpoints" / "sd1.safetensors", seed=1)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def scaled(engine, unet_name: str, options: dict) -> tuple:
    """(the loaded MODEL, the ScaleROPE MODEL)."""
    nodes = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
             "2": {"class_type": "ScaleROPE", "inputs": {"model": ["1", 0], **options}},
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    result = engine.run(parse_api(nodes), keep=["1", "2"])
    assert result.ok, result.error
    return result.values["1"][0], result.values["2"][0]


def recorded_positions(monkeypatch, module, call) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output and the positions [L, 3] it computed its RoPE angles of (a spy on the real function)."""
    seen = []
    real = module.rope_angles

    def spy(ids, *args):
        seen.append(ids.clone())
        return real(ids, *args)

    monkeypatch.setattr(module, "rope_angles", spy)
    with torch.no_grad():
        out = call()
    monkeypatch.setattr(module, "rope_angles", real)
    (ids,) = seen
    return out, ids


def comfy_flux_img_ids(h_len: int, w_len: int, o: dict, index: int = 0, h_offset: int = 0,
                       w_offset: int = 0) -> torch.Tensor:
    """ComfyUI's Flux.process_img positions under rope_options (offsets already in patches), transcribed."""
    steps_h, steps_w = h_len, w_len
    h_len = (h_len - 1.0) * o["scale_y"] + 1.0
    w_len = (w_len - 1.0) * o["scale_x"] + 1.0
    index += o["shift_t"]
    h_offset += o["shift_y"]
    w_offset += o["shift_x"]
    ids = torch.zeros((steps_h, steps_w, 3), dtype=torch.float32)
    ids[:, :, 0] = ids[:, :, 1] + index
    ids[:, :, 1] = ids[:, :, 1] + torch.linspace(h_offset, h_len - 1 + h_offset, steps=steps_h,
                                                 dtype=torch.float32).unsqueeze(1)
    ids[:, :, 2] = ids[:, :, 2] + torch.linspace(w_offset, w_len - 1 + w_offset, steps=steps_w,
                                                 dtype=torch.float32).unsqueeze(0)
    return ids.reshape(-1, 3)


def comfy_wan_ids(t_len: int, h_len: int, w_len: int, o: dict) -> torch.Tensor:
    """ComfyUI's WanModel.rope_encode positions under rope_options (lengths in patches, t_start 0), transcribed."""
    steps_t, steps_h, steps_w = t_len, h_len, w_len
    t_len = (t_len - 1.0) * o["scale_t"] + 1.0
    h_len = (h_len - 1.0) * o["scale_y"] + 1.0
    w_len = (w_len - 1.0) * o["scale_x"] + 1.0
    t_start, h_start, w_start = 0 + o["shift_t"], 0 + o["shift_y"], 0 + o["shift_x"]
    ids = torch.zeros((steps_t, steps_h, steps_w, 3), dtype=torch.float32)
    ids[..., 0] += torch.linspace(t_start, t_start + (t_len - 1), steps=steps_t).reshape(-1, 1, 1)
    ids[..., 1] += torch.linspace(h_start, h_start + (h_len - 1), steps=steps_h).reshape(1, -1, 1)
    ids[..., 2] += torch.linspace(w_start, w_start + (w_len - 1), steps=steps_w).reshape(1, 1, -1)
    return ids.reshape(-1, 3)


def flux_inputs(unet) -> dict:
    g = torch.Generator().manual_seed(0)
    c = unet.config
    return {"x": torch.randn(1, 16, 8, 12, generator=g), "timesteps": torch.tensor([0.6]),
            "context": torch.randn(1, 5, c.context_dim, generator=g),
            "y": torch.cat([torch.randn(1, c.vec_in_dim, generator=g), torch.tensor([[3.5]])], dim=1)}


def flux2_inputs(unet) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(1, 128, 3, 5, generator=g), "timesteps": torch.tensor([0.7]),
            "context": torch.randn(1, 6, unet.config.context_dim, generator=g), "y": torch.tensor([[4.0]])}


def wan_inputs(unet) -> dict:
    g = torch.Generator().manual_seed(1)
    c = unet.config
    return {"x": torch.randn(1, c.in_dim, 3, 8, 6, generator=g), "timesteps": torch.tensor([0.4]),
            "context": torch.randn(1, 7, c.text_dim, generator=g)}


def test_declaration_is_comfyuis(engine):
    info = engine.registry.object_info()["ScaleROPE"]
    assert info["category"] == "advanced/model_patches"
    assert info["description"] == "Scale and shift the ROPE of the model."
    required = info["input"]["required"]
    assert list(required) == ["model", "scale_x", "shift_x", "scale_y", "shift_y", "scale_t", "shift_t"]
    for axis in "xyt":
        scale, shift = required[f"scale_{axis}"][1], required[f"shift_{axis}"][1]
        assert (scale["default"], scale["min"], scale["max"], scale["step"]) == (1.0, 0.0, 100.0, 0.1)
        assert (shift["default"], shift["min"], shift["max"], shift["step"]) == (0.0, -256.0, 256.0, 0.1)
        assert scale["advanced"] is True and shift["advanced"] is True
    assert info["output"] == ["MODEL"]


@pytest.mark.parametrize("unet_name, inputs", [("flux1-tiny-dev.safetensors", flux_inputs),
                                               ("flux2-tiny.safetensors", flux2_inputs),
                                               ("wan-tiny.safetensors", wan_inputs)])
def test_defaults_leave_the_output_bit_identical(engine, unet_name, inputs):
    loaded, patched = scaled(engine, unet_name, IDENTITY)
    assert patched.unet is not loaded.unet
    args = inputs(loaded.unet)
    with torch.no_grad():
        assert torch.equal(patched.unet(**args), loaded.unet(**args))


def test_flux_positions_are_comfyuis(engine, monkeypatch):
    loaded, patched = scaled(engine, "flux1-tiny-dev.safetensors", SCALED)
    args = flux_inputs(loaded.unet)
    reference = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(2))
    out, ids = recorded_positions(monkeypatch, ldm.flux,
                                  lambda: patched.unet(**args, ref_latents=References((reference,))))
    text = args["context"].shape[1]
    assert torch.equal(ids[:text], torch.zeros(text, 3))  # text tokens stay at 0, as in ComfyUI
    # The noisy latent's 4 x 6 patches, then Kontext's reference of 3 x 2 at index 1 (the "offset" method).
    torch.testing.assert_close(ids[text:text + 24], comfy_flux_img_ids(4, 6, SCALED), rtol=0, atol=0)
    torch.testing.assert_close(ids[text + 24:], comfy_flux_img_ids(3, 2, SCALED, index=1), rtol=0, atol=0)
    assert ids[text + 1, 2].item() == pytest.approx(3.5) and ids[text + 6, 1].item() == pytest.approx(0.2)

    with torch.no_grad():
        plain = loaded.unet(**args, ref_latents=References((reference,)))
    assert not torch.allclose(out, plain, atol=1e-4)
    assert loaded.unet.rope_scale is None  # the loaded model is left as it was


def test_flux2_positions_are_comfyuis(engine, monkeypatch):
    """FLUX.2 runs ComfyUI's Flux process_img on its 1 x 1 patches, the fourth (text) axis left at 0; a reference
    by the "index" method at time 10."""
    loaded, patched = scaled(engine, "flux2-tiny.safetensors", SCALED)
    args = flux2_inputs(loaded.unet)
    reference = torch.randn(1, 128, 2, 2, generator=torch.Generator().manual_seed(4))
    out, ids = recorded_positions(monkeypatch, ldm.flux2, lambda: patched.unet(**args, ref_latents=[reference]))
    text = args["context"].shape[1]
    assert torch.equal(ids[:text, 3], torch.arange(text, dtype=torch.float32)) and not ids[:text, :3].any()
    assert not ids[text:, 3].any()
    torch.testing.assert_close(ids[text:text + 15, :3], comfy_flux_img_ids(3, 5, SCALED), rtol=0, atol=0)
    torch.testing.assert_close(ids[text + 15:, :3], comfy_flux_img_ids(2, 2, SCALED, index=10), rtol=0, atol=0)
    with torch.no_grad():
        plain = loaded.unet(**args, ref_latents=[reference])
    assert not torch.allclose(out, plain, atol=1e-4)


def test_wan_positions_are_comfyuis(engine, monkeypatch):
    loaded, patched = scaled(engine, "wan-tiny.safetensors", SCALED)
    args = wan_inputs(loaded.unet)
    out, ids = recorded_positions(monkeypatch, ldm.wan, lambda: patched.unet(**args))
    # 3 frames of 4 x 3 patches (Wan's 1 x 2 x 2 patch).
    torch.testing.assert_close(ids, comfy_wan_ids(3, 4, 3, SCALED), rtol=0, atol=0)
    assert ids[-1].tolist() == pytest.approx([0.75 + 2 * 2.5, -1.5 + 3 * 1.7, 3.0 + 2 * 0.5])
    with torch.no_grad():
        plain = loaded.unet(**args)
    assert not torch.allclose(out, plain, atol=1e-4)
    assert loaded.unet.rope_scale is None


def test_a_model_loom_cannot_scale_is_refused(engine):
    nodes = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "2": {"class_type": "ScaleROPE", "inputs": {"model": ["1", 0], **SCALED}},
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    result = engine.run(parse_api(nodes), keep=["2"])
    assert not result.ok
    message = str(result.error)
    assert "ScaleROPE" in message and "UNetModel" in message and "Flux" in message
