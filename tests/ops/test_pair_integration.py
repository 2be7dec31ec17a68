"""The fused pair as a fast step uses it: soar_aux_z + one batched (1+M)B forward +
soar_fused_mse_and_grad + v.backward(grad_v), against the eager reference loss of
soar_fast.loss.soar on the same draws: same loss, same parameter gradients."""

from __future__ import annotations

import pytest
import torch

from soar_fast.config import SoarConfig
from soar_fast.loss.schedule import loss_weight
from soar_fast.loss.soar import sample_draws, soar_loss_from_draws
from soar_fast.ops import soar_aux_z, soar_fused_mse_and_grad


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("normalization", ["points", "sum"])
def test_fused_pair_matches_reference_loss_and_grads(request, backend, normalization):
    if backend == "native":
        request.getfixturevalue("native_lib")
    cfg = SoarConfig(num_aux=3, weighting="cosmap", lambda_aux=0.7, normalization=normalization)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 6)

    def velocity_fn(z, sigma, cond):
        return model(z) * (1 + sigma.view(-1, 1, 1)) + cond

    b, m, lam = 2, cfg.num_aux, cfg.lambda_aux
    z0 = torch.randn(b, 5, 6)
    cond = torch.randn(b, 1, 6)
    uncond = torch.zeros(1, 1, 6)
    draws = sample_draws(z0, cfg, torch.Generator().manual_seed(3))

    ref = soar_loss_from_draws(velocity_fn, z0, cond, uncond, cfg, draws)
    ref.loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    z1, s0, s1, sa = draws.z1, draws.sigma0, draws.sigma1, draws.sigma_aux
    z_t = (1 - s0.view(b, 1, 1)) * z0 + s0.view(b, 1, 1) * z1
    with torch.no_grad():
        v_u, v_c = velocity_fn(
            torch.cat([z_t, z_t]), torch.cat([s0, s0]), torch.cat([uncond.expand(b, 1, 6), cond])
        ).chunk(2)
    z_aux = soar_aux_z(z0, z1, v_u, v_c, s0, s1, sa, cfg.guidance_scale, backend=backend)
    sig = torch.cat([s0, sa.flatten()])
    v = velocity_fn(torch.cat([z_t, z_aux]), sig, cond.repeat(1 + m, 1, 1))
    # The SOAR normalisation folded into the per-row weights, so grad_v is the gradient of the total.
    if normalization == "points":
        coeff = torch.cat([torch.ones(b), torch.full((m * b,), lam)]) / (b + lam * m * b)
    else:
        coeff = torch.cat([torch.full((b,), 1.0 / b), torch.full((m * b,), lam / (m * b))])
    losses, grad_v = soar_fused_mse_and_grad(
        v, z0, z1, z_aux, sa, coeff * loss_weight(sig, cfg.weighting), backend=backend
    )
    v.backward(grad_v)

    torch.testing.assert_close(losses.sum(), ref.loss.detach(), rtol=1e-5, atol=1e-7)
    for p, g in zip(model.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
