"""FLUX.2's text encoders (ldm.flux2_text, ldm.tekken): [klein] against diffusers' Flux2KleinPipeline prompt
encoding on transformers' Qwen3Model with the same tiny weights; [dev] against transformers' MistralModel (configured
by hand) on tokens from an independent tiktoken-style rank BPE, and against diffusers' Flux2Pipeline's left-padded
encoding on its prompt tokens; the tekken tokenizer's ids, the pruned Mistral layout, fp8 files, kind detection and
refusals."""

from __future__ import annotations

import base64
import json
import math

import pytest
import regex
import safetensors.torch
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from transformers import MistralConfig, MistralModel, PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from ldm.checkpoint import CheckpointError
from ldm.flux2_text import (
    DEV_TEMPLATE,
    TEKKEN_KEY,
    TINY_CORPUS,
    klein_tokens,
    load_flux2_text_encoder,
    text_kind,
    write_tiny_flux2_klein,
    write_tiny_flux2_mistral,
)
from ldm.qwen3_text import write_tiny_qwen3
from ldm.tekken import LLAMA3_SPLIT, tekken_tokenizer, tiny_tekken
from ldm.umt5 import write_tiny_umt5
from tests.ldm.test_qwen3_text import hf_tokenizer  # noqa: F401 (a fixture: Qwen3's tokenizer, as diffusers loads it)

PROMPTS = ["a red fox running through the snow, (slow motion:1.3)", "waves on a beach at sunset, 夕阳 \\(HDR\\)"]
TEXTS = ["HelloWorld 1024x1024 2048 don't STOP", "a cat on a sofa\n\nthe city at night 夕阳 🦊",
         " multiple   spaces\tand\r\n"]


@pytest.fixture(scope="module")
def klein_file(tmp_path_factory):
    return write_tiny_flux2_klein(tmp_path_factory.mktemp("te") / "qwen_3_4b.safetensors", seed=3,
                                  dtype=torch.float32)


@pytest.fixture(scope="module")
def mistral_file(tmp_path_factory):
    return write_tiny_flux2_mistral(tmp_path_factory.mktemp("te") / "mistral_3_small_flux2_bf16.safetensors",
                                    seed=5, dtype=torch.float32)


@pytest.fixture(scope="module")
def klein(klein_file):
    return load_flux2_text_encoder([klein_file])


@pytest.fixture(scope="module")
def mistral(mistral_file):
    return load_flux2_text_encoder([mistral_file])


@pytest.fixture(scope="module")
def qwen3_reference(klein_file) -> Qwen3Model:
    """transformers' Qwen3Model configured by hand (Qwen3-4B's config, tiny), all 28 layers and its final norm."""
    config = Qwen3Config(vocab_size=151936, hidden_size=8, intermediate_size=16, num_hidden_layers=28,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=40960,
                         tie_word_embeddings=True)
    model = Qwen3Model(config).eval()
    state = safetensors.torch.load_file(klein_file)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    return model


@pytest.fixture(scope="module")
def mistral_reference(mistral_file) -> MistralModel:
    """transformers' MistralModel configured by hand as Mistral Small 3's text config is (tiny: 8 heads of 2 over a
    width of 8), all 31 layers and its final norm."""
    config = MistralConfig(vocab_size=131072, hidden_size=8, intermediate_size=24, num_hidden_layers=31,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=2, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e9}, sliding_window=None,
                           max_position_embeddings=131072, tie_word_embeddings=False)
    model = MistralModel(config).eval()
    state = safetensors.torch.load_file(mistral_file)
    del state[TEKKEN_KEY]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    return model


def rank_bpe(spec: dict, text: str, pattern: str) -> list[int]:
    """tiktoken's algorithm, written apart from transformers' converter: control tokens matched first, the rest split
    by `pattern`, each piece's bytes merged lowest-rank pair first; ids after the control tokens."""
    ranks = {base64.b64decode(v["token_bytes"]): i for i, v in enumerate(spec["vocab"])}
    controls = {s["token_str"]: s["rank"] for s in spec["special_tokens"]}
    offset = spec["config"]["default_num_special_tokens"]
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, sorted(controls, key=len, reverse=True))) + ")", text):
        if part in controls:
            ids.append(controls[part])
            continue
        for piece in regex.findall(pattern, part):
            parts = [bytes([b]) for b in piece.encode("utf-8")]
            while len(parts) > 1:
                best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
                if parts[best] + parts[best + 1] not in ranks:
                    break
                parts[best:best + 2] = [parts[best] + parts[best + 1]]
            ids += [offset + ranks[p] for p in parts]
    return ids


