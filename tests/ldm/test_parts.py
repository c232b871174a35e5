"""UNet-only and text-encoder-only files, written from tiny checkpoints in each layout, load bit for bit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from ldm import parts
from ldm.checkpoint import CheckpointError, load_checkpoint, load_state_dict, read_metadata
from ldm.parts import load_text_encoders, load_unet, peek_text_encoder, peek_unet, read_text_encoder
from ldm.presets import PRESETS as PRESETS_BY_NAME
from ldm.presets import make_checkpoint
from ldm.unet import UNetConfig, UNetModel

PRESETS = ("tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-sdxl-refiner")
UNET = "model.diffusion_model."
# Where each preset keeps its OpenCLIP tower in the LDM file, and its kind.
OPEN_CLIP = {"tiny-sd2": ("cond_stage_model.model.", "clip_h"),
             "tiny-sdxl": ("conditioner.embedders.1.model.", "clip_g"),
             "tiny-sdxl-refiner": ("conditioner.embedders.0.model.", "clip_g")}


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SimpleNamespace]:
    root = tmp_path_factory.mktemp("parts")
    out = {}
    for preset in PRESETS:
        path = make_checkpoint(preset, root / f"{preset}.safetensors", seed=4)
        out[preset] = SimpleNamespace(path=path, sd=load_state_dict(path), metadata=read_metadata(path),
                                      loaded=load_checkpoint(path), root=root)
    return out


def unet_layouts(ckpt: SimpleNamespace) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's UNet with and without its prefix, and in diffusers' names made by diffusers itself."""
    from tests.ldm.diffusers_reference import diffusers_unet

    prefixed = {k: v for k, v in ckpt.sd.items() if k.startswith(UNET)}
    bare = {k[len(UNET):]: v for k, v in prefixed.items()}
    reference = diffusers_unet(ckpt.loaded.family.unet_config, {k: v.float() for k, v in bare.items()})
    diffusers = {k: v.to(torch.float16) for k, v in reference.state_dict().items()}  # fp16 -> fp32 -> fp16 is exact
    return {"ldm": prefixed, "ldm_unprefixed": bare, "diffusers": diffusers}


def clip_l_file(ckpt: SimpleNamespace) -> dict[str, torch.Tensor]:
    """CLIP-L as transformers' CLIPTextModel saves it (text_model.*), by diffusers' own conversion."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    return convert_ldm_clip_checkpoint(ckpt.sd)


def open_clip_file(ckpt: SimpleNamespace, preset: str) -> dict[str, torch.Tensor]:
    """OpenCLIP-H/bigG as transformers' CLIPTextModel(WithProjection) saves it, by diffusers' own conversion
    (which drops SD2's projection, as diffusers' SD2 text_encoder has none)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=None))
    return convert_open_clip_checkpoint(text_model, ckpt.sd, prefix=OPEN_CLIP[preset][0])


def text_files(ckpt: SimpleNamespace, preset: str, tmp_path: Path) -> list[Path]:
    """The preset's text encoders as separate HF-layout files; tiny widths say their kind in metadata, as
    Loom's own files do (released widths need not: 768 is CLIP-L, 1024 OpenCLIP-H, 1280 bigG)."""
    files = []
    if preset in ("tiny-sd1", "tiny-sdxl"):
        files.append(write(tmp_path / f"{preset}-clip_l.safetensors", clip_l_file(ckpt)))
    if preset in OPEN_CLIP:
        kind = OPEN_CLIP[preset][1]
        files.append(write(tmp_path / f"{preset}-{kind}.safetensors", open_clip_file(ckpt, preset),
                           {"loom.text_encoder": kind}))
    return files


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("layout", ["ldm", "ldm_unprefixed", "diffusers"])
@pytest.mark.parametrize("preset", PRESETS)
def test_a_unet_file_in_each_layout_loads_the_checkpoints_unet_bit_for_bit(checkpoints, tmp_path, preset, layout):
    ckpt = checkpoints[preset]
    path = write(tmp_path / "unet.safetensors", unet_layouts(ckpt)[layout], ckpt.metadata)
    loaded = load_unet(path)
    assert loaded.layout == layout and loaded.unused_keys == []
    assert loaded.family.name == ckpt.loaded.family.name and loaded.family.prediction == ckpt.loaded.family.prediction
    assert loaded.family.unet_config == ckpt.loaded.family.unet_config
    assert loaded.family.latent_scale_factor == ckpt.loaded.family.latent_scale_factor
    same_weights(loaded.unet, ckpt.loaded.unet)
    assert peek_unet(path).name == ckpt.loaded.family.name  # the header alone tells the family too


