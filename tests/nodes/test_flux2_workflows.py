"""FLUX.2 end to end on tiny random files in the real layouts (`ldm.flux2_files`, `ldm.flux2_vae`): ComfyUI's FLUX.2
graphs (UNETLoader, VAELoader, EmptyFlux2LatentImage, Flux2Scheduler, RandomNoise, KSamplerSelect euler, CFGGuider for
klein, BasicGuider with FluxGuidance for dev, SamplerCustomAdvanced, VAEDecode; ReferenceLatent for editing) against an
Euler flow loop over diffusers' Flux2Transformer2DModel with the same weights, prompt, noise and levels. The prompt
states come from a test node (the text encoders have their own tests), zero-padded at the front to 512 tokens as
ComfyUI's FLUX.2 takes them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.flux2_files import TINY_FLUX2, TINY_FLUX2_KLEIN, load_flux2_unet, write_tiny_flux2
from ldm.flux2_vae import load_flux2_vae, write_tiny_flux2_vae
from ldm.sampling import prepare_noise
from ldm.sampling.flow import flux2_sigmas
from nodes.folders import FolderPaths, set_paths
from nodes.node import Node
from nodes.registry import builtin_registry
from nodes.spec import Int, Output

WIDTH, HEIGHT, SEED, STEPS, CFG, GUIDANCE = 96, 64, 6, 3, 2.0, 4.0
TOKENS = 7


def prompt_states() -> torch.Tensor:
    return torch.randn(1, TOKENS, TINY_FLUX2.context_dim, generator=torch.Generator().manual_seed(3))


class Flux2PromptStates(Node):
    """Seeded prompt states of the tiny transformers' width, as CLIPTextEncode with a FLUX.2 text encoder makes them."""

    seed = Int(0, min=0, max=100)
    outputs = (Output("CONDITIONING"),)

    def execute(self, seed: int) -> tuple[list]:
        return ([(prompt_states(), {})],)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    models = root / "models"
    files = {"klein": write_tiny_flux2(models / "diffusion_models" / "flux-2-klein-4b-tiny.safetensors", seed=2,
                                       dtype=torch.float32, config=TINY_FLUX2_KLEIN),
             "dev": write_tiny_flux2(models / "diffusion_models" / "flux2_dev-tiny.safetensors", seed=3,
                                     dtype=torch.float32),
             "vae": write_tiny_flux2_vae(models / "vae" / "flux2-vae-tiny.safetensors", seed=4)}
    paths = FolderPaths(base=root)
    set_paths(paths)
    registry = builtin_registry()
    registry.register_all([Flux2PromptStates], "tests")
    yield Executor(registry, services=Services.create(paths)), files
    set_paths(FolderPaths())


def workflow(unet: str, vae: str, dev: bool = False) -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "5": {"class_type": "Flux2PromptStates", "inputs": {"seed": 0}},
        "7": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "12": {"class_type": "Flux2Scheduler", "inputs": {"steps": STEPS, "width": WIDTH, "height": HEIGHT}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["10", 0], "guider": ["13", 0], "sampler": ["11", 0], "sigmas": ["12", 0],
            "latent_image": ["7", 0]}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["3", 0]}},
        "16": {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}},
    }
    if dev:  # ComfyUI's FLUX.2 [dev] graph: guidance-distilled, one prompt
        doc["6"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": GUIDANCE}}
        doc["13"] = {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["6", 0]}}
    else:  # klein's: real CFG against a zeroed negative
        doc["6"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["5", 0]}}
        doc["13"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["5", 0],
                                                           "negative": ["6", 0], "cfg": CFG}}
    return doc


def run(engine: Executor, doc: dict, keep: tuple[str, ...]) -> list:
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def padded(states: torch.Tensor) -> torch.Tensor:
    return F.pad(states, (0, 0, 512 - states.shape[1], 0))


