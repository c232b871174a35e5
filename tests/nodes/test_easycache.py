"""EasyCache (nodes/sd/easycache.py): the skip rule on a fake model against a hand-computed run and against a
transcription of ComfyUI's rule keyed by cond uuids (the negative prompt first, as its calc_cond_batch batches), the
window's levels from start_percent and end_percent, resets between runs, and whole graphs on a tiny SD1 checkpoint and
tiny HunyuanVideo 1.5 files (the templates' use): reuse_threshold 0 is the plain run, bit for bit; a large one skips
model calls and stays finite."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.hunyuan_video15_files import HunyuanVideo15Denoiser, make_hunyuan_video15_files
from ldm.presets import make_checkpoint
from ldm.sampling.flow import SD3FlowSchedule
from ldm.sampling.run import sampling_run
from ldm.sampling.schedules import DiscreteSchedule
from ldm.unet import UNetModel
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd import easycache
from nodes.sd.easycache import EasyCacheSettings, cached_unet, percent_timestep


class Square(nn.Module):
    """A fake model: `x ** 2` (one value per prompt batch row), counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x, timesteps, context, y=None):
        self.calls += 1
        return x**2


class Mixer(nn.Module):
    """A fake model whose output depends on the input, the level and each row's prompt, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x, timesteps, context, y=None):
        self.calls += 1
        prompt = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.tanh(1.7 * x + prompt) * (1 + timesteps.reshape(-1, 1, 1, 1)) + 0.3 * x.roll(1, dims=-1)


def with_cache(module: nn.Module, threshold: float, start_t: float = math.inf, end_t: float = -math.inf):
    return cached_unet(module, EasyCacheSettings(threshold, start_t, end_t, schedule=SD3FlowSchedule(3.0)))


@pytest.fixture
def start_run():
    """Opens a sampling run over the levels given and a last 0, as ldm.sampling.ksampler.sample does, until the
    test ends (a later one within it is the current run); returns the run's state of a cached UNet's EasyCache."""
    with contextlib.ExitStack() as stack:
        def start(unet: nn.Module, levels: list[float]):
            run = stack.enter_context(sampling_run(torch.tensor([*levels, 0.0])))
            return lambda: run.state[unet.easycache]
        yield start


def test_hand_computed_run_of_the_skip_rule(start_run) -> None:
    """x = 1, 0.8, 0.7, 0.6, 0.5, 0.45 through `x ** 2` with reuse_threshold 0.5 (mean |.| of one value is |.|):
    calls 1 and 2 run (no rate yet): rate = |0.64 - 1| / |0.8 - 1| = 1.8, norm 0.64, diff 0.64 - 0.8 = -0.16;
    call 3: 1.8 * 0.1 / 0.64 = 0.28125 < 0.5, skipped: 0.7 - 0.16 = 0.54;
    call 4: + 1.8 * |0.6 - 0.8| / 0.64 = 0.84375, runs (cumulative back to 0): rate |0.36 - 0.64| / 0.2 = 1.4;
    call 5: 1.4 * 0.1 / 0.36 = 0.3889, skipped: 0.5 + (0.36 - 0.6) = 0.26;
    call 6: + 1.4 * 0.15 / 0.36 = 0.9722, runs."""
    unet = with_cache(Square(), 0.5)  # a copy: it counts its own calls
    levels = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    state = start_run(unet, levels)
    context = torch.zeros(1, 2, 3, dtype=torch.float64)
    outs = [float(unet(torch.full((1, 1, 1, 1), x, dtype=torch.float64), torch.tensor([t]), context))
            for x, t in zip([1.0, 0.8, 0.7, 0.6, 0.5, 0.45], levels, strict=True)]
    assert outs == pytest.approx([1.0, 0.64, 0.54, 0.36, 0.26, 0.2025], abs=1e-12)
    assert unet.calls == 4
    assert state().skipped == 2
    # reuse_threshold 0: the cumulative change is never below it, nothing is skipped
    unet = with_cache(Square(), 0.0)
    start_run(unet, levels)
    for x, t in zip([1.0, 0.8, 0.7, 0.6, 0.5, 0.45], levels, strict=True):
        unet(torch.full((1, 1, 1, 1), x, dtype=torch.float64), torch.tensor([t]), context)
    assert unet.calls == 6


def comfyui_rule(model, xs, levels, threshold, start_t, end_t, calls, contexts):
    """ComfyUI's easycache_forward_wrapper (with its calc_cond_batch wrapper's per-evaluation reset), written out
    from its source, for model evaluations that make the calls `calls` (each a list of cond uuids, in ComfyUI's
    order), each prompt with the latent batch `xs[i]`; returns each evaluation's outputs by uuid and how many times
    `model` ran."""
    st = {"rate": None, "cum": 0.0, "initial": True, "first": None, "x_prev": None, "out_prev": None, "norm": None,
          "diffs": {}, "calls": 0}
    results = []
    for x_latent, t in zip(xs, levels, strict=True):
        skip_current, result = False, {}
        for uuids in calls:
            x = torch.cat([x_latent] * len(uuids))
            batch = x_latent.shape[0]

            def sub(v, uuids=uuids, batch=batch):
                i = uuids.index(st["first"])
                return v[i * batch:(i + 1) * batch, ..., ::8, ::8]

            def cached(x=x, uuids=uuids, batch=batch):
                return torch.cat([x[i * batch:(i + 1) * batch] + st["diffs"][u] for i, u in enumerate(uuids)])

            def compute(x=x, t=t, uuids=uuids, batch=batch):
                st["calls"] += 1
                context = torch.cat([contexts[u].expand(batch, -1, -1) for u in uuids])
                return model(x, torch.full((x.shape[0],), t), context)

            def done(out, uuids=uuids, batch=batch, result=result):
                result.update({u: out[i * batch:(i + 1) * batch] for i, u in enumerate(uuids)})

            if not t > end_t:
                done(compute())
                continue
            has_first, input_change = st["first"] in uuids, None
            if t <= start_t:
                can_apply = all(u in st["diffs"] for u in uuids)
                if skip_current and can_apply:
                    done(cached())
                    continue
                if st["initial"]:
                    st["first"], st["initial"] = uuids[0], False
                    has_first = True
                if has_first:
                    if st["x_prev"] is not None:
                        input_change = (sub(x) - st["x_prev"]).flatten().abs().mean()
                    if st["norm"] is not None and st["rate"] is not None:
                        st["cum"] += st["rate"] * input_change / st["norm"]
                        if st["cum"] < threshold and can_apply:
                            skip_current = True
                            done(cached())
                            continue
                        st["cum"] = 0.0
            out = compute()
            if has_first and st["norm"] is not None and input_change is not None:
                st["rate"] = (sub(out) - st["out_prev"]).flatten().abs().mean() / input_change
            for i, u in enumerate(uuids):
                st["diffs"][u] = (out - x)[i * batch:(i + 1) * batch]
            if has_first:
                st["x_prev"], st["out_prev"], st["norm"] = sub(x), sub(out), out.flatten().abs().mean()
            done(out)
        results.append(result)
    return results, st["calls"]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.8])
def test_prompts_match_comfyuis_rule(threshold, batched, start_run) -> None:
    """Two latents, the positive and negative prompts in one call ([positive; negative] in Loom, [negative; positive]
    in ComfyUI) or in calls of their own (the positive's first in Loom, the negative's in ComfyUI): ComfyUI tracks
    the negative, and so does Loom, deciding at each evaluation's first call. 16x16 latents subsampled to 2x2, a
    window from level 0.85 to 0.15."""
    torch.manual_seed(0)
    contexts = {"pos": torch.randn(1, 5, 8, dtype=torch.float64), "neg": torch.randn(1, 5, 8, dtype=torch.float64)}
    levels = [1.0 - i / 12 for i in range(12)]
    xs = [torch.randn(2, 4, 16, 16, dtype=torch.float64)]
    for _ in levels[1:]:
        xs.append(xs[-1] * 0.93 + 0.05 * torch.randn(2, 4, 16, 16, dtype=torch.float64))
    calls = [["neg", "pos"]] if batched else [["neg"], ["pos"]]
    expected, expected_calls = comfyui_rule(Mixer(), xs, levels, threshold, 0.85, 0.15, calls, contexts)

    unet = with_cache(Mixer(), threshold, 0.85, 0.15)
    start_run(unet, levels)
    # the guider's contexts, made once per run
    pos, neg = contexts["pos"].expand(2, -1, -1), contexts["neg"].expand(2, -1, -1)
    both = torch.cat([pos, neg])
    for x, t, want in zip(xs, levels, expected, strict=True):
        if batched:
            got = unet(torch.cat([x, x]), torch.full((4,), t), both).chunk(2)
        else:
            got = [unet(x, torch.full((2,), t), pos), unet(x, torch.full((2,), t), neg)]
        assert (got[0] - want["pos"]).abs().max() < 1e-12 and (got[1] - want["neg"]).abs().max() < 1e-12
    assert unet.calls == expected_calls
    assert (expected_calls == len(levels) * len(calls)) == (threshold == 0.0)


def test_metadata_change_resets_with_a_zero_rate(start_run) -> None:
    """A new input shape within the window clears the cache as ComfyUI's reset does, leaving the rate at 0 (not
    unknown): the second call after it is skipped, the change rate being 0."""
    unet = with_cache(Square(), 1e-9)
    levels = [0.9, 0.8, 0.7, 0.6, 0.5]
    start_run(unet, levels)
    context = torch.zeros(1, 2, 3)
    for x, t in zip([1.0, 0.8, 0.7], levels[:3], strict=True):
        unet(torch.full((1, 1, 2, 2), x), torch.tensor([t]), context)
    assert unet.calls == 3
    unet(torch.full((1, 1, 3, 3), 0.6), torch.tensor([0.6]), context)  # reset: runs
    out = unet(torch.full((1, 1, 3, 3), 0.5), torch.tensor([0.5]), context)
    assert unet.calls == 4 and torch.allclose(out, torch.full((1, 1, 3, 3), 0.5 + 0.36 - 0.6))


def test_window_levels_and_new_runs(start_run) -> None:
    """Calls above start_t run and keep their diffs; at or below end_t they run and change nothing; each run (the
    sampling run) starts afresh."""
    unet = with_cache(Square(), 3.0, start_t=0.65, end_t=0.25)
    levels = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    context = torch.zeros(1, 2, 3)
    for run in range(2):
        state = start_run(unet, levels)
        unet.calls = 0
        ran = []
        for i, t in enumerate(levels):
            before = unet.calls
            unet(torch.full((1, 1, 2, 2), 1.0 - 0.05 * i), torch.tensor([t]), context)
            ran.append(unet.calls > before)
        # 0.6 and 0.5: the first two tracked calls; 0.4, 0.3 skipped; 0.2, 0.1 past the end
        assert ran == [True, True, True, True, True, False, False, True, True], run
        assert state().skipped == 2


def test_outside_a_sampling_run_every_call_runs() -> None:
    unet = with_cache(Square(), 3.0)
    for i, t in enumerate([0.9, 0.8, 0.7, 0.6, 0.5]):
        out = unet(torch.full((1, 1, 2, 2), 1.0 - 0.1 * i), torch.tensor([t]), torch.zeros(1, 2, 3))
        assert torch.allclose(out, torch.full((1, 1, 2, 2), (1.0 - 0.1 * i) ** 2))
    assert unet.calls == 5


def test_percent_levels_are_comfyuis_percent_to_sigma() -> None:
    shift = 7.0
    flow = SD3FlowSchedule(shift)
    for percent in (0.15, 0.5, 0.95):
        t = 1.0 - percent
        assert percent_timestep(flow, percent) == pytest.approx(shift * t / (1 + (shift - 1) * t), rel=1e-6)
    assert percent_timestep(flow, 0.0) == math.inf and percent_timestep(flow, 1.0) == -math.inf
    # SD's discrete levels: the timestep (1 - percent) * 999 (ComfyUI's percent_to_sigma: sigma at that timestep)
    for percent in (0.15, 0.5, 0.95):
        assert percent_timestep(DiscreteSchedule(), percent) == pytest.approx((1 - percent) * 999, abs=1e-3)


def test_node_declaration_is_comfyuis() -> None:
    node = next(n for n in easycache.NODES if n.name == "EasyCache")
    info = node.object_info()
    assert (info["name"], info["category"], info["output"]) == ("EasyCache", "advanced/debug", ["MODEL"])
    required = info["input"]["required"]
    assert list(required) == ["model", "reuse_threshold", "start_percent", "end_percent", "verbose"]
    defaults = {k: (v[1]["default"], v[1].get("min"), v[1].get("max")) for k, v in required.items() if k != "model"}
    assert defaults == {"reuse_threshold": (0.2, 0.0, 3.0), "start_percent": (0.15, 0.0, 1.0),
                        "end_percent": (0.95, 0.0, 1.0), "verbose": (False, None, None)}


# --- Whole graphs ---------------------------------------------------------------------------------------------------


def registry():
    registry = builtin_registry()
    if "EasyCache" not in registry:  # until nodes/registry.py lists the module among the built-ins
        registry.register_module(easycache, "builtin")
    return registry


@pytest.fixture(scope="module")
def sd_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("easycache_sd")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    set_paths(FolderPaths(base=root))
    yield Executor(registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


@pytest.fixture
def counted(monkeypatch):
    """How many times each model class's own forward ran."""
    calls = {}
    for cls in (UNetModel, HunyuanVideo15Denoiser):
        forward = cls.forward

        def counting(self, *args, _forward=forward, _name=cls.__name__, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counting)
    return calls


