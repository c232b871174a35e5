"""Textual-inversion embeddings: an embedding holding a word's own token vectors encodes exactly as the word,
in every file layout, weighted and in SDXL's pair; bad files and names get clear errors."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from ldm.embeddings import EmbeddingError, load_embedding
from ldm.text_encoders import build_text_encoder, random_text_encoder_config


def encoder_for(preset: str):
    encoder = build_text_encoder(random_text_encoder_config(preset))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return encoder.eval()


def word_vectors(encoder, name: str, words: str) -> torch.Tensor:
    """The token-table rows of `words` in one of the encoders: what an embedding of those words holds."""
    ids = encoder.tokenizer.encode_text(words)
    table = encoder.encoders[name].text_model.embeddings.token_embedding.weight
    return table[ids].detach().clone()


def assert_same(a, b):
    torch.testing.assert_close(a.cond, b.cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["a1111.pt", "a1111.safetensors", "diffusers.bin"])
def test_an_embedding_of_a_words_vectors_encodes_as_the_word(tmp_path, layout):
    encoder = encoder_for("tiny-sd1")
    vectors = word_vectors(encoder, "clip_l", "red circle")  # two tokens: a two-vector embedding
    path = tmp_path / f"shape.{layout.split('.')[1]}"
    if layout == "a1111.pt":
        torch.save({"string_to_param": {"*": vectors}, "name": "shape", "step": 500}, path)
    elif layout == "a1111.safetensors":
        safetensors.torch.save_file({"emb_params": vectors}, path)
    else:  # diffusers' learned_embeds.bin holds one vector per placeholder token
        torch.save({"<shape>": vectors[0]}, path)
        vectors = vectors[:1]
    loaded = load_embedding(path)
    assert list(loaded) == [vectors.shape[-1]] and torch.equal(loaded[vectors.shape[-1]], vectors)
    words = "red circle" if len(vectors) == 2 else "red"
    lookup = {"shape": loaded}.get
    with torch.no_grad():
        assert_same(encoder.encode(["a embedding:shape, on blue"], embeddings=lookup),
                    encoder.encode([f"a {words}, on blue"]))
        # Emphasis weighs the embedding's vectors as it weighs words.
        assert_same(encoder.encode(["a (embedding:shape:1.3) on blue"], embeddings=lookup),
                    encoder.encode([f"a ({words}:1.3) on blue"]))


def test_sdxl_pairs_give_each_encoder_its_vectors(tmp_path):
    encoder = encoder_for("tiny-sdxl")
    path = tmp_path / "pair.safetensors"
    safetensors.torch.save_file({"clip_l": word_vectors(encoder, "clip_l", "cat"),
                                 "clip_g": word_vectors(encoder, "clip_g", "cat")}, path)
    lookup = {"pair": load_embedding(path)}.get
    with torch.no_grad():
        assert_same(encoder.encode(["a embedding:pair on a mat"], embeddings=lookup),
                    encoder.encode(["a cat on a mat"]))


def test_wrong_family_and_bad_files_are_refused_clearly_and_missing_names_left_out(tmp_path):
    sd1, sdxl = encoder_for("tiny-sd1"), encoder_for("tiny-sdxl")
    vectors = {"v": {sdxl.encoders["clip_g"].config.hidden_size: torch.zeros(1, 8)}}
    with pytest.raises(ValueError, match="embedding:v holds vectors .* wide; .* it is for another model family"):
        sd1.encode(["embedding:v"], embeddings=vectors.get)
    with torch.no_grad():  # a missing one is left out of the prompt (with a warning), as in ComfyUI
        assert_same(sd1.encode(["a embedding:nope"], embeddings=vectors.get), sd1.encode(["a"]))

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"string_to_param": {"*": Payload()}}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match="evil.pt is not a readable embedding file"):
        load_embedding(tmp_path / "evil.pt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(EmbeddingError, match="empty.safetensors is not a readable embedding file"):
        load_embedding(tmp_path / "empty.safetensors")


def test_clip_text_encode_reads_models_embeddings(tmp_path, caplog):
    from executor.executor import Executor
    from executor.services import Services
    from graph.document import parse_api
    from ldm.checkpoint import load_checkpoint
    from ldm.presets import make_checkpoint
    from nodes.folders import FolderPaths, set_paths
    from nodes.registry import builtin_registry

    checkpoint = make_checkpoint("tiny-sd1", tmp_path / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    text_encoder = load_checkpoint(checkpoint).text_encoder
    (tmp_path / "models" / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": word_vectors(text_encoder, "clip_l", "blurry")}},
               tmp_path / "models" / "embeddings" / "EasyNegative.pt")
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    try:
        engine = Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))

        def encode(text):
            graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
                     "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
                     "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
            result = engine.run(parse_api(graph), keep=["2"])
            return result, result.ok and result.values["2"][0][0][0]

        (with_embedding, cond), (_, expected) = encode("embedding:EasyNegative, ugly"), encode("blurry, ugly")
        assert with_embedding.ok and torch.allclose(cond, expected, atol=1e-5)
        with caplog.at_level("WARNING"):
            (missing, without), (_, plain) = encode("embedding:BadHands, ugly"), encode(", ugly")
        assert missing.ok and torch.allclose(without, plain, atol=1e-5)
        assert "embedding:BadHands not found" in caplog.text
    finally:
        set_paths(FolderPaths())
