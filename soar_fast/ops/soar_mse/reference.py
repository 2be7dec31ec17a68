"""Pure-torch reference of the fused SOAR loss: per-row weighted MSE against the SOAR targets.

Shapes (B samples, M aux points, N = prod of trailing dims):
    v         `[(1+M)*B, ...]` model outputs: rows [0, B) base, then row B + m*B + b = point m of b
    z0, z1    `[B, ...]` clean latent and noise
    z_aux     `[M*B, ...]` re-noised states z', point-major (as `soar_aux_states` returns them)
    sigma_aux `[M, B]` σ' per point
    weights   `[(1+M)*B]` w per row (w(σ0) for base rows, w(σ'_m) for aux rows)
Returns `[(1+M)*B]` fp32 (fp64 for fp64 inputs): mean over elements of w·(v − target)², with
target z1 − z0 for base rows and v_corr = (z' − z0)/σ' for aux rows, formed in fp32. This is what
`soar_fast.loss.soar` computes (`base_losses`, then `aux_losses` flattened point-major).
"""

from __future__ import annotations

import torch

__all__ = ["soar_fused_mse_and_grad_reference", "soar_fused_mse_reference"]


def soar_fused_mse_reference(
    v: torch.Tensor,
    z0: torch.Tensor,
    z1: torch.Tensor,
    z_aux: torch.Tensor,
    sigma_aux: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Per-row losses `[(1+M)*B]`; differentiable in v (targets and weights are constants)."""
    compute = torch.float64 if z0.dtype == torch.float64 else torch.float32
    b, m = z0.shape[0], sigma_aux.shape[0]
    z0_, z1_ = z0.to(compute), z1.to(compute)
    base_target = z1_ - z0_
    sa = sigma_aux.to(compute).reshape(m, b, *([1] * (z0.dim() - 1)))
    za = z_aux.to(compute).reshape(m, b, *z0.shape[1:])
    aux_target = ((za - z0_) / sa).reshape(m * b, *z0.shape[1:])
    target = torch.cat([base_target, aux_target]).detach()
    err = (v.to(compute) - target).flatten(1)
    return (weights.to(compute).detach()[:, None] * err.square()).mean(dim=1)


def soar_fused_mse_and_grad_reference(
    v: torch.Tensor,
    z0: torch.Tensor,
    z1: torch.Tensor,
    z_aux: torch.Tensor,
    sigma_aux: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses `[(1+M)*B]`, grad_v = d(Σ_r losses_r)/dv in v's dtype): the forward and the
    backward at upstream grad 1, in closed form 2·w·(v − t)/N. Fold any normalisation into w."""
    with torch.enable_grad():
        vv = (
            v.detach()
            .to(torch.float64 if z0.dtype == torch.float64 else torch.float32)
            .requires_grad_()
        )
        losses = soar_fused_mse_reference(vv, z0, z1, z_aux, sigma_aux, weights)
        (grad,) = torch.autograd.grad(losses.sum(), vv)
    return losses.detach(), grad.to(v.dtype)