SD2_UNET = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)


@pytest.mark.parametrize("family, config", [("sd1", PRESETS_BY_NAME["sd15"][2]), ("sd2", SD2_UNET),
                                            ("sdxl", PRESETS_BY_NAME["sdxl"][2]),
                                            ("sdxl_refiner", PRESETS_BY_NAME["sdxl-refiner"][2])])
def test_diffusers_names_of_the_released_unets_map_onto_ours(family, config):
    """Full-size shapes on the meta device: diffusers' own conversion names every weight, ours maps each back,
    and the family rules recover the exact configuration from the renamed shapes."""
    from tests.ldm.diffusers_reference import diffusers_unet

    with torch.device("meta"):
        ours = UNetModel(config).state_dict()
        theirs = diffusers_unet(config, ours).state_dict()
    names, layout = parts.unet_names(theirs, Path("unet.safetensors"))
    renamed = {names[k]: theirs[k] for k in names}
    assert layout == "diffusers" and len(names) == len(theirs) and renamed.keys() == ours.keys()
    assert all(renamed[k].shape == ours[k].shape for k in ours)
    found = parts.unet_family(renamed)
    assert (found.name, found.unet_config) == (family, config)


def test_unet_keys_beyond_the_model_are_reported_and_missing_ones_refused(checkpoints, tmp_path):
    ckpt = checkpoints["tiny-sd1"]
    tensors = unet_layouts(ckpt)["diffusers"]
    path = write(tmp_path / "extra.safetensors", {**tensors, "class_embedding.linear_1.weight": torch.ones(2, 2),
                                                  "down_blocks.0.resnets.0.surplus.weight": torch.ones(1)},
                 ckpt.metadata)
    assert load_unet(path).unused_keys == ["class_embedding.linear_1.weight", "down_blocks.0.resnets.0.surplus.weight"]
    del tensors["up_blocks.1.attentions.0.proj_out.weight"]
    with pytest.raises(CheckpointError, match=r"the UNet is missing 1 weights: output_blocks\.2\.1\.proj_out\.weight"):
        load_unet(write(tmp_path / "short.safetensors", tensors, ckpt.metadata))


@pytest.mark.parametrize("preset", PRESETS)
def test_text_encoder_files_load_the_checkpoints_encoder_bit_for_bit(checkpoints, tmp_path, preset):
    ckpt = checkpoints[preset]
    files = text_files(ckpt, preset, tmp_path)
    loaded = load_text_encoders(files[::-1])  # SDXL's pair in either order
    assert loaded.family == ckpt.loaded.family.name and loaded.unused_keys == [] and loaded.ignored_keys == []
    theirs, ours = ckpt.loaded.text_encoder.ldm_state_dict(), loaded.encoder.ldm_state_dict()
    # diffusers' SD2 text encoder has no projection (SD2 never reads the pooled prompt); all else is there.
    assert set(theirs) - set(ours) == ({"cond_stage_model.model.text_projection"} if preset == "tiny-sd2" else set())
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for clip_skip in (None, -1):
        a = ckpt.loaded.text_encoder.encode(["a (red:1.2) cat", "embedding-free prompt"], clip_skip=clip_skip)
        b = loaded.encoder.encode(["a (red:1.2) cat", "embedding-free prompt"], clip_skip=clip_skip)
        assert torch.equal(a.cond, b.cond)
        if preset != "tiny-sd2":
            assert torch.equal(a.pooled, b.pooled)
    assert [peek_text_encoder(f) for f in files] == [read_text_encoder(f).kind for f in files]