def sd_graph(cache: dict | None, seed: int = 5, steps: int = 8) -> dict:
    nodes = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
             "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}}
    model = ["1", 0]
    if cache is not None:
        nodes["5"] = {"class_type": "EasyCache", "inputs": {"model": model, "start_percent": 0.15, "end_percent": 0.95,
                                                             "verbose": False, **cache}}
        model = ["5", 0]
    nodes["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    return nodes


def sample(engine, nodes: dict, keep: str = "6") -> torch.Tensor:
    nodes = {**nodes, "99": {"class_type": "PreviewAny", "inputs": {"source": [keep, 0]}}}
    result = engine.run(parse_api(nodes), keep=[keep])
    assert result.ok, result.error
    return result.values[keep][0]["samples"]


def test_sd1_graph_threshold_zero_is_the_plain_run_and_a_large_one_skips(sd_engine, counted) -> None:
    plain = sample(sd_engine, sd_graph(None))
    assert counted == {"UNetModel": 8}  # one call a step: both prompts batched
    counted.clear()
    assert torch.equal(sample(sd_engine, sd_graph({"reuse_threshold": 0.0})), plain)
    assert counted == {"UNetModel": 8}
    counted.clear()
    cached = sample(sd_engine, sd_graph({"reuse_threshold": 3.0}))
    assert counted["UNetModel"] < 8
    assert torch.isfinite(cached).all() and (cached - plain).abs().max() > 1e-4


def test_sd1_graph_runs_start_afresh(sd_engine) -> None:
    """The EasyCache node's MODEL (kept by the executor) samples seed 5, seed 6, then seed 5 again (its KSampler made
    to run again by a latent from another node): the same latent as the first time."""
    nodes = sd_graph({"reuse_threshold": 3.0})
    first = sd_engine.run(parse_api({**nodes, "99": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}}),
                          keep=["5", "6"])
    assert first.ok, first.error
    other = sample(sd_engine, sd_graph({"reuse_threshold": 3.0}, seed=6))
    assert torch.isfinite(other).all()
    nodes["14"] = dict(nodes["4"])
    nodes["6"]["inputs"]["latent_image"] = ["14", 0]
    again = sd_engine.run(parse_api({**nodes, "99": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}}),
                          keep=["5", "6"])
    assert again.ok, again.error
    assert again.values["5"][0] is first.values["5"][0]  # the same model and cache
    assert torch.equal(again.values["6"][0]["samples"], first.values["6"][0]["samples"])
    assert not torch.equal(other, first.values["6"][0]["samples"])


