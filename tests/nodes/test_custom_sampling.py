"""The custom sampling nodes (SamplerCustom, SamplerCustomAdvanced and their parts) against the KSampler."""

from types import SimpleNamespace

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from ldm.sampling import DiscreteSchedule, get_sigmas
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

STEPS = 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom_sampling")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def prompts() -> dict:
    """Loader "1", prompts "2" and "3", an empty latent "4" (64x64 pixels, batch 2)."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}}


def run(engine, graph: dict, *nodes: str) -> list:
    """The outputs of `nodes`, after running the graph with a PreviewAny on each (only what outputs need runs)."""
    graph = {**graph, **{f"preview{node}": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}
                         for node in nodes}}
    result = engine.run(parse_api(graph), keep=list(nodes))
    assert result.ok, result.error
    return [result.values[node] for node in nodes]


def ksampler(sampler: str = "euler", scheduler: str = "karras", cfg: float = 6.0, seed: int = 5) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": seed, "steps": STEPS, "cfg": cfg, "sampler_name": sampler,
        "scheduler": scheduler, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "denoise": 1.0}}


def advanced(sampler: dict, sigmas: dict | None = None, noise: dict | None = None, guider: dict | None = None,
             latent=("4", 0)) -> dict:
    """Nodes "10".."14": noise, guider, sampler, sigmas and SamplerCustomAdvanced."""
    return {"10": noise or {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
            "11": guider or {"class_type": "CFGGuider", "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 6.0}},
            "12": sampler,
            "13": sigmas or {"class_type": "BasicScheduler", "inputs": {
                "model": ["1", 0], "scheduler": "karras", "steps": STEPS, "denoise": 1.0}},
            "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["10", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": ["13", 0],
                "latent_image": list(latent)}}}


def select(name: str) -> dict:
    return {"class_type": "KSamplerSelect", "inputs": {"sampler_name": name}}


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde", "euler_ancestral"])
def test_sampler_custom_advanced_makes_the_ksamplers_latent(engine, sampler):
    """Deterministic, Brownian-tree and ancestral samplers: the seed reaches the initial and the step noise."""
    graph = {**prompts(), "5": ksampler(sampler), **advanced(select(sampler))}
    [(expected,), (output, denoised)] = run(engine, graph, "5", "14")
    assert torch.equal(output["samples"], expected["samples"])
    assert denoised["samples"].shape == output["samples"].shape


def test_sampler_custom_makes_the_ksamplers_latent_and_its_noise_switch_works(engine):
    custom = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": 5, "cfg": 6.0, "positive": ["2", 0],
        "negative": ["3", 0], "sampler": ["12", 0], "sigmas": ["13", 0], "latent_image": ["4", 0]}}
    graph = {**prompts(), "5": ksampler(), "12": select("euler"),
             "13": {"class_type": "KarrasScheduler", "inputs": {
                 "steps": STEPS, "sigma_max": 14.614642, "sigma_min": 0.0291675, "rho": 7.0}},
             "15": custom,
             "16": {**custom, "inputs": {**custom["inputs"], "add_noise": False}}}
    [(expected,), (output, _), (quiet, _)] = run(engine, graph, "5", "15", "16")
    # KarrasScheduler's defaults are SD's range, so its sigmas are BasicScheduler's karras ones (to float32).
    torch.testing.assert_close(output["samples"], expected["samples"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(quiet["samples"], output["samples"])


def test_split_sigmas_with_disable_noise_is_the_two_stage_ksampler_advanced(engine):
    """Stage one keeps its leftover noise; stage two adds none and finishes: KSamplerAdvanced's two-stage run."""
    def stage(add: str, start: int, end: int, leftover: str, latent) -> dict:
        return {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": add, "noise_seed": 5, "steps": STEPS, "cfg": 6.0,
            "sampler_name": "euler", "scheduler": "karras", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": latent, "start_at_step": start, "end_at_step": end,
            "return_with_leftover_noise": leftover}}

    graph = {**prompts(), "5": stage("enable", 0, 2, "enable", ["4", 0]),
             "6": stage("disable", 2, 10000, "disable", ["5", 0]),
             **advanced(select("euler")),
             "20": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["13", 0], "step": 2}},
             "21": {"class_type": "DisableNoise", "inputs": {}}}
    graph["14"]["inputs"]["sigmas"] = ["20", 0]
    graph["22"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["21", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": ["20", 1],
        "latent_image": ["14", 0]}}
    [(expected,), (first, _), (second, denoised)] = run(engine, graph, "6", "14", "22")
    assert torch.equal(second["samples"], expected["samples"])
    # The last step goes to sigma 0, where Euler's result is the denoised prediction itself.
    torch.testing.assert_close(denoised["samples"], second["samples"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first["samples"], second["samples"])


def test_sampler_options_reach_the_sampler(engine):
    """Euler ancestral with eta 0 adds no step noise: it is plain Euler."""
    graph = {**prompts(), "5": ksampler("euler"),
             **advanced({"class_type": "SamplerEulerAncestral", "inputs": {"eta": 0.0, "s_noise": 1.0}}),
             "30": {**ksampler("euler_ancestral")}}
    [(euler,), (output, _), (ancestral,)] = run(engine, graph, "5", "14", "30")
    torch.testing.assert_close(output["samples"], euler["samples"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ancestral["samples"], euler["samples"])


def test_basic_guider_is_cfg_1(engine):
    basic = {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["2", 0]}}
    graph = {**prompts(), "5": ksampler(cfg=1.0), **advanced(select("euler"), guider=basic)}
    [(expected,), (output, _)] = run(engine, graph, "5", "14")
    assert torch.equal(output["samples"], expected["samples"])


def test_the_schedulers_and_sigma_tools():
    from nodes.sd import custom_sampling as cs

    schedule = DiscreteSchedule()
    [basic] = cs.BasicScheduler().execute(SimpleNamespace(schedule=schedule), "karras", 10, 0.5)
    torch.testing.assert_close(basic, get_sigmas("karras", schedule, 20)[-11:])
    [exp] = cs.ExponentialScheduler().execute(5, schedule.sigma_max, schedule.sigma_min)
    [poly] = cs.PolyexponentialScheduler().execute(5, schedule.sigma_max, schedule.sigma_min, 1.0)
    torch.testing.assert_close(poly, exp)  # rho 1 is the exponential schedule
    [turbo] = cs.SDTurboScheduler().execute(SimpleNamespace(schedule=schedule), 2, 1.0)
    torch.testing.assert_close(turbo, torch.stack([schedule.sigmas[999], schedule.sigmas[899], torch.tensor(0.0)]))
    [turbo_half] = cs.SDTurboScheduler().execute(SimpleNamespace(schedule=schedule), 1, 0.5)
    torch.testing.assert_close(turbo_half[0], schedule.sigmas[499])

    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    high, low = cs.SplitSigmas().execute(sigmas, 1)
    assert high.tolist() == [10.0, 5.0] and low.tolist() == [5.0, 2.0, 1.0, 0.0]
    high, low = cs.SplitSigmasDenoise().execute(sigmas, 0.5)
    assert high.tolist() == [10.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    high, low = cs.SplitSigmasDenoise().execute(sigmas, 0.0)
    assert high.tolist() == sigmas.tolist() and low.tolist() == [0.0]
    [flipped] = cs.FlipSigmas().execute(sigmas)
    assert flipped.tolist() == pytest.approx([0.0001, 1.0, 2.0, 5.0, 10.0]) and sigmas[-1] == 0
    [first] = cs.SetFirstSigma().execute(sigmas, 20.0)
    assert first.tolist() == [20.0, 5.0, 2.0, 1.0, 0.0] and sigmas[0] == 10.0
    [manual] = cs.ManualSigmas().execute("14.6, 7 ,3.5e-1; 0")
    assert manual.tolist() == pytest.approx([14.6, 7.0, 0.35, 0.0])


def test_bad_sigmas_get_clear_errors(engine):
    graph = {**prompts(), **advanced(select("euler"), sigmas={"class_type": "ManualSigmas",
                                                              "inputs": {"sigmas": "14, -1, 0"}})}
    graph["99"] = {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}}
    result = engine.run(parse_api(graph))
    assert not result.ok and "sigmas must be finite and not negative" in str(result.error)

    graph["13"]["inputs"]["sigmas"] = "none"
    result = engine.run(parse_api(graph))
    assert not result.ok and "no numbers in the sigmas" in str(result.error)

    graph["13"] = {"class_type": "ExponentialScheduler", "inputs": {"steps": 4, "sigma_max": 14.6, "sigma_min": 0.0}}
    with pytest.raises(WorkflowInvalid) as err:
        engine.run(parse_api(graph))
    assert "sigma_min must be above 0" in str(err.value)


def test_a_wrong_socket_type_is_a_validation_error(engine):
    graph = {**prompts(), **advanced(select("euler"))}
    graph["14"]["inputs"]["sigmas"] = ["12", 0]  # a SAMPLER where SIGMAS belongs
    graph["99"] = {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}}
    with pytest.raises(WorkflowInvalid) as err:
        engine.run(parse_api(graph))
    assert "SAMPLER" in str(err.value) and "SIGMAS" in str(err.value)