def test_tekken_ids_are_the_real_layouts() -> None:
    data = tiny_tekken(TINY_CORPUS)
    tokenizer = tekken_tokenizer(data)
    ids = {t: tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>",
                                                 "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")}
    assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "<pad>": 11, "[SYSTEM_PROMPT]": 17,
                   "[/SYSTEM_PROMPT]": 18}
    assert tokenizer.encode("Z~", add_special_tokens=False).ids == [1000 + ord("Z"), 1000 + ord("~")]  # bytes' ids
    assert tokenizer.get_vocab_size() == 1000 + len(json.loads(data)["vocab"]) > 1256  # merges learnt
    encoded = tokenizer.encode("[INST]a photo[/INST]", add_special_tokens=False)
    assert encoded.ids[0] == 3 and encoded.ids[-1] == 4 and len(encoded.ids) == 4  # "a", " photo" merged
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text


@pytest.mark.parametrize("split", [LLAMA3_SPLIT, None])  # ComfyUI's split and the tekken file's own
def test_tekken_matches_an_independent_rank_bpe(split) -> None:
    data = tiny_tekken(TINY_CORPUS)
    spec = json.loads(data)
    tokenizer = tekken_tokenizer(data, split)
    for text in [*TEXTS, DEV_TEMPLATE.format(PROMPTS[0])]:
        assert tokenizer.encode(text, add_special_tokens=False).ids == rank_bpe(spec, text,
                                                                               split or spec["config"]["pattern"])
    # the two splits differ where tekken's own splits digits one by one
    assert (tekken_tokenizer(data).encode(TEXTS[0], add_special_tokens=False).ids
            != tekken_tokenizer(data, None).encode(TEXTS[0], add_special_tokens=False).ids)


def test_klein_matches_diffusers(klein, qwen3_reference, hf_tokenizer) -> None:  # noqa: F811
    encoder = klein.encoder
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt.replace("\\(", "(").replace("\\)", ")")}]
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                enable_thinking=False)
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert klein_tokens(prompt) == hf_tokenizer(text).input_ids
    unescaped = [p.replace("\\(", "(").replace("\\)", ")") for p in PROMPTS]
    with torch.no_grad():
        expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(qwen3_reference, hf_tokenizer, unescaped)
        encoding = encoder.encode(PROMPTS)
    assert encoding.cond.shape == expected.shape == (2, 512, 24) and klein.context_dim == 24
    torch.testing.assert_close(encoding.cond, expected, atol=1e-5, rtol=1e-5)  # the padding's states too
    lengths = encoding.extra["attention_mask"].sum(1).tolist()
    assert lengths == [len(klein_tokens(p)) for p in PROMPTS] and encoding.extra["attention_mask"].dtype == torch.long
    # per token: the inputs of layers 9, 18 and 27 in that order, no final norm
    with torch.no_grad():
        states = qwen3_reference(torch.tensor([klein_tokens(PROMPTS[0])]), output_hidden_states=True).hidden_states
    length = lengths[0]
    for i, layer in enumerate((9, 18, 27)):
        torch.testing.assert_close(encoding.cond[0, :length, 8 * i:8 * (i + 1)], states[layer][0], atol=1e-5,
                                   rtol=1e-5)


def dev_ids(spec: dict, prompt: str) -> list[int]:
    return [1, *rank_bpe(spec, DEV_TEMPLATE.format(prompt), LLAMA3_SPLIT)]


