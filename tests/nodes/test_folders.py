"""Model folder listings: what the combo inputs offer, kept current as files come and go."""

from __future__ import annotations

import os

from nodes.folders import FolderPaths


def paths_in(tmp_path) -> FolderPaths:
    return FolderPaths(base=tmp_path, bundled_models=None)


def test_lists_model_files_below_every_folder_sorted_and_once(tmp_path):
    extra = tmp_path / "elsewhere"
    (extra / "sd15").mkdir(parents=True)
    (extra / "sd15" / "b.safetensors").write_bytes(b"")
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "a.ckpt").write_bytes(b"")
    (tmp_path / "models" / "checkpoints" / "notes.txt").write_text("not a model")
    (tmp_path / "models" / "checkpoints" / "folder.safetensors").mkdir()  # a folder, not a file
    paths = paths_in(tmp_path)
    paths.extra_model_paths["checkpoints"] = [extra]
    assert paths.list_models("checkpoints") == ["a.ckpt", "sd15/b.safetensors"]
    assert paths.list_models("loras") == []


def test_the_listing_follows_files_added_and_removed_at_any_depth(tmp_path):
    paths = paths_in(tmp_path)
    assert paths.list_models("loras") == []
    deep = tmp_path / "models" / "loras" / "styles" / "ink"
    deep.mkdir(parents=True)  # the folder appears after a listing that found nothing
    (deep / "ink.safetensors").write_bytes(b"")
    assert paths.list_models("loras") == ["styles/ink/ink.safetensors"]
    (deep / "pencil.safetensors").write_bytes(b"")  # only the deepest folder's time changes
    assert paths.list_models("loras") == ["styles/ink/ink.safetensors", "styles/ink/pencil.safetensors"]
    os.rename(deep / "ink.safetensors", deep / "brush.safetensors")
    (deep / "pencil.safetensors").unlink()
    assert paths.list_models("loras") == ["styles/ink/brush.safetensors"]


def test_an_unchanged_tree_is_not_walked_again(tmp_path, monkeypatch):
    (tmp_path / "models" / "vae").mkdir(parents=True)
    (tmp_path / "models" / "vae" / "v.safetensors").write_bytes(b"")
    paths = paths_in(tmp_path)
    walks = []
    real_walk = os.walk
    monkeypatch.setattr(os, "walk", lambda *a, **k: walks.append(a) or real_walk(*a, **k))
    first = paths.list_models("vae")
    first.append("changed by the caller")
    assert paths.list_models("vae") == ["v.safetensors"]  # a copy is handed out, the cache is intact
    assert len(walks) == 1


def test_comfyuis_extra_model_paths_yaml_is_read_as_it_is(tmp_path):
    import pytest

    webui = tmp_path / "stable-diffusion-webui"
    for folder in ("models/Stable-diffusion", "models/Lora", "models/LyCORIS", "models/ControlNet"):
        (webui / folder).mkdir(parents=True)
    (webui / "models/Stable-diffusion/dreamshaper.safetensors").write_bytes(b"")
    (webui / "models/LyCORIS/ink.safetensors").write_bytes(b"")
    (webui / "models/ControlNet/canny.safetensors").write_bytes(b"")
    config = tmp_path / "extra_model_paths.yaml"
    # The a111 section of ComfyUI's example file: base_path relative to the file, a kind with two folders.
    config.write_text("""
a111:
    base_path: stable-diffusion-webui/
    checkpoints: models/Stable-diffusion
    loras: |
         models/Lora
         models/LyCORIS
    controlnet: models/ControlNet
    upscale_models: models/ESRGAN
comfyui:
    base_path: shared/
    is_default: true
    checkpoints: models/checkpoints/
""")
    (tmp_path / "shared/models/checkpoints").mkdir(parents=True)
    paths = paths_in(tmp_path)
    paths.load_extra_paths(config)
    assert paths.list_models("checkpoints") == ["dreamshaper.safetensors"]
    assert paths.list_models("loras") == ["ink.safetensors"]
    assert paths.list_models("controlnet") == ["canny.safetensors"]
    # The is_default section's folder comes before the project's own models/checkpoints.
    assert paths.model_dirs("checkpoints")[:2] == [tmp_path / "shared/models/checkpoints",
                                                   tmp_path / "models/checkpoints"]
    config.write_text("a111: [not, a, mapping]\n")
    with pytest.raises(ValueError, match="expected ComfyUI's layout"):
        paths_in(tmp_path).load_extra_paths(config)