def test_an_empty_schedule_returns_the_latent_unchanged(engine):
    graph = {**prompts(), **advanced(select("euler"))}
    graph["13"]["inputs"]["denoise"] = 0.0
    [(output, denoised), (latent,)] = run(engine, graph, "14", "4")
    assert torch.equal(output["samples"], latent["samples"]) and denoised is output


def test_a_first_stage_split_off_at_step_0_adds_the_noise_so_the_second_stage_is_the_whole_run(engine):
    """SplitSigmas' default step 0: the high part is one level, no step; the latent still gets its noise
    (as in ComfyUI), so DisableNoise over the rest makes the one-stage image."""
    graph = {**prompts(), **advanced(select("euler")),
             "20": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["13", 0], "step": 0}},
             "21": {"class_type": "DisableNoise", "inputs": {}}}
    single = dict(graph["14"], inputs=dict(graph["14"]["inputs"]))
    graph["30"] = single
    graph["14"]["inputs"]["sigmas"] = ["20", 0]
    graph["22"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["21", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": ["20", 1],
        "latent_image": ["14", 0]}}
    [(expected, _), (first, _), (second, _)] = run(engine, graph, "30", "14", "22")
    assert first["samples"].abs().mean() > 1  # pure noise at sigma_max, not the empty latent
    # To rounding: the first stage's latent goes out unscaled (/ 0.18215) and back in between the stages.
    torch.testing.assert_close(second["samples"], expected["samples"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("text, message", [
    ("14, 0, 5, 0", "sigmas must fall at every step"),
    ("5, 5, 0", "sigmas must fall at every step"),
    ("0, 1, 14", "sigmas must fall at every step"),
])
def test_schedules_no_sampler_can_walk_are_refused_with_the_reason(engine, text, message):
    graph = {**prompts(), **advanced(select("dpmpp_sde"), sigmas={"class_type": "ManualSigmas",
                                                                  "inputs": {"sigmas": text}})}
    graph["99"] = {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}}
    result = engine.run(parse_api(graph))
    assert not result.ok and message in str(result.error)


def test_rising_sigmas_unsample_with_a_deterministic_sampler_and_are_refused_by_a_noisy_one(engine):
    flip = {"class_type": "FlipSigmas", "inputs": {"sigmas": ["40", 0]}}
    schedule = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": STEPS,
                                                           "denoise": 1.0}}
    graph = {**prompts(), "40": schedule, **advanced(select("euler"), sigmas=flip,
                                                      noise={"class_type": "DisableNoise", "inputs": {}})}
    [(output, _)] = run(engine, graph, "14")
    assert bool(torch.isfinite(output["samples"]).all()) and output["samples"].abs().mean() > 1  # noise again
    graph["99"] = {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}}
    for sampler, why in [("euler_ancestral", "adds noise at each step"),
                         ("dpm_adaptive", "plans its steps from high to low noise")]:
        graph["12"] = select(sampler)
        result = engine.run(parse_api(graph))
        assert not result.ok and f"{sampler} {why} and needs falling sigmas" in str(result.error)


