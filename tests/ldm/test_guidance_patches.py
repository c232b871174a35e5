"""Guidance patches (ldm.sampling.guidance_patches) against hand computations of ComfyUI's definitions and the
papers they cite, the identities that reduce them to plain guidance, and runs through `sample`."""

import math

import pytest
import torch

from ldm.sampling import DiscreteSchedule, sample
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import CFGGuider, DualCfg
from ldm.sampling.guidance_patches import (
    AdaptiveProjectedGuidance,
    CFGNorm,
    CFGZeroStar,
    EpsilonScaling,
    Mahiro,
    PerpNeg,
    TangentialDampingCFG,
    optimized_scale,
    perp_neg,
    tangential_damping,
)
from ldm.sampling.model_patches import CfgArgs, SamplingPatches


def _unused_predict(*args, **kwargs):
    raise AssertionError("these patches run no extra model pass")


def _args(cfg: float = 5.0, seed: int = 0, batch: int = 2, sigma: float = 3.0) -> CfgArgs:
    g = torch.Generator().manual_seed(seed)
    x, cond, uncond = (torch.randn(batch, 4, 6, 6, generator=g) * s for s in (3.0, 1.0, 1.1))
    return CfgArgs(x, torch.full((batch,), sigma), cond, uncond, cfg)


def _cfg(args: CfgArgs) -> torch.Tensor:
    return args.uncond + args.cfg * (args.cond - args.uncond)


# CFG-Zero* --------------------------------------------------------------------------------------------------------

def test_optimized_scale_by_hand():
    positive = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 0.0]]]])
    negative = torch.tensor([[[[2.0, 1.0]]], [[[1.0, 1.0]]]])
    scale = optimized_scale(positive, negative)
    assert scale.shape == (2, 1, 1, 1)
    assert scale.flatten().tolist() == pytest.approx([4 / (5 + 1e-8), 3 / (2 + 1e-8)])


def test_cfg_zero_star_scales_the_negative_before_guidance():
    args = _args()
    out = CFGZeroStar()(args, _cfg(args), _unused_predict)
    c, u = args.x - args.cond, args.x - args.uncond  # ComfyUI fits the scale on the noise predictions
    alpha = torch.stack([(ci * ui).sum() / ((ui * ui).sum() + 1e-8) for ci, ui in zip(c, u, strict=True)])
    alpha = alpha.reshape(-1, 1, 1, 1)
    expected = alpha * args.uncond + args.cfg * (args.cond - alpha * args.uncond)  # Eq. 9, on the x0 predictions
    assert torch.allclose(out, expected, atol=1e-5)
    assert (out - _cfg(args)).abs().max() > 1e-3


def test_cfg_zero_star_is_plain_cfg_at_cfg_1_and_without_a_negative():
    args = _args(cfg=1.0)
    denoised = _cfg(args)
    assert torch.equal(CFGZeroStar()(args, denoised, _unused_predict), denoised)
    no_negative = CfgArgs(args.x, args.sigma, args.cond, None, 1.0)
    assert CFGZeroStar()(no_negative, args.cond, _unused_predict) is args.cond


# CFGNorm ----------------------------------------------------------------------------------------------------------

def test_cfg_norm_caps_each_pixel_at_the_positive_norm_by_hand():
    cond = torch.tensor([[3.0, 0.0], [4.0, 1.0]]).reshape(1, 2, 1, 2)  # channels x pixels: pixel norms 5 and 1
    denoised = torch.tensor([[6.0, 0.0], [8.0, 3.0]]).reshape(1, 2, 1, 2)  # norms 10 (capped to 5), 3 (to 1)
    args = CfgArgs(torch.zeros_like(cond), torch.ones(1), cond, cond, 2.0)
    out = CFGNorm(1.0)(args, denoised, _unused_predict)
    expected = torch.tensor([[3.0, 0.0], [4.0, 1.0]]).reshape(1, 2, 1, 2)
    assert torch.allclose(out, expected)
    small = cond * 0.5  # already below the positive's norm: kept, times strength
    assert torch.allclose(CFGNorm(0.7)(args, small, _unused_predict), small * 0.7)
    assert torch.equal(CFGNorm(0.0)(args, denoised, _unused_predict), torch.zeros_like(denoised))


# Mahiro -----------------------------------------------------------------------------------------------------------

