"""HiDream's text encoders (ldm.hidream_text, ldm.llama_text) against diffusers' HiDreamImagePipeline prompt encoding
with identical tiny weights, and Llama 3's tokenizer against Meta's own (tiktoken)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.hidream_text import LLAMA_KEY, HiDreamTextEncoder, llama_tokens, load_hidream_text_encoder
from ldm.llama_text import (
    EOT,
    PATTERN,
    SPECIAL_TOKENS,
    _tokenizer,
    tiny_llama_state,
    token_ids,
    vocabulary_file,
    write_tiny_llama,
)
from ldm.parts import look_of
from ldm.sd3_presets import random_clip, random_t5
from ldm.tokenizer import DATA_DIR

# No emphasis brackets: ComfyUI (and Loom) read them as weights, diffusers as text.
PROMPTS = ["a photo of a cat on a red sofa", "A fox, running through the snow at sunset! Wide shot, 35mm."]


def _long_clip(kind: str, seed: int) -> torch.nn.Module:
    """A tiny CLIPTextModelWithProjection with 248 positions (HiDream's retrained CLIPs read 128 tokens) and a
    random projection."""
    from transformers import CLIPTextModelWithProjection

    small = random_clip(kind, seed)
    config = small.config
    config.max_position_embeddings = 248
    model = CLIPTextModelWithProjection(config).eval()
    generator = torch.Generator().manual_seed(seed)
    positions = "text_model.embeddings.position_embedding.weight"
    model.load_state_dict({**small.state_dict(), positions: torch.randn(248, config.hidden_size, generator=generator)
                           * 0.1, "text_projection.weight": torch.randn(config.projection_dim, config.hidden_size,
                                                                        generator=generator) * 0.2})
    return model


@pytest.fixture(scope="module")
def models():
    """transformers' twins of the four tiny encoders."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ldm.llama_text import llama_config_from_state_dict

    state = tiny_llama_state(seed=5)
    config = llama_config_from_state_dict(state)
    llama = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "use_cache": False})).eval()
    llama.load_state_dict(state)
    return {"clip_l": _long_clip("clip_l", 2), "clip_g": _long_clip("clip_g", 3), "t5xxl": random_t5(4),
            "llama": llama, "llama_state": state}


@pytest.fixture(scope="module")
def files(models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("text_encoders")
    paths = {kind: folder / f"{kind}_hidream_tiny.safetensors" for kind in ("clip_l", "clip_g", "t5xxl", "llama")}
    for kind in ("clip_l", "clip_g"):
        write_safetensors(models[kind].state_dict(), paths[kind], {"loom.text_encoder": kind}, torch.float32)
    write_safetensors({k: v for k, v in models["t5xxl"].state_dict().items() if k != "encoder.embed_tokens.weight"},
                      paths["t5xxl"], {}, torch.float32)
    write_safetensors(models["llama_state"], paths["llama"], {}, torch.float32)
    return paths


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory: pytest.TempPathFactory):
    """diffusers' HiDreamImagePipeline prompt-encoding methods on the twins, with transformers' tokenizers: CLIP's
    and T5's from the vocabularies Loom bundles, Llama's converted by transformers from Meta's file with tiktoken
    (Loom's own where tiktoken is not installed: test_tokenizer_matches_metas checks it then)."""
    import copy
    import importlib.util

    from diffusers import HiDreamImagePipeline
    from tokenizers.processors import TemplateProcessing
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    t5_file = tmp_path_factory.mktemp("t5") / "tokenizer.json"
    t5_file.write_bytes(gzip.decompress((DATA_DIR / "t5_tokenizer.json.gz").read_bytes()))
    folder = tmp_path_factory.mktemp("clip")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA_DIR / name, folder / name)
    if importlib.util.find_spec("tiktoken") is None:
        llama = copy.deepcopy(_tokenizer())
    else:
        llama = TikTokenConverter(vocab_file=str(vocabulary_file()), pattern=PATTERN,
                                  extra_special_tokens=SPECIAL_TOKENS).converted()
    llama.post_processor = TemplateProcessing(single="<|begin_of_text|> $A",
                                              special_tokens=[("<|begin_of_text|>", 128000)])
    pipe = SimpleNamespace(
        _execution_device=torch.device("cpu"),
        tokenizer_3=T5TokenizerFast(tokenizer_file=str(t5_file)), text_encoder_3=models["t5xxl"],
        tokenizer_4=PreTrainedTokenizerFast(tokenizer_object=llama, bos_token="<|begin_of_text|>",
                                            eos_token="<|eot_id|>", pad_token="<|eot_id|>", model_max_length=131072),
        text_encoder_4=models["llama"])
    clip = CLIPTokenizer.from_pretrained(str(folder), model_max_length=248)

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            pooled = torch.cat([HiDreamImagePipeline._get_clip_prompt_embeds(pipe, clip, models[k], prompts)
                                for k in ("clip_l", "clip_g")], dim=-1)
            t5 = HiDreamImagePipeline._get_t5_prompt_embeds(pipe, prompts)
            llama_states = HiDreamImagePipeline._get_llama3_prompt_embeds(pipe, prompts)
        return t5, pooled, llama_states.transpose(0, 1)  # diffusers stacks the layers first

    return encode