def test_sd1_graph_window_bounds_the_skipped_steps(sd_engine, counted) -> None:
    """Skips happen only from the third step at or below start_percent's level and above end_percent's: a window that
    holds two steps (8 steps of the normal scheduler: timesteps 999, 856, 713, ...; end_percent 0.15 is timestep
    849, 0.3 is 699) skips none, one from 0 to 1 skips more than the default one."""
    counts = {}
    for start, end in ((0.0, 1.0), (0.15, 0.95), (0.0, 0.15), (0.0, 0.3)):
        counted.clear()
        nodes = sd_graph({"reuse_threshold": 3.0}, seed=7)
        nodes["5"]["inputs"].update(start_percent=start, end_percent=end)
        sample(sd_engine, nodes)
        counts[start, end] = counted["UNetModel"]
    assert counts[0.0, 0.15] == 8 and counts[0.0, 0.3] == 7, counts
    assert counts[0.0, 1.0] < counts[0.15, 0.95] < 8, counts


# --- LazyCache ------------------------------------------------------------------------------------------------------


def lazy_reference(threshold: float, start: float, end: float, calls: list[tuple[float, float]], guide) -> list:
    """A transcription of ComfyUI's lazycache_predict_noise_wrapper on one value per call (subsampling a 1x1 latent
    keeps it whole): (x, sigma) in, each call's result and whether the guide ran."""
    rate, cumulative, x_prev, out_prev, norm, diff = None, 0.0, None, None, None, None
    results = []
    for x, sigma in calls:
        if not sigma > end:
            results.append((guide(x), True))
            continue
        change = None
        if sigma <= start and x_prev is not None:
            change = abs(x - x_prev)
            if norm is not None and rate is not None:
                cumulative += rate * change / norm
                if cumulative < threshold:
                    results.append((x + diff, False))
                    continue
                cumulative = 0.0
        out = guide(x)
        if norm is not None and change is not None:
            rate = abs(out - out_prev) / change
        diff, x_prev, out_prev, norm = out - x, x, out, abs(out)
        results.append((out, True))
    return results


