"""SD3's text conditioning against diffusers' StableDiffusion3Pipeline.encode_prompt with the same tiny encoders."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import CheckpointError
from ldm.sd3_presets import make_sd3_files, random_clip, random_t5
from ldm.sd3_text import SD3TextEncoder, load_sd3_text_encoders, sd3_text_encoders_from_checkpoint
from ldm.tokenizer import DATA_DIR

PROMPT = "a photo of a cat on a red sofa"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_sd3_files(tmp_path_factory.mktemp("models"), dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """diffusers' pipeline with transformers' tokenizers (CLIP's and T5's, from the vocabularies Loom bundles) and
    the very encoders make_sd3_files writes (same seeds)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    t5_file = tmp_path_factory.mktemp("t5") / "tokenizer.json"
    t5_file.write_bytes(gzip.decompress((DATA_DIR / "t5_tokenizer.json.gz").read_bytes()))
    folder = tmp_path_factory.mktemp("clip")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA_DIR / name, folder / name)
    clip = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    # SD3's second tokenizer pads with "!" (id 0), as OpenCLIP does.
    clip_g = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token="!")
    return StableDiffusion3Pipeline(
        transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=random_clip("clip_l", 2), tokenizer=clip, text_encoder_2=random_clip("clip_g", 3),
        tokenizer_2=clip_g, text_encoder_3=random_t5(4), tokenizer_3=T5TokenizerFast(tokenizer_file=str(t5_file)))


def diffusers_encode(pipe, prompt: str, prompt_2: str | None = None, prompt_3: str | None = None):
    with torch.no_grad():
        cond, _, pooled, _ = pipe.encode_prompt(prompt, prompt_2, prompt_3, do_classifier_free_guidance=False,
                                                max_sequence_length=77)
    return cond, pooled


@pytest.mark.parametrize("texts", [(PROMPT, PROMPT, PROMPT), ("a cat", "a red sofa", "a cat on a red sofa, photo")],
                         ids=["one-prompt", "three-prompts"])
def test_matches_diffusers_encode_prompt(files: dict[str, Path], reference, texts: tuple[str, str, str]) -> None:
    encoder = load_sd3_text_encoders([files["t5xxl"], files["clip_g"], files["clip_l"]]).encoder
    with torch.no_grad():
        ours = encoder.encode([texts[0]], per_encoder={"clip_g": [texts[1]], "t5xxl": [texts[2]]})
    cond, pooled = diffusers_encode(reference, *texts)
    assert ours.cond.shape == cond.shape == (1, 77 + 77, 96) and ours.pooled.shape == pooled.shape == (1, 80)
    assert cond[:, :77, 80:].abs().max() == 0 and cond[:, 77:].abs().mean() > 0.05
    torch.testing.assert_close(ours.cond, cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-5, atol=1e-5)


def test_checkpoint_encoders_equal_the_part_files(files: dict[str, Path]) -> None:
    from ldm.checkpoint import load_state_dict

    sd = load_state_dict(files["checkpoint"])
    from_checkpoint, used = sd3_text_encoders_from_checkpoint(sd, files["checkpoint"])
    assert used == {k for k in sd if k.startswith("text_encoders.")}
    from_parts = load_sd3_text_encoders([files["clip_l"], files["clip_g"], files["t5xxl"]]).encoder
    with torch.no_grad():
        a, b = from_checkpoint.encode(["a (cat:1.3)"]), from_parts.encode(["a (cat:1.3)"])
    torch.testing.assert_close(a.cond, b.cond)
    torch.testing.assert_close(a.pooled, b.pooled)


def test_absent_and_dropped_encoders_give_zeros(files: dict[str, Path]) -> None:
    full = load_sd3_text_encoders([files["clip_l"], files["clip_g"], files["t5xxl"]]).encoder
    without_t5 = SD3TextEncoder(full.clip_l, full.clip_g, None)
    with torch.no_grad():
        enc = full.encode([PROMPT])
        clip_only = without_t5.encode([PROMPT])
        # ComfyUI's empty_padding "none": an empty T5 prompt adds no tokens; empty CLIP prompts neither, pooled zeros.
        dropped_t5 = full.encode([PROMPT], per_encoder={"t5xxl": [""]}, drop_empty=True)
        dropped_clip = full.encode([""], per_encoder={"t5xxl": [PROMPT]}, drop_empty=True)
    assert clip_only.cond.shape == (1, 77, 4096)
    torch.testing.assert_close(clip_only.cond[..., :80], enc.cond[:, :77, :80])
    torch.testing.assert_close(dropped_t5.cond, enc.cond[:, :77])
    torch.testing.assert_close(dropped_clip.cond, enc.cond[:, 77:])
    assert dropped_clip.pooled.abs().max() == 0 and dropped_clip.pooled.shape == (1, 80)


def test_wrong_files_are_named(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="t5xxl missing"):
        load_sd3_text_encoders([files["clip_l"], files["clip_g"]])
    twin = tmp_path / "another-clip_l.safetensors"
    shutil.copy(files["clip_l"], twin)
    with pytest.raises(CheckpointError, match=r"sd3-clip_l-tiny.safetensors \(clip_l\) \+ another-clip_l"):
        load_sd3_text_encoders([files["clip_l"], twin, files["t5xxl"]])


def test_t5_alone_and_mismatched_widths(files: dict[str, Path]) -> None:
    full = load_sd3_text_encoders([files["clip_l"], files["clip_g"], files["t5xxl"]]).encoder
    with torch.no_grad():
        t5_only = SD3TextEncoder(None, None, full.t5xxl).encode([PROMPT])
        enc = full.encode([PROMPT])
    torch.testing.assert_close(t5_only.cond, enc.cond[:, 77:])
    assert t5_only.pooled.shape == (1, 768 + 1280) and t5_only.pooled.abs().max() == 0
    with pytest.raises(ValueError, match="CLIP-L and CLIP-G are 816 wide together, wider than T5's 96"):
        SD3TextEncoder(None, full.clip_g, full.t5xxl)


def test_clip_l_pools_unprojected_as_comfyui(files: dict[str, Path], tmp_path: Path) -> None:
    """ComfyUI (and Stability's sd3_infer) take CLIP-L's pooled state without its projection; CLIP-G's with."""
    from ldm.checkpoint import load_state_dict, write_safetensors

    paths = {kind: files[kind] for kind in ("clip_l", "clip_g", "t5xxl")}
    before = load_sd3_text_encoders(list(paths.values())).encoder
    for kind in ("clip_l", "clip_g"):
        sd = load_state_dict(files[kind])
        sd["text_projection.weight"] = 2 * sd["text_projection.weight"]
        paths[kind] = tmp_path / f"{kind}.safetensors"
        write_safetensors(sd, paths[kind], {"loom.text_encoder": kind}, torch.float32)
    after = load_sd3_text_encoders(list(paths.values())).encoder
    with torch.no_grad():
        a, b = before.encode([PROMPT]).pooled, after.encode([PROMPT]).pooled
    torch.testing.assert_close(b[:, :32], a[:, :32])
    torch.testing.assert_close(b[:, 32:], 2 * a[:, 32:])