def test_tokenizer_matches_metas() -> None:
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(vocabulary_file()))
    meta = tiktoken.Encoding("llama3", pat_str=PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: 128000 + i for i, t in enumerate(SPECIAL_TOKENS)})
    texts = [*PROMPTS, "Ünïcödé 日本語 🦊  x\r\n\n  1234567 it's DON'T", "   leading and trailing   ", ""]
    for text in texts:
        assert token_ids(text) == meta.encode(text), text
    assert token_ids("Hello world") == [9906, 1917]
    assert token_ids("<|begin_of_text|><|eot_id|><|reserved_special_token_245|>") == [128000, EOT, 128255]


def test_llama_tokens_drop_emphasis() -> None:
    assert llama_tokens("a (red:1.3) fox") == [128000, *token_ids("a "), *token_ids("red"), *token_ids(" fox")]


def test_matches_diffusers(files, reference) -> None:
    encoder = load_hidream_text_encoder(list(files.values())).encoder
    with torch.no_grad():
        ours = encoder.encode(PROMPTS)
    t5, pooled, llama = reference(PROMPTS)
    assert ours.cond.shape == t5.shape == (2, 128, 96) and ours.pooled.shape == pooled.shape == (2, 32 + 48)
    assert ours.extra[LLAMA_KEY].shape == llama.shape == (2, 4, 128, 32)
    torch.testing.assert_close(ours.cond, t5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.extra[LLAMA_KEY], llama, rtol=1e-5, atol=1e-5)
    errors = [(a - b).abs().max().item() for a, b in ((ours.cond, t5), (ours.pooled, pooled),
                                                       (ours.extra[LLAMA_KEY], llama))]
    print("max abs errors t5, pooled, llama:", errors)


def test_per_encoder_prompts(files, reference) -> None:
    encoder = load_hidream_text_encoder(list(files.values())).encoder
    texts = {"clip_l": ["a cat"], "clip_g": ["a red sofa"], "t5xxl": ["a cat on a sofa"], "llama": ["sofa, cat"]}
    with torch.no_grad():
        ours = encoder.encode(["ignored"], per_encoder=texts)
    t5, _, _ = reference(texts["t5xxl"])
    _, _, llama = reference(texts["llama"])
    pooled_l, pooled_g = reference(texts["clip_l"])[1][:, :32], reference(texts["clip_g"])[1][:, 32:]
    torch.testing.assert_close(ours.cond, t5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.extra[LLAMA_KEY], llama, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, torch.cat([pooled_l, pooled_g], -1), rtol=1e-5, atol=1e-5)


def test_llama_is_never_cut(files) -> None:
    encoder = load_hidream_text_encoder([files["llama"]]).encoder
    long = " ".join(["a red fox"] * 60)
    with torch.no_grad():
        out = encoder.encode([long, "a cat"])
    assert out.extra[LLAMA_KEY].shape == (2, 4, 1 + len(token_ids(long)), 32)
    assert out.cond.abs().max() == 0 and out.pooled.shape == (2, 768 + 1280) and out.pooled.abs().max() == 0


def test_scaled_fp8_llama(tmp_path) -> None:
    """A scaled fp8 file encodes as the same weights descaled, stored in float32."""
    from ldm.checkpoint import load_state_dict
    from ldm.t5 import descaled_fp8, scaling_keys

    path = write_tiny_llama(tmp_path / "llama_fp8_scaled.safetensors", seed=5, fp8=True)
    scaled = load_state_dict(path)
    assert scaled["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    plain = {k: v.float() for k, v in descaled_fp8(scaled).items() if k not in scaling_keys(scaled)}
    write_safetensors(plain, tmp_path / "llama_descaled.safetensors", {})
    loaded = load_hidream_text_encoder([path])
    assert loaded.unused_keys == [] and loaded.family == "hidream"
    expected = load_hidream_text_encoder([tmp_path / "llama_descaled.safetensors"]).encoder
    with torch.no_grad():
        a, b = expected.encode(PROMPTS).extra[LLAMA_KEY], loaded.encoder.encode(PROMPTS).extra[LLAMA_KEY]
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_absent_encoders_give_zeros(files) -> None:
    encoder = load_hidream_text_encoder([files["clip_g"], files["t5xxl"]]).encoder
    assert isinstance(encoder, HiDreamTextEncoder) and encoder.llama is None and encoder.clip_l is None
    with torch.no_grad():
        out = encoder.encode(PROMPTS)
    assert out.pooled[:, :768].abs().max() == 0 and out.pooled[:, 768:].abs().max() > 0
    assert out.extra[LLAMA_KEY].shape == (2, 32, 1, 4096) and out.extra[LLAMA_KEY].abs().max() == 0
    assert out.cond.shape == (2, 128, 96)


def test_wrong_files_are_refused(files, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="one T5-XXL"):
        load_hidream_text_encoder([files["t5xxl"], files["t5xxl"]])
    from ldm.qwen3_text import write_tiny_qwen3

    qwen = write_tiny_qwen3(tmp_path / "qwen.safetensors")
    with pytest.raises(CheckpointError):
        load_hidream_text_encoder([qwen])


def test_parts_look(files) -> None:
    from ldm import checkpoint as ckpt

    assert look_of(ckpt.read_shapes(files["llama"])).kind == "llama3"