def test_lazycache_run_against_a_transcription_of_comfyuis_rule() -> None:
    from nodes.sd.easycache import LazyCacheRun

    levels = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    xs = [1.0 - 0.07 * i + 0.01 * (i % 3) for i in range(len(levels))]
    for threshold, start, end in ((0.5, 0.85, 0.08), (0.2, 0.85, 0.08), (3.0, math.inf, 0.0), (0.0, 0.85, 0.08)):
        run = LazyCacheRun(threshold, start, end, steps=len(levels))
        ran = []

        def guide(x, sigma, _ran=ran):
            _ran.append(True)
            return torch.sin(3 * x) + 0.5

        ours = [float(run(torch.full((1, 1, 1, 1), x, dtype=torch.float64), torch.tensor([s]), guide))
                for x, s in zip(xs, levels, strict=True)]
        expected = lazy_reference(threshold, start, end, list(zip(xs, levels, strict=True)),
                                  lambda x: math.sin(3 * x) + 0.5)
        assert ours == pytest.approx([r for r, _ in expected], abs=1e-12), threshold
        skipped = sum(not ran_ for _, ran_ in expected)
        assert run.skipped == skipped and len(ran) == len(levels) - skipped
        if threshold == 0.0:
            assert skipped == 0
        if threshold == 3.0:
            assert skipped > 3