def test_mahiro_by_hand_at_one_pixel():
    cfg = 2.0
    cond = torch.tensor([1.0, 4.0]).reshape(1, 2, 1, 1)
    uncond = torch.tensor([4.0, -1.0]).reshape(1, 2, 1, 1)
    args = CfgArgs(torch.zeros_like(cond), torch.ones(1), cond, uncond, cfg)
    denoised = _cfg(args)  # (-2, 9)
    leap = [2.0, 8.0]
    merged = [(2.0 - 2.0) / 2, (8.0 + 9.0) / 2]  # (0, 8.5)
    a = [math.copysign(math.sqrt(abs(v * cfg)), v) for v in (4.0, -1.0)]
    b = [math.copysign(math.sqrt(abs(v)), v) for v in merged]
    sim = sum(p * q for p, q in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))
    w = 2 * (sim + 1)
    expected = [(w * d + (4 - w) * lp) / 4 for d, lp in zip((-2.0, 9.0), leap, strict=True)]
    out = Mahiro()(args, denoised, _unused_predict)
    assert out.flatten().tolist() == pytest.approx(expected, rel=1e-5)


def test_mahiro_keeps_the_guided_result_when_the_negative_points_the_same_way():
    args = _args()
    same = CfgArgs(args.x, args.sigma, args.cond, args.cond, args.cfg)  # similarity 1: weight 4 on denoised
    denoised = _cfg(same)
    assert torch.allclose(Mahiro()(same, denoised, _unused_predict), denoised, atol=1e-5)
    assert (Mahiro()(args, _cfg(args), _unused_predict) - _cfg(args)).abs().max() > 1e-3


# Epsilon Scaling --------------------------------------------------------------------------------------------------

def test_epsilon_scaling_divides_the_noise_prediction():
    args = _args()
    denoised = _cfg(args)
    out = EpsilonScaling(1.005)(args, denoised, _unused_predict)
    assert torch.allclose(args.x - out, (args.x - denoised) / 1.005, atol=1e-5)
    assert torch.allclose(EpsilonScaling(1.0)(args, denoised, _unused_predict), denoised, atol=1e-6)


# APG --------------------------------------------------------------------------------------------------------------

def _apg_by_hand(cond, uncond, cfg, eta, threshold, update=None):
    """Sadat et al. 2024, Algorithm 1, per image, written as `cond + (w - 1) * D'` with ComfyUI's w = cfg + 1."""
    out = []
    for i in range(cond.shape[0]):
        c = cond[i].double()
        d = (c - uncond[i].double()) if update is None else update[i].double()
        if threshold > 0:
            d = d * min(1.0, threshold / float(d.norm()))
        unit = c / c.norm()
        parallel = (d * unit).sum() * unit
        out.append(c + cfg * ((d - parallel) + eta * parallel))
    return torch.stack(out).float()


@pytest.mark.parametrize(("eta", "threshold"), [(0.0, 5.0), (0.5, 0.0), (-1.0, 2.0)])
def test_apg_matches_the_algorithm_by_hand(eta, threshold):
    args = _args(cfg=4.0)
    modified = AdaptiveProjectedGuidance(eta, threshold)(args, {})
    assert torch.equal(modified.uncond, args.uncond) and torch.equal(modified.x, args.x)
    expected = _apg_by_hand(args.cond, args.uncond, 4.0, eta, threshold)
    assert torch.allclose(_cfg(modified), expected, atol=1e-4)


def test_apg_at_eta_1_without_threshold_or_momentum_is_plain_cfg_at_cfg_plus_1():
    args = _args(cfg=3.0)
    modified = AdaptiveProjectedGuidance(1.0, 0.0, 0.0)(args, {})
    assert torch.allclose(_cfg(modified), args.uncond + 4.0 * (args.cond - args.uncond), atol=1e-5)


def test_apg_needs_the_negative_prediction():
    args = _args(cfg=1.0)
    no_negative = CfgArgs(args.x, args.sigma, args.cond, None, 1.0)
    assert AdaptiveProjectedGuidance(0.0)(no_negative, {}) is no_negative


def test_apg_momentum_runs_over_falling_levels_and_restarts_when_the_level_rises():
    apg = AdaptiveProjectedGuidance(0.3, 0.0, momentum=-0.5)
    state: dict = {}
    first, second, restart = _args(seed=1, sigma=5.0), _args(seed=2, sigma=3.0), _args(seed=3, sigma=8.0)
    assert torch.allclose(_cfg(apg(first, state)), _apg_by_hand(first.cond, first.uncond, 5.0, 0.3, 0.0), atol=1e-4)
    running = (second.cond - second.uncond) - 0.5 * (first.cond - first.uncond)
    assert torch.allclose(_cfg(apg(second, state)),
                          _apg_by_hand(second.cond, second.uncond, 5.0, 0.3, 0.0, update=running), atol=1e-4)
    assert torch.allclose(_cfg(apg(restart, state)),  # the level rose: a new run, the sum starts again
                          _apg_by_hand(restart.cond, restart.uncond, 5.0, 0.3, 0.0), atol=1e-4)


# TCFG -------------------------------------------------------------------------------------------------------------

