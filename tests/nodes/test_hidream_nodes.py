"""HiDream-I1 end to end on tiny random files in the real layouts (`ldm.hidream_presets`): ComfyUI's HiDream graph
(UNETLoader, QuadrupleCLIPLoader, ModelSamplingSD3, CLIPTextEncode for both prompts, EmptySD3LatentImage, KSampler
with euler / simple, VAEDecode) against an Euler flow loop over diffusers' HiDreamImageTransformer2DModel with the same
weights, prompt states, noise and levels; CLIPTextEncodeHiDream's four texts; and the refusals a wrong graph gets."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.flux_files import FLUX_VAE, LATENT_SHIFT
from ldm.hidream_files import load_hidream_unet
from ldm.hidream_presets import make_hidream_files
from ldm.hidream_text import LLAMA_KEY, load_hidream_text_encoder
from ldm.presets import make_checkpoint
from ldm.sampling import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

WIDTH, HEIGHT, SEED, STEPS, SHIFT, CFG = 64, 48, 6, 3, 6.0, 3.0
POSITIVE, NEGATIVE = "a red fox sitting in fresh snow", "blurry"
TEXT_PARTS = ("clip_l", "clip_g", "t5xxl", "llama")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hidream")
    files = make_hidream_files(root / "models", seed=2, dtype=torch.float32)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), files
    set_paths(FolderPaths())


def workflow(files: dict) -> dict:
    """Comfy-Org's HiDream-I1 template's graph (dev: shift 6), at a tiny size and with real CFG."""
    # the text encoders in another order than the loader's: it tells them apart by their contents
    clips = {f"clip_name{i}": files[part].name for i, part in enumerate(("llama", "t5xxl", "clip_l", "clip_g"), 1)}
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"].name, "weight_dtype": "default"}},
        "2": {"class_type": "QuadrupleCLIPLoader", "inputs": clips},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"].name}},
        "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": SHIFT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": POSITIVE}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": NEGATIVE}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def run(engine: Executor, doc: dict, keep: tuple[str, ...]) -> list:
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def test_workflow_matches_an_euler_loop_over_diffusers(base) -> None:
    """The prompts as HiDream's text encoder gives them (matched against diffusers' HiDreamImagePipeline in
    tests/ldm/test_hidream_text.py): T5's states as the context, the pooled CLIP-L and CLIP-G prompts as `y`, Llama's
    states of every layer beside them; the loop's velocity as HiDreamImagePipeline takes it, SD3's shifted levels."""
    from tests.ldm.test_hidream import diffusers_twin, pipeline_call

    engine, files = base
    latent, positive, negative, image = run(engine, workflow(files), ("8", "5", "6", "9"))
    encoder = load_hidream_text_encoder([files[part] for part in TEXT_PARTS], dtype=torch.float32).encoder
    prompts = {}
    for side, text, conditioning in (("positive", POSITIVE, positive), ("negative", NEGATIVE, negative)):
        [(states, options)] = conditioning
        expected = encoder.encode([text])
        torch.testing.assert_close(states, expected.cond.float())
        torch.testing.assert_close(options["pooled_output"], expected.pooled.float())
        torch.testing.assert_close(options[LLAMA_KEY], expected.extra[LLAMA_KEY].float())
        prompts[side] = (states, options["pooled_output"], options[LLAMA_KEY])
    twin = diffusers_twin(load_hidream_unet(files["unet"], dtype=torch.float32).unet)
    ts = [1 - int(i * 1000 / STEPS) / 1000 for i in range(STEPS)]
    sigmas = [SHIFT * t / (1 + (SHIFT - 1) * t) for t in ts] + [0.0]
    x = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    with torch.no_grad():
        for sigma, following in zip(sigmas, sigmas[1:], strict=False):
            t = torch.tensor([sigma])
            cond, uncond = (pipeline_call(twin, x, t, *prompts[side]) for side in ("positive", "negative"))
            x = x + (following - sigma) * (uncond + CFG * (cond - uncond))
    expected = x / FLUX_VAE.scaling_factor + LATENT_SHIFT
    assert latent["samples"].shape == (1, 16, HEIGHT // 8, WIDTH // 8) and expected.std() > 0.1
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and image.std() > 0.01


def test_clip_text_encode_hidream_gives_each_encoder_its_text(base) -> None:
    engine, files = base
    doc = workflow(files)
    texts = {"clip_l": "a fox", "clip_g": "a red fox", "t5xxl": "a red fox in snow", "llama": "a red fox in the snow"}
    doc["5"] = {"class_type": "CLIPTextEncodeHiDream", "inputs": {"clip": ["2", 0], **texts}}
    [(states, options)], = run(engine, doc, ("5",))
    encoder = load_hidream_text_encoder([files[part] for part in TEXT_PARTS], dtype=torch.float32).encoder
    expected = encoder.encode(["a fox"], per_encoder={k: [v] for k, v in texts.items()})
    torch.testing.assert_close(states, expected.cond.float())
    torch.testing.assert_close(options["pooled_output"], expected.pooled.float())
    torch.testing.assert_close(options[LLAMA_KEY], expected.extra[LLAMA_KEY].float())
    plain = encoder.encode(["a fox"])
    assert (options[LLAMA_KEY] - plain.extra[LLAMA_KEY].float()).abs().max() > 1e-3


def test_zeroed_negative_zeroes_the_llama_states_too(base) -> None:
    """ConditioningZeroOut, the usual empty negative prompt: T5's states, the pooled prompt and Llama's all zero."""
    engine, files = base
    doc = workflow(files)
    doc["6"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["5", 0]}}
    [(states, options)], latent = run(engine, doc, ("6", "8"))
    assert not states.any() and not options["pooled_output"].any() and not options[LLAMA_KEY].any()
    assert torch.isfinite(latent["samples"]).all()


def test_wrong_graphs_are_refused_by_name(base) -> None:
    engine, files = base
    doc = workflow(files)
    doc["2"]["inputs"]["clip_name2"] = files["clip_l"].name  # two CLIP-Ls and no T5
    with pytest.raises(WorkflowInvalid, match="QuadrupleCLIPLoader takes HiDream's CLIP-L .clip_l., CLIP-G .clip_g., "
                                              "T5-XXL .t5xxl. and Llama 3.1 8B .llama3."):
        engine.run(parse_api(doc))
    doc = workflow(files)  # an SD1 prompt for the HiDream model
    doc["11"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    doc["6"]["inputs"]["clip"] = ["11", 1]
    result = engine.run(parse_api(doc), keep=["8"])
    assert not result.ok and "the negative prompt was encoded 32 wide" in str(result.error)
    doc = workflow(files)  # CLIPTextEncodeHiDream with another family's CLIP
    doc["11"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    doc["5"] = {"class_type": "CLIPTextEncodeHiDream", "inputs": {"clip": ["11", 1], "clip_l": "a", "clip_g": "a",
                                                                  "t5xxl": "a", "llama": "a"}}
    with pytest.raises(WorkflowInvalid, match="CLIPTextEncodeHiDream needs HiDream's text encoders"):
        engine.run(parse_api(doc))


def test_loaders_say_hidream_at_validation(base) -> None:
    from nodes.sd.hidream import QuadrupleCLIPLoader
    from nodes.sd.part_loaders import UNETLoader

    _, files = base
    assert UNETLoader.output_facts({"unet_name": files["unet"].name, "weight_dtype": "default"}, {}) == \
        {0: {"family": "hidream"}}
    assert QuadrupleCLIPLoader.check_inputs({f"clip_name{i}": files[p].name
                                             for i, p in enumerate(TEXT_PARTS, 1)}) is None


def test_fewer_encoders_through_clip_loader_and_dual_clip_loader(base) -> None:
    """CLIPLoader and DualCLIPLoader type hidream load one or two of the four, the others' parts zeros of the released
    widths (ComfyUI's rule; the tiny model takes other widths, so these prompts are not sampled here): T5 and Llama
    alone encode as the full set's T5 and Llama parts, with no pooled prompt."""
    engine, files = base
    doc = {"11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": files["llama"].name,
                                                             "clip_name2": files["t5xxl"].name, "type": "hidream"}},
           "12": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["llama"].name, "type": "hidream"}},
           "13": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0], "text": POSITIVE}},
           "14": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["12", 0], "text": POSITIVE}},
           "15": {"class_type": "PreviewAny", "inputs": {"source": ["13", 0]}},
           "16": {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}}}
    [(states, options)], [(no_t5, llama_options)] = run(engine, doc, ("13", "14"))
    full = load_hidream_text_encoder([files[part] for part in TEXT_PARTS], dtype=torch.float32).encoder
    expected = full.encode([POSITIVE])
    torch.testing.assert_close(states, expected.cond.float())
    torch.testing.assert_close(options[LLAMA_KEY], expected.extra[LLAMA_KEY].float())
    torch.testing.assert_close(llama_options[LLAMA_KEY], expected.extra[LLAMA_KEY].float())
    assert not options["pooled_output"].any() and options["pooled_output"].shape == (1, 2048)
    assert not no_t5.any() and no_t5.shape[-1] == 4096
    doc["11"]["inputs"]["clip_name2"] = files["llama"].name
    with pytest.raises(WorkflowInvalid, match="type hidream takes two of HiDream-I1's"):
        engine.run(parse_api(doc))