def test_lazycache_hand_computed_run() -> None:
    """x = 1, 0.8, 0.7, 0.6 through `x ** 2`, threshold 0.5, every level in the window: calls 1 and 2 run (no rate
    yet; after call 2 the rate is |0.64 - 1| / |0.8 - 1| = 1.8, norm 0.64, diff -0.16); call 3: 1.8 * 0.1 / 0.64 =
    0.28 < 0.5, skipped: 0.7 - 0.16 = 0.54; call 4: + 1.8 * 0.2 / 0.64, past 0.5: runs, 0.36."""
    from nodes.sd.easycache import LazyCacheRun

    run = LazyCacheRun(0.5, math.inf, 0.0, steps=4)
    outs = [float(run(torch.full((1, 1, 1, 1), x, dtype=torch.float64), torch.tensor([s]), lambda x, s: x**2))
            for x, s in ((1.0, 0.9), (0.8, 0.8), (0.7, 0.7), (0.6, 0.6))]
    assert outs == pytest.approx([1.0, 0.64, 0.54, 0.36], abs=1e-12) and run.skipped == 1
    # A latent of another shape clears the state (and leaves the rate 0, as ComfyUI's reset): the next call runs,
    # the one after is skipped whatever the threshold above 0.
    calls = []
    guide = lambda x, s: calls.append(1) or x**2  # noqa: E731
    run(torch.full((1, 1, 3, 3), 0.5, dtype=torch.float64), torch.tensor([0.5]), guide)
    run(torch.full((1, 1, 3, 3), 0.4, dtype=torch.float64), torch.tensor([0.4]), guide)
    assert len(calls) == 1 and run.rate == 0.0