def test_karras_checks_rho_and_may_ramp_down_to_zero(engine):
    from nodes.sd import custom_sampling as cs

    assert "rho must be above 0" in cs.KarrasScheduler.check_inputs({"rho": 0.0, "sigma_min": 0.1, "sigma_max": 1})
    assert "must be below sigma_max" in cs.KarrasScheduler.check_inputs({"rho": 7, "sigma_min": 2, "sigma_max": 1})
    [sigmas] = cs.KarrasScheduler().execute(4, 14.6, 0.0, 7.0)
    assert len(sigmas) == 4 and sigmas[-1] == 0 and sigmas[-2] > 0  # one 0, not two


def test_karras_down_to_zero_in_one_step_keeps_its_step():
    from nodes.sd import custom_sampling as cs

    [sigmas] = cs.KarrasScheduler().execute(1, 14.6, 0.0, 7.0)
    assert sigmas.tolist() == pytest.approx([14.6, 0.0])


@pytest.mark.parametrize("sampler", ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_cfg_pp_samplers_run_in_the_ksampler_and_custom_sampling(engine, sampler):
    graph = {**prompts(), "5": ksampler(sampler, cfg=1.5), **advanced(select(sampler), guider={
        "class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                               "cfg": 1.5}})}
    [(expected,), (output, _)] = run(engine, graph, "5", "14")
    assert torch.equal(output["samples"], expected["samples"])
    [(plain,)] = run(engine, {**prompts(), "5": ksampler(sampler.replace("_cfg_pp", ""), cfg=1.5)}, "5")
    assert not torch.equal(plain["samples"], expected["samples"])


def test_sampler_euler_ancestral_cfg_pp_node_makes_the_ksamplers_latent(engine):
    node = {"class_type": "SamplerEulerAncestralCFGPP", "inputs": {"eta": 1.0, "s_noise": 1.0}}
    guider = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 1.5}}
    graph = {**prompts(), "5": ksampler("euler_ancestral_cfg_pp", cfg=1.5), **advanced(node, guider=guider)}
    [(expected,), (output, _)] = run(engine, graph, "5", "14")
    assert torch.equal(output["samples"], expected["samples"])


def test_dual_cfg_guider(engine):
    """With the second prompt the same as the first, regular dual guidance is plain guidance at cfg_cond2_negative;
    with another second prompt, both styles change the result."""
    def dual(cond2: str, style: str = "regular") -> dict:
        return {"class_type": "DualCFGGuider", "inputs": {
            "model": ["1", 0], "cond1": ["2", 0], "cond2": [cond2, 0], "negative": ["3", 0], "cfg_conds": 9.0,
            "cfg_cond2_negative": 6.0, "style": style}}

    base = {**prompts(), "20": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["1", 1]}}}
    [(expected, _)] = run(engine, {**base, **advanced(select("euler"))}, "14")  # CFGGuider at cfg 6
    [(same, _)] = run(engine, {**base, **advanced(select("euler"), guider=dual("2"))}, "14")
    # the same guidance by another sum of the same predictions: equal to float rounding of the latent's scale
    assert (same["samples"] - expected["samples"]).abs().max() <= 1e-5 * expected["samples"].abs().max()
    [(regular, _)] = run(engine, {**base, **advanced(select("euler"), guider=dual("20"))}, "14")
    [(nested, _)] = run(engine, {**base, **advanced(select("euler"), guider=dual("20", "nested"))}, "14")
    assert not torch.allclose(regular["samples"], expected["samples"])
    assert not torch.allclose(nested["samples"], regular["samples"])


