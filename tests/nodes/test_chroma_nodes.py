"""Chroma end to end on tiny random files in the real layouts: UNETLoader, CLIPLoader type chroma, VAELoader,
CLIPTextEncode and KSampler (real CFG, Flux's levels) against diffusers' ChromaPipeline, and the family refusals."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from ldm.chroma_files import load_chroma_unet, make_chroma_files
from ldm.flux_files import LATENT_SHIFT
from ldm.flux_presets import make_flux_files
from ldm.sampling import prepare_noise
from ldm.t5 import T5Tokenizer
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.chroma_reference import diffusers_twin

# 4 steps: `simple` then takes table entries exactly at diffusers' levels (1000 / 4 is whole).
WIDTH, HEIGHT, SEED, STEPS, CFG = 64, 48, 5, 4, 4.0
CLIP = {"clip_name": "t5xxl-chroma-tiny.safetensors", "type": "chroma"}
H = 32  # the tiny model's width
_G = torch.Generator().manual_seed(9)
# A diffusers/PEFT-named Chroma LoRA (split q/k/v and proj_mlp: slots of the fused layers; the guidance layer), and a
# kohya-named one with a T5 entry and a Flux modulation entry that Chroma has no layer for.
DIFFUSERS = {f"transformer.{name}.lora_{ab}.weight": torch.randn(*shape, generator=_G) * 0.5
             for name, a, b in (("transformer_blocks.0.attn.to_k", H, H),
                                ("single_transformer_blocks.1.proj_mlp", H, 4 * H),
                                ("distilled_guidance_layer.layers.1.linear_2", 48, 48))
             for ab, shape in (("A", (3, a)), ("B", (b, 3)))}
DIFFUSERS["transformer.transformer_blocks.0.attn.to_k.alpha"] = torch.tensor(1.5)
_QKV, _T5_Q = "lora_unet_double_blocks_1_txt_attn_qkv", "lora_te_encoder_block_0_layer_0_SelfAttention_q"
KOHYA = {f"{_QKV}.lora_down.weight": torch.randn(2, H, generator=_G), f"{_QKV}.lora_up.weight":
         torch.randn(3 * H, 2, generator=_G), f"{_QKV}.alpha": torch.tensor(1.0),
         f"{_T5_Q}.lora_down.weight": torch.randn(2, 32, generator=_G),
         f"{_T5_Q}.lora_up.weight": torch.randn(32, 2, generator=_G),
         "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.randn(2, H, generator=_G),
         "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.randn(6 * H, 2, generator=_G)}


def _write_loras(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(DIFFUSERS, folder / "chroma_diffusers.safetensors")
    safetensors.torch.save_file(KOHYA, folder / "chroma_kohya.safetensors")
    sd1 = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    safetensors.torch.save_file({f"{sd1}.lora_down.weight": torch.zeros(2, 768),
                                 f"{sd1}.lora_up.weight": torch.zeros(32, 2)}, folder / "sd1.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("chroma")
    models = root / "models"
    files = make_chroma_files(models, seed=4)
    make_flux_files(models, "dev", seed=2)
    _write_loras(models / "loras")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def workflow(unet: str = "chroma-tiny.safetensors", clip: str = "chroma") -> dict:
    text = (["2", 0] if clip == "chroma" else ["12", 0])
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": dict(CLIP)},
        "12": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl-tiny.safetensors",
                                                          "clip_name2": "clip_l-tiny.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae-chroma-tiny.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": text, "text": "a red fox sitting in fresh snow"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": text, "text": "blurry"}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": SEED, "steps": STEPS, "cfg": CFG,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def run(engine: Executor, doc: dict):
    result = engine.run(parse_api(doc), keep=["6", "7", "8", "9"])
    assert result.ok, result.error
    return result.values["8"][0], result.values["9"][0], result.values["6"][0], result.values["7"][0]


def test_workflow_matches_chroma_pipeline(engine, base) -> None:
    """The whole chain (loaders, T5 prompts unpadded as ComfyUI encodes them, real CFG with a negative prompt of
    another length, Flux's levels at shift 1.15, the latent's shift and scale) against diffusers' ChromaPipeline
    given the same transformer, prompt embeddings (all their tokens attended) and noise."""
    latent, image, positive, negative = run(engine, workflow())
    [(context, options)], [(negative_context, _)] = positive, negative
    tokens = len(T5Tokenizer().tokenize("a red fox sitting in fresh snow").ids)  # the words' tokens and the end
    assert context.shape == (1, tokens, 32) and negative_context.shape[1] < tokens  # no padding
    assert options.get("pooled_output") is None
    model = load_chroma_unet(base[1]["unet"]).unet
    # ComfyUI's ModelSamplingFlux shift of 1.15 at every size: diffusers' dynamic shift pinned to it.
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=1.15, max_image_seq_len=4096, max_shift=1.15, use_dynamic_shifting=True),
        vae=None, text_encoder=None, tokenizer=None, transformer=diffusers_twin(model))
    pipe.set_progress_bar_config(disable=True)
    h, w = HEIGHT // 8, WIDTH // 8
    noise = prepare_noise(torch.zeros(1, 16, h, w), SEED)
    with torch.no_grad():
        packed = pipe(prompt_embeds=context, prompt_attention_mask=torch.ones(context.shape[:2], dtype=torch.bool),
                      negative_prompt_embeds=negative_context,
                      negative_prompt_attention_mask=torch.ones(negative_context.shape[:2], dtype=torch.bool),
                      height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=CFG,
                      output_type="latent", latents=ChromaPipeline._pack_latents(noise, 1, 16, h, w)).images
    expected = ChromaPipeline._unpack_latents(packed, HEIGHT, WIDTH, 8) / 0.3611 + LATENT_SHIFT
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and 0 <= image.min() and image.max() <= 1 and image.std() > 0.01


def test_cfg_is_real_guidance(engine) -> None:
    doc = workflow()
    first = run(engine, doc)[0]["samples"]
    doc["8"]["inputs"]["cfg"] = 1.0
    assert (run(engine, doc)[0]["samples"] - first).abs().max() > 1e-3


def test_loaders_say_chroma_at_validation(engine) -> None:
    from nodes.sd.part_loaders import CLIPLoader, UNETLoader

    assert UNETLoader.output_facts({"unet_name": "chroma-tiny.safetensors"}, {}) == {0: {"family": "chroma"}}
    assert CLIPLoader.output_facts(CLIP, {}) == {0: {"family": "chroma"}}
    problem = CLIPLoader.check_inputs({"clip_name": "clip_l-tiny.safetensors", "type": "chroma"})
    assert problem == "clip_l-tiny.safetensors holds clip_l; type chroma takes one T5-XXL (t5xxl)"


def test_flux_clip_with_chroma_and_the_reverse_are_refused(engine) -> None:
    flux_clip = workflow(clip="flux")
    [problem] = validate(parse_api(flux_clip), engine.registry).problems
    assert "the positive prompt was encoded by a FLUX CLIP; a Chroma model takes prompts encoded by CLIPLoader " \
           "with type chroma" in problem.details
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(flux_clip))
    flux_model = workflow(unet="flux1-tiny-dev.safetensors")
    [problem] = validate(parse_api(flux_model), engine.registry).problems
    assert "encoded by Chroma's text encoder (CLIPLoader type chroma); the FLUX model" in problem.details


def test_a_flux_prompt_reaching_chroma_at_run_time_is_refused(engine) -> None:
    """Past validation (a prompt through a node that says no family), the sampler refuses a pooled prompt."""
    doc = workflow(clip="flux")
    doc["13"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                  "conditioning_2": ["6", 0]}}
    doc["8"]["inputs"]["positive"] = ["13", 0]
    doc["8"]["inputs"]["negative"] = ["13", 0]
    result = engine.run(parse_api(doc))
    assert not result.ok and "carries a pooled CLIP vector" in str(result.error)


def _loaded(engine: Executor, doc: dict, node: str) -> tuple:
    result = engine.run(parse_api({**doc, "99": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}}),
                        keep=[node])
    assert result.ok, result.error
    return result.values[node]


def test_diffusers_lora_patches_the_slots_of_fused_layers(engine, base) -> None:
    doc = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "chroma-tiny.safetensors",
                                                        "weight_dtype": "default"}},
           "11": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "strength_model": 0.5,
                                                                  "lora_name": "chroma_diffusers.safetensors"}}}
    unet = _loaded(engine, doc, "11")[0].unet
    original = load_chroma_unet(base[1]["unet"]).unet

    def delta(name: str) -> torch.Tensor:
        return DIFFUSERS[f"transformer.{name}.lora_B.weight"] @ DIFFUSERS[f"transformer.{name}.lora_A.weight"]

    qkv = original.double_blocks[0].img_attn.qkv.weight.clone()
    qkv[H:2 * H] += 0.5 * 1.5 / 3 * delta("transformer_blocks.0.attn.to_k")
    linear1 = original.single_blocks[1].linear1.weight.clone()
    linear1[3 * H:] += 0.5 * delta("single_transformer_blocks.1.proj_mlp")
    guidance = original.distilled_guidance_layer.layers[1].out_layer.weight + 0.5 * delta(
        "distilled_guidance_layer.layers.1.linear_2")
    torch.testing.assert_close(unet.double_blocks[0].img_attn.qkv.weight, qkv)
    torch.testing.assert_close(unet.single_blocks[1].linear1.weight, linear1)
    torch.testing.assert_close(unet.distilled_guidance_layer.layers[1].out_layer.weight, guidance)


def test_kohya_lora_patches_the_transformer_and_t5(engine) -> None:
    doc = {**workflow(), "11": {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "lora_name": "chroma_kohya.safetensors", "strength_model": 1.0,
        "strength_clip": 0.25}}}
    plain_model, plain_clip = _loaded(engine, doc, "1")[0], _loaded(engine, doc, "2")[0]
    model, clip = _loaded(engine, doc, "11")
    expected = plain_model.unet.double_blocks[1].txt_attn.qkv.weight + 0.5 * (
        KOHYA[f"{_QKV}.lora_up.weight"] @ KOHYA[f"{_QKV}.lora_down.weight"])
    torch.testing.assert_close(model.unet.double_blocks[1].txt_attn.qkv.weight, expected)
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    before = plain_clip.encoder.t5xxl.model.state_dict()[q]
    torch.testing.assert_close(clip.encoder.t5xxl.model.state_dict()[q], before + 0.25 * (
        KOHYA[f"{_T5_Q}.lora_up.weight"] @ KOHYA[f"{_T5_Q}.lora_down.weight"]))


def test_an_sd1_lora_on_chroma_is_refused(engine) -> None:
    doc = {**workflow(), "11": {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "strength_model": 1.0, "lora_name": "sd1.safetensors"}}}
    doc["8"]["inputs"]["model"] = ["11", 0]
    with pytest.raises(WorkflowInvalid, match="sd1.safetensors is a SD1 LoRA; it does not fit the CHROMA model"):
        engine.run(parse_api(doc))


def test_fp8_weight_dtype_stores_the_transformer_in_fp8(engine) -> None:
    doc = workflow()
    reference = run(engine, doc)[0]["samples"]
    doc["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    model = _loaded(engine, doc, "1")[0]
    assert model.unet.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    fp8 = run(engine, doc)[0]["samples"]
    assert (fp8 - reference).abs().mean() < 0.2 * reference.abs().mean()  # fp8 rounding, amplified by cfg 4


def test_t5_tokenizer_options_pad_the_prompts_as_comfy_chromas_template_does(engine) -> None:
    """T5TokenizerOptions (Comfy-Org's Chroma template: min_padding 1): one pad token after each prompt's end token,
    which T5 attends to; min_length pads to that many tokens, in place of the encoder's own minimum (Flux's 256)."""
    from ldm.t5 import END_TOKEN, PAD_TOKEN, T5Tokenizer

    def encoded(doc: dict, node: str = "6") -> torch.Tensor:
        result = engine.run(parse_api(doc), keep=[node])
        assert result.ok, result.error
        return result.values[node][0][0][0]

    plain = encoded(workflow())
    doc = workflow()
    doc["20"] = {"class_type": "T5TokenizerOptions", "inputs": {"clip": ["2", 0], "min_padding": 1, "min_length": 0}}
    doc["6"]["inputs"]["clip"] = ["20", 0]
    padded = encoded(doc)
    ids = T5Tokenizer().tokenize("a red fox sitting in fresh snow").ids
    assert ids[-1] == END_TOKEN and padded.shape[1] == plain.shape[1] + 1 == len(ids) + 1
    clip = engine.run(parse_api(doc), keep=["20"]).values["20"][0]
    with torch.inference_mode():
        expected = clip.encoder.t5xxl(torch.tensor([[*ids, PAD_TOKEN]]))
    torch.testing.assert_close(padded, expected.float())
    assert (padded[:, :-1] - plain).abs().max() > 1e-4  # every token attends to the pad
    doc["20"]["inputs"].update({"min_padding": 0, "min_length": 12})
    assert encoded(doc).shape[1] == 12
    # on Flux's CLIP, min_length 0 replaces the minimum of 256
    flux = {"12": workflow()["12"], "6": {"class_type": "CLIPTextEncodeFlux", "inputs": {
        "clip": ["12", 0], "clip_l": "a fox", "t5xxl": "a fox", "guidance": 3.5}},
        "20": {"class_type": "T5TokenizerOptions", "inputs": {"clip": ["12", 0], "min_padding": 0, "min_length": 0}},
        "30": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}}
    assert encoded(flux).shape[1] == 256
    flux["6"]["inputs"]["clip"] = ["20", 0]
    assert encoded(flux).shape[1] == len(T5Tokenizer().tokenize("a fox").ids)