def lazy_graph(threshold: float | None, seed: int = 5, **window) -> dict:
    nodes = sd_graph(None, seed=seed)
    if threshold is not None:
        nodes["5"] = {"class_type": "LazyCache", "inputs": {
            "model": ["1", 0], "reuse_threshold": threshold, "start_percent": window.get("start", 0.15),
            "end_percent": window.get("end", 0.95), "verbose": True}}
        nodes["6"]["inputs"]["model"] = ["5", 0]
    return nodes


def test_lazycache_sd1_graph(sd_engine, counted, caplog) -> None:
    """Threshold 0 is the plain run bit for bit; a large one skips whole evaluations (both prompts' call), logs what
    it skipped as ComfyUI does, and each run starts afresh (the same result twice)."""
    plain = sample(sd_engine, lazy_graph(None))
    counted.clear()
    assert torch.equal(sample(sd_engine, lazy_graph(0.0)), plain)
    assert counted == {"UNetModel": 8}
    counted.clear()
    with caplog.at_level("INFO", logger="nodes.sd.easycache"):
        cached = sample(sd_engine, lazy_graph(3.0))
    skipped = 8 - counted["UNetModel"]
    assert skipped > 0 and f"LazyCache - skipped {skipped}/8 steps" in caplog.text
    assert "LazyCache enabled - threshold: 3.0, start_percent: 0.15, end_percent: 0.95" in caplog.text
    assert "LazyCache [verbose] - skipping step" in caplog.text
    assert torch.isfinite(cached).all() and (cached - plain).abs().max() > 1e-4
    other = sample(sd_engine, lazy_graph(3.0, seed=6))
    assert not torch.equal(other, cached)
    again = lazy_graph(3.0)
    again["14"] = dict(again["4"])
    again["6"]["inputs"]["latent_image"] = ["14", 0]
    assert torch.equal(sample(sd_engine, again), cached)


def test_lazycache_window_and_declaration(sd_engine, counted) -> None:
    """A window holding two evaluations skips none (the first two in it run)."""
    counted.clear()
    sample(sd_engine, lazy_graph(3.0, seed=7, start=0.0, end=0.15))
    assert counted == {"UNetModel": 8}
    node = next(n for n in easycache.NODES if n.name == "LazyCache")
    info = node.object_info()
    assert list(info["input"]["required"]) == ["model", "reuse_threshold", "start_percent", "end_percent", "verbose"]
    assert info["output"] == ["MODEL"]