@pytest.mark.parametrize(("name", "node"), [
    ("er_sde", {"class_type": "SamplerER_SDE", "inputs": {"solver_type": "ER-SDE", "max_stage": 3, "eta": 1.0,
                                                          "s_noise": 1.0}}),
    ("sa_solver", {"class_type": "SamplerSASolver", "inputs": {
        "model": ["1", 0], "eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8, "s_noise": 1.0,
        "predictor_order": 3, "corrector_order": 4, "use_pece": False, "simple_order_2": False}}),
    ("seeds_2", {"class_type": "SamplerSEEDS2", "inputs": {"solver_type": "phi_1", "eta": 1.0, "s_noise": 1.0,
                                                           "r": 0.5}}),
])
def test_solver_nodes_at_their_defaults_make_the_ksamplers_latent(engine, name, node):
    graph = {**prompts(), "5": ksampler(name), **advanced(node)}
    [(expected,), (output, _)] = run(engine, graph, "5", "14")
    assert torch.equal(output["samples"], expected["samples"])
    # Their settings reach the sampler: without noise (the ODE) the result is another one.
    quiet = {**node, "inputs": {**node["inputs"], "eta": 0.0}}
    [(ode, _)] = run(engine, {**prompts(), **advanced(quiet)}, "14")
    assert not torch.equal(ode["samples"], expected["samples"])


def test_sa_solver_node_refuses_an_sde_window_that_ends_before_it_starts(engine):
    node = {"class_type": "SamplerSASolver", "inputs": {
        "model": ["1", 0], "eta": 1.0, "sde_start_percent": 0.9, "sde_end_percent": 0.1, "s_noise": 1.0,
        "predictor_order": 3, "corrector_order": 4, "use_pece": True, "simple_order_2": False}}
    graph = {**prompts(), **advanced(node), "15": {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}}}
    with pytest.raises(WorkflowInvalid, match=r"sde_start_percent \(0.9\) must not be after sde_end_percent"):
        engine.run(parse_api(graph))


def test_sampler_euler_cfg_pp_node_regular_is_the_ksamplers_and_alternative_another(engine):
    guider = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 1.5}}

    def run_version(version: str):
        graph = {**prompts(), **advanced({"class_type": "SamplerEulerCFGpp", "inputs": {"version": version}},
                                         guider=guider)}
        return run(engine, graph, "14")[0][0]["samples"]

    [(expected,)] = run(engine, {**prompts(), "5": ksampler("euler_cfg_pp", cfg=1.5)}, "5")
    assert torch.equal(run_version("regular"), expected["samples"])
    assert not torch.allclose(run_version("alternative"), expected["samples"])