def test_comfyui_and_openclip_layouts_of_bigg_load_the_same(checkpoints, tmp_path):
    """ComfyUI's clip_g files: transformers' names with text_projection.weight, or (older CLIPSave) the
    x @ P `text_projection` and CLIP's logit_scale; OpenCLIP's own names; transformers 5's names without
    `text_model.`; the LDM prefix kept."""
    ckpt = checkpoints["tiny-sdxl"]
    prefix = OPEN_CLIP["tiny-sdxl"][0]
    hf = open_clip_file(ckpt, "tiny-sdxl")
    clip_l = write(tmp_path / "clip_l.safetensors", clip_l_file(ckpt))
    old_clipsave = {**{k: v for k, v in hf.items() if k != "text_projection.weight"},
                    "text_projection": hf["text_projection.weight"].t(), "logit_scale": torch.tensor(4.6)}
    layouts = {
        "old_clipsave": old_clipsave,
        "open_clip": {k[len(prefix):]: v for k, v in ckpt.sd.items() if k.startswith(prefix)},
        "transformers5": {k.removeprefix("text_model."): v for k, v in hf.items()},
        "ldm_prefix": {k: v for k, v in ckpt.sd.items() if k.startswith(prefix)},
    }
    reference = ckpt.loaded.text_encoder.encode(["a cat"])
    for name, tensors in layouts.items():
        path = write(tmp_path / f"{name}.safetensors", tensors, {"loom.text_encoder": "clip_g"})
        loaded = load_text_encoders([clip_l, path])
        assert loaded.unused_keys == [], name
        encoded = loaded.encoder.encode(["a cat"])
        assert torch.equal(encoded.cond, reference.cond) and torch.equal(encoded.pooled, reference.pooled), name
    assert load_text_encoders([clip_l, tmp_path / "old_clipsave.safetensors"]).ignored_keys == [
        "old_clipsave.safetensors: logit_scale"]


def test_keys_no_sd_encoder_reads_are_ignored_by_name_and_strangers_reported(checkpoints, tmp_path):
    """SD1's CLIP-L never uses its projection (ComfyUI's and SD3's clip_l files carry one); the position ids
    are rebuilt; anything else unknown is listed as unused."""
    ckpt = checkpoints["tiny-sd1"]
    tensors = {**clip_l_file(ckpt), "text_projection.weight": torch.eye(32),
               "text_model.embeddings.position_ids": torch.arange(77)[None], "vision_model.post_layernorm.weight":
               torch.ones(8)}
    loaded = load_text_encoders([write(tmp_path / "clip_l.safetensors", tensors)])
    assert loaded.family == "sd1" and loaded.kinds == ("clip_l",)
    assert loaded.ignored_keys == ["clip_l.safetensors: text_model.embeddings.position_ids",
                                   "clip_l.safetensors: text_projection.weight"]
    assert loaded.unused_keys == ["clip_l.safetensors: vision_model.post_layernorm.weight"]


def test_sd2_encoder_without_its_last_layer_encodes_as_the_full_one(checkpoints, tmp_path, monkeypatch):
    """diffusers' SD2 text_encoder has 23 of OpenCLIP-H's 24 layers (SD2 reads the penultimate one): clip skip
    counts from the full model's top, and the layer that is not there is refused by name."""
    monkeypatch.setitem(parts.STANDARD_SHAPES, "clip_h", (32, 2))  # the tiny model's width, for the released 1024
    ckpt = checkpoints["tiny-sd2"]
    tensors = {k: v for k, v in open_clip_file(ckpt, "tiny-sd2").items() if ".layers.1." not in k}
    loaded = load_text_encoders([write(tmp_path / "sd2.safetensors", tensors)])
    assert loaded.encoder.missing_layers == 1
    assert torch.equal(loaded.encoder.encode(["a cat"]).cond, ckpt.loaded.text_encoder.encode(["a cat"]).cond)
    assert torch.equal(loaded.encoder.encode(["a cat"], clip_skip=-2).cond,
                       ckpt.loaded.text_encoder.encode(["a cat"], clip_skip=-2).cond)
    with pytest.raises(ValueError, match="lacks the last 1 of its 2 layers; stop_at_clip_layer must be -2 or lower"):
        loaded.encoder.encode(["a cat"], clip_skip=-1)


def test_released_encoders_are_told_apart_by_their_shapes(tmp_path):
    """768 wide is CLIP-L, 1024 OpenCLIP-H (23 layers: diffusers' copy, one short), 1280 bigG; other widths
    by ComfyUI's rule of depth. Meta tensors: the shapes of real files without their gigabytes."""
    plain = write(tmp_path / "plain.safetensors", {"x": torch.zeros(1)})

    def header(width: int, layers: int) -> dict[str, torch.Tensor]:
        sd = {"text_model.embeddings.token_embedding.weight": torch.empty(49408, width, device="meta")}
        sd.update({f"text_model.encoder.layers.{i}.mlp.fc1.weight": torch.empty(4 * width, width, device="meta")
                   for i in range(layers)})
        return sd

    found = {shape: read_text_encoder(plain, header(*shape)) for shape in
             [(768, 12), (1024, 24), (1024, 23), (1280, 32), (64, 32), (64, 24), (64, 2)]}
    assert {shape: (f.kind, f.missing_layers) for shape, f in found.items()} == {
        (768, 12): ("clip_l", 0), (1024, 24): ("clip_h", 0), (1024, 23): ("clip_h", 1), (1280, 32): ("clip_g", 0),
        (64, 32): ("clip_g", 0), (64, 24): ("clip_h", 0), (64, 2): ("clip_l", 0)}


