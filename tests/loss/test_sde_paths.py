"""Several rollout paths: each stochastic step type against hand-computed cases (mean, noise
coefficient, and the empirical variance of many draws against the closed form), which points
exist, the point counts of both normalisations, and replay on given draws."""

import math

import pytest
import torch

import soar_fast as sf
from soar_fast.loss.draws import keyed_draws
from soar_fast.loss.paths import point_mask, sde_step_moments, sigma_max_value, stochastic_step
from soar_fast.loss.schedule import sigma_table

# z = 0.5, v = -0.2, σ_curr = 0.6, σ_next = 0.55 (dt = -0.05), noise scale 0.5; worked by hand:
# simple:   mean = z + v·dt = 0.5 + 0.01 = 0.51;               coef = 0.5·√0.05
# sde:      x0 = z − σc·v = 0.62; mean = (1 − σn)·x0 = 0.279;    coef = σn = 0.55
# flow_sde: std² = 0.25·σc/(1 − σc) = 0.375; mean = z(1 + std²/(2σc)·dt) + v(1 + std²(1 − σc)/(2σc))·dt
#           = 0.5·(1 − 0.015625) + (−0.2)·1.125·(−0.05) = 0.5034375; coef = √0.375·√0.05
# cps:      std = σn·sin(π/4); eps = z + v(1 − σc) = 0.42; mean = x0(1 − σn) + eps·√(σn² − std²)
#           = 0.279 + 0.42·0.55·√0.5;                          coef = 0.55·√0.5
HAND = {
    "simple": (0.51, 0.5 * math.sqrt(0.05)),
    "sde": (0.279, 0.55),
    "flow_sde": (0.5034375, math.sqrt(0.375) * math.sqrt(0.05)),
    "cps": (0.279 + 0.42 * 0.55 * math.sqrt(0.5), 0.55 * math.sqrt(0.5)),
}
KINDS = list(HAND)


def _scalar_case(n=1):
    z = torch.full((1, n), 0.5)
    v = torch.full((1, n), -0.2)
    return z, v, torch.tensor([0.6]), torch.tensor([0.55])


@pytest.mark.parametrize("kind", KINDS)
def test_step_mean_and_noise_coefficient_match_the_hand_computed_case(kind):
    z, v, sc, sn = _scalar_case()
    mean, coef = sde_step_moments(z, v, sc, sn, kind, 0.5, sigma_max_value(3.0))
    want_mean, want_coef = HAND[kind]
    assert abs(mean.item() - want_mean) < 1e-6 and abs(coef.item() - want_coef) < 1e-6
    noise = torch.tensor([[1.7]])
    step = stochastic_step(z, v, sc, sn, noise, kind, 0.5, sigma_max_value(3.0))
    assert abs(step.item() - (want_mean + 1.7 * want_coef)) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_empirical_variance_of_many_draws_matches_the_closed_form(kind):
    n = 200_000
    cfg = sf.SoarConfig(num_aux=1, num_rollout_paths=2, sde_rollout_type=kind)
    draws = sf.sample_draws(torch.zeros(1, n), cfg, torch.Generator().manual_seed(3))
    assert draws.sde_noise.shape == (1, 1, n)
    z, v, sc, sn = _scalar_case(n)
    out = stochastic_step(z, v, sc, sn, draws.sde_noise[0], kind, 0.5, sigma_max_value(3.0))
    want_mean, want_coef = HAND[kind]
    # sample variance of n normals: relative std √(2/n) ≈ 0.3%; mean: std coef/√n
    assert abs(out.var().item() / want_coef**2 - 1) < 0.02
    assert abs(out.mean().item() - want_mean) < 5 * want_coef / math.sqrt(n)


def test_flow_sde_at_sigma_one_uses_the_second_table_entry():
    z, v = torch.full((1, 1), 0.3), torch.full((1, 1), 0.1)
    s_max = float(sigma_table(3.0)[1])
    assert sigma_max_value(3.0) == s_max
    _, coef = sde_step_moments(z, v, torch.tensor([1.0]), torch.tensor([0.9]), "flow_sde", 0.5, s_max)
    want = 0.5 * math.sqrt(1.0 / (1 - s_max)) * math.sqrt(0.1)  # ≈ 8.66: 1/(1 − σ) read at table[1]
    assert abs(coef.item() / want - 1) < 1e-6


def test_no_noise_scale_makes_simple_the_ode_step():
    z, v, sc, sn = _scalar_case()
    mean, coef = sde_step_moments(z, v, sc, sn, "simple", 0.0, 1.0)
    assert coef.item() == 0 and abs(mean.item() - (0.5 + 0.2 * 0.05)) < 1e-7


def test_points_exist_only_where_u1_is_positive():
    cfg = sf.SoarConfig(num_aux=2, num_rollout_paths=3)
    u0 = torch.tensor([0.01, 0.025, 0.5, 1.0])  # 1/N = 0.025: the first two sit at u1 = 0
    mask = point_mask(u0, cfg)
    assert mask.shape == (6, 4)
    assert mask[:2].all() and not mask[2:, :2].any() and mask[2:, 2:].all()
    assert point_mask(u0, sf.SoarConfig(num_aux=2)) is None


def _linear_setup(batch=4, paths=3, m=2, **kw):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)

    def vf(z, sigma, cond):
        return lin(z) * (1 + sigma[:, None]) + cond

    z0 = torch.randn(batch, 8)
    cond = torch.randn(batch, 8)
    cfg = sf.SoarConfig(num_aux=m, num_rollout_paths=paths, **kw)
    draws = sf.sample_draws(z0, cfg, torch.Generator().manual_seed(5))
    draws.u0[0] = 0.01  # sample 0 at u1 = 0: its stochastic paths do not exist
    return vf, z0, cond, torch.zeros(8), cfg, draws


