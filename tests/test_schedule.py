"""The noise schedule matches diffusers' FlowMatchEulerDiscreteScheduler and the contract's σ(u)."""

import math

import pytest
import torch

from soar_fast.loss.schedule import (
    loss_weight,
    quantize_sigma,
    quantize_u,
    shift_sigma,
    sigma_table,
)


def test_shift_formula_endpoints_and_midpoint():
    u = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(shift_sigma(u, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    assert torch.equal(shift_sigma(u, 1.0), u)


def test_table_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert torch.allclose(sigma_table(3.0), sched.sigmas[:1000].float(), atol=1e-6)


def test_quantize_u_uses_floor_index_like_reference_release():
    table = sigma_table(3.0)
    assert quantize_u(torch.tensor([1.0]), 3.0).item() == table[0].item() == 1.0
    assert quantize_u(torch.tensor([0.0]), 3.0).item() == table[999].item()
    u = torch.tensor([0.4567])
    assert quantize_u(u, 3.0).item() == table[int((1 - 0.4567) * 1000)].item()


def test_quantize_sigma_is_largest_table_entry_not_above():
    table = sigma_table(3.0)
    s = torch.rand(100) * 0.99 + 0.005
    q = quantize_sigma(s, 3.0)
    assert torch.all(q <= s + 1e-7)
    assert torch.all(torch.isin(q, table))
    # exact table entries map to themselves
    assert torch.equal(quantize_sigma(table[10:20], 3.0), table[10:20])


@pytest.mark.parametrize("scheme", ["logit_normal", "none", "sigma_sqrt", "cosmap"])
def test_loss_weight_matches_diffusers(scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    s = torch.tensor([0.1, 0.5, 0.9])
    expected = compute_loss_weighting_for_sd3(scheme, s)
    assert torch.allclose(loss_weight(s, scheme), expected.float())
    if scheme == "cosmap":
        assert math.isclose(loss_weight(torch.tensor([0.5]), scheme).item(), 2 / (math.pi * 0.5), rel_tol=1e-6)
