"""Stable Audio Open's transformer and seconds conditioners (ldm.stable_audio) against diffusers' StableAudioDiTModel
and StableAudioProjectionModel with the same weights, converted from Stability's single-file names by a restatement
of diffusers' scripts/convert_stable_audio.py; the conditioning against what StableAudioPipeline itself feeds its
transformer (tiny T5, tokenizer from the vocabulary Loom bundles); the file round trip; the released shape."""

from __future__ import annotations

import dataclasses
import gzip
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import (
    AutoencoderOobleck,
    CosineDPMSolverMultistepScheduler,
    StableAudioDiTModel,
    StableAudioPipeline,
    StableAudioProjectionModel,
)
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from ldm.checkpoint import CheckpointError
from ldm.sampling.denoiser import Conditioning, Denoiser, level_tensor
from ldm.sampling.schedules import ContinuousVSchedule
from ldm.stable_audio import (
    SECONDS_RANGE,
    SIGMA_MAX,
    SIGMA_MIN,
    TINY_STABLE_AUDIO,
    StableAudioConditioners,
    StableAudioConfig,
    StableAudioDiT,
    default_seconds_total,
    is_stable_audio,
    latent_length,
    load_stable_audio,
    random_stable_audio,
    stable_audio_conditioning,
    stable_audio_config,
    stable_audio_state_dict,
    unet_timestep,
    write_tiny_stable_audio,
)
from ldm.tokenizer import DATA_DIR

TOL = 1e-5


def to_diffusers(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stability's names to diffusers' (the transformer's, the projection model's), as diffusers' converter renames
    them; its Fourier features go to `time_proj.weight`, the name diffusers' model has, as a vector."""
    projection = {}
    for key, value in sd.items():
        if key.startswith("conditioner.conditioners."):
            new = key.removeprefix("conditioner.conditioners.")
            new = new.replace("embedder.embedding", "time_positional_embedding")
            projection[new.replace("seconds_start", "start_number_conditioner")
                       .replace("seconds_total", "end_number_conditioner")] = value
    transformer = {}
    for key, value in sd.items():
        if not key.startswith("model.model.") or key.endswith("rotary_pos_emb.inv_freq"):
            continue
        new = (key.removeprefix("model.model.").replace("transformer.", "").replace("layers", "transformer_blocks")
               .replace("self_attn", "attn1").replace("cross_attn", "attn2").replace("ff.ff", "ff.net")
               .replace("pre_norm", "norm1").replace("cross_attend_norm", "norm2").replace("ff_norm", "norm3")
               .replace("to_out", "to_out.0").replace("gamma", "weight").replace("beta", "bias")
               .replace("project", "proj").replace("to_timestep_embed", "timestep_proj")
               .replace("to_global_embed", "global_proj").replace("to_cond_embed", "cross_attention_proj"))
        if new == "timestep_features.weight":
            transformer["time_proj.weight"] = value.squeeze(1)
        elif "to_qkv" in new:
            for name, part in zip("qkv", value.chunk(3), strict=True):
                transformer[new.replace("qkv", name)] = part
        elif "to_kv" in new:
            for name, part in zip("kv", value.chunk(2), strict=True):
                transformer[new.replace("kv", name)] = part
        else:
            transformer[new] = value
    return transformer, projection


def diffusers_transformer(config: StableAudioConfig, length: int) -> StableAudioDiTModel:
    return StableAudioDiTModel(
        sample_size=length, in_channels=config.io_channels, num_layers=config.depth, attention_head_dim=64,
        num_attention_heads=config.num_heads, num_key_value_attention_heads=config.kv_heads,
        out_channels=config.io_channels, cross_attention_dim=config.cond_token_dim,
        time_proj_dim=config.timestep_features_dim, global_states_input_dim=config.global_cond_dim,
        cross_attention_input_dim=config.cond_token_dim)


def twins(sd: dict[str, torch.Tensor], config: StableAudioConfig,
          length: int) -> tuple[StableAudioDiTModel, StableAudioProjectionModel]:
    """diffusers' transformer and projection model holding the single file's weights (strictly: every key)."""
    transformer_sd, projection_sd = to_diffusers(sd)
    transformer = diffusers_transformer(config, length)
    transformer.load_state_dict(transformer_sd)
    projection = StableAudioProjectionModel(text_encoder_dim=config.number_embed_dim,
                                            conditioning_dim=config.number_embed_dim,
                                            min_value=SECONDS_RANGE[0], max_value=SECONDS_RANGE[1])
    projection.load_state_dict(projection_sd)
    return transformer.eval(), projection.eval()


@pytest.fixture(scope="module")
def ours() -> tuple[StableAudioDiT, StableAudioConditioners]:
    return random_stable_audio(TINY_STABLE_AUDIO, seed=0)


@pytest.fixture(scope="module")
def theirs(ours) -> tuple[StableAudioDiTModel, StableAudioProjectionModel]:
    return twins(stable_audio_state_dict(*ours), TINY_STABLE_AUDIO, 13)


def diffusers_dit(transformer: StableAudioDiTModel, x, t, context, global_states) -> torch.Tensor:
    rope = get_1d_rotary_pos_embed(32, x.shape[2] + 1, use_real=True, repeat_interleave_real=False)
    return transformer(x, t, encoder_hidden_states=context, global_hidden_states=global_states[:, None],
                       rotary_embedding=rope, return_dict=False)[0]


@pytest.mark.parametrize("length", [13, 7])
@pytest.mark.parametrize("masked", [False, True], ids=["full-prompt", "padded-prompt"])
def test_transformer_matches_diffusers(ours, theirs, length: int, masked: bool) -> None:
    dit, conditioners = ours
    generator = torch.Generator().manual_seed(length)
    x = torch.randn(2, 8, length, generator=generator)
    states = torch.randn(2, 9, 64, generator=generator)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5]) if masked else None
    t = unet_timestep(torch.tensor([500.0, 0.7]))
    with torch.no_grad():
        context, y = stable_audio_conditioning(states, mask, [0.0, 3.5], [47.0, 10.0], conditioners)
        out = dit(x, t, context, y=y)
        ref = diffusers_dit(theirs[0], x, t, context, y)
    assert out.shape == (2, 8, length)
    assert (out - ref).abs().max() < TOL * ref.abs().max()
    if masked:  # padding acts through its zeros alone: what sits under the mask does not matter
        with torch.no_grad():
            other = stable_audio_conditioning(states + 5 * (1 - mask[..., None]), mask, [0.0, 3.5], [47.0, 10.0],
                                              conditioners)[0]
            assert torch.equal(dit(x, t, other, y=y), out)