def test_tangential_damping_keeps_the_negative_along_the_pairs_principal_direction():
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    out = tangential_damping(cond, uncond)
    for i in range(2):
        a = torch.stack((uncond[i].flatten(), cond[i].flatten())).double()  # the 2 x N score matrix
        _, vectors = torch.linalg.eigh(a @ a.T)  # the first right singular vector is A^T w / |A^T w|,
        v = a.T @ vectors[:, -1]  # w the Gram matrix's top eigenvector
        v = v / v.norm()
        expected = (a[0] @ v) * v
        assert torch.allclose(out[i].flatten().double(), expected, atol=1e-5)
        assert out[i].norm() <= uncond[i].norm() + 1e-5
    parallel = cond * -0.7  # a negative already along the positive is its own principal direction
    assert torch.allclose(tangential_damping(cond, parallel), parallel, atol=1e-5)


def test_tcfg_replaces_the_negative_prediction_in_noise_space():
    args = _args()
    modified = TangentialDampingCFG()(args, {})
    assert torch.equal(modified.cond, args.cond)
    damped = tangential_damping(args.x - args.cond, args.x - args.uncond)
    assert torch.allclose(modified.uncond, args.x - damped, atol=1e-6)
    no_negative = CfgArgs(args.x, args.sigma, args.cond, None, 1.0)
    assert TangentialDampingCFG()(no_negative, {}) is no_negative


# Perp-Neg ---------------------------------------------------------------------------------------------------------

def test_perp_neg_by_hand():
    empty = torch.tensor([1.0, 1.0]).reshape(1, 2, 1, 1)
    positive = torch.tensor([3.0, 1.0]).reshape(1, 2, 1, 1)  # p = (2, 0)
    negative = torch.tensor([2.0, 4.0]).reshape(1, 2, 1, 1)  # n = (1, 3): perpendicular part (0, 3)
    out = perp_neg(positive, negative, empty, neg_scale=0.5, cfg=2.0)
    assert out.flatten().tolist() == pytest.approx([1 + 2 * 2, 1 + 2 * (0 - 0.5 * 3)])


def test_perp_neg_reduces_to_cfg_against_the_empty_prompt():
    g = torch.Generator().manual_seed(6)
    positive, negative, empty = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    plain = empty + 7.0 * (positive - empty)
    assert torch.allclose(perp_neg(positive, negative, empty, 0.0, 7.0), plain, atol=1e-5)
    along = empty + 0.3 * (positive - empty)  # a negative along the positive has no perpendicular part
    assert torch.allclose(perp_neg(positive, along, empty, 2.0, 7.0), plain, atol=1e-4)
    assert torch.allclose(perp_neg(positive, empty, empty, 2.0, 7.0), plain, atol=1e-5)


def test_perp_neg_with_the_positive_equal_to_the_empty_prompt_stays_finite():
    g = torch.Generator().manual_seed(7)
    empty, negative = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 4, 2, 2, generator=g)
    assert torch.isfinite(perp_neg(empty, negative, empty, 1.0, 5.0)).all()


# Through the guider and the sampler -------------------------------------------------------------------------------

def _unet(x, t, context, y=None):
    """A smooth stand-in eps-predictor whose output depends on each item's prompt in more than an offset."""
    mean, spread = (v.reshape(-1, 1, 1, 1) for v in (context.mean(dim=(1, 2)), context.std(dim=(1, 2))))
    return torch.sin(x * 1.3 * spread + mean) * 0.5 + mean * 0.1


def _prompts():
    g = torch.Generator().manual_seed(8)
    return [[(torch.randn(1, 3, 8, generator=g), {})] for _ in range(3)]


def test_the_guider_applies_pre_guidance_before_combining_and_shows_post_guidance_the_result():
    positive, negative, _ = _prompts()
    denoiser = Denoiser(_unet, DiscreteSchedule())
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 4, torch.full((1,), 4.0)
    cond = CFGGuider(denoiser, positive, [], 1.0)(x, sigma)
    uncond = CFGGuider(denoiser, negative, [], 1.0)(x, sigma)
    seen = []

    def spy(args, denoised, predict):
        seen.append(args)
        return denoised

    out = CFGGuider(denoiser, positive, negative, 6.0, pre_cfg=(TangentialDampingCFG(),), post_cfg=(spy,))(x, sigma)
    damped = x - tangential_damping(x - cond, x - uncond)
    assert torch.allclose(out, damped + 6.0 * (cond - damped), atol=1e-4)
    assert torch.allclose(seen[0].uncond, damped, atol=1e-5)


