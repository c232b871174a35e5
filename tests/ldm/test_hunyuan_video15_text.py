"""HunyuanVideo 1.5's prompt encoding (ldm.hunyuan_video15_text) against diffusers' HunyuanVideo15Pipeline
.encode_prompt on transformers' Qwen2_5_VLTextModel and T5EncoderModel, built from their own configurations and
given the same tiny weights, with transformers' Qwen2Tokenizer (on the bundled vocabulary, Qwen2-VL's chat template
for text messages) and ByT5Tokenizer; float32."""

from __future__ import annotations

import json
import lzma
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from diffusers import HunyuanVideo15Pipeline
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts
from transformers import (
    ByT5Tokenizer,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
)

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.hunyuan_video15_text import (
    BYT5_MASK,
    CONDITIONING_BYT5,
    DIFFUSERS_CROP_START,
    DIFFUSERS_SYSTEM_MESSAGE,
    DIFFUSERS_TEMPLATE,
    SYSTEM_MESSAGE,
    TEMPLATE,
    TINY_BYT5,
    byt5_ids,
    glyph_prompt,
    glyph_texts,
    hunyuan_video15_text_encoder,
    is_byt5,
    load_hunyuan_video15_text_encoder,
    write_tiny_byt5,
)
from ldm.qwen_text import ATTENTION_MASK, VOCAB_FILE, template_end, tiny_qwen25_state, tokenize
from ldm.t5 import T5Config as LoomT5Config
from ldm.t5 import build_t5, t5_config_from_state_dict
from ldm.umt5 import write_tiny_umt5

PLAIN = "A cat walks on the grass, realistic (slow motion)"
QUOTED = 'A neon sign reading "OPEN 24h" above a café door, 招牌写着“欢迎”'
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
           "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
# Qwen2-VL's chat template, its branch for messages whose content is a string (HunyuanVideo15Pipeline's).
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
                 "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_LAYERS = 4  # so that hidden_states[-3] is a layer's output, not the embeddings


class VaeShape:
    """What the pipeline's __init__ reads of its VAE (no VAE is needed to encode prompts)."""

    temporal_compression_ratio, spatial_compression_ratio = 4, 16
    config = SimpleNamespace(latent_channels=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("te")
    qwen = folder / "qwen_2.5_vl_7b.safetensors"
    write_safetensors(tiny_qwen25_state(seed=3, layers=QWEN_LAYERS), qwen, {}, torch.float32)
    return qwen, write_tiny_byt5(folder / "byt5_small_glyphxl_fp16.safetensors", seed=5, dtype=torch.float32)


@pytest.fixture(scope="module")
def encoder(files):
    loaded = load_hunyuan_video15_text_encoder(list(files))
    assert loaded.family == "hunyuan_video15" and loaded.unused_keys == []  # the vision tower knowingly unused
    return loaded.encoder


@pytest.fixture(scope="module")
def hf_tokenizer() -> Qwen2Tokenizer:
    with lzma.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        model = json.load(f)["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def pipeline(files, hf_tokenizer) -> HunyuanVideo15Pipeline:
    """diffusers' pipeline with transformers' models (their own configurations) holding the tiny files' weights."""
    qwen_file, byt5_file = files
    text = Qwen2_5_VLTextConfig(vocab_size=152064, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=QWEN_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                rms_norm_eps=1e-6, max_position_embeddings=128000,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]})
    torch.manual_seed(0)
    qwen = Qwen2_5_VLTextModel(text).eval()
    state = safetensors.torch.load_file(qwen_file)
    qwen.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    t5 = T5EncoderModel(T5Config(vocab_size=1510, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
                                 is_encoder_decoder=False)).eval()
    missing = t5.load_state_dict(safetensors.torch.load_file(byt5_file), strict=False).missing_keys
    assert missing == ["encoder.embed_tokens.weight"]  # tied to shared.weight
    return HunyuanVideo15Pipeline(text_encoder=qwen, tokenizer=hf_tokenizer, transformer=None, vae=VaeShape(),
                                  scheduler=None, text_encoder_2=t5, tokenizer_2=ByT5Tokenizer(), guider=None)


