"""aux_timestep="table": the release's scheduler-table timestep at aux points (its float32 round
trip, rounding included, over all 1000 bins), while z', v_corr and the weight keep σ'."""

import numpy as np
import pytest
import torch

import soar_fast as sf
from soar_fast.loss.schedule import quantize_sigma, release_table_sigma, sigma_table


def _release_index(i: int) -> int:
    """The release's round trip of table index i (sigma_to_t, then t_to_sigma_timestep), in numpy
    float32 scalars: t = 1 − i/1000, then ⌊(1 − t)·1000⌋, clamped to [0, 999]."""
    f = np.float32
    t = f(1.0) - f(i) / f(1000)
    return min(max(int(np.floor((f(1.0) - t) * f(1000))), 0), 999)


def test_sigma_table_is_diffusers_bit_for_bit():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    table = sigma_table(3.0)
    assert torch.equal(table, sched.sigmas[:1000].float())
    assert torch.equal(table * 1000, sched.timesteps.float())  # what the model sees: 1000·σ


def test_table_timestep_matches_the_release_arithmetic_on_all_1000_bins():
    table = sigma_table(3.0)
    want = torch.tensor([_release_index(i) for i in range(1000)])
    # σ exactly on each entry i, and strictly inside bin i, (table[i], table[i-1]): the searchsorted
    # (first i with table[i] <= σ) picks entry i for both
    on = release_table_sigma(table, 3.0)
    inside = release_table_sigma(torch.cat([table[:1], (table[:-1] + table[1:]) / 2]), 3.0)
    assert torch.equal(on, table[want]) and torch.equal(inside, table[want])
    higher = (want != torch.arange(1000)).nonzero().flatten()
    assert len(higher) > 0 and (want[higher] == higher - 1).all()  # one entry higher (larger σ), never more
    assert torch.equal(quantize_sigma(table, 3.0), table)  # our own quantizer has no round trip


def test_model_sees_the_table_timestep_while_targets_use_continuous_sigma():
    seen = []

    def vf(z, sigma, cond):
        seen.append(sigma.clone())
        return torch.zeros_like(z)  # loss = mean(w·target²): the targets are visible in it

    z0 = torch.randn(3, 4, 2, 2)
    cond = torch.zeros(3, 1)
    cfg = sf.SoarConfig.reference_release(num_aux=2, target_dtype="fp32")
    draws = sf.sample_draws(z0, cfg, torch.Generator().manual_seed(2))
    table = sigma_table(3.0)
    assert not torch.isin(draws.sigma_aux, table).all()  # σ' stays continuous with "table"
    assert torch.isin(draws.sigma0, table).all() and torch.isin(draws.sigma1, table).all()
    out = sf.soar_loss_from_draws(vf, z0, cond, torch.zeros(1), cfg, draws)
    aux_calls = seen[2:]  # base, rollout, then one call per point
    for i, s in enumerate(aux_calls):
        assert torch.equal(s, release_table_sigma(draws.sigma_aux[i], 3.0))
    # the targets: z' from σ' (α = (σ' − σ1)/(1 − σ1)) with v = 0, v_corr = (z' − z0)/σ'
    s0, s1 = draws.sigma0.view(-1, 1, 1, 1), draws.sigma1.view(-1, 1, 1, 1)
    z_hat = (1 - s0) * z0 + s0 * draws.z1  # the rollout velocity is 0
    for i in range(2):
        sa = draws.sigma_aux[i].view(-1, 1, 1, 1)
        alpha = (sa - s1) / (1 - s1)
        v_corr = ((1 - alpha) * z_hat + alpha * draws.z1 - z0) / sa
        torch.testing.assert_close(out.aux_losses[i], v_corr.square().flatten(1).mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aux_timestep,quantized", [("sigma", True), ("table", False)])
def test_timestep_quantization_quantizes_sigma_aux_only_for_sigma(aux_timestep, quantized):
    cfg = sf.SoarConfig(timestep_quantization=True, aux_timestep=aux_timestep)
    draws = sf.sample_draws(torch.zeros(8, 2), cfg, torch.Generator().manual_seed(0))
    assert bool(torch.isin(draws.sigma_aux, sigma_table(3.0)).all()) is quantized