def reference_latent(unet_path, dev: bool, refs: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """Euler over diffusers' transformer at Flux2Scheduler's levels from the seeded noise: x += (next - sigma) *
    velocity, the velocity as Flux2Pipeline takes it (klein: CFG against zeros; dev: the guidance embedding)."""
    from tests.ldm.test_flux2 import diffusers_twin, pipeline_call

    twin = diffusers_twin(load_flux2_unet(unet_path, dtype=torch.float32).unet)
    sigmas = flux2_sigmas(STEPS, WIDTH, HEIGHT).tolist()
    x = prepare_noise(torch.zeros(1, 128, HEIGHT // 16, WIDTH // 16), SEED)
    positive = padded(prompt_states())
    with torch.no_grad():
        for sigma, following in zip(sigmas, sigmas[1:], strict=False):
            t = torch.tensor([sigma])
            if dev:
                v = pipeline_call(twin, x, t, positive, torch.tensor([GUIDANCE]), refs)
            else:
                cond, uncond = (pipeline_call(twin, x, t, c, None, refs) for c in (positive, 0 * positive))
                v = uncond + CFG * (cond - uncond)
            x = x + (following - sigma) * v
    return x


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_workflow_matches_an_euler_loop_over_diffusers(base, variant) -> None:
    engine, files = base
    latent, image = run(engine, workflow(files[variant].name, files["vae"].name, dev=variant == "dev"), ("14", "15"))
    expected = reference_latent(files[variant], dev=variant == "dev")
    assert latent["samples"].shape == (1, 128, HEIGHT // 16, WIDTH // 16) and expected.std() > 0.1
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and image.std() > 0.01


def test_reference_latents_edit_as_flux2_pipeline_places_them(base) -> None:
    """ComfyUI's FLUX.2 edit graph: VAEEncode of the reference picture -> ReferenceLatent on both prompts; the
    transformer sees the reference's tokens at time index 10, as Flux2Pipeline places its first image."""
    engine, files = base
    doc = workflow(files["klein"].name, files["vae"].name)
    picture = torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(5))
    doc["20"] = {"class_type": "Flux2TestPicture", "inputs": {}}
    doc["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["3", 0]}}
    doc["22"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["5", 0], "latent": ["21", 0]}}
    doc["23"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["21", 0]}}
    doc["13"]["inputs"].update({"positive": ["22", 0], "negative": ["23", 0]})
    registry_node = type("Flux2TestPicture", (Node,), {"outputs": (Output("IMAGE"),),
                                                       "execute": lambda self: (picture,)})
    engine.registry.register_all([registry_node], "tests")
    latent, = run(engine, doc, ("14",))
    vae = load_flux2_vae(files["vae"])
    with torch.no_grad():
        reference = vae.encode(picture.movedim(-1, 1) * 2 - 1).mode()
    expected = reference_latent(files["klein"], dev=False, refs=(reference,))
    plain, = run(engine, workflow(files["klein"].name, files["vae"].name), ("14",))
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert (latent["samples"] - plain["samples"]).abs().max() > 1e-3


def kv_reference_latent(unet_path, refs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The Euler loop of `reference_latent` for klein over diffusers' transformer as Flux2KleinKVPipeline runs it:
    the references' keys and values extracted at the first step, one cache per prompt, reused after."""
    from tests.ldm.test_flux2_kv import kv_pipeline_calls, kv_twin

    twin = kv_twin(load_flux2_unet(unet_path, dtype=torch.float32).unet)
    sigmas = flux2_sigmas(STEPS, WIDTH, HEIGHT).tolist()
    x = prepare_noise(torch.zeros(1, 128, HEIGHT // 16, WIDTH // 16), SEED)
    positive = padded(prompt_states())
    with torch.no_grad():
        # kv_pipeline_calls runs every level on one latent; the loop needs each step's own, so it replays the
        # calls so far, which with the cache reused gives the same velocities.
        for step, (sigma, following) in enumerate(zip(sigmas, sigmas[1:], strict=False)):
            levels = [torch.tensor([s]) for s in sigmas[:step + 1]]
            cond, uncond = (kv_pipeline_calls(twin, x, levels, c, refs)[-1] for c in (positive, 0 * positive))
            x = x + (following - sigma) * (uncond + CFG * (cond - uncond))
    return x


def test_flux_kv_cache_samples_as_the_klein_kv_pipeline(base, monkeypatch) -> None:
    """Comfy-Org's klein 9B KV edit graph: FluxKVCache on the model, ReferenceLatent on both prompts. The references
    are modulated at timestep 0 and attend only to themselves; their tokens go through the transformer at the first
    step only (one batched call for both prompts), the cached keys and values after."""
    from ldm.flux2 import Flux2

    engine, files = base
    doc = workflow(files["klein"].name, files["vae"].name)
    picture = torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(5))
    engine.registry.register_all([type("Flux2KVPicture", (Node,), {"outputs": (Output("IMAGE"),),
                                                                  "execute": lambda self: (picture,)})], "tests")
    doc["20"] = {"class_type": "Flux2KVPicture", "inputs": {}}
    doc["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["3", 0]}}
    doc["22"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["5", 0], "latent": ["21", 0]}}
    doc["23"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["21", 0]}}
    doc["24"] = {"class_type": "FluxKVCache", "inputs": {"model": ["1", 0]}}
    doc["13"]["inputs"].update({"model": ["24", 0], "positive": ["22", 0], "negative": ["23", 0]})
    built = []
    reference_tokens = Flux2._reference_tokens
    monkeypatch.setattr(Flux2, "_reference_tokens", lambda self, *a: built.append(a[1]) or reference_tokens(self, *a))
    latent, = run(engine, doc, ("14",))
    assert built == [2]  # the first step's call, both prompts in one batch
    vae = load_flux2_vae(files["vae"])
    with torch.no_grad():
        reference = vae.encode(picture.movedim(-1, 1) * 2 - 1).mode()
    torch.testing.assert_close(latent["samples"], kv_reference_latent(files["klein"], (reference,)),
                               rtol=1e-4, atol=1e-4)
    doc["13"]["inputs"]["model"] = ["1", 0]
    without, = run(engine, doc, ("14",))
    assert len(built) == 1 + STEPS and (latent["samples"] - without["samples"]).abs().max() > 1e-3


def test_flux_kv_cache_refuses_other_models(base) -> None:
    """A MODEL of another family is refused when the graph is checked, by name."""
    from executor.executor import WorkflowInvalid
    from ldm.presets import make_checkpoint

    engine, files = base
    make_checkpoint("tiny-sd1", files["vae"].parent.parent / "checkpoints" / "sd1.safetensors", seed=1)
    doc = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
           "2": {"class_type": "FluxKVCache", "inputs": {"model": ["1", 0]}},
           "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    refusal = r"FluxKVCache is for FLUX.2 models \(klein 9B KV\); the MODEL linked is SD1"
    with pytest.raises(WorkflowInvalid, match=refusal):
        engine.run(parse_api(doc))


def test_a_prompt_of_another_width_is_refused_by_name(base) -> None:
    engine, files = base
    doc = workflow(files["klein"].name, files["vae"].name)
    doc["5"] = {"class_type": "Flux2WidePrompt", "inputs": {}}
    wide = type("Flux2WidePrompt", (Node,), {"outputs": (Output("CONDITIONING"),),
                                             "execute": lambda self: ([(torch.zeros(1, 5, 4096), {})],)})
    engine.registry.register_all([wide], "tests")
    result = engine.run(parse_api(doc), keep=["14"])
    assert not result.ok
    assert "encoded 4096 wide, and the model flux-2-klein-4b-tiny.safetensors (FLUX2) takes 24: encode it with the " \
           "model's FLUX.2 text encoder (CLIPLoader type flux2" in str(result.error)


def test_unet_loader_reads_the_family_from_the_header(base) -> None:
    from nodes.sd.part_loaders import UNETLoader

    for variant in ("klein", "dev"):
        facts = UNETLoader.output_facts({"unet_name": base[1][variant].name, "weight_dtype": "default"}, {})
        assert facts == {0: {"family": "flux2"}}


@pytest.mark.parametrize(("part", "kind"), [("qwen3", "qwen3_4b"), ("mistral", "mistral3_24b")])
def test_clip_loader_type_flux2_encodes_as_the_text_encoder_does(tmp_path, part, kind) -> None:
    """CLIPLoader type flux2 -> CLIPTextEncode gives the encoder's states (klein's Qwen3 padded to 512 tokens, dev's
    Mistral unpadded), which the sampler then pads at the front; the file's kind is read from its header."""
    from ldm.flux2_presets import make_flux2_files
    from ldm.flux2_text import load_flux2_text_encoder
    from nodes.sd.part_loaders import CLIPLoader

    files = make_flux2_files(tmp_path / "models", seed=1, dtype=torch.float32)
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    try:
        engine = Executor(builtin_registry(), services=Services.create(paths))
        doc = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": files[part].name, "type": "flux2"}},
               "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": "a red fox in the snow"}},
               "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
        [[(states, _)]] = run(engine, doc, ("2",))
        assert CLIPLoader.check_inputs(doc["1"]["inputs"]) is None
        assert CLIPLoader.output_facts(doc["1"]["inputs"], {}) == {0: {"family": "flux2"}}
        wrong = CLIPLoader.check_inputs({"clip_name": files[part].name, "type": "wan"})
        assert wrong.startswith(f"{files[part].name} holds {kind}; type wan takes one UMT5-XXL")
    finally:
        set_paths(FolderPaths())
    expected = load_flux2_text_encoder([files[part]]).encoder.encode(["a red fox in the snow"]).cond
    assert states.shape[-1] == TINY_FLUX2.context_dim and states.shape[1] == (512 if part == "qwen3" else
                                                                               expected.shape[1])
    torch.testing.assert_close(states, expected, rtol=1e-5, atol=1e-5)

