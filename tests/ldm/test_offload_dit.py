"""Low-VRAM block streaming of the diffusion transformers (ldm.offload): which modules stream, the same outputs
bit for bit, weights back home after each block, fp8 weights moved as fp8, LoRA copies, the device manager.

On the CPU the compute and offload devices are the same, so a block that missed its copy would still compute right.
`OffloadedReads` stands in for a second device: its streamer copies each block as it loads it, and any op that reads
a block's home tensor (a block used outside its own call, whose weights would still be on the CPU on a GPU) fails.
"""

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from executor.devices import DeviceManager, EngineOptions, module_bytes
from ldm import offload
from ldm.offload import (
    BlockStreamer,
    block_plan,
    resident_bytes,
    stream_blocks,
    streamable,
    streamer_of,
    unstream_blocks,
)
from tests.ldm import (
    test_chroma,
    test_flux2,
    test_hidream,
    test_ltxv,
    test_lumina2,
    test_mmdit,
    test_qwen_image,
    test_z_image,
)


class OffloadedReads(TorchFunctionMode):
    """Fails any op given a streamed block's home tensor while active; paused while the streamer itself copies."""

    def __init__(self, streamer: BlockStreamer):
        super().__init__()
        self.streamer, self.paused = streamer, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and not getattr(func, "__name__", "").startswith("__"):  # not `.data`'s get or set
            homes = {home.data_ptr() for home in self.streamer.home.values()}
            pending = [*args, *kwargs.values()]
            while pending:
                value = pending.pop()
                if isinstance(value, (list, tuple)):
                    pending.extend(value)
                elif isinstance(value, torch.Tensor) and value.numel() and value.data_ptr() in homes:
                    raise AssertionError(f"{func} read an offloaded tensor of shape {tuple(value.shape)}")
        return func(*args, **kwargs)


@pytest.fixture
def copying_streamer(monkeypatch):
    """Streamers whose loads copy (as to another device); returns the check to run a forward under."""
    load, unload = BlockStreamer.load, BlockStreamer.unload
    checks: list[OffloadedReads] = []

    def copying_load(self, block, args):
        checks[-1].paused = True
        load(self, block, args)
        for tensor in offload._tensors(block):
            tensor.data = tensor.data.clone()
        checks[-1].paused = False

    def quiet_unload(self, block, args, output):
        checks[-1].paused = True
        unload(self, block, args, output)
        checks[-1].paused = False

    monkeypatch.setattr(BlockStreamer, "load", copying_load)
    monkeypatch.setattr(BlockStreamer, "unload", quiet_unload)

    def check(model: nn.Module) -> OffloadedReads:
        checks.append(OffloadedReads(streamer_of(model)))
        return checks[-1]

    return check


def _flux():
    from ldm.flux_presets import random_flux

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 16, 8, 6, generator=g), torch.tensor([0.9, 0.4]), torch.randn(2, 7, 32, generator=g),
              torch.randn(2, 33, generator=g))
    return random_flux(seed=1), inputs, {}


def _wan():
    from ldm.wan_files import TINY_WAN, random_wan

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, TINY_WAN.in_dim, 3, 4, 6, generator=g), torch.tensor([0.9, 0.3]),
              torch.randn(2, 20, TINY_WAN.text_dim, generator=g))
    return random_wan(seed=1), inputs, {}


def _ltx2():
    """LTX-2 as the sampler calls it: its denoiser wrapper, the transformer under `.model`."""
    from ldm.ltx2 import LTX2Model
    from ldm.ltx2_files import TINY_LTX2, LTX2Denoiser

    torch.manual_seed(2)
    model = LTX2Model(TINY_LTX2).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        video_context, audio_context, _ = model.preprocess_text_embeds(
            torch.randn(1, 13, TINY_LTX2.connector_dim, generator=g))
    parts = [torch.randn(1, 128, 3, 5, 7, generator=g), torch.randn(1, 8, 11, 16, generator=g)]
    return LTX2Denoiser(model), (parts, torch.tensor([0.5]), video_context), {"audio_context": audio_context}


