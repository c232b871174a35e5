"""PhotoMakerLoader and PhotoMakerEncode through the engine as ComfyUI writes them: a whole graph on a tiny SDXL
checkpoint and a tiny PhotoMaker file in the real key layouts, the conditioning it gives, and wrong files."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from PIL import Image, ImageDraw

import nodes.sd.photomaker
from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_checkpoint
from ldm.photomaker import encode_with_id, load_photomaker
from ldm.presets import make_checkpoint
from nodes.comfy_compat import COMFY_CORE_NODES_MISSING
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.image import LoadImage
from tests.ldm.test_photomaker import tiny_lora, tiny_photomaker


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("photomaker")
    checkpoints = root / "models" / "checkpoints"
    make_checkpoint("tiny-sdxl", checkpoints / "xl.safetensors", seed=1)
    make_checkpoint("tiny-sd1", checkpoints / "sd1.safetensors", seed=2)
    folder = root / "models" / "photomaker"
    folder.mkdir(parents=True)
    sd = tiny_photomaker(seed=3)
    torch.save({"id_encoder": sd, "lora_weights": tiny_lora()}, folder / "photomaker-v1.bin")
    torch.save({"id_encoder": {**sd, "qformer_perceiver.token_norm.weight": torch.ones(4)}, "lora_weights": {}},
               folder / "photomaker-v2.bin")
    safetensors.torch.save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)},
                                folder / "not-photomaker.safetensors")
    (root / "input").mkdir()
    for name, colour, box in (("face.png", "orange", (14, 8, 50, 44)), ("other.png", "navy", (2, 20, 30, 46))):
        picture = Image.new("RGB", (64, 48), "white")
        ImageDraw.Draw(picture).ellipse(box, fill=colour)
        picture.save(root / "input" / name)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base, force_cpu=True))


def workflow(text: str = "photograph of a man photomaker", picture: str = "face.png",
             photomaker: str = "photomaker-v1.bin", ckpt: str = "xl.safetensors") -> dict:
    """CheckpointLoaderSimple -> PhotoMakerLoader -> LoadImage -> PhotoMakerEncode -> KSampler -> VAEDecode ->
    SaveImage."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "10": {"class_type": "PhotoMakerLoader", "inputs": {"photomaker_model_name": photomaker}},
        "11": {"class_type": "LoadImage", "inputs": {"image": picture}},
        "12": {"class_type": "PhotoMakerEncode", "inputs": {"photomaker": ["10", 0], "image": ["11", 0],
                                                            "clip": ["4", 1], "text": text}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 3, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["12", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "photomaker"}},
    }


def run(engine: Executor, graph: dict, keep: tuple[str, ...] = ("8",)):
    return engine.run(parse_api(graph), keep=list(keep))


def test_a_photomaker_workflow_runs_end_to_end_and_follows_its_photo(base, engine):
    result = run(engine, workflow(), keep=("8", "12"))
    assert result.ok, result.error
    picture = result.values["8"][0]
    assert picture.shape == (1, 64, 64, 3) and picture.isfinite().all()
    saved = sorted(base.output.glob("photomaker_*.png"))
    assert saved and Image.open(saved[-1]).size == (64, 64)
    [(cond, options)] = result.values["12"][0]
    assert cond.shape == (1, 77, 80) and set(options) == {"pooled_output"} and options["pooled_output"].shape == (1, 48)
    # Another photo changes the class word's embedding alone (position 4: "man"), and so the picture (a little: the
    # tiny random UNet hears its prompt faintly); so does the same prompt without the trigger word.
    for other in (workflow(picture="other.png"), workflow(text="photograph of a man")):
        again = run(engine, other, keep=("8", "12"))
        assert again.ok, again.error
        [(other_cond, _)] = again.values["12"][0]
        differs = (other_cond - cond).abs().amax(dim=-1)[0]
        assert differs[4] > 0.1 and differs[:4].max() == differs[5:].max() == 0
        assert (again.values["8"][0] - picture).abs().max() > 1e-6


def test_the_conditioning_is_the_libraries_and_without_the_trigger_clip_text_encodes(base, engine):
    text = "photograph of a (woman:1.2) photomaker, smiling"
    graph = workflow(text=text)
    graph["13"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "photograph of a woman", "clip": ["4", 1]}}
    graph["14"] = {"class_type": "PhotoMakerEncode", "inputs": {"photomaker": ["10", 0], "image": ["11", 0],
                                                                "clip": ["4", 1], "text": "photograph of a woman"}}
    graph |= {"15": {"class_type": "PreviewAny", "inputs": {"source": ["13", 0]}},
              "16": {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}}}
    result = run(engine, graph, keep=("12", "13", "14"))
    assert result.ok, result.error
    models = base.base / "models"
    text_encoder = load_checkpoint(models / "checkpoints" / "xl.safetensors").text_encoder
    id_encoder = load_photomaker(models / "photomaker" / "photomaker-v1.bin").model
    photo = LoadImage().execute("face.png")[0]
    expected = encode_with_id(id_encoder, text_encoder, text, photo)
    [(cond, options)] = result.values["12"][0]
    torch.testing.assert_close(cond, expected.cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(options["pooled_output"], expected.pooled, rtol=0, atol=1e-6)
    [(plain, plain_options)] = result.values["13"][0]
    [(untriggered, untriggered_options)] = result.values["14"][0]
    assert torch.equal(untriggered, plain)
    assert torch.equal(untriggered_options["pooled_output"], plain_options["pooled_output"])


def test_wrong_files_and_models_get_errors_that_say_why(engine):
    for name, said in (("photomaker-v2.bin", "PhotoMaker V2"), ("not-photomaker.safetensors", "not a PhotoMaker")):
        result = run(engine, workflow(photomaker=name))
        assert not result.ok and said in str(result.error) and name in str(result.error)
    # An SD1 checkpoint's CLIP is refused at validation (it failed at run time only, after loading everything)
    with pytest.raises(WorkflowInvalid, match="PhotoMaker fuses into SDXL prompts and this CLIP is SD1's"):
        run(engine, workflow(ckpt="sd1.safetensors"))
    result = run(engine, workflow(text="photomaker portrait"))
    assert not result.ok and "follows no class word" in str(result.error)


def test_schemas_are_comfyuis():
    loader = nodes.sd.photomaker.PhotoMakerLoader.object_info()
    assert loader["input_order"]["required"] == ["photomaker_model_name"] and loader["output"] == ["PHOTOMAKER"]
    encode = nodes.sd.photomaker.PhotoMakerEncode.object_info()
    assert encode["input_order"]["required"] == ["photomaker", "image", "clip", "text"]
    assert encode["input"]["required"]["text"][1]["default"] == "photograph of photomaker"
    assert encode["output"] == ["CONDITIONING"] and encode["category"] == "_for_testing/photomaker"
    assert not {"PhotoMakerLoader", "PhotoMakerEncode"} & COMFY_CORE_NODES_MISSING
