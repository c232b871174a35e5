"""Flux's edit inputs checked at validation (graph.validate), from the files' headers: reference latents given to
a Flux Fill / Depth model or to a non-Flux model, InpaintModelConditioning's image and mask given to a Depth model,
InstructPixToPixConditioning's image given to a plain Flux model, each refused in the words the run uses; the
pairs that fit pass; and the run still refuses what validation cannot see."""

from __future__ import annotations

import pytest

from graph.document import parse_api
from graph.validate import validate
from nodes.sd.loaders import CheckpointLoaderSimple
from nodes.sd.part_loaders import UNETLoader
from tests.nodes.test_flux_variants_nodes import HEIGHT, WIDTH, engine, root, workflow  # noqa: F401 (fixtures)

REFERENCES_TO_FILL = ("the prompts carry reference latents (ReferenceLatent), which Flux Kontext takes; "
                      "flux1-tiny-fill.safetensors is a Flux Fill (inpainting) model, which takes none")
REFERENCES_TO_SD1 = ("the prompts carry reference latents (ReferenceLatent), which Flux Kontext, FLUX.2 and "
                     "Qwen-Image-Edit take; "
                     "sd1.safetensors is SD1, which takes none")
MASK_TO_DEPTH = ("the prompts carry an inpainting mask (InpaintModelConditioning) and flux1-tiny-depth.safetensors "
                 "is a Flux Depth / Canny model, which takes a control image: use InstructPixToPixConditioning, or a "
                 "Flux Fill model")
CONTROL_TO_PLAIN = ("the prompts carry a control image (InstructPixToPixConditioning) and "
                    "flux1-tiny-kontext.safetensors takes none: use a Flux Depth or Canny model")


def problems(engine, doc: dict) -> list[str]:  # noqa: F811 (the fixture)
    return [f"{p.class_type}: {p.details}" for p in validate(parse_api(doc), engine.registry).problems]


def with_model(variant: str, unet: str) -> dict:
    doc = workflow(variant)
    doc["1"]["inputs"]["unet_name"] = unet
    return doc


def sd1_with_references() -> dict:
    doc = workflow("kontext")
    doc["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    doc["6"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}}
    doc["8"]["inputs"]["model"] = ["1", 0]
    doc["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}}
    return doc


def test_loaders_say_a_flux_models_edit_kind(engine) -> None:  # noqa: F811
    facts = {name: UNETLoader.output_facts({"unet_name": f"flux1-tiny-{name}.safetensors"}, {})[0]
             for name in ("kontext", "fill", "depth")}
    assert facts["kontext"] == {"family": "flux", "source": "flux1-tiny-kontext.safetensors", "edit_kind": None}
    assert (facts["fill"]["edit_kind"], facts["depth"]["edit_kind"]) == ("fill", "control")
    checkpoint = CheckpointLoaderSimple.output_facts({"ckpt_name": "flux1-tiny-fill-checkpoint.safetensors"}, {})
    assert checkpoint[0]["edit_kind"] == "fill" and checkpoint[1] == {"family": "flux"}
    assert CheckpointLoaderSimple.output_facts({"ckpt_name": "sd1.safetensors"}, {})[0] == {
        "family": "sd1", "source": "sd1.safetensors"}


@pytest.mark.parametrize(("doc", "message"), [
    (lambda: with_model("kontext", "flux1-tiny-fill.safetensors"), REFERENCES_TO_FILL),
    (sd1_with_references, REFERENCES_TO_SD1),
    (lambda: with_model("fill", "flux1-tiny-depth.safetensors"), MASK_TO_DEPTH),
    (lambda: with_model("depth", "flux1-tiny-kontext.safetensors"), CONTROL_TO_PLAIN),
], ids=["references-to-fill", "references-to-sd1", "mask-to-depth", "control-to-plain"])
def test_edit_inputs_a_model_does_not_take_are_refused_at_validation(engine, doc, message) -> None:  # noqa: F811
    assert problems(engine, doc()) == [f"KSampler: {message}"]
    advanced = doc()
    inputs = advanced["8"]["inputs"]
    advanced["8"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": inputs["model"], "add_noise": "enable", "noise_seed": 1, "steps": 2, "cfg": 1.0,
        "sampler_name": "euler", "scheduler": "simple", "positive": inputs["positive"],
        "negative": inputs["negative"], "latent_image": inputs["latent_image"], "start_at_step": 0,
        "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    assert problems(engine, advanced) == [f"KSamplerAdvanced: {message}"]


def test_edit_inputs_a_model_takes_pass_validation(engine) -> None:  # noqa: F811
    for variant in ("kontext", "fill", "depth"):
        assert problems(engine, workflow(variant)) == []
    plain_inpaint = with_model("fill", "flux1-tiny-kontext.safetensors")  # by the noise mask alone, as in ComfyUI
    assert problems(engine, plain_inpaint) == []


def test_facts_pass_through_flux_guidance_and_a_checkpoint_says_its_kind(engine) -> None:  # noqa: F811
    doc = with_model("kontext", "flux1-tiny-fill.safetensors")
    doc["14"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["12", 0], "guidance": 2.5}}
    doc["8"]["inputs"]["positive"] = ["14", 0]
    assert problems(engine, doc) == [f"KSampler: {REFERENCES_TO_FILL}"]
    doc["1"] = {"class_type": "CheckpointLoaderSimple",
                "inputs": {"ckpt_name": "flux1-tiny-fill-checkpoint.safetensors"}}
    assert problems(engine, doc) == [f"KSampler: {REFERENCES_TO_FILL.replace('fill.', 'fill-checkpoint.')}"]


def test_the_run_refuses_what_validation_cannot_see(engine) -> None:  # noqa: F811
    """Prompts through a node that says nothing of them (ConditioningCombine) pass validation; the run refuses."""
    doc = with_model("depth", "flux1-tiny-kontext.safetensors")
    for nid, side in (("14", 0), ("15", 1)):
        doc[nid] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["12", side],
                                                                    "conditioning_2": ["12", side]}}
    doc["8"]["inputs"].update(positive=["14", 0], negative=["15", 0])
    assert problems(engine, doc) == []
    result = engine.run(parse_api(doc))
    assert not result.ok and CONTROL_TO_PLAIN in str(result.error)