def _others():
    """The other families' tiny transformers, with inputs from their own tests."""
    from ldm.ace_step15 import random_ace_step15
    from ldm.ace_step15_files import silence_latent
    from ldm.chroma_files import random_chroma
    from ldm.flux2_files import random_flux2
    from ldm.hidream_files import random_hidream
    from ldm.hunyuan_image21 import HunyuanImage21
    from ldm.hunyuan_image21_files import HunyuanImage21Denoiser, tiny_hunyuan_image21_config
    from ldm.hunyuan_video15 import HunyuanVideo15, randomize
    from ldm.hunyuan_video15_files import HunyuanVideo15Denoiser, tiny_hunyuan_video15_config
    from ldm.ltxv_files import random_ltxv
    from ldm.lumina2_files import random_lumina2
    from ldm.qwen_image21 import random_qwen_image21
    from ldm.qwen_image_files import random_qwen_image
    from ldm.sd3_presets import TINY_SD3, random_mmdit
    from ldm.stable_audio import TINY_STABLE_AUDIO, random_stable_audio
    from ldm.stable_audio_files import StableAudioModel
    from ldm.z_image_files import random_z_image
    from tests.ldm import test_ace_step15

    g = torch.Generator().manual_seed(0)
    ace = test_ace_step15._inputs()
    return {
        "ltxv": (random_ltxv, test_ltxv._inputs(), {}),
        "sd3": (random_mmdit, test_mmdit.inputs(TINY_SD3, 0), {}),
        "qwen-image": (random_qwen_image, test_qwen_image.inputs(8, 8), {}),
        "qwen-image-2.1": (random_qwen_image21,
                           (torch.randn(1, 64, 4, 4, generator=g), torch.tensor([0.4]), torch.randn(1, 7, 32)), {}),
        "hidream": (random_hidream, test_hidream.inputs(8, 8), {}),
        "lumina2": (random_lumina2, test_lumina2.inputs(8, 8), {}),
        "z-image": (random_z_image, test_z_image.inputs(8, 8), {}),
        "chroma": (random_chroma, test_chroma._inputs(), {}),
        "flux2": (random_flux2, test_flux2.inputs(4, 4), {}),
        "ace-step-1.5": (lambda: random_ace_step15(test_ace_step15.CONFIG, seed=3),
                         (ace["x"], ace["t"], ace["text"], ace["lyric"], silence_latent(21)), {"is_covers": False}),
        "stable-audio": (lambda: StableAudioModel(*random_stable_audio(TINY_STABLE_AUDIO, seed=0)),
                         (torch.randn(2, 8, 16, generator=g), torch.tensor([0.5, 0.7]), torch.randn(2, 9, 64)), {}),
        # the denoisers the sampler calls: the SR model (98 channels, the start picture's tokens, glyph text) and
        # the distilled HunyuanImage 2.1 (its guidance strength as `y`)
        "hunyuan-video-1.5": (lambda: HunyuanVideo15Denoiser(randomize(HunyuanVideo15(
                              tiny_hunyuan_video15_config("sr")), 1)).eval(),
                              (torch.randn(1, 98, 2, 4, 4, generator=g), torch.tensor([0.5]),
                               torch.randn(1, 5, 32, generator=g)),
                              {"y": torch.randn(1, 3, 32, generator=g), "byt5": torch.randn(1, 4, 32, generator=g)}),
        "hunyuan-image-2.1": (lambda: HunyuanImage21Denoiser(randomize(HunyuanImage21(
                              tiny_hunyuan_image21_config(distilled=True)), 1)).eval(),
                              (torch.randn(1, 64, 4, 4, generator=g), torch.tensor([0.5]),
                               torch.randn(1, 5, 32, generator=g)),
                              {"y": torch.tensor([[3.0]]), "byt5": torch.randn(1, 4, 32, generator=g)}),
    }


BUILDERS = {"flux": _flux, "wan": _wan, "ltx2": _ltx2}


def _run(model: nn.Module, inputs: tuple, kwargs: dict):
    with torch.inference_mode():
        return model(*inputs, **kwargs)


def _block_tensors(plan: offload.BlockPlan) -> list[torch.Tensor]:
    return [t for block in plan.blocks for t in offload._tensors(block)]


