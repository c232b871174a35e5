"""ACE-Step 1.5's text side (ldm.ace_step15_text): its prompts against ComfyUI's ACE15Tokenizer templates restated
here, its encodings against transformers' Qwen3Model on the same tiny weights, its KV-cached audio-code sampler
against a loop that reruns transformers' Qwen3ForCausalLM (tied head, positions counted from the attention mask) over
the whole sequence each step, the sampling filters, and the loader's reading and refusal of files."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from ldm.ace_step15_text import (
    AUDIO_CODE_END,
    AUDIO_CODE_START,
    AUDIO_CODES,
    END_TOKEN,
    AceStep15TextEncoder,
    CodeSampling,
    comfy_mask,
    file_role,
    filtered,
    guided,
    left_padded,
    load_ace_step15_text_encoder,
    picked,
    sample_audio_codes,
    song_prompts,
    write_tiny_ace_step15_encoder,
    write_tiny_ace_step15_lm,
)
from ldm.checkpoint import CheckpointError
from ldm.qwen3_text import token_ids
from ldm.qwen_text import PAD_TOKEN
from ldm.stable_audio_text import write_tiny_t5_base

TAGS = "  upbeat pop, piano, female vocals \n"
LYRICS = "[verse]\nHello \\(little\\) world\n[chorus]\nla la la\n"
SONG = {"bpm": 120, "duration": 10.2, "timesignature": "4", "language": "en", "keyscale": "C major"}
# ComfyUI's ACE15Tokenizer templates, restated
SYSTEM = ("<|im_start|>system\n# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n"
          "<|im_end|>\n")


def lm_prompt(think: str) -> str:
    return (SYSTEM + "<|im_start|>user\n# Caption\nupbeat pop, piano, female vocals\n\n# Lyric\n"
            "[verse]\nHello \\(little\\) world\n[chorus]\nla la la\n<|im_end|>\n<|im_start|>assistant\n"
            f"{think}\n\n<|im_end|>\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ace")
    return {"encoder": write_tiny_ace_step15_encoder(folder / "qwen_0.6b_ace15.safetensors", 3, dtype=torch.float32),
            "lm": write_tiny_ace_step15_lm(folder / "qwen_1.7b_ace15.safetensors", 4, dtype=torch.float32)}


@pytest.fixture(scope="module")
def loaded(files) -> AceStep15TextEncoder:
    return load_ace_step15_text_encoder([files["encoder"], files["lm"]]).encoder


def _config(sd: dict[str, torch.Tensor], layers: int = 2) -> Qwen3Config:
    vocab, width = sd["model.embed_tokens.weight"].shape
    return Qwen3Config(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
                       attention_bias=False)


@pytest.fixture(scope="module")
def reference_encoder(files) -> Qwen3Model:
    sd = safetensors.torch.load_file(files["encoder"])
    model = Qwen3Model(_config(sd)).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()})
    return model


@pytest.fixture(scope="module")
def reference_lm(files) -> Qwen3ForCausalLM:
    sd = safetensors.torch.load_file(files["lm"])
    model = Qwen3ForCausalLM(_config(sd)).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as ComfyUI's has it
    return model


def test_prompts_are_comfyuis() -> None:
    prompts = song_prompts(TAGS, LYRICS, **SONG)
    assert prompts.lm == lm_prompt("<think>\nbpm: 120\nduration: 11\nkeyscale: C major\ntimesignature: 4\n</think>")
    assert prompts.lm_negative == lm_prompt("<think>\n\n</think>")
    assert prompts.lyrics == ("# Languages\nen\n\n# Lyric\n[verse]\nHello \\(little\\) world\n[chorus]\nla la la\n"
                              "<|endoftext|><|endoftext|>")
    assert prompts.caption == ("# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n"
                               "# Caption\nupbeat pop, piano, female vocals\n\n# Metas\n- bpm: 120\n"
                               "- timesignature: 4\n- keyscale: C major\n- duration: 11 seconds\n"
                               "<|endoftext|>\n<|endoftext|>")
    assert prompts.codes == 55
    # the node's int time signature, "N/4" and digit strings read alike
    assert song_prompts(TAGS, LYRICS, **(SONG | {"timesignature": 4, "bpm": "120"})) == prompts
    assert song_prompts(TAGS, LYRICS, **(SONG | {"timesignature": "4/4"})) == prompts


def test_clip_text_encode_defaults() -> None:
    prompts = song_prompts("rock")
    assert prompts.lm.endswith("<|im_start|>assistant\n<think>\nduration: 120\n</think>\n\n<|im_end|>\n")
    assert "# Caption\nrock\n\n# Lyric\n\n<|im_end|>" in prompts.lm
    assert prompts.lyrics == "# Languages\n\n\n# Lyric\n<|endoftext|><|endoftext|>"
    assert prompts.caption.endswith("# Metas\n- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n"
                                    "- duration: 120 seconds\n<|endoftext|>\n<|endoftext|>")
    assert prompts.codes == 600


def test_tokens_and_masks() -> None:
    ids = song_prompts(TAGS, LYRICS, **SONG).token_ids()
    assert ids["qwen3_06b"][-3:] == [PAD_TOKEN, 198, PAD_TOKEN]  # "\n" between the two <|endoftext|>
    assert 151667 in ids["lm_prompt"] and 151668 in ids["lm_prompt"]  # <think>, </think> whole
    assert ids["lyrics"] == token_ids(song_prompts(TAGS, LYRICS, **SONG).lyrics.replace("\\", ""))  # \( is (
    assert comfy_mask([PAD_TOKEN, PAD_TOKEN, 5, 6, PAD_TOKEN, 7, PAD_TOKEN]) == [0, 0, 1, 1, 0, 0, 0]
    batch, mask = left_padded([[1, 2, 3], [4]])
    assert batch.tolist() == [[1, 2, 3], [PAD_TOKEN, PAD_TOKEN, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_encodings_match_transformers(loaded, reference_encoder) -> None:
    encoding = loaded.encode_song(TAGS, LYRICS, generate_audio_codes=False, **SONG)
    ids = song_prompts(TAGS, LYRICS, **SONG).token_ids()
    caption = torch.tensor([ids["qwen3_06b"]])
    with torch.no_grad():
        expected = reference_encoder(input_ids=caption, attention_mask=torch.tensor([comfy_mask(caption[0].tolist())])
                                     ).last_hidden_state
        lyrics = reference_encoder.embed_tokens(torch.tensor([ids["lyrics"]]))
    assert encoding.cond.shape == (1, caption.shape[1], 32) and encoding.pooled is None
    assert (encoding.cond - expected).abs().max() < 1e-5
    assert torch.equal(encoding.extra["conditioning_lyrics"], lyrics)
    assert "audio_codes" not in encoding.extra


def _rerun_codes(model: Qwen3ForCausalLM, positive: list[int], negative: list[int], seed: int, count: int,
                 sampling: CodeSampling) -> tuple[list[int], list[torch.Tensor]]:
    """The sampler without a cache: the whole sequence through transformers each step, positions from the mask."""
    ids, mask = left_padded([positive, negative])
    generator = torch.Generator().manual_seed(seed)
    codes, steps = [], []
    for _ in range(count):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        steps.append(guided(logits, sampling.cfg_scale))
        token = picked(filtered(steps[-1], len(codes), count, sampling), sampling.temperature, generator)
        codes.append(token - AUDIO_CODE_START)
        ids = torch.cat([ids, torch.full((2, 1), token)], 1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    return codes, steps


def test_cached_sampler_matches_full_reruns(loaded, reference_lm) -> None:
    ids = song_prompts(TAGS, LYRICS, **SONG).token_ids()
    positive, negative = ids["lm_prompt"], ids["lm_prompt_negative"]
    assert len(positive) > len(negative)  # the negative is left-padded
    sampling = CodeSampling(top_k=50, min_p=0.01)
    steps: list[torch.Tensor] = []
    codes = sample_audio_codes(loaded.lm, positive, negative, seed=11, min_tokens=8, max_tokens=8, sampling=sampling,
                               on_logits=steps.append)
    expected, expected_steps = _rerun_codes(reference_lm, positive, negative, 11, 8, sampling)
    assert codes == expected
    assert max((a - b).abs().max() for a, b in zip(steps, expected_steps, strict=True)) < 1e-4


def test_greedy_codes_are_the_guided_argmax(loaded) -> None:
    ids = song_prompts("jazz", "", duration=1).token_ids()
    steps: list[torch.Tensor] = []
    codes = sample_audio_codes(loaded.lm, ids["lm_prompt"], ids["lm_prompt_negative"], seed=0, min_tokens=5,
                               max_tokens=5, sampling=CodeSampling(temperature=0.0), on_logits=steps.append)
    assert codes == [int(s[0, AUDIO_CODE_START:AUDIO_CODE_END].argmax()) for s in steps]


def test_filters() -> None:
    logits = torch.randn(1, AUDIO_CODE_END + 1000, generator=torch.Generator().manual_seed(0))
    logits[0, END_TOKEN] = 50.0
    least = torch.finfo(logits.dtype).min
    kept = filtered(logits, 3, 3, CodeSampling(top_p=1.0)) > least
    assert kept[0, AUDIO_CODE_START:AUDIO_CODE_END].all() and kept.sum() == AUDIO_CODES  # the end not yet
    later = filtered(logits, 4, 3, CodeSampling(top_p=1.0)) > least
    assert later[0, END_TOKEN] and later.sum() == AUDIO_CODES + 1
    assert (filtered(logits, 0, 3, CodeSampling(top_k=7, top_p=1.0)) > least).sum() == 7
    probs = logits[:, AUDIO_CODE_START:AUDIO_CODE_END].softmax(-1)
    by_min_p = filtered(logits, 0, 3, CodeSampling(top_p=1.0, min_p=0.5)) > least
    assert by_min_p.sum() == (probs >= 0.5 * probs.max()).sum()
    top_p = filtered(logits, 0, 3, CodeSampling(top_p=0.3)) > least
    mass = probs.sort(-1, descending=True).values.cumsum(-1)
    assert top_p.sum() == int((mass < 0.3).sum()) + 1  # the smallest set holding 0.3
    generator = torch.Generator().manual_seed(1)
    draws = {picked(filtered(logits, 0, 3, CodeSampling(top_k=3)), 0.85, generator) for _ in range(50)}
    assert draws <= set(range(AUDIO_CODE_START, AUDIO_CODE_END)) and len(draws) > 1


def test_end_only_after_min_tokens(loaded, monkeypatch) -> None:
    ids = song_prompts("jazz", "", duration=1).token_ids()
    logits_of = loaded.lm.last_logits
    end_bias = torch.zeros(loaded.lm.model.embed_tokens.weight.shape[0])
    end_bias[END_TOKEN] = 1e4  # the end wins as soon as it may

    def biased(*args):
        logits, cache = logits_of(*args)
        return logits + end_bias, cache

    monkeypatch.setattr(loaded.lm, "last_logits", biased)
    codes = sample_audio_codes(loaded.lm, ids["lm_prompt"], ids["lm_prompt_negative"], seed=0, min_tokens=3,
                               max_tokens=10)
    assert len(codes) == 4  # taken once more than min_tokens codes are written


def test_song_codes_count_and_seeds(loaded) -> None:
    song = SONG | {"duration": 1.4}
    first = loaded.encode_song(TAGS, LYRICS, seed=5, **song).extra["audio_codes"]
    assert first.shape == (1, 10) and first.dtype == torch.long  # 5 a second of 2 seconds: the end never comes
    assert ((first >= 0) & (first < AUDIO_CODES)).all()
    assert torch.equal(loaded.encode_song(TAGS, LYRICS, seed=5, **song).extra["audio_codes"], first)
    assert not torch.equal(loaded.encode_song(TAGS, LYRICS, seed=6, **song).extra["audio_codes"], first)
    one = loaded.encode_song(TAGS, LYRICS, seed=5, cfg_scale=1.0, **song).extra["audio_codes"]
    assert one.shape == (1, 10)


def test_encode_batches_songs(loaded, files) -> None:
    song = {"lyrics": "la", "seed": 2, "duration": 0.5, "timesignature": 3, "language": "fr", "keyscale": "A minor"}
    short, long = "piano", "a much longer caption for a song, strings, brass, drums"
    encoding = loaded.encode([short, long], song=song)
    alone = [loaded.encode_song(p, **song) for p in (short, long)]
    length = alone[1].cond.shape[1]
    assert encoding.cond.shape == (2, length, 32)
    assert torch.equal(encoding.cond[1], alone[1].cond[0])
    assert torch.equal(encoding.cond[0, :alone[0].cond.shape[1]], alone[0].cond[0])
    assert not encoding.cond[0, alone[0].cond.shape[1]:].any()
    assert "attention_mask" not in encoding.extra  # the model takes no mask (ComfyUI passes none)
    assert torch.equal(encoding.extra["audio_codes"], torch.cat([a.extra["audio_codes"] for a in alone]))
    # CLIPTextEncode: ComfyUI's defaults; with the encoder alone, no codes
    encoder_only = load_ace_step15_text_encoder([files["encoder"]]).encoder
    assert encoder_only.lm is None
    default = encoder_only.encode(["rock"])
    assert torch.equal(default.cond, loaded.encode_song("rock", generate_audio_codes=False).cond)
    assert set(default.extra) == {"conditioning_lyrics"}


def test_loader_reads_either_order_and_refuses_others(files, loaded, tmp_path) -> None:
    swapped = load_ace_step15_text_encoder([files["lm"], files["encoder"]])
    assert swapped.family == "ace_step15" and swapped.unused_keys == []
    for mine, theirs in zip(swapped.encoder.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    assert file_role(safetensors.torch.load_file(files["lm"])) == "lm"
    t5 = write_tiny_t5_base(tmp_path / "t5_base.safetensors")
    with pytest.raises(CheckpointError, match="t5_base.safetensors: not an ACE-Step 1.5 text encoder file.*"
                                              "DualCLIPLoader type ace takes qwen_0.6b_ace15"):
        load_ace_step15_text_encoder([files["encoder"], t5])
    with pytest.raises(CheckpointError, match="needs the text encoder"):
        load_ace_step15_text_encoder([files["lm"]])
    with pytest.raises(CheckpointError, match="both ACE-Step 1.5 text encoders"):
        load_ace_step15_text_encoder([files["encoder"], files["encoder"]])
    # Z-Image's Qwen3-4B, by its header's shapes: 2560 wide without the audio codes
    z_image = {"model.embed_tokens.weight": torch.empty(151936, 2560, device="meta"),
               "model.layers.0.self_attn.q_norm.weight": torch.empty(128, device="meta"),
               "model.layers.0.mlp.gate_proj.weight": torch.empty(9728, 2560, device="meta")}
    assert file_role(z_image) is None
    real_lm = z_image | {"model.embed_tokens.weight": torch.empty(217204, 2048, device="meta")}
    assert file_role(real_lm) == "lm"
    assert file_role(z_image | {"model.embed_tokens.weight": torch.empty(151669, 1024, device="meta")}) == "encoder"
