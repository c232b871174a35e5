"""PhotoMaker v1: the ID encoder against the paper's forward (TencentARC's photomaker/model.py, written out op by op
here: the repository is not pip-installable) on a tiny random encoder in the real key layout, the files it comes in,
and the prompt edit that fuses photos into the class word of an SDXL prompt."""

from __future__ import annotations

import safetensors.torch
import torch
import torch.nn.functional as F

from ldm.checkpoint import CheckpointError
from ldm.clip_vision import preprocess
from ldm.photomaker import encode_with_id, load_photomaker, mark_class_word
from ldm.text_encoders import build_text_encoder, random_text_encoder_config
from ldm.tokenizer import ClipTokenizer
from tests.ldm.test_clip_vision import _randomize, _smooth_image

VISION_WIDTH, IMAGE_SIZE = 32, 32
WIDTHS = (32, 48)  # visual_projection's and visual_projection_2's: tiny-sdxl's CLIP-L and bigG widths
EMBED = sum(WIDTHS)


def _tower(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8, projection_dim=WIDTHS[0],
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return _randomize(CLIPVisionModelWithProjection(config), seed)


def tiny_photomaker(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny PhotoMaker v1 ID encoder's state dict in the file's layout, every weight random."""
    generator = torch.Generator().manual_seed(seed + 1000)

    def rand(*shape: int, around: float = 0.0) -> torch.Tensor:
        return around + 0.1 * torch.randn(shape, generator=generator)

    sd = dict(_tower(seed).state_dict())
    sd["visual_projection_2.weight"] = rand(WIDTHS[1], VISION_WIDTH)
    for mlp, width in (("mlp1", 2 * EMBED), ("mlp2", EMBED)):
        sd |= {f"fuse_module.{mlp}.layernorm.weight": rand(width, around=1.0),
               f"fuse_module.{mlp}.layernorm.bias": rand(width),
               f"fuse_module.{mlp}.fc1.weight": rand(EMBED, width), f"fuse_module.{mlp}.fc1.bias": rand(EMBED),
               f"fuse_module.{mlp}.fc2.weight": rand(EMBED, EMBED), f"fuse_module.{mlp}.fc2.bias": rand(EMBED)}
    sd |= {"fuse_module.layer_norm.weight": rand(EMBED, around=1.0), "fuse_module.layer_norm.bias": rand(EMBED)}
    return sd


def tiny_lora() -> dict[str, torch.Tensor]:
    """A stand-in for the file's `lora_weights` half (diffusers' attention-processor names)."""
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    return {f"{name}.down.weight": torch.zeros(4, 64), f"{name}.up.weight": torch.zeros(64, 4)}


# --- the paper's forward, op by op (photomaker/model.py: MLP, FuseModule, PhotoMakerIDEncoder) -------------

def _ref_mlp(sd, prefix, x, residual):
    h = F.layer_norm(x, (x.shape[-1],), sd[prefix + "layernorm.weight"], sd[prefix + "layernorm.bias"], 1e-5)
    h = F.linear(h, sd[prefix + "fc1.weight"], sd[prefix + "fc1.bias"])
    h = F.gelu(h)  # nn.GELU(): the exact erf form
    h = F.linear(h, sd[prefix + "fc2.weight"], sd[prefix + "fc2.bias"])
    return h + x if residual else h


def _ref_fuse_fn(sd, prompt_embeds, id_embeds):
    stacked = torch.cat([prompt_embeds, id_embeds], dim=-1)
    stacked = _ref_mlp(sd, "fuse_module.mlp1.", stacked, residual=False) + prompt_embeds
    stacked = _ref_mlp(sd, "fuse_module.mlp2.", stacked, residual=True)
    return F.layer_norm(stacked, (stacked.shape[-1],), sd["fuse_module.layer_norm.weight"],
                        sd["fuse_module.layer_norm.bias"], 1e-5)


def _ref_fuse_module(sd, prompt_embeds, id_embeds, class_tokens_mask):
    id_embeds = id_embeds.to(prompt_embeds.dtype)
    num_inputs = class_tokens_mask.sum().unsqueeze(0)
    batch_size, max_num_inputs = id_embeds.shape[:2]
    seq_length = prompt_embeds.shape[1]
    flat_id_embeds = id_embeds.view(-1, id_embeds.shape[-2], id_embeds.shape[-1])
    valid_id_mask = torch.arange(max_num_inputs)[None, :] < num_inputs[:, None]
    valid_id_embeds = flat_id_embeds[valid_id_mask.flatten()]
    prompt_embeds = prompt_embeds.clone().view(-1, prompt_embeds.shape[-1])
    class_tokens_mask = class_tokens_mask.view(-1)
    valid_id_embeds = valid_id_embeds.view(-1, valid_id_embeds.shape[-1])
    image_token_embeds = prompt_embeds[class_tokens_mask]
    stacked_id_embeds = _ref_fuse_fn(sd, image_token_embeds, valid_id_embeds)
    assert class_tokens_mask.sum() == stacked_id_embeds.shape[0]
    prompt_embeds.masked_scatter_(class_tokens_mask[:, None], stacked_id_embeds.to(prompt_embeds.dtype))
    return prompt_embeds.view(batch_size, seq_length, -1)


@torch.no_grad()
def _ref_id_encoder(tower, sd, id_pixel_values, prompt_embeds, class_tokens_mask):
    b, num_inputs, c, h, w = id_pixel_values.shape
    shared_id_embeds = tower.vision_model(id_pixel_values.view(b * num_inputs, c, h, w))[1]
    id_embeds = tower.visual_projection(shared_id_embeds).view(b, num_inputs, 1, -1)
    id_embeds_2 = F.linear(shared_id_embeds, sd["visual_projection_2.weight"]).view(b, num_inputs, 1, -1)
    return _ref_fuse_module(sd, prompt_embeds, torch.cat((id_embeds, id_embeds_2), dim=-1), class_tokens_mask)


def _ref_id_embeds(tower, sd, image):
    with torch.no_grad():
        pooled = tower.vision_model(preprocess(image, IMAGE_SIZE))[1]
    return torch.cat([tower.visual_projection(pooled), F.linear(pooled, sd["visual_projection_2.weight"])], -1)


def _photos(count: int) -> torch.Tensor:
    return torch.cat([_smooth_image(seed, 40, 48) for seed in range(count)])


def test_the_id_encoder_matches_the_papers_forward(tmp_path):
    sd = tiny_photomaker(seed=1)
    torch.save({"id_encoder": sd, "lora_weights": tiny_lora()}, tmp_path / "photomaker-v1.bin")
    loaded = load_photomaker(tmp_path / "photomaker-v1.bin")
    assert loaded.unused_keys == []
    model, tower = loaded.model, _tower(seed=1)
    assert model.config.embed_dim == EMBED and model.config.vision.image_size == IMAGE_SIZE
    photos = _photos(3)
    prompt = torch.randn(1, 77, EMBED, generator=torch.Generator().manual_seed(5))
    for first, count in ((4, 1), (6, 3)):
        mask = torch.zeros(1, 77, dtype=torch.bool)
        mask[0, first:first + count] = True
        pixels = preprocess(photos[:count], IMAGE_SIZE)
        expected = _ref_id_encoder(tower, sd, pixels.unsqueeze(0), prompt, mask)
        ours = prompt.clone()
        ours[0, first:first + count] = model.fuse(prompt[0, first:first + count], model.id_embeds(photos[:count]))
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        assert torch.equal(ours[~mask], prompt[~mask]) and (ours[mask] - prompt[mask]).abs().max() > 0.1


def test_the_files_it_comes_in_load_alike(tmp_path):
    sd = tiny_photomaker(seed=2)
    safetensors.torch.save_file(sd, tmp_path / "bare.safetensors")
    safetensors.torch.save_file({**{f"id_encoder.{k}": v for k, v in sd.items()},
                                 **{f"lora_weights.{k}": v for k, v in tiny_lora().items()}},
                                tmp_path / "prefixed.safetensors")
    torch.save({**sd, "vision_model.embeddings.position_ids": torch.arange(17)[None], "extra.weight": torch.ones(2)},
               tmp_path / "flat.pt")
    photo = _photos(1)
    embeds = [load_photomaker(tmp_path / name).model.id_embeds(photo)
              for name in ("bare.safetensors", "prefixed.safetensors", "flat.pt")]
    for other in embeds[1:]:  # the same weights (tensors laid out differently in memory: float-exact at most)
        torch.testing.assert_close(other, embeds[0], rtol=0, atol=1e-6)
    assert load_photomaker(tmp_path / "flat.pt").unused_keys == ["extra.weight"]  # position_ids: rebuilt
    half = load_photomaker(tmp_path / "bare.safetensors", dtype=torch.float16).model
    assert half.visual_projection_2.weight.dtype == torch.float16


def test_wrong_files_are_refused_by_name(tmp_path):
    sd = tiny_photomaker(seed=3)
    cases = {
        "v2.bin": ({"id_encoder": {**sd, "qformer_perceiver.token_norm.weight": torch.ones(4)}, "lora_weights": {}},
                   "PhotoMaker V2"),
        "vit.safetensors": (dict(_tower(0).state_dict()), "Load CLIP Vision"),
        "lora.safetensors": (tiny_lora(), "Load LoRA"),
        "other.safetensors": ({"something.weight": torch.ones(2)}, "no id_encoder"),
    }
    for name, (content, said) in cases.items():
        if name.endswith(".bin"):
            torch.save(content, tmp_path / name)
        else:
            safetensors.torch.save_file(content, tmp_path / name)
        try:
            load_photomaker(tmp_path / name)
        except CheckpointError as e:
            assert name in str(e) and said in str(e) and "not a PhotoMaker v1 model" in str(e)
        else:
            raise AssertionError(f"{name} was accepted")
    (tmp_path / "garbage.bin").write_bytes(b"not a model at all")
    try:
        load_photomaker(tmp_path / "garbage.bin")
    except CheckpointError as e:
        assert "garbage.bin: not a checkpoint" in str(e)
    else:
        raise AssertionError("a file of garbage was accepted")
    del sd["fuse_module.mlp2.fc1.bias"]
    safetensors.torch.save_file(sd, tmp_path / "cut.safetensors")
    try:
        load_photomaker(tmp_path / "cut.safetensors")
    except CheckpointError as e:
        assert "missing 1 weights: fuse_module.mlp2.fc1.bias" in str(e)
    else:
        raise AssertionError("a file missing a weight was accepted")


# --- the prompt ------------------------------------------------------------------------------------------

def _comfy_token_index(text: str) -> int:
    """ComfyUI's rule: the class word's token position is the trigger's word number minus one (words by spaces)."""
    return text.split(" ").index("photomaker")


def test_the_class_word_is_marked_where_comfyui_and_the_paper_put_it():
    tokenizer = ClipTokenizer()
    text = "a photograph of a man photomaker wearing a hat"
    marked, positions = mark_class_word(tokenizer.tokenize(text), copies=1)
    assert positions == [_comfy_token_index(text)] == [5]
    assert marked == tokenizer.tokenize("a photograph of a man wearing a hat")
    marked, positions = mark_class_word(tokenizer.tokenize(text), copies=3)
    assert positions == [5, 6, 7] and marked == tokenizer.tokenize("a photograph of a man man man wearing a hat")
    # The trigger as a token word: with punctuation, capitalised; the first one only; not inside another word.
    marked, positions = mark_class_word(tokenizer.tokenize("(woman:1.2) Photomaker, smiling photomaker"), copies=2)
    assert marked == tokenizer.tokenize("(woman woman:1.2), smiling photomaker") and positions == [1, 2]
    assert mark_class_word(tokenizer.tokenize("a xphotomaker and a man"), copies=1) is None
    # A class word of several tokens fuses at its last one (the token before the trigger, as the paper's pipeline).
    words = tokenizer.encode_words("superhero")
    _, positions = mark_class_word(tokenizer.tokenize("a superhero photomaker"), copies=1)
    assert positions == [1 + len(words[0])]
    try:
        mark_class_word(tokenizer.tokenize("photomaker portrait"), copies=1)
    except ValueError as e:
        assert "follows no class word" in str(e)
    else:
        raise AssertionError("a trigger word without a class word was accepted")


def test_a_chunk_the_copies_overflow_splits_and_the_positions_follow():
    tokenizer = ClipTokenizer()
    text = " ".join(["cat"] * 72) + " man photomaker"
    marked, positions = mark_class_word(tokenizer.tokenize(text), copies=5)
    assert [len(chunk) for chunk in marked.ids] == [77, 4]
    assert positions == [73, 74, 75, 77 + 1, 77 + 2]
    flat = [token for chunk in marked.ids for token in chunk]
    padded = flat[:77] + flat[77:] + [0] * (77 - 4)
    assert all(padded[p] == tokenizer.encode_text("man")[0] for p in positions)


def _text_encoder(preset: str = "tiny-sdxl", seed: int = 4):
    encoder = build_text_encoder(random_text_encoder_config(preset))
    encoder.init_random_weights(seed, std=0.1)
    return encoder


def test_the_conditioning_is_the_prompts_with_the_class_word_fused(tmp_path):
    sd = tiny_photomaker(seed=5)
    safetensors.torch.save_file(sd, tmp_path / "pm.safetensors")
    model, tower = load_photomaker(tmp_path / "pm.safetensors").model, _tower(seed=5)
    text_encoder = _text_encoder()
    photos = _photos(2)
    cases = (("photograph of a man photomaker, smiling", "photograph of a man, smiling", 1, 4),
             ("photograph of a man photomaker, smiling", "photograph of a man man, smiling", 2, 4),
             ("a (woman:1.3) photomaker at night", "a (woman:1.3) at night", 1, 2))
    for text, plain, count, first in cases:
        ours = encode_with_id(model, text_encoder, text, photos[:count])
        reference = text_encoder.encode([plain])
        positions = list(range(first, first + count))
        expected = reference.cond.clone()
        id_embeds = _ref_id_embeds(tower, sd, photos[:count])
        expected[0, positions] = _ref_fuse_fn(sd, reference.cond[0, positions], id_embeds)
        torch.testing.assert_close(ours.cond, expected, rtol=0, atol=1e-5)
        assert torch.equal(ours.pooled, reference.pooled)
    # Without the trigger word: the prompt as CLIP Text Encode gives it; the photos unused.
    plain = encode_with_id(model, text_encoder, "photograph of a man", photos)
    reference = text_encoder.encode(["photograph of a man"])
    assert torch.equal(plain.cond, reference.cond) and torch.equal(plain.pooled, reference.pooled)
    assert text_encoder.tokenizer.__class__ is ClipTokenizer  # the shared encoder is left as it was
    try:
        encode_with_id(model, _text_encoder("tiny-sd1"), "a man photomaker", photos)
    except ValueError as e:
        assert "SDXL" in str(e) and "80-wide" in str(e)
    else:
        raise AssertionError("an SD1 text encoder was accepted")