def fake(*keys: str) -> dict[str, torch.Tensor]:
    return {key: torch.zeros(2, 2) for key in keys}


BAD_FILES = {
    "a LoRA": fake("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", "lora_unet_input_blocks_1_1_proj_in.alpha"),
    "a T5 text encoder": fake("encoder.block.0.layer.0.SelfAttention.k.weight", "shared.weight"),
    "a Flux diffusion model": fake("model.diffusion_model.double_blocks.0.img_attn.qkv.weight"),
    "an SD3 diffusion model": fake("joint_blocks.0.context_block.attn.qkv.weight", "pos_embed"),
    "a ControlNet": fake("control_model.input_blocks.0.0.weight", "control_model.zero_convs.0.0.weight"),
    "a VAE": fake("encoder.conv_in.weight", "decoder.conv_out.weight"),
    "a language-model text encoder": fake("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight"),
    "a CLIP vision model": fake("vision_model.embeddings.patch_embedding.weight"),
    "match no model layout": fake("some.unknown.tensor"),
}


@pytest.mark.parametrize("what", list(BAD_FILES))
def test_files_that_are_no_part_are_refused_with_what_they_look_like(tmp_path, what):
    path = write(tmp_path / "file.safetensors", BAD_FILES[what])
    with pytest.raises(CheckpointError, match=f"file.safetensors is not a UNet-only file: .*{what}"):
        load_unet(path)
    with pytest.raises(CheckpointError, match=f"file.safetensors is not a CLIP text encoder: .*{what}"):
        load_text_encoders([path])
    with pytest.raises(CheckpointError, match=what):
        peek_unet(path)


def test_a_checkpoint_a_unet_and_a_text_encoder_each_in_the_wrong_loader(checkpoints, tmp_path):
    ckpt = checkpoints["tiny-sd1"]
    with pytest.raises(CheckpointError, match="it looks like a full checkpoint .*load it with Load Checkpoint"):
        load_unet(ckpt.path)
    with pytest.raises(CheckpointError, match="it looks like a full checkpoint"):
        load_text_encoders([ckpt.path])
    unet = write(tmp_path / "unet.safetensors", unet_layouts(ckpt)["ldm_unprefixed"], ckpt.metadata)
    with pytest.raises(CheckpointError, match="not a CLIP text encoder: it looks like an SD UNet .*Load Diffusion"):
        load_text_encoders([unet])
    [clip_l] = text_files(ckpt, "tiny-sd1", tmp_path)
    with pytest.raises(CheckpointError, match="not a UNet-only file: it looks like a CLIP text encoder; .*Load CLIP"):
        load_unet(clip_l)


def test_sets_of_text_encoders_no_family_has_are_refused(checkpoints, tmp_path):
    ckpt = checkpoints["tiny-sdxl"]
    clip_l, clip_g = text_files(ckpt, "tiny-sdxl", tmp_path)
    with pytest.raises(CheckpointError, match=r"hold clip_l \+ clip_l, which is no SD family's set"):
        load_text_encoders([clip_l, clip_l])
    hf = {k: v for k, v in open_clip_file(ckpt, "tiny-sdxl").items() if k != "text_projection.weight"}
    unprojected = write(tmp_path / "g.safetensors", hf, {"loom.text_encoder": "clip_g"})
    with pytest.raises(CheckpointError, match="without its text_projection .*SDXL's pooled prompt needs it"):
        load_text_encoders([clip_l, unprojected])


def test_an_encoder_pinned_to_the_cpu_ignores_moves_but_not_casts(checkpoints, tmp_path):
    [clip_l] = text_files(checkpoints["tiny-sd1"], "tiny-sd1", tmp_path)
    encoder = load_text_encoders([clip_l], pin_to_cpu=True).encoder
    encoder.to("meta")
    assert {p.device.type for p in encoder.parameters()} == {"cpu"}
    encoder.to(torch.float16)
    assert {p.dtype for p in encoder.parameters()} == {torch.float16}