def test_mistral_matches_transformers(mistral, mistral_file, mistral_reference) -> None:
    spec = json.loads(tiny_tekken(TINY_CORPUS))
    encoder = mistral.encoder
    assert mistral.kind == "mistral3_24b" and mistral.context_dim == 24 and mistral.unused_keys == []
    assert len(encoder.mistral3_24b.layers) == 30  # the deepest read: the 31st layer is not run
    ids = dev_ids(spec, PROMPTS[0])
    assert encoder.tokenize(PROMPTS[0]) == ids and ids[:2] == [1, 17] and ids[-1] == 4
    with torch.no_grad():
        encoding = encoder.encode([PROMPTS[0]])
        states = mistral_reference(torch.tensor([ids]), output_hidden_states=True).hidden_states
    expected = torch.cat([states[10], states[20], states[30]], dim=-1)
    assert encoding.cond.shape == (1, len(ids), 24)
    torch.testing.assert_close(encoding.cond, expected, atol=1e-5, rtol=1e-5)
    assert encoding.extra["attention_mask"].tolist() == [[1] * len(ids)]


def test_mistral_prompt_tokens_match_diffusers_left_padded(mistral, mistral_reference) -> None:
    """diffusers pads on the left with <pad> under the mask: the prompt's states agree, the padding's are not zeros
    (ComfyUI's model_base.Flux2 and nodes.sd.flux2 pad with zeros)."""
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                "{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}[/INST]"
                "{% endif %}{% endfor %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=mistral.encoder.tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                        chat_template=template)
    prompt = PROMPTS[1].replace("\\(", "(").replace("\\)", ")")
    with torch.no_grad():
        expected = Flux2Pipeline._get_mistral_3_small_prompt_embeds(mistral_reference, tokenizer, [prompt],
                                                                    max_sequence_length=64)
        cond = mistral.encoder.encode([PROMPTS[1]]).cond
    length = cond.shape[1]
    assert expected.shape == (1, 64, 24)
    torch.testing.assert_close(cond[0], expected[0, -length:], atol=1e-4, rtol=1e-4)
    assert expected[0, :-length].abs().amin(-1).gt(0).all()


def test_a_dev_batch_puts_each_prompt_at_the_end(mistral) -> None:
    encoder = mistral.encoder
    with torch.no_grad():
        both = encoder.encode(["a cat", PROMPTS[0]])
        alone = encoder.encode(["a cat"]).cond[0]
    short = alone.shape[0]
    assert both.cond.shape[1] == len(encoder.tokenize(PROMPTS[0])) > short
    torch.testing.assert_close(both.cond[0, -short:], alone)
    assert both.cond[0, :-short].eq(0).all() and both.extra["attention_mask"][0].sum() == short
    assert both.extra["attention_mask"][1].all()


def test_pruned_mistral_gives_the_same_states(mistral, tmp_path) -> None:
    pruned = load_flux2_text_encoder([write_tiny_flux2_mistral(tmp_path / "pruned.safetensors", seed=5,
                                                               dtype=torch.float32, layers=30)])
    assert pruned.unused_keys == []
    with torch.no_grad():
        torch.testing.assert_close(pruned.encoder.encode(PROMPTS).cond, mistral.encoder.encode(PROMPTS).cond,
                                   atol=0, rtol=0)
    short = write_tiny_flux2_mistral(tmp_path / "short.safetensors", layers=29)
    with pytest.raises(CheckpointError, match="short.safetensors: Mistral Small 3.* with 29 layers; .*10, 20 and "
                                              "30, so it needs at least 30"):
        load_flux2_text_encoder([short])


def test_fp8_files_load_close_to_the_full_ones(klein, mistral, tmp_path) -> None:
    for full, write, seed in ((klein, write_tiny_flux2_klein, 3), (mistral, write_tiny_flux2_mistral, 5)):
        loaded = load_flux2_text_encoder([write(tmp_path / f"{seed}_fp8.safetensors", seed=seed,
                                                dtype=torch.float8_e4m3fn)])
        assert loaded.unused_keys == [] and loaded.encoder.dtype == torch.float32
        weight = loaded.encoder.model.layers[20].mlp.up_proj.weight
        torch.testing.assert_close(weight, full.encoder.model.layers[20].mlp.up_proj.weight
                                   .to(torch.float8_e4m3fn).float(), atol=0, rtol=0)  # the fp8 values, exactly
        with torch.no_grad():
            cond, reference = loaded.encoder.encode([PROMPTS[0]]).cond, full.encoder.encode([PROMPTS[0]]).cond
        # fp8's rounding of every weight, through up to 30 layers
        assert cond.shape == reference.shape and (cond - reference).abs().mean() < 0.25 * reference.abs().mean()