@pytest.mark.parametrize("norm", ["points", "sum"])
def test_point_counts_in_both_normalisations(norm):
    vf, z0, cond, uncond, cfg, draws = _linear_setup(normalization=norm, lambda_aux=0.7)
    out = sf.soar_loss_from_draws(vf, z0, cond, uncond, cfg, draws)
    n = 2 * 4 + 2 * 2 * 3  # path 0: M·B; paths 1, 2: M points each for the 3 samples with u1 > 0
    assert (out.aux_losses[2:, 0] == 0).all() and (out.aux_losses[:, 1:] > 0).all()
    base, aux = out.base_losses.sum(), out.aux_losses.sum()
    want = (base + 0.7 * aux) / (4 + 0.7 * n) if norm == "points" else base / 4 + 0.7 * aux / n
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=0)
    assert abs(out.metrics["aux_points_per_sample"] - n / 4) < 1e-6
    assert abs(out.metrics["aux_loss"] - aux.item() / n) < 1e-5


def test_step_replays_exactly_on_given_draws_and_paths_differ():
    vf, z0, cond, uncond, cfg, draws = _linear_setup()
    a = sf.soar_loss_from_draws(vf, z0, cond, uncond, cfg, draws)
    b = sf.soar_loss_from_draws(vf, z0, cond, uncond, cfg, draws)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.aux_losses, b.aux_losses)
    draws.sde_noise = draws.sde_noise + 1.0  # the SDE noise is a draw: changing it changes the step
    c = sf.soar_loss_from_draws(vf, z0, cond, uncond, cfg, draws)
    assert torch.equal(c.aux_losses[:2], a.aux_losses[:2]) and not torch.equal(c.aux_losses[2:], a.aux_losses[2:])


def test_one_path_draws_are_a_prefix_of_several_paths():
    z0 = torch.randn(3, 4, 2, 2)
    one = sf.sample_draws(z0, sf.SoarConfig(num_aux=3), torch.Generator().manual_seed(1))
    three = sf.sample_draws(z0, sf.SoarConfig(num_aux=3, num_rollout_paths=3), torch.Generator().manual_seed(1))
    assert one.sde_noise is None and three.sde_noise.shape == (2, 3, 4, 2, 2)
    assert three.sigma_aux.shape == (9, 3)
    for name in ("z1", "u0", "sigma0", "sigma1", "drop"):
        assert torch.equal(getattr(one, name), getattr(three, name))
    assert torch.equal(one.sigma_aux, three.sigma_aux[:3])


def test_keyed_draws_with_paths_are_independent_of_the_split():
    cfg = sf.SoarConfig(num_aux=2, num_rollout_paths=2, cond_dropout=0.5)
    z0 = torch.zeros(4, 3)
    whole = keyed_draws(z0, cfg, seed=1, step=7, indices=[0, 1, 2, 3])
    part = keyed_draws(z0[2:], cfg, seed=1, step=7, indices=[2, 3])
    assert torch.equal(whole.sde_noise[:, 2:], part.sde_noise)
    assert torch.equal(whole.sigma_aux[:, 2:], part.sigma_aux)


def test_cond_dropout_per_batch_drops_all_or_none():
    z0 = torch.zeros(6, 3)
    cfg = sf.SoarConfig(cond_dropout=0.5, cond_dropout_per="batch")
    seen = set()
    for s in range(20):
        d = sf.sample_draws(z0, cfg, torch.Generator().manual_seed(s))
        assert d.drop.all() or not d.drop.any()
        seen.add(bool(d.drop[0]))
        k = [keyed_draws(z0[i:i + 2], cfg, seed=0, step=s, indices=[i, i + 1]).drop for i in (0, 2, 4)]
        assert all(torch.equal(k[0][:1].expand(2), x) for x in k)  # one draw per optimizer step
    assert seen == {True, False}
    per_sample = [sf.sample_draws(z0, sf.SoarConfig(cond_dropout=0.5), torch.Generator().manual_seed(s)).drop
                  for s in range(20)]
    assert any(0 < int(d.sum()) < 6 for d in per_sample)


@pytest.mark.parametrize("weighting,uniform", [("sigma_sqrt", True), ("cosmap", True), ("logit_normal", False)])
def test_time_density_by_weighting_draws_uniform_for_sigma_sqrt_and_cosmap(weighting, uniform):
    z0 = torch.zeros(20_000, 1)
    cfg = sf.SoarConfig(weighting=weighting, time_density="by_weighting")
    u0 = sf.sample_draws(z0, cfg, torch.Generator().manual_seed(0)).u0
    ours = sf.sample_draws(z0, sf.SoarConfig(weighting=weighting), torch.Generator().manual_seed(0)).u0
    if uniform:  # U[0, 1]: a tenth below 0.1; logit-normal puts ~1.4% there
        assert abs((u0 < 0.1).float().mean().item() - 0.1) < 0.01
    else:
        assert torch.equal(u0, ours)


def test_draws_of_another_path_count_are_refused_in_one_line():
    vf, z0, cond, uncond, cfg, draws = _linear_setup(paths=2, m=2)
    other = sf.SoarConfig(num_aux=2, num_rollout_paths=3)
    with pytest.raises(ValueError) as err:
        sf.soar_loss_from_draws(vf, z0, cond, uncond, other, draws)
    assert "num_rollout_paths=3" in str(err.value) and "\n" not in str(err.value)
