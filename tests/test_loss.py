"""The eager reference loss against hand-computed cases (SOAR.md, steps 1-5)."""

import pytest
import torch

import soar_fast as sf
from soar_fast.loss.schedule import sigma_table
from soar_fast.ops import soar_aux_states

SHAPES = [
    pytest.param((1, 3, 5, 7), id="batch1-3x5x7"),
    pytest.param((3, 2, 4, 4), id="b3-2x4x4"),
    pytest.param((5, 11), id="b5-flat11"),
]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def bview(s, like):
    return s.view(-1, *([1] * (like.dim() - 1)))


def oracle_velocity(z0):
    """v(z, σ) = (z − z0)/σ: the exact velocity toward z0 from any state (z0 known to the oracle)."""

    def fn(z, sigma, cond):
        reps = z.shape[0] // z0.shape[0]
        return (z - z0.repeat(reps, *([1] * (z0.dim() - 1)))) / bview(sigma, z)

    return fn


@pytest.mark.parametrize("shape", SHAPES)
def test_perfect_model_has_zero_loss_and_no_rollout_deviation(shape):
    z0 = torch.randn(shape, dtype=torch.float64)
    out = sf.soar_loss(oracle_velocity(z0), z0, torch.zeros(shape[0], 1), torch.zeros(1), sf.SoarConfig(), gen())
    assert out.loss.abs().item() < 1e-12
    assert out.metrics["rollout_deviation"] < 1e-10
    assert out.aux_losses.shape == (6, shape[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_velocity_matches_closed_form(shape):
    """v ≡ 0: L_base = mean (z1−z0)², and z' − z0 = ((1−α)σ0 + α)(z1 − z0), so
    L_aux = (((1−α)σ0 + α)/σ')² · mean (z1 − z0)²."""
    cfg = sf.SoarConfig(num_aux=3)
    z0 = torch.randn(shape, dtype=torch.float64)
    d = sf.sample_draws(z0, cfg, gen(1))
    out = sf.soar_loss_from_draws(lambda z, s, c: torch.zeros_like(z), z0, torch.zeros(shape[0], 1), torch.zeros(1), cfg, d)
    sq = (d.z1.double() - z0).flatten(1).square().mean(1)  # [B]
    s0, s1, sa = d.sigma0.double(), d.sigma1.double(), d.sigma_aux.double()
    alpha = ((sa - s1) / (1 - s1)).clamp(0, 1)
    expected_aux = (((1 - alpha) * s0 + alpha) / sa) ** 2 * sq  # [M, B]
    torch.testing.assert_close(out.base_losses, sq, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.aux_losses, expected_aux, rtol=1e-9, atol=0)
    b, m = shape[0], 3
    expected = (sq.sum() + expected_aux.sum()) / (b + m * b)
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=0)
    # rollout deviation: ẑ = z_t, so ‖ẑ − z_σ1‖ = (σ0 − σ1)‖z1 − z0‖
    dev = ((s0 - s1) * (d.z1.double() - z0).flatten(1).norm(dim=1)).mean()
    assert abs(out.metrics["rollout_deviation"] - dev.item()) < 1e-9


def test_cfg_combines_uncond_and_cond_with_guidance_scale():
    """A model answering a constant per condition: v_u = a, v_c = b ⇒ v_cfg = a + g(b − a)."""
    g = 2.5
    cfg = sf.SoarConfig(num_aux=2, guidance_scale=g)
    z0 = torch.randn(4, 6, dtype=torch.float64)
    cond = torch.full((4, 1), 3.0, dtype=torch.float64)
    uncond = torch.full((1,), -1.0, dtype=torch.float64)
    d = sf.sample_draws(z0, cfg, gen(2))
    out = sf.soar_loss_from_draws(lambda z, s, c: c.expand_as(z).clone(), z0, cond, uncond, cfg, d)
    v_cfg = -1.0 + g * (3.0 - (-1.0))
    s0, s1 = d.sigma0.double(), d.sigma1.double()
    dev = ((s0 - s1) * (v_cfg - (d.z1.double() - z0)).norm(dim=1)).mean()
    assert abs(out.metrics["rollout_deviation"] - dev.item()) < 1e-9


def _linear_model(dim, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(dim, dim, dtype=torch.float64)


def _linear_velocity(model):
    def fn(z, sigma, cond):
        h = model(z.flatten(1)).view_as(z)
        return h + bview(sigma, z) * bview(cond.sum(-1), z)

    return fn


def test_m0_is_exactly_plain_sft():
    model = _linear_model(12)
    vf = _linear_velocity(model)
    z0 = torch.randn(3, 3, 4, dtype=torch.float64)
    cond = torch.randn(3, 2, dtype=torch.float64)
    cfg = sf.SoarConfig(num_aux=0)
    calls = []
    out = sf.soar_loss(lambda *a: calls.append(1) or vf(*a), z0, cond, torch.zeros(2), cfg, gen(3))
    assert len(calls) == 1  # no rollout, no auxiliary pass
    d = sf.sample_draws(z0, cfg, gen(3))
    s0 = bview(d.sigma0.double(), z0)
    z_t = (1 - s0) * z0 + s0 * d.z1.double()
    plain = (vf(z_t, d.sigma0, cond) - (d.z1.double() - z0)).flatten(1).square().mean(1).sum() / 3
    assert torch.equal(out.loss, plain)
    # λ = 0 with M = 6 is the same SFT loss, bitwise, with the same random draws
    out_l0 = sf.soar_loss(vf, z0, cond, torch.zeros(2), sf.SoarConfig(num_aux=6, lambda_aux=0.0), gen(3))
    assert torch.equal(out_l0.loss, out.loss)
    assert out.metrics["aux_loss"] == 0.0 and out.aux_losses.numel() == 0


def test_gradients_flow_only_through_model_outputs():
    """If the rollout (or the targets) were recorded, the gradient would include d v_corr / dθ."""
    model = _linear_model(6)
    vf = _linear_velocity(model)
    z0 = torch.randn(4, 6, dtype=torch.float64)
    cond = torch.randn(4, 2, dtype=torch.float64)
    cfg = sf.SoarConfig(num_aux=3, guidance_scale=3.0)
    d = sf.sample_draws(z0, cfg, gen(4))

    grad_modes = []

    def recording_vf(z, s, c):
        grad_modes.append(torch.is_grad_enabled())
        return vf(z, s, c)

    out = sf.soar_loss_from_draws(recording_vf, z0, cond, torch.zeros(2), cfg, d)
    assert grad_modes == [True, False, True, True, True]  # base, rollout (no grad), 3 aux passes
    g_ref = torch.autograd.grad(out.loss, list(model.parameters()))

    def manual(detach: bool):
        z1, s0 = d.z1.double(), bview(d.sigma0.double(), z0)
        z_t = (1 - s0) * z0 + s0 * z1
        v_u, v_c = vf(z_t, d.sigma0, torch.zeros_like(cond)), vf(z_t, d.sigma0, cond)
        if detach:
            v_u, v_c = v_u.detach(), v_c.detach()
        z_aux, v_corr = soar_aux_states(z0, z1, v_u, v_c, d.sigma0, d.sigma1, d.sigma_aux, 3.0, backend="reference")
        total = (vf(z_t, d.sigma0, cond) - (z1 - z0)).square().mean(1).sum()
        for m in range(3):
            rows = slice(m * 4, (m + 1) * 4)
            total = total + (vf(z_aux[rows], d.sigma_aux[m], cond) - v_corr[rows]).square().mean(1).sum()
        return total / (4 + 3 * 4)

    g_const = torch.autograd.grad(manual(detach=True), list(model.parameters()))
    g_recorded = torch.autograd.grad(manual(detach=False), list(model.parameters()))
    for a, b, c in zip(g_ref, g_const, g_recorded):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(a, c, rtol=1e-4)  # recording the rollout would change it


@pytest.mark.parametrize("shape", SHAPES)
def test_renoised_states_lie_on_segment_at_the_right_fraction(shape):
    b, m, g = shape[0], 4, 4.5
    z0, z1, vu, vc = (torch.randn(shape, dtype=torch.float64) for _ in range(4))
    s0 = torch.rand(b, dtype=torch.float64) * 0.8 + 0.2
    s1 = s0 - 0.05
    sa = s1 + torch.rand(m, b, dtype=torch.float64) * (1 - s1)
    z_aux, v_corr = soar_aux_states(z0, z1, vu, vc, s0, s1, sa, g, backend="reference")
    z_t = (1 - bview(s0, z0)) * z0 + bview(s0, z0) * z1
    z_hat = z_t + bview(s1 - s0, z0) * (vu + g * (vc - vu))
    alpha = (sa - s1) / (1 - s1)  # [M, B]
    for i in range(m):
        rows = z_aux[i * b:(i + 1) * b]
        a = bview(alpha[i], z0)
        torch.testing.assert_close(rows, z_hat + a * (z1 - z_hat), rtol=1e-12, atol=1e-12)
        # one Euler step of v_corr from z' over σ' lands exactly on z0
        landed = rows + (0 - bview(sa[i], z0)) * v_corr[i * b:(i + 1) * b]
        torch.testing.assert_close(landed, z0, rtol=1e-12, atol=1e-12)


def test_normalisations_points_and_sum():
    model = _linear_model(5)
    vf = _linear_velocity(model)
    z0 = torch.randn(3, 5, dtype=torch.float64)
    cond = torch.randn(3, 2, dtype=torch.float64)
    lam, m, b = 0.5, 4, 3
    pts = sf.soar_loss(vf, z0, cond, torch.zeros(2), sf.SoarConfig(num_aux=m, lambda_aux=lam), gen(5))
    sm = sf.soar_loss(vf, z0, cond, torch.zeros(2), sf.SoarConfig(num_aux=m, lambda_aux=lam, normalization="sum"), gen(5))
    torch.testing.assert_close(pts.base_losses, sm.base_losses)
    base, aux = pts.base_losses.detach(), pts.aux_losses.detach()
    torch.testing.assert_close(pts.loss.detach(), (base.sum() + lam * aux.sum()) / (b + lam * m * b))
    torch.testing.assert_close(sm.loss.detach(), base.mean() + lam * aux.mean())
    assert abs(pts.loss.item() - sm.loss.item()) > 1e-6


def test_sigma_floor_prevents_inf_nan_when_sigma1_is_zero():
    cfg = sf.SoarConfig(num_aux=6, logit_mean=-30.0, logit_std=1e-3)  # u0 ≈ 0 ⇒ u1 = 0 ⇒ σ1 = 0
    z0 = torch.randn(4, 3, 5)
    d = sf.sample_draws(z0, cfg, gen(6))
    assert torch.all(d.sigma1 == 0)
    assert torch.all(d.sigma_aux >= cfg.sigma_min)
    model = _linear_model(15).float()
    vf = lambda z, s, c: model(z.flatten(1)).view_as(z)  # noqa: E731
    out = sf.soar_loss_from_draws(vf, z0, torch.zeros(4, 1), torch.zeros(1), cfg, d)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # without the floor the target divides by zero
    d.sigma_aux.zero_()
    _, v_corr = soar_aux_states(z0, d.z1, z0, z0, d.sigma0, d.sigma1, d.sigma_aux, 4.5, backend="reference")
    assert not torch.isfinite(v_corr).all()


def test_sigma_ranges_and_hi_ratio():
    z0 = torch.randn(256, 2)
    d = sf.sample_draws(z0, sf.SoarConfig(), gen(7))
    assert torch.all(d.sigma1 <= d.sigma0) and torch.all(d.sigma_aux >= d.sigma1) and torch.all(d.sigma_aux <= 1)
    d = sf.sample_draws(z0, sf.SoarConfig(sigma_hi_ratio=1.5), gen(7))
    hi = (1.5 * d.sigma0).clamp(max=1)
    assert torch.all(d.sigma_aux <= hi + 1e-6)


def test_timestep_quantization_uses_table_entries():
    table = sigma_table(3.0)
    z0 = torch.randn(64, 3)
    d = sf.sample_draws(z0, sf.SoarConfig(timestep_quantization=True), gen(8))
    for s in (d.sigma0, d.sigma1, d.sigma_aux.flatten()):
        assert torch.all(torch.isin(s, table))
    # σ1 is one rollout step (1/N in u) below σ0: 1000/40 = 25 table entries
    idx0 = (table[:, None] == d.sigma0[None]).float().argmax(0)
    idx1 = (table[:, None] == d.sigma1[None]).float().argmax(0)
    assert torch.all((idx1 - idx0 <= 26) & (idx1 >= idx0))  # 25, ±1 for float rounding of ⌊·⌋


def test_cond_dropout_trains_on_the_empty_prompt():
    z0 = torch.randn(5, 3)
    seen = []

    def vf(z, s, c):
        seen.append(c.clone())
        return torch.zeros_like(z)

    sf.soar_loss(vf, z0, torch.ones(5, 2), torch.zeros(2), sf.SoarConfig(num_aux=1, cond_dropout=1.0), gen(9))
    assert torch.all(seen[0] == 0) and torch.all(seen[2] == 0)  # base and aux see the empty prompt
    seen.clear()
    sf.soar_loss(vf, z0, torch.ones(5, 2), torch.zeros(2), sf.SoarConfig(num_aux=1), gen(9))
    assert torch.all(seen[0] == 1) and torch.all(seen[1][:5] == 0) and torch.all(seen[1][5:] == 1)


def test_tuple_conditions_and_uncond_with_or_without_leading_one():
    z0 = torch.randn(2, 4)
    cond = (torch.randn(2, 3, 8), torch.randn(2, 5))
    vf = lambda z, s, c: z * c[1][:, :1] + c[0].mean((1, 2))[:, None]  # noqa: E731
    a = sf.soar_loss(vf, z0, cond, (torch.zeros(3, 8), torch.zeros(5)), sf.SoarConfig(num_aux=2), gen(10))
    b = sf.soar_loss(vf, z0, cond, (torch.zeros(1, 3, 8), torch.zeros(1, 5)), sf.SoarConfig(num_aux=2), gen(10))
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(ValueError, match="uncond"):
        sf.soar_loss(vf, z0, cond, (torch.zeros(4, 8), torch.zeros(5)), sf.SoarConfig(num_aux=2), gen(10))


def test_low_precision_model_targets_formed_in_fp32():
    model = torch.nn.Linear(6, 6).to(torch.bfloat16)
    vf = lambda z, s, c: model(z.to(torch.bfloat16))  # noqa: E731
    z0 = torch.randn(3, 6, dtype=torch.bfloat16)
    out = sf.soar_loss(vf, z0, torch.zeros(3, 1), torch.zeros(1), sf.SoarConfig(num_aux=2), gen(11))
    assert out.base_losses.dtype == torch.float32 and out.aux_losses.dtype == torch.float32
    out.loss.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad.float()).all()


def test_metrics_include_the_contract_keys():
    out = sf.soar_loss(lambda z, s, c: z, torch.randn(2, 3), torch.zeros(2, 1), torch.zeros(1), sf.SoarConfig(), gen())
    for key in ("loss", "base_loss", "aux_loss", "rollout_deviation"):
        assert isinstance(out.metrics[key], float)


def test_generator_makes_the_step_reproducible():
    z0 = torch.randn(3, 4)
    vf = lambda z, s, c: 0.5 * z  # noqa: E731
    a = sf.soar_loss(vf, z0, torch.zeros(3, 1), torch.zeros(1), sf.SoarConfig(), gen(12))
    b = sf.soar_loss(vf, z0, torch.zeros(3, 1), torch.zeros(1), sf.SoarConfig(), gen(12))
    c = sf.soar_loss(vf, z0, torch.zeros(3, 1), torch.zeros(1), sf.SoarConfig(), gen(13))
    assert torch.equal(a.loss, b.loss) and not torch.equal(a.loss, c.loss)