@pytest.fixture(scope="module")
def hv_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("easycache_hv15")
    make_hunyuan_video15_files(root / "models", seed=3, dtype=torch.float32)
    set_paths(FolderPaths(base=root))
    yield Executor(registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def hv_graph(threshold: float | None, steps: int = 8) -> dict:
    """Comfy-Org's template wiring: UNETLoader -> EasyCache -> ModelSamplingSD3 (7) -> KSampler, image to video."""
    nodes = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "hunyuanvideo1.5_720p_i2v-tiny.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": "qwen_2.5_vl_7b-hunyuan_video15-tiny.safetensors",
            "clip_name2": "byt5_small_glyphxl-tiny.safetensors", "type": "hunyuan_video_15"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "hunyuanvideo15_vae-tiny.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red kite"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "10": {"class_type": "CLIPVisionLoader",
               "inputs": {"clip_name": "sigclip_vision_patch14_384-tiny.safetensors"}},
        "11": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0xD04020}},
        "12": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["10", 0], "image": ["11", 0],
                                                            "crop": "center"}},
        "13": {"class_type": "HunyuanVideo15ImageToVideo", "inputs": {
            "positive": ["5", 0], "negative": ["6", 0], "vae": ["3", 0], "width": 64, "height": 48, "length": 5,
            "batch_size": 1, "start_image": ["11", 0], "clip_vision_output": ["12", 0]}},
        "14": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 7.0}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["14", 0], "seed": 5, "steps": steps, "cfg": 6.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["13", 0], "negative": ["13", 1], "latent_image": ["13", 2], "denoise": 1.0}},
    }
    if threshold is not None:
        nodes["7"] = {"class_type": "EasyCache", "inputs": {"model": ["1", 0], "reuse_threshold": threshold,
                                                            "start_percent": 0.15, "end_percent": 0.95,
                                                            "verbose": True}}
        nodes["14"]["inputs"]["model"] = ["7", 0]
    return nodes


def test_hunyuan_video15_template_wiring(hv_engine, counted, caplog) -> None:
    """The prompts' calls are separate here (their inputs differ in kind): the positive's call decides for both."""
    plain = sample(hv_engine, hv_graph(None), keep="8")
    assert counted == {"HunyuanVideo15Denoiser": 16}
    counted.clear()
    assert torch.equal(sample(hv_engine, hv_graph(0.0), keep="8"), plain)
    assert counted == {"HunyuanVideo15Denoiser": 16}
    counted.clear()
    with caplog.at_level("INFO", logger="nodes.sd.easycache"):
        cached = sample(hv_engine, hv_graph(3.0), keep="8")
    skipped, odd = divmod(16 - counted["HunyuanVideo15Denoiser"], 2)
    assert skipped > 0 and odd == 0
    assert torch.isfinite(cached).all() and (cached - plain).abs().max() > 1e-4
    assert f"EasyCache - skipped {skipped}/8 steps" in caplog.text
    assert "EasyCache [verbose] - skipping step" in caplog.text



class _FailingFinish:
    """A guidance wrapper (`model_patches.GuidanceWrapper`) that passes each evaluation on and fails to finish."""

    def __init__(self, sigmas: torch.Tensor) -> None:
        self.levels = sigmas  # the run's levels, on the CPU

    def __call__(self, x, sigma, guide):
        return guide(x, sigma)

    def finish(self) -> None:
        raise RuntimeError("the wrapper failed to finish")


def test_a_wrapper_failing_to_finish_never_hides_the_samplers_error() -> None:
    """A wrapper's finish() failing after a good run is raised; after a failed run the sampler's own error is."""
    from ldm.sampling.ksampler import SamplingInterrupted, sample
    from ldm.sampling.model_patches import SamplingPatches

    made = []

    def factory(sigmas):
        made.append(wrapper := _FailingFinish(sigmas))
        return wrapper

    patches = SamplingPatches().around(factory)
    args = dict(seed=1, steps=2, cfg=1.0, sampler_name="euler", positive=[(torch.zeros(1, 2, 4), {})], negative=[],
                patches=patches)
    with pytest.raises(RuntimeError, match="failed to finish"):
        sample(Square(), DiscreteSchedule(), torch.zeros(1, 4, 2, 2), **args)
    assert made[0].levels.device.type == "cpu" and len(made[0].levels) == 3
    with pytest.raises(SamplingInterrupted):
        sample(Square(), DiscreteSchedule(), torch.zeros(1, 4, 2, 2), interrupt=lambda: True, **args)
    assert len(made) == 2