def test_each_family_streams_its_block_lists():
    from ldm.hidream_files import random_hidream
    from ldm.vae import AutoencoderKL, VAEConfig

    flux, _, _ = _flux()
    assert block_plan(flux).blocks == [*flux.double_blocks, *flux.single_blocks]
    wan, _, _ = _wan()
    assert block_plan(wan).blocks == list(wan.blocks)
    ltx2, _, _ = _ltx2()  # the denoiser wrapper: its transformer's blocks, and its prompt connectors' too
    blocks = block_plan(ltx2).blocks
    assert blocks[-len(ltx2.model.transformer_blocks):] == list(ltx2.model.transformer_blocks) and len(blocks) == 6
    hidream = random_hidream()  # its `.block.` wrappers are called past: the blocks are what they wrap
    assert block_plan(hidream).blocks[0] is hidream.double_stream_blocks[0].block
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))  # a level has no forward: its blocks run
    assert vae.decoder.up[1].block[0] in block_plan(vae).blocks and vae.decoder.up[1] not in block_plan(vae).blocks
    assert block_plan(nn.Sequential(nn.Linear(4, 4))).blocks == [] and not streamable(nn.Linear(4, 4))
    held = nn.ModuleList([nn.Linear(4, 4)])  # a bare layer in a list may be read outside a call: resident
    assert block_plan(nn.Sequential(held)).resident == [held[0]]


