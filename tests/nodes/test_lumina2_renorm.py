"""Lumina Image 2.0's RenormCFG (`ldm.sampling.model_patches.RenormCFG`, the node in nodes.sd.lumina2) against the
reference's formula written out per image (Lumina-Image-2.0's `forward_with_cfg` as ComfyUI's node applies it to x0
predictions at sigma), and in the tiny Lumina 2 workflow of tests/nodes/test_lumina2_nodes.py; LoRAs through
LoraLoader / LoraLoaderModelOnly on the same workflow."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from graph.document import parse_api
from graph.validate import validate
from ldm.lora import apply_lora, lora_from_state_dict
from ldm.lora_lumina2 import diffusers_name
from ldm.lumina2_files import TINY_LUMINA2, load_lumina2_checkpoint
from ldm.sampling.model_patches import CfgArgs, RenormCFG
from tests.nodes.test_lumina2_nodes import base, run, workflow  # noqa: F401  (`base`: the module's fixture)


def reference(x0_cond: torch.Tensor, x0_uncond: torch.Tensor | None, sigma: torch.Tensor, cfg: float,
              cfg_trunc: float, renorm_cfg: float) -> torch.Tensor:
    """The reference's rule one image at a time: guide below `cfg_trunc`, then scale the guided prediction down to
    `renorm_cfg` times the positive one's norm where it is larger (0: no cap)."""
    out = []
    for i in range(x0_cond.shape[0]):
        cond = x0_cond[i]
        uncond = torch.zeros_like(cond) if x0_uncond is None else x0_uncond[i]
        if float(sigma[i]) < cfg_trunc:
            guided = uncond + cfg * (cond - uncond)
            if renorm_cfg > 0:
                largest = cond.norm() * renorm_cfg
                if guided.norm() >= largest:
                    guided = guided * (largest / guided.norm())
        else:
            guided = cond
        out.append(guided)
    return torch.stack(out)


@pytest.mark.parametrize("cfg_trunc", [0.0, 0.35, 0.7, 100.0])
@pytest.mark.parametrize("renorm_cfg", [0.0, 0.5, 1.0, 1.3, 4.0])
def test_matches_the_reference_formula(cfg_trunc: float, renorm_cfg: float) -> None:
    g = torch.Generator().manual_seed(int(cfg_trunc * 10 + renorm_cfg * 100))
    x = torch.randn(4, 16, 6, 5, generator=g)
    cond, uncond = torch.randn(4, 16, 6, 5, generator=g), torch.randn(4, 16, 6, 5, generator=g)
    sigma = torch.tensor([0.9, 0.6, 0.3, 0.05])  # items at several levels: each on its own side of cfg_trunc
    for cfg in (1.0, 4.0):
        ours = RenormCFG(cfg_trunc, renorm_cfg)(CfgArgs(x, sigma, cond, uncond, cfg))
        expected = reference(cond, uncond, sigma, cfg, cfg_trunc, renorm_cfg)
        error = (ours - expected).abs().max().item()
        assert error < 1e-5, error
    # without a negative prediction (cfg 1) the positive one, capped: the reference's zeros for the missing side
    alone = RenormCFG(cfg_trunc, renorm_cfg)(CfgArgs(x, sigma, cond, None, 1.0))
    torch.testing.assert_close(alone, reference(cond, None, sigma, 1.0, cfg_trunc, renorm_cfg))


def test_cap_and_threshold_act_as_said() -> None:
    g = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(2, 16, 4, 4, generator=g) for _ in range(3))
    sigma = torch.tensor([0.8, 0.2])
    plain = uncond + 5.0 * (cond - uncond)
    # renorm 0, every level guided: plain CFG
    torch.testing.assert_close(RenormCFG(100.0, 0.0)(CfgArgs(x, sigma, cond, uncond, 5.0)), plain)
    capped = RenormCFG(100.0, 1.0)(CfgArgs(x, sigma, cond, uncond, 5.0))
    norms = capped.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, cond.flatten(1).norm(dim=1))  # cfg 5 overshoots: capped to the positive's
    torch.testing.assert_close(capped / norms[:, None, None, None], plain / plain.flatten(1).norm(dim=1)[
        :, None, None, None])  # the direction kept
    # the item above the threshold takes the positive prediction alone
    split = RenormCFG(0.5, 0.0)(CfgArgs(x, sigma, cond, uncond, 5.0))
    torch.testing.assert_close(split[0], cond[0])
    torch.testing.assert_close(split[1], plain[1])
    zeros = torch.zeros_like(cond)  # both norms 0: no 0 / 0
    assert torch.isfinite(RenormCFG(100.0, 1.0)(CfgArgs(x, sigma, zeros, zeros, 5.0))).all()


