"""Z-Image end to end on tiny random files in the real layouts (`ldm.z_image_presets`): ComfyUI's Z-Image-Turbo
workflow (UNETLoader, VAELoader with Flux's VAE, ModelSamplingAuraFlow at 3, EmptySD3LatentImage, KSampler with
euler / simple at cfg 1, ConditioningZeroOut for the negative) against an Euler flow loop over diffusers'
ZImageTransformer2DModel with the same weights, prompt, noise and levels. The prompt states (Qwen3-4B's, 32 wide
here, with padding the mask marks) come from a test node, so that the mask's route is checked on its own; the last
test encodes the prompt with CLIPLoader type lumina2 (`ldm.qwen3_text`) instead."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import UNET_PREFIX
from ldm.flux_files import FLUX_VAE, LATENT_SHIFT
from ldm.sampling import prepare_noise
from ldm.z_image_files import TINY_Z_IMAGE, load_z_image_unet, write_tiny_z_image
from ldm.z_image_presets import make_z_image_files
from nodes.folders import FolderPaths, set_paths
from nodes.node import Node
from nodes.registry import builtin_registry
from nodes.spec import Int, Output

WIDTH, HEIGHT, SEED, STEPS, SHIFT = 64, 48, 6, 3, 3.0
TOKENS, REAL = 12, 9  # the prompt: 12 states, the last 3 padding


def prompt_states() -> tuple[torch.Tensor, torch.Tensor]:
    states = torch.randn(1, TOKENS, TINY_Z_IMAGE.cap_feat_dim, generator=torch.Generator().manual_seed(3))
    return states, torch.tensor([[1] * REAL + [0] * (TOKENS - REAL)])


class ZImagePromptStates(Node):
    """Seeded Qwen3-4B-like prompt states with their attention mask, as helper (9)'s CLIPTextEncode makes them."""

    seed = Int(0, min=0, max=100)
    outputs = (Output("CONDITIONING"),)

    def execute(self, seed: int) -> tuple[list]:
        states, mask = prompt_states()
        return ([(states, {"attention_mask": mask})],)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("z_image")
    files = make_z_image_files(root / "models", seed=2, dtype=torch.float32)
    files["prefixed"] = write_tiny_z_image(root / "models" / "diffusion_models" / "z_image_prefixed.safetensors",
                                           seed=2, dtype=torch.float32, prefix=UNET_PREFIX)
    paths = FolderPaths(base=root)
    set_paths(paths)
    registry = builtin_registry()
    registry.register_all([ZImagePromptStates], "tests")
    yield Executor(registry, services=Services.create(paths)), files
    set_paths(FolderPaths())


def workflow(unet: str, vae: str, cfg: float = 1.0, sampler: str = "euler") -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": SHIFT}},
        "5": {"class_type": "ZImagePromptStates", "inputs": {"seed": 0}},
        "6": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["5", 0]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": cfg, "sampler_name": sampler,
            "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def run(engine: Executor, doc: dict, keep: tuple[str, ...]) -> list:
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def reference_latent(unet_path, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Euler over diffusers' transformer at ComfyUI's `simple` levels of 1000 SD3-shifted ones (shift 3): from
    pure noise, x += (next - sigma) * velocity, the velocity as ZImagePipeline takes it; then Flux's latent out."""
    from tests.ldm.test_z_image import diffusers_twin, pipeline_call

    twin = diffusers_twin(load_z_image_unet(unet_path, dtype=torch.float32).unet)
    ts = [1 - int(i * 1000 / STEPS) / 1000 for i in range(STEPS)]
    sigmas = [SHIFT * t / (1 + (SHIFT - 1) * t) for t in ts] + [0.0]
    x = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    with torch.no_grad():
        for sigma, following in zip(sigmas, sigmas[1:], strict=False):
            x = x + (following - sigma) * pipeline_call(twin, x, torch.tensor([sigma]), states, mask)
    return x / FLUX_VAE.scaling_factor + LATENT_SHIFT


@pytest.mark.parametrize("unet", ["unet", "prefixed"])  # Comfy-Org's bare keys; `model.diffusion_model.` ones
def test_workflow_matches_an_euler_loop_over_diffusers(base, unet) -> None:
    engine, files = base
    latent, image = run(engine, workflow(files[unet].name, files["vae"].name), ("8", "9"))
    expected = reference_latent(files[unet], *prompt_states())
    assert latent["samples"].shape == (1, 16, HEIGHT // 8, WIDTH // 8) and expected.std() > 0.1
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and image.std() > 0.01


def test_cfg_and_res_multistep_run(base) -> None:
    """Z-Image (not Turbo) runs with cfg above 1, which brings in the negative; Turbo's workflow's res_multistep."""
    engine, files = base
    plain = run(engine, workflow(files["unet"].name, files["vae"].name), ("8",))[0]["samples"]
    guided = run(engine, workflow(files["unet"].name, files["vae"].name, cfg=2.5), ("8",))[0]["samples"]
    multistep = run(engine, workflow(files["unet"].name, files["vae"].name, sampler="res_multistep"), ("8",))[0]
    assert not torch.allclose(plain, guided) and torch.isfinite(guided).all()
    assert torch.isfinite(multistep["samples"]).all() and not torch.allclose(plain, multistep["samples"])


def test_unet_loader_reads_the_family_from_the_header(base) -> None:
    from nodes.sd.part_loaders import UNETLoader

    facts = UNETLoader.output_facts({"unet_name": base[1]["unet"].name, "weight_dtype": "default"}, {})
    assert facts == {0: {"family": "z_image"}}


def test_text_encoder_chain(base) -> None:
    """CLIPLoader type lumina2 (Qwen3-4B, `ldm.qwen3_text`) -> CLIPTextEncode -> KSampler: the prompt's states and
    attention mask reach the transformer as diffusers' loop takes them."""
    engine, files = base
    doc = workflow(files["unet"].name, files["vae"].name)
    doc["2"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": files["qwen3"].name, "type": "lumina2"}}
    doc["5"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red fox in the snow"}}
    latent, positive = run(engine, doc, ("8", "5"))
    states, options = positive[0]
    assert states.shape[-1] == TINY_Z_IMAGE.cap_feat_dim
    mask = options.get("attention_mask", torch.ones(states.shape[:2]))
    expected = reference_latent(files["unet"], states.float(), mask)
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