def test_conditioners_match_diffusers(ours, theirs) -> None:
    conditioners, projection = ours[1], theirs[1]
    seconds = torch.tensor([0.0, 3.25, 47.0, 511.0, 600.0, -2.0])  # the last two clamp to the range
    with torch.no_grad():
        ref = projection(start_seconds=seconds, end_seconds=seconds)
        start, total = conditioners.seconds_start(seconds), conditioners.seconds_total(seconds)
    assert start.shape == total.shape == (6, 1, 64)
    assert (start - ref.seconds_start_hidden_states).abs().max() < TOL
    assert (total - ref.seconds_end_hidden_states).abs().max() < TOL
    assert torch.equal(conditioners.seconds_total([600.0]), conditioners.seconds_total([512.0]))


@pytest.fixture(scope="module")
def pipeline(ours, theirs, tmp_path_factory: pytest.TempPathFactory) -> StableAudioPipeline:
    """diffusers' pipeline around the twins, a tiny T5 64 wide and T5's tokenizer (128 tokens, as SAO's); its VAE
    (never run: latents come out) hops 4 samples at 4 Hz, so that 13 latent frames are 13 seconds."""
    tokenizer_file = tmp_path_factory.mktemp("t5") / "tokenizer.json"
    tokenizer_file.write_bytes(gzip.decompress((DATA_DIR / "t5_tokenizer.json.gz").read_bytes()))
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4)).eval()
    vae = AutoencoderOobleck(encoder_hidden_size=4, downsampling_ratios=[2, 2], channel_multiples=[1, 2],
                             decoder_channels=4, decoder_input_channels=8, audio_channels=2, sampling_rate=4)
    pipe = StableAudioPipeline(vae=vae, text_encoder=t5, projection_model=theirs[1],
                               tokenizer=T5TokenizerFast(tokenizer_file=str(tokenizer_file), model_max_length=128),
                               transformer=theirs[0], scheduler=CosineDPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_transformer_call(pipeline: StableAudioPipeline, **kwargs) -> tuple[dict, torch.Tensor]:
    """The inputs and output of the pipeline's first transformer call."""
    calls = []
    forward = pipeline.transformer.forward

    def recording(*args, **kw):
        out = forward(*args, **kw)
        calls.append(({"x": args[0], "t": args[1], **kw}, out[0]))
        return out

    pipeline.transformer.forward = recording
    try:
        pipeline(num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(1), **kwargs)
    finally:
        del pipeline.transformer.forward
    return calls[0]


# diffusers' tiny VAE is built with the deprecated weight_norm; its SDE sampler's noise warns of float rounding.
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("negative", [None, "low quality, noise"], ids=["no-guidance", "negative-prompt"])
def test_conditioning_matches_pipeline(ours, pipeline: StableAudioPipeline, negative: str | None) -> None:
    """Loom's context and global conditioning from the same T5 states are what the pipeline feeds its transformer
    (rows: negative then positive), its timestep is atan(sigma) * 2 / pi, and the transformer's output matches."""
    dit, conditioners = ours
    prompts = ["a hammer hitting a wooden surface"] if negative is None else [negative, "a hammer on wood"]
    tokens = pipeline.tokenizer(prompts, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = pipeline.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        context, y = stable_audio_conditioning(states, tokens.attention_mask, 1.5, 9.0, conditioners)
    inputs, out = first_transformer_call(pipeline, prompt=prompts[-1], negative_prompt=negative,
                                         guidance_scale=1.0 if negative is None else 7.0,
                                         audio_start_in_s=1.5, audio_end_in_s=9.0)
    assert context.shape == (len(prompts), 130, 64) and y.shape == (len(prompts), 128)
    assert (inputs["encoder_hidden_states"] - context).abs().max() < TOL
    assert (inputs["global_hidden_states"][:, 0] - y).abs().max() < TOL
    sigma = float(pipeline.scheduler.sigmas[0])
    assert math.isclose(float(inputs["t"]), unet_timestep(sigma), rel_tol=1e-6)
    with torch.no_grad():
        ours_out = dit(inputs["x"], inputs["t"], context, y=y)
    assert (ours_out - out).abs().max() < TOL * out.abs().max()


@pytest.mark.parametrize("sigma", [500.0, 3.7, 0.03])
def test_denoiser_matches_diffusers_preconditioning(ours, theirs, sigma: float) -> None:
    """Loom's v-prediction denoiser on ComfyUI's continuous-V levels (0.03 to 500) around the transformer gives the
    x0 of diffusers' Cosine DPM-Solver preconditioning (inputs scaled by 1 / sqrt(sigma^2 + 1), timestep
    atan(sigma) * 2 / pi, v turned to x0) around its twin."""
    dit, conditioners = ours
    scheduler = CosineDPMSolverMultistepScheduler()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 11, generator=generator) * (1 + sigma**2) ** 0.5
    context, y = stable_audio_conditioning(torch.randn(2, 5, 64, generator=generator), None, 0.0, 11.0, conditioners)
    denoiser = Denoiser(dit, ContinuousVSchedule(SIGMA_MIN, SIGMA_MAX), prediction="v")
    with torch.no_grad():
        by_level = denoiser(x, level_tensor(sigma, 2, x.device, x.dtype), Conditioning(context, y=y))
        by_tensor = denoiser(x, torch.tensor([sigma, sigma]), Conditioning(context, y=y))
        t = scheduler.precondition_noise(torch.tensor(sigma))
        out = diffusers_dit(theirs[0], scheduler.precondition_inputs(x, sigma), t.reshape(1), context, y)
        ref = scheduler.precondition_outputs(x, out, sigma)
    for ours_x0 in (by_level, by_tensor):
        assert (ours_x0 - ref).abs().max() < TOL * ref.abs().max()


def test_bfloat16_weights_stay_close(ours, tmp_path: Path) -> None:
    """bf16 weights (rotary angles and Fourier features still computed in float32) follow float32's output."""
    path = write_tiny_stable_audio(tmp_path / "sao_bf16.safetensors", dtype=torch.bfloat16)
    dit, conditioners = load_stable_audio(path, dtype=torch.bfloat16)
    reference, _ = load_stable_audio(path)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 301, generator=generator)
    context, y = stable_audio_conditioning(torch.randn(1, 6, 64, generator=generator), None, 0.0, 30.0, conditioners)
    with torch.no_grad():
        out = dit(x, unet_timestep(torch.tensor([2.0])), context, y=y)
        ref = reference(x, unet_timestep(torch.tensor([2.0])), context.float(), y=y.float())
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_file_round_trip(ours, tmp_path: Path) -> None:
    vae_tensor = torch.randn(3, 4)
    path = write_tiny_stable_audio(tmp_path / "sao.safetensors", seed=0,
                                   extra={"pretransform.model.encoder.layers.0.bias": vae_tensor})
    sd = safetensors.torch.load_file(path)
    assert is_stable_audio(sd) and torch.equal(sd["pretransform.model.encoder.layers.0.bias"], vae_tensor)
    dit, conditioners = load_stable_audio(path)
    assert dit.config == TINY_STABLE_AUDIO
    for mine, loaded in ((ours[0], dit), (ours[1], conditioners)):
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in mine.state_dict().items())
    # ComfyUI's own saves drop the norms' betas (zeros in SAO): they load as zeros.
    del sd["pretransform.model.encoder.layers.0.bias"]
    no_beta = {k: v for k, v in sd.items() if not k.endswith("norm.beta")}
    assert len(no_beta) == len(sd) - 3 * TINY_STABLE_AUDIO.depth
    dit_b, _ = load_stable_audio(no_beta, dtype=torch.bfloat16)
    assert dit_b.transformer.layers[1].ff_norm.beta.dtype == torch.bfloat16
    assert not dit_b.transformer.layers[1].ff_norm.beta.any()