def _renormed(checkpoint: str, cfg_trunc: float, renorm_cfg: float, cfg: float | None = None) -> dict:
    doc = workflow(checkpoint)
    doc["20"] = {"class_type": "RenormCFG", "inputs": {"model": ["2", 0], "cfg_trunc": cfg_trunc,
                                                       "renorm_cfg": renorm_cfg}}
    doc["6"]["inputs"]["model"] = ["20", 0]
    if cfg is not None:
        doc["6"]["inputs"]["cfg"] = cfg
    return doc


def test_workflow_with_renorm_cfg(base) -> None:  # noqa: F811
    engine, files = base
    name = files["checkpoint"].name
    assert not validate(parse_api(_renormed(name, 100.0, 1.0)), engine.registry).problems
    [plain] = run(engine, workflow(name), ("6",))
    [capped, image] = run(engine, _renormed(name, 100.0, 1.0), ("6", "7"))
    [uncapped] = run(engine, _renormed(name, 100.0, 0.0), ("6",))
    [never] = run(engine, _renormed(name, 0.0, 1.0, cfg=3.0), ("6",))
    [positive_only] = run(engine, _renormed(name, 0.0, 0.0, cfg=1.0), ("6",))
    assert torch.isfinite(capped["samples"]).all() and image.shape[-1] == 3
    # no cap and every level guided: plain CFG; a cap of 1 changes it
    torch.testing.assert_close(uncapped["samples"], plain["samples"], rtol=1e-5, atol=1e-5)
    assert (capped["samples"] - plain["samples"]).abs().max() > 1e-3
    # cfg_trunc 0 never guides: the positive prediction alone, capped to its own norm (cfg 1 with renorm 1: itself)
    torch.testing.assert_close(never["samples"], positive_only["samples"], rtol=1e-5, atol=1e-5)


def tiny_lora(path, seed: int = 1) -> dict:
    """A PEFT-layout LoRA (diffusers' Lumina 2 names, q / k / v apart) on every attention and feed-forward of the
    tiny model; also saved at `path`."""
    g, sd = torch.Generator().manual_seed(seed), {}
    c = TINY_LUMINA2
    kv = c.num_kv_heads * c.head_dim
    for block in [f"layers.{i}" for i in range(c.num_layers)] + ["noise_refiner.0", "context_refiner.0"]:
        shapes = {f"{block}.attn.to_q": c.dim, f"{block}.attn.to_k": kv, f"{block}.attn.to_v": kv,
                  diffusers_name(f"{block}.attention.out"): c.dim}
        for name, out in shapes.items():
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, c.dim, generator=g) * 0.3
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out, 2, generator=g) * 0.3
    save_file(sd, path)
    return sd


@pytest.mark.parametrize("loader", ["LoraLoader", "LoraLoaderModelOnly"])
def test_lora_loaders_patch_lumina2(base, loader: str) -> None:  # noqa: F811
    engine, files = base
    name = files["checkpoint"].name
    lora_dir = files["checkpoint"].parent.parent / "loras"
    lora_dir.mkdir(exist_ok=True)
    sd = tiny_lora(lora_dir / "lumina2-tiny-lora.safetensors")
    doc = _renormed(name, 100.0, 1.0)
    inputs = {"model": ["1", 0], "lora_name": "lumina2-tiny-lora.safetensors", "strength_model": 0.7}
    if loader == "LoraLoader":
        inputs |= {"clip": ["1", 1], "strength_clip": 1.0}
        doc["3"]["inputs"]["clip"] = ["30", 1]  # the text encoder takes no LoRA: passed through
    doc["30"] = {"class_type": loader, "inputs": inputs}
    doc["2"]["inputs"]["model"] = ["30", 0]
    assert not validate(parse_api(doc), engine.registry).problems
    patched, latent = run(engine, doc, ("30", "6"))
    [without] = run(engine, _renormed(name, 100.0, 1.0), ("6",))
    assert torch.isfinite(latent["samples"]).all()
    assert (latent["samples"] - without["samples"]).abs().max() > 1e-3
    unet = load_lumina2_checkpoint(files["checkpoint"], dtype=torch.float32).unet
    expected = apply_lora(unet, lora_from_state_dict(sd), 0.7).state_dict()
    ours = patched.unet.state_dict()
    assert max((ours[k].float() - v).abs().max().item() for k, v in expected.items()) < 1e-6