def reference(pipeline: HunyuanVideo15Pipeline, prompts: list[str]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return pipeline.encode_prompt(prompts, device=torch.device("cpu"), dtype=torch.float32,
                                      batch_size=len(prompts))


def test_template_crop_is_diffusers(pipeline, hf_tokenizer) -> None:
    assert pipeline.system_message == DIFFUSERS_SYSTEM_MESSAGE
    assert pipeline.prompt_template_encode_start_idx == DIFFUSERS_CROP_START
    for prompt in (PLAIN, QUOTED, " "):
        messages = [{"role": "system", "content": DIFFUSERS_SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]
        ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True).input_ids
        assert tokenize(prompt, DIFFUSERS_TEMPLATE) == list(ids)
        assert template_end(ids) == DIFFUSERS_CROP_START  # ComfyUI's rule finds diffusers' constant
        assert ids[DIFFUSERS_CROP_START:] == hf_tokenizer(prompt).input_ids + [151645, 198, 151644, 77091, 198]


def test_comfyui_template_keeps_the_same_tokens(hf_tokenizer) -> None:
    """ComfyUI's template (the aspects a line each) drops 98 tokens, and keeps what diffusers' keeps."""
    assert "\n1. The main content" in TEMPLATE and SYSTEM_MESSAGE.count("\n") == 5
    for prompt in (PLAIN, QUOTED):
        ids = tokenize(prompt, TEMPLATE)
        assert template_end(ids) == 98
        assert ids[98:] == tokenize(prompt, DIFFUSERS_TEMPLATE)[DIFFUSERS_CROP_START:]


def test_glyph_texts_follow_comfyui() -> None:
    assert glyph_texts(PLAIN) == [] and glyph_prompt(PLAIN) is None
    assert glyph_texts(QUOTED) == ["OPEN 24h", "欢迎"]
    assert glyph_prompt(QUOTED) == 'Text "OPEN 24h". Text "欢迎". ' == extract_glyph_texts(QUOTED)
    assert glyph_prompt('a sign "\\(x\\)"') == 'Text "(x)". '
    # where diffusers differs: the quote kinds' order, repeats, Chinese single quotes
    mixed = '“B” then "A", "A" and ‘C’'
    assert glyph_texts(mixed) == ["A", "A", "C", "B"]
    assert extract_glyph_texts(mixed) == 'Text "B". Text "A". '


def test_byt5_ids_match_transformers() -> None:
    tokenizer = ByT5Tokenizer()
    for text in ('Text "OPEN 24h". Text "欢迎". ', "é" * 300):
        assert byt5_ids(text) == tokenizer(text).input_ids
        assert byt5_ids(text, 256) == tokenizer(text, max_length=256, truncation=True).input_ids


def test_prompt_without_quotes_matches_diffusers(encoder, pipeline) -> None:
    encoding = encoder.encode([PLAIN], template=DIFFUSERS_TEMPLATE)
    states, mask, byt5, byt5_mask = reference(pipeline, [PLAIN])
    length = len(tokenize(PLAIN, DIFFUSERS_TEMPLATE)) - DIFFUSERS_CROP_START
    assert encoding.pooled is None and encoding.cond.shape == (1, length, 32)
    assert encoding.extra[ATTENTION_MASK].tolist() == [[1] * length] and mask.sum().item() == length
    assert (encoding.cond - states[:, :length]).abs().max() < 1e-5
    assert CONDITIONING_BYT5 not in encoding.extra and BYT5_MASK not in encoding.extra  # ComfyUI's: no byT5 key
    assert byt5.shape == (1, 256, 32) and byt5.eq(0).all() and byt5_mask.eq(0).all()  # diffusers': masked zeros


def test_quoted_text_matches_diffusers(encoder, pipeline) -> None:
    encoding = encoder.encode(QUOTED, template=DIFFUSERS_TEMPLATE)
    states, mask, byt5, byt5_mask = reference(pipeline, [QUOTED])
    length = int(mask.sum())
    assert encoding.cond.shape[1] == length and (encoding.cond - states[:, :length]).abs().max() < 1e-5
    glyph_length = len(byt5_ids(glyph_prompt(QUOTED)))
    ours, ours_mask = encoding.extra[CONDITIONING_BYT5], encoding.extra[BYT5_MASK]
    assert ours.shape == (1, glyph_length, 32) and ours_mask.dtype == torch.int64 and ours_mask.eq(1).all()
    assert byt5_mask.sum().item() == glyph_length and byt5_mask[0, :glyph_length].eq(1).all()
    assert (ours - byt5[:, :glyph_length]).abs().max() < 1e-5 and ours.abs().amax() > 0.1


def test_batch_of_two_matches_each_alone_and_diffusers(encoder, pipeline) -> None:
    encoding = encoder.encode([PLAIN, QUOTED], template=DIFFUSERS_TEMPLATE)
    states, mask, byt5, byt5_mask = reference(pipeline, [PLAIN, QUOTED])
    lengths = mask.sum(1).int().tolist()
    assert encoding.extra[ATTENTION_MASK].sum(1).tolist() == lengths and encoding.cond.shape[1] == max(lengths)
    for i, length in enumerate(lengths):
        assert (encoding.cond[i, :length] - states[i, :length]).abs().max() < 1e-5
        assert encoding.cond[i, length:].eq(0).all()
        alone = encoder.encode([PLAIN, QUOTED][i], template=DIFFUSERS_TEMPLATE).cond[0]
        assert (alone - encoding.cond[i, :length]).abs().max() < 1e-5
    ours, ours_mask = encoding.extra[CONDITIONING_BYT5], encoding.extra[BYT5_MASK]
    glyph_length = len(byt5_ids(glyph_prompt(QUOTED)))
    assert ours_mask.tolist() == [[0] * glyph_length, [1] * glyph_length]  # no quotes: a zero row, as diffusers
    assert ours[0].eq(0).all() and byt5_mask[0].eq(0).all()
    assert (ours[1] - byt5[1, :glyph_length]).abs().max() < 1e-5


def test_glyph_batch_pads_and_masks(encoder) -> None:
    short, long = 'a "Hi" sign', 'a "Hello there, world" sign'
    encoding = encoder.encode([long, short])
    lengths = [len(byt5_ids(glyph_prompt(p))) for p in (long, short)]
    assert encoding.extra[BYT5_MASK].sum(1).tolist() == lengths
    alone = encoder.encode(short).extra[CONDITIONING_BYT5][0]
    batched = encoding.extra[CONDITIONING_BYT5][1]
    assert (batched[:lengths[1]] - alone).abs().max() < 1e-5 and batched[lengths[1]:].eq(0).all()


def test_files_in_either_order_and_qwen_alone(files, encoder) -> None:
    qwen_file, byt5_file = files
    swapped = load_hunyuan_video15_text_encoder([byt5_file, qwen_file]).encoder.encode(QUOTED)
    assert torch.equal(swapped.extra[CONDITIONING_BYT5], encoder.encode(QUOTED).extra[CONDITIONING_BYT5])
    alone = load_hunyuan_video15_text_encoder([qwen_file]).encoder
    assert alone.byt5_small is None and set(alone.encode(QUOTED).extra) == {ATTENTION_MASK}


def test_file_kinds_and_refusals(files, tmp_path) -> None:
    qwen_file, byt5_file = files
    qwen, byt5 = safetensors.torch.load_file(qwen_file), safetensors.torch.load_file(byt5_file)
    assert is_byt5(byt5) and not is_byt5(qwen)
    assert byt5["shared.weight"].shape == (TINY_BYT5.vocab_size, TINY_BYT5.d_model)
    umt5 = safetensors.torch.load_file(write_tiny_umt5(tmp_path / "umt5.safetensors"))
    assert not is_byt5(umt5)
    with pytest.raises(CheckpointError, match="neither Qwen2.5-VL-7B nor byT5"):
        hunyuan_video15_text_encoder([("qwen", qwen), ("umt5.safetensors", umt5)])
    with pytest.raises(CheckpointError, match="needs the Qwen2.5-VL-7B file"):
        hunyuan_video15_text_encoder([("byt5.safetensors", byt5)])
    with pytest.raises(CheckpointError, match="both byT5"):
        hunyuan_video15_text_encoder([("qwen", qwen), ("a", byt5), ("b", byt5)])


def test_byt5_small_glyph_shape_is_read_from_its_weights() -> None:
    """byt5_small_glyphxl's shapes (ComfyUI's byt5_config_small_glyph.json), on the meta device."""
    glyph = LoomT5Config(vocab_size=1510, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6)
    shapes = {k: v for k, v in build_t5(glyph, device="meta").model.state_dict().items()
              if k != "encoder.embed_tokens.weight"}
    assert is_byt5(shapes) and t5_config_from_state_dict(shapes) == glyph
    assert shapes["encoder.block.0.layer.0.SelfAttention.q.weight"].shape == (384, 1472)


def test_hunyuan_image21_prompts_match_diffusers(files, pipeline) -> None:
    """HunyuanImage 2.1's encoding (ComfyUI's type hunyuan_image): its template, 34 tokens dropped, the prompt's
    states and `<|im_end|>` kept, against diffusers' HunyuanImagePipeline on the same Qwen model; the glyph text as
    HunyuanVideo 1.5's."""
    from diffusers import HunyuanImagePipeline
    from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

    from ldm.hunyuan_video15_text import IMAGE_TEMPLATE, HunyuanImage21TextEncoder, load_hunyuan_image21_text_encoder

    loaded = load_hunyuan_image21_text_encoder(list(files))
    assert isinstance(loaded.encoder, HunyuanImage21TextEncoder) and loaded.family == "hunyuan_image21"
    encoding = loaded.encoder.encode([PLAIN, QUOTED])
    with torch.no_grad():
        states, mask = HunyuanImagePipeline._get_qwen_prompt_embeds(
            pipeline, pipeline.tokenizer, pipeline.text_encoder, [PLAIN, QUOTED], torch.device("cpu"), torch.float32,
            template=IMAGE_TEMPLATE)
        glyph = extract_glyph_text(QUOTED)
        byt5, byt5_mask = HunyuanImagePipeline._get_byt5_prompt_embeds(
            pipeline, pipeline.tokenizer_2, pipeline.text_encoder_2, glyph, torch.device("cpu"), torch.float32)
    lengths = mask.sum(1).int().tolist()
    assert template_end(tokenize(PLAIN, IMAGE_TEMPLATE)) == 34
    assert encoding.extra[ATTENTION_MASK].sum(1).tolist() == lengths
    for i, length in enumerate(lengths):
        assert (encoding.cond[i, :length] - states[i, :length]).abs().max() < 1e-5
    assert glyph == glyph_prompt(QUOTED)  # no ASCII single quotes here, which diffusers also reads
    glyph_length = int(byt5_mask.sum())
    ours = encoding.extra[CONDITIONING_BYT5][1, :glyph_length]
    assert (ours - byt5[0, :glyph_length]).abs().max() < 1e-5
    empty = loaded.encoder.encode([""])
    assert empty.cond.shape[1] == 1  # an empty prompt stays empty: `<|im_end|>` alone (HunyuanVideo 1.5's: " ")