@pytest.mark.parametrize("family", BUILDERS)
def test_a_streamed_transformer_gives_the_same_output_bit_for_bit(family, copying_streamer):
    model, inputs, kwargs = BUILDERS[family]()
    expected = _run(model, inputs, kwargs)
    plan = block_plan(model)
    assert streamable(model)
    resident = stream_blocks(model, "cpu")
    assert resident == resident_bytes(plan) == module_bytes(model) - offload._bytes(_block_tensors(plan))
    streamer = streamer_of(model)
    with copying_streamer(model):
        out = _run(model, inputs, kwargs)
        _run(model, inputs, kwargs)
    # each block fetched once per call (LTX-2's prompt connectors run when the prompt is encoded, not here)
    per_call = len(plan.blocks) if family != "ltx2" else len(model.model.transformer_blocks)
    assert streamer.loads == 2 * per_call
    for a, b in zip(out if isinstance(out, list) else [out], expected if isinstance(expected, list) else [expected],
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for tensor in _block_tensors(plan):  # between calls every block holds its home tensor, no copy
        assert tensor.data.data_ptr() == streamer.home[id(tensor)].data_ptr()
    unstream_blocks(model)
    assert streamer_of(model) is None and not plan.blocks[0]._forward_pre_hooks
    for a, b in zip(*(o if isinstance(o, list) else [o] for o in (_run(model, inputs, kwargs), expected)),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert streamer.loads == 2 * per_call  # hooks gone


def test_ltx2_prompt_connectors_stream_when_a_prompt_is_encoded(copying_streamer):
    """nodes.sd.ltx2.ltx2_conditioning runs `preprocess_text_embeds` on the placed (streamed) model."""
    model, _, _ = _ltx2()
    features = torch.randn(1, 13, model.config.connector_dim, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = model.model.preprocess_text_embeds(features)
    stream_blocks(model, "cpu")
    assert next(model.parameters()) is model.model.scale_shift_table  # where that node reads the device: resident
    with copying_streamer(model), torch.inference_mode():
        out = model.model.preprocess_text_embeds(features)
    assert streamer_of(model).loads == len(block_plan(model).blocks) - len(model.model.transformer_blocks)
    for a, b in zip(out[:2], expected[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["ltxv", "sd3", "qwen-image", "qwen-image-2.1", "hidream", "lumina2", "z-image",
                                    "chroma", "flux2", "ace-step-1.5", "stable-audio", "hunyuan-video-1.5",
                                    "hunyuan-image-2.1"])
def test_every_family_reads_block_weights_only_inside_the_blocks(family, copying_streamer):
    build, inputs, kwargs = _others()[family]
    model = build()
    expected = _run(model, inputs, kwargs)
    stream_blocks(model, "cpu")
    with copying_streamer(model):
        out = _run(model, inputs, kwargs)
    assert streamer_of(model).loads >= 2
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_the_offloaded_read_check_catches_a_block_run_past_its_call(copying_streamer):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x))

    class CallsPast(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])

        def forward(self, x):
            return self.blocks[0].a(x)  # the block's layer, not the block: no hook runs

    model = CallsPast()
    stream_blocks(model, "cpu")
    with pytest.raises(AssertionError, match="offloaded"), copying_streamer(model):
        _run(model, (torch.randn(2, 4),), {})


def test_fp8_blocks_travel_as_fp8_with_their_scales(copying_streamer):
    from ldm.quant import FP8, quantize_fp8_

    model, inputs, kwargs = _flux()
    quantize_fp8_(model)
    expected = _run(model, inputs, kwargs)
    stream_blocks(model, "cpu")
    streamer, seen = streamer_of(model), []
    layer = model.double_blocks[0].img_mlp[0]
    hook = layer.register_forward_pre_hook(lambda module, args: seen.append((module.weight.dtype, module.weight_scale)))
    with copying_streamer(model):
        out = _run(model, inputs, kwargs)
    hook.remove()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert seen[0][0] == FP8  # the copy on the device is fp8, upcast by the layer itself
    assert streamer.home[id(layer.weight)].dtype == FP8 and id(layer.weight_scale) in streamer.home


def test_a_lora_copy_of_a_streamed_transformer_runs_its_own_weights(copying_streamer):
    from ldm.lora import shallow_copy

    model, inputs, kwargs = _flux()
    model.loom_denoiser = True  # a MODEL's (nodes.sd.models.DiffusionModel marks its denoiser)
    devices = DeviceManager(force_cpu=True, options=EngineOptions(lowvram=True))
    devices.use(model)
    copy = shallow_copy(model)
    layer = copy.single_blocks[1].linear2
    layer._parameters["weight"] = nn.Parameter(layer.weight * 2, requires_grad=False)
    devices.use(copy)
    assert streamer_of(copy) is streamer_of(model)  # the copy shares the hooks of its base model
    with copying_streamer(copy):
        patched = _run(copy, inputs, kwargs)
        base = _run(model, inputs, kwargs)
    assert not torch.allclose(patched, base)
    assert copy.single_blocks[1].linear2.weight.data_ptr() != model.single_blocks[1].linear2.weight.data_ptr()
    devices.free()
    devices.use(model)  # the base streams again after the shared hooks were removed
    torch.testing.assert_close(_run(model, inputs, kwargs), base, rtol=0, atol=0)


def test_the_device_manager_streams_a_models_denoiser_under_lowvram_and_counts_its_resident_parts():
    from nodes.sd.models import DiffusionModel

    model, inputs, kwargs = _flux()
    expected = _run(model, inputs, kwargs)
    lowvram = DeviceManager(force_cpu=True, options=EngineOptions(lowvram=True))
    lowvram.use(model)  # a transformer that is no MODEL's denoiser (a text encoder's, say) moves whole
    assert streamer_of(model) is None and lowvram.resident_bytes() == module_bytes(model)
    lowvram.free()
    DiffusionModel(model, None, "flux-tiny")  # a MODEL's denoiser is marked to stream
    plain = DeviceManager(force_cpu=True)
    plain.use(model)
    assert streamer_of(model) is None and plain.resident_bytes() == module_bytes(model)
    plain.free()
    devices = DeviceManager(force_cpu=True, options=EngineOptions(lowvram=True))
    devices.use(model)
    plan = block_plan(model)
    resident = module_bytes(model) - offload._bytes(_block_tensors(plan))
    assert streamer_of(model) is not None and devices.resident_bytes() == resident_bytes(plan) == resident
    assert resident < module_bytes(model) / 4
    torch.testing.assert_close(_run(model, inputs, kwargs), expected, rtol=0, atol=0)
    assert streamer_of(model).loads == len(plan.blocks)
    devices.use(model)  # again: the resident parts re-placed, the same streamer
    devices.free()
    assert streamer_of(model) is None


def test_full_size_transformers_keep_a_few_percent_resident():
    """Built on the meta device in bf16 (12B Flux.1-dev, 14B Wan 2.1): what stays on the card when streamed."""
    from ldm.flux import Flux, FluxConfig
    from ldm.wan import WanConfig, WanModel

    with torch.device("meta"):
        flux = Flux(FluxConfig()).to(torch.bfloat16)
        wan = WanModel(WanConfig()).to(torch.bfloat16)
    for model, share in ((flux, 0.006), (wan, 0.017)):
        plan = block_plan(model)
        assert streamable(model) and resident_bytes(plan) < share * module_bytes(model)