def fake(width: int, *keys: str, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.zeros(4, width)} | {key: torch.zeros(2) for key in keys} | extra


QWEN3 = ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.gate_proj.weight")
LLAMA = ("model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj.weight")
TEKKEN = {TEKKEN_KEY: torch.zeros(3, dtype=torch.uint8)}


def test_kinds(klein_file, mistral_file) -> None:
    assert text_kind(safetensors.torch.load_file(klein_file)) == "qwen3_4b"
    assert text_kind(safetensors.torch.load_file(mistral_file)) == "mistral3_24b"
    assert text_kind(fake(2560, *QWEN3)) == "qwen3_4b" and text_kind(fake(4096, *QWEN3)) == "qwen3_8b"
    assert text_kind(fake(2048, *QWEN3)) is None  # Qwen3-1.7B
    assert text_kind(fake(5120, *LLAMA)) == "mistral3_24b"
    assert text_kind(fake(3072, *LLAMA, **TEKKEN)) is None  # Ministral 3B
    assert text_kind(fake(8, *LLAMA)) is None  # a tiny Llama without a tekken tokenizer
    assert text_kind(fake(5120, *LLAMA, "model.layers.0.pre_feedforward_layernorm.weight")) is None  # Gemma


def test_wrong_files_are_refused(tmp_path, klein_file) -> None:
    needs = "CLIPLoader type flux2 takes one FLUX.2 text encoder"
    umt5 = write_tiny_umt5(tmp_path / "umt5.safetensors")
    with pytest.raises(CheckpointError, match=f"umt5.safetensors: not a FLUX.2 text encoder: it holds UMT5-XXL.*"
                                              f"{needs}"):
        load_flux2_text_encoder([umt5])
    safetensors.torch.save_file(fake(2048, *QWEN3), tmp_path / "qwen_3_1.7b.safetensors")
    with pytest.raises(CheckpointError, match="holds a Qwen3 language model 2048 wide, neither Qwen3-4B"):
        load_flux2_text_encoder([tmp_path / "qwen_3_1.7b.safetensors"])
    safetensors.torch.save_file(fake(3072, *LLAMA), tmp_path / "ministral.safetensors")
    with pytest.raises(CheckpointError, match="Llama-layout language model 3072 wide, not Mistral Small 3"):
        load_flux2_text_encoder([tmp_path / "ministral.safetensors"])
    safetensors.torch.save_file(fake(5120, *LLAMA), tmp_path / "mistral_no_tekken.safetensors")
    with pytest.raises(CheckpointError, match="mistral_no_tekken.safetensors: Mistral Small 3 without its tokenizer"):
        load_flux2_text_encoder([tmp_path / "mistral_no_tekken.safetensors"])
    z_image = write_tiny_qwen3(tmp_path / "z_image_qwen3.safetensors", layers=3)  # Z-Image's tiny Qwen3: 3 layers
    with pytest.raises(CheckpointError, match="Qwen3-4B, FLUX.2 \\[klein\\] 4B's text encoder with 3 layers"):
        load_flux2_text_encoder([z_image])
    with pytest.raises(CheckpointError, match="one text encoder file; got 2"):
        load_flux2_text_encoder([klein_file, klein_file])
    state = safetensors.torch.load_file(klein_file)
    tag = json.dumps({"format": "nvfp4"}).encode()  # an NVFP4 layer without its second-level scale
    state["model.layers.4.mlp.down_proj.comfy_quant"] = torch.frombuffer(bytearray(tag), dtype=torch.uint8)
    state["model.layers.4.mlp.down_proj.weight_scale"] = torch.ones(1)
    safetensors.torch.save_file(state, tmp_path / "fp4_mixed.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.4.mlp.down_proj.*weight_scale_2"):
        load_flux2_text_encoder([tmp_path / "fp4_mixed.safetensors"])
    del state["model.layers.27.self_attn.k_norm.weight"]  # unread (past the deepest layer): not missed
    del state["model.layers.4.mlp.down_proj.comfy_quant"]
    del state["model.layers.2.self_attn.k_norm.weight"]
    safetensors.torch.save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="broken.safetensors: 1 Qwen3 weights missing.*layers.2.self_attn.k_norm"):
        load_flux2_text_encoder([tmp_path / "broken.safetensors"])
