"""Matching prompts to workers by the model files they name and hold (web.affinity, the Ray pool's choice)."""

from pathlib import Path

import pytest

from executor.services import ModelCache
from nodes.folders import FolderPaths
from web.affinity import held_models, model_names, prompt_models
from web.store import PromptRecord

PROMPT = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd/base.safetensors"}},
          "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "style.safetensors", "model": ["4", 0],
                                                         "strength_model": 1.0}},
          "11": {"class_type": "VAELoader", "inputs": {"vae_name": "better.safetensors"}},
          "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "ckpt_name", "clip": ["4", 1]}}}


def test_prompt_models_names_every_loader_file():
    assert prompt_models(PROMPT) == {"checkpoints/sd/base.safetensors", "loras/style.safetensors",
                                     "vae/better.safetensors"}
    assert prompt_models({"1": {"class_type": "X", "inputs": {"ckpt_name": ["4", 0]}}}) == frozenset()


def test_model_names_come_from_the_loader_cache_keys_relative_to_any_model_folder(tmp_path):
    extra = tmp_path / "elsewhere"
    paths = FolderPaths(base=tmp_path, models_dirs=[extra], bundled_models=None)
    keys = [("checkpoint", str(tmp_path / "models" / "checkpoints" / "sd" / "base.safetensors"), "fp", "cpu", "f32"),
            ("lora", str(extra / "loras" / "style.safetensors"), "fp"),
            ("checkpoint", str(Path("/not/a/model/folder.safetensors")), "fp"),
            "some-other-key"]
    assert model_names(keys, paths) == {"checkpoints/sd/base.safetensors", "loras/style.safetensors"}
    cache = ModelCache()
    cache.get_or_load(keys[0], object)
    assert held_models(cache, paths) == {"checkpoints/sd/base.safetensors"}
    cache.clear()
    assert held_models(cache, paths) == frozenset()


def test_choose_prefers_the_worker_holding_the_checkpoint_then_the_least_used():
    pytest.importorskip("ray")
    from web.ray_pool import Slot, choose

    record = PromptRecord("p", 0, "running", PROMPT, {}, ["9"], None)
    cold = Slot("ray-0", None, prompts=0)
    warm = Slot("ray-1", None, prompts=5, held=frozenset({"checkpoints/sd/base.safetensors"}))
    other = Slot("ray-2", None, prompts=1, held=frozenset({"checkpoints/other.safetensors"}))
    assert choose(record, [cold, warm, other]) is warm
    assert choose(record, [other, cold]) is cold