def test_the_guider_keeps_pre_guidance_state_for_its_own_run_only():
    positive, negative, _ = _prompts()
    denoiser = Denoiser(_unet, DiscreteSchedule())
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10)) * 4
    apg = (AdaptiveProjectedGuidance(0.5, 0.0, momentum=0.5),)
    first = CFGGuider(denoiser, positive, negative, 4.0, pre_cfg=apg)
    a = first(x, torch.full((1,), 4.0))
    b = first(x, torch.full((1,), 2.0))  # the running sum carries over within the run
    fresh = CFGGuider(denoiser, positive, negative, 4.0, pre_cfg=apg)
    assert torch.allclose(fresh(x, torch.full((1,), 4.0)), a)
    assert not torch.allclose(fresh(x, torch.full((1,), 2.0)), CFGGuider(
        denoiser, positive, negative, 4.0, pre_cfg=apg)(x, torch.full((1,), 2.0)))
    assert torch.isfinite(b).all()


def test_perp_neg_as_the_guiders_third_prompt():
    positive, negative, empty = _prompts()
    denoiser = Denoiser(_unet, DiscreteSchedule())
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11)) * 4, torch.full((1,), 4.0)
    preds = [CFGGuider(denoiser, side, [], 1.0)(x, sigma) for side in (positive, negative, empty)]
    out = CFGGuider(denoiser, positive, negative, 5.0, dual=PerpNeg(empty, 1.5))(x, sigma)
    assert torch.allclose(out, perp_neg(*preds, 1.5, 5.0), atol=1e-4)
    # DualCfg still combines as before behind the same interface.
    regular = CFGGuider(denoiser, positive, negative, 5.0, dual=DualCfg(empty, 3.0))(x, sigma)
    expected = preds[1] + 3.0 * (preds[2] - preds[1]) + 5.0 * (preds[0] - preds[2])
    assert torch.allclose(regular, expected, atol=1e-4)
    nested = CFGGuider(denoiser, positive, negative, 5.0, dual=DualCfg(empty, 3.0, nested=True))(x, sigma)
    expected = preds[1] + 3.0 * (preds[2] + 5.0 * (preds[0] - preds[2]) - preds[1])
    assert torch.allclose(nested, expected, atol=1e-4)


def _sample(cfg: float = 5.0, **kwargs):
    positive, negative, _ = _prompts()
    latent = torch.zeros(1, 4, 8, 8)
    options = dict(seed=3, steps=5, cfg=cfg, sampler_name="euler", positive=positive, negative=negative)
    return sample(_unet, DiscreteSchedule(), latent, **{**options, **kwargs})


@pytest.mark.parametrize("patches", [
    SamplingPatches(post_cfg=(CFGZeroStar(),)),
    SamplingPatches(post_cfg=(CFGNorm(0.9),)),
    SamplingPatches(post_cfg=(Mahiro(),)),
    SamplingPatches(post_cfg=(EpsilonScaling(1.05),)),
    SamplingPatches(pre_cfg=(AdaptiveProjectedGuidance(0.0, 2.0, -0.5),)),
    SamplingPatches(pre_cfg=(TangentialDampingCFG(),)),
], ids=["cfg_zero_star", "cfg_norm", "mahiro", "epsilon_scaling", "apg", "tcfg"])
def test_each_patch_changes_a_sampling_run_and_repeats_exactly(patches):
    plain = _sample()
    patched = _sample(patches=patches)
    assert torch.isfinite(patched).all()
    assert (patched - plain).abs().max() > 1e-3
    assert torch.equal(_sample(patches=patches), patched)  # no state left over from the first run


def test_neutral_settings_sample_the_plain_result():
    plain = _sample()
    assert torch.allclose(_sample(patches=SamplingPatches(post_cfg=(EpsilonScaling(1.0),))), plain, atol=1e-5)
    at_one = _sample(cfg=1.0)
    for patches in (SamplingPatches(post_cfg=(CFGZeroStar(), Mahiro())),
                    SamplingPatches(pre_cfg=(AdaptiveProjectedGuidance(), TangentialDampingCFG()))):
        assert torch.allclose(_sample(cfg=1.0, patches=patches), at_one, atol=1e-5)
    apg_as_cfg = SamplingPatches(pre_cfg=(AdaptiveProjectedGuidance(1.0, 0.0, 0.0),))
    assert torch.allclose(_sample(cfg=4.0, patches=apg_as_cfg), _sample(cfg=5.0), atol=1e-4)


def test_perp_neg_at_neg_scale_0_samples_as_cfg_against_the_empty_prompt():
    positive, negative, empty = _prompts()
    against_empty = _sample(negative=empty)
    assert torch.allclose(_sample(dual=PerpNeg(empty, 0.0)), against_empty, atol=1e-5)
    assert (_sample(dual=PerpNeg(empty, 1.0)) - against_empty).abs().max() > 1e-3