def test_released_config_on_meta() -> None:
    """Stable Audio Open 1.0's shape, read back from its own key shapes, has diffusers' parameter count (diffusers'
    model lacks only the rotary frequencies, which Loom computes)."""
    with torch.device("meta"):
        dit, conditioners = StableAudioDiT(), StableAudioConditioners()
        reference = diffusers_transformer(StableAudioConfig(), 1024)
        projection = StableAudioProjectionModel(text_encoder_dim=768, conditioning_dim=768, min_value=0, max_value=512)
    assert StableAudioConfig().num_heads == 24 and StableAudioConfig().kv_heads == 12
    count = sum(p.numel() for p in dit.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in conditioners.parameters()) == sum(p.numel() for p in projection.parameters())
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in stable_audio_state_dict(dit, conditioners).items()}
    assert stable_audio_config(shapes) == StableAudioConfig()


def test_latent_length_and_defaults() -> None:
    assert latent_length(47.6) == 1024 and latent_length(10.0) == 216 and latent_length(1.0) == 22
    assert default_seconds_total(1024) == 47 and default_seconds_total(216) == 10
    assert unet_timestep(1.0) == pytest.approx(0.5) and float(unet_timestep(torch.tensor(1.0))) == pytest.approx(0.5)


def test_refusals(tmp_path: Path) -> None:
    path = write_tiny_stable_audio(tmp_path / "sao.safetensors")
    sd = safetensors.torch.load_file(path)
    with pytest.raises(CheckpointError, match="not a Stable Audio checkpoint"):
        load_stable_audio({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
    missing = {k: v for k, v in sd.items() if "seconds_total" not in k}
    with pytest.raises(CheckpointError, match="seconds conditioners is missing"):
        load_stable_audio(missing)
    extra = {**sd, "model.model.to_prepend_embed.0.weight": torch.zeros(128, 16)}
    with pytest.raises(CheckpointError, match="does not run: to_prepend_embed"):
        load_stable_audio(extra)
    wrong = {**sd, "model.model.transformer.layers.1.cross_attn.to_kv.weight": torch.zeros(64, 64)}
    with pytest.raises(CheckpointError, match="to_kv.weight is \\[64, 64\\]"):
        load_stable_audio(wrong)
    rope = {**sd, "model.model.transformer.rotary_pos_emb.inv_freq": torch.ones(16)}
    with pytest.raises(CheckpointError, match="base 10000"):
        load_stable_audio(rope)
    odd = {**sd, "model.model.transformer.project_in.weight": torch.zeros(96, 8)}
    with pytest.raises(CheckpointError, match="embed_dim 96 is not a whole number"):
        load_stable_audio(odd)
    gap = {k.replace("layers.1.", "layers.2."): v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match="not numbered from 0"):
        load_stable_audio(gap)
    with pytest.raises(ValueError, match="would overwrite"):
        write_tiny_stable_audio(tmp_path / "x.safetensors", extra={"model.model.preprocess_conv.weight": torch.ones(1)})


def test_input_refusals(ours) -> None:
    dit, conditioners = ours
    with pytest.raises(ValueError, match="latents \\[B, 8, L\\]"):
        dit(torch.zeros(1, 4, 5), torch.zeros(1), torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="context \\[B, N, 64\\]"):
        dit(torch.zeros(1, 8, 5), torch.zeros(1), torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="global conditioning is 128 wide"):
        dit(torch.zeros(1, 8, 5), torch.zeros(1), torch.zeros(1, 3, 64), y=torch.zeros(1, 64))
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        stable_audio_conditioning(torch.zeros(2, 3, 64), None, [1.0, 2.0, 3.0], 4.0, conditioners)
    with pytest.raises(ValueError, match="mask \\[2, 4\\]"):
        stable_audio_conditioning(torch.zeros(2, 3, 64), torch.ones(2, 4), 0.0, 4.0, conditioners)
    with pytest.raises(ValueError, match="must be even"):
        dataclasses.replace(TINY_STABLE_AUDIO, rotary_dim=33)
