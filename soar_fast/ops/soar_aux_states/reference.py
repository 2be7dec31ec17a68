"""Pure-torch reference of the fused aux-state op: the spec, the test oracle and the fallback.

Shapes: z0, z1, v_uncond, v_cond `[B, ...]`; sigma0, sigma1 `[B]`; sigma_aux `[M, B]`.
Returns z_aux, v_corr `[M*B, ...]`, point-major (row m*B + b is point m of sample b), in z0's
dtype, computed in fp32 (or fp64 when the inputs are fp64, so tests can build an fp64 oracle).
"""

from __future__ import annotations

import torch

__all__ = ["aux_rows_shape", "soar_aux_states_reference"]


def _bcast(s: torch.Tensor, ndim: int) -> torch.Tensor:
    """[..., B] -> [..., B, 1, ...] with ndim - 1 trailing ones, to broadcast over a sample."""
    return s.reshape(*s.shape, *([1] * (ndim - 1)))


def aux_rows_shape(z0: torch.Tensor, sigma_aux: torch.Tensor) -> tuple[int, ...]:
    """The outputs' shape `[M*B, ...]` for z0 `[B, ...]` and sigma_aux `[M, B]`."""
    return (sigma_aux.shape[0] * z0.shape[0], *z0.shape[1:])


def soar_aux_states_reference(
    z0: torch.Tensor,
    z1: torch.Tensor,
    v_uncond: torch.Tensor,
    v_cond: torch.Tensor,
    sigma0: torch.Tensor,
    sigma1: torch.Tensor,
    sigma_aux: torch.Tensor,
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SOAR.md steps 2-4 after the model call: CFG, one Euler step, re-noise, correction target."""
    compute = torch.float64 if z0.dtype == torch.float64 else torch.float32
    z0_, z1_ = z0.to(compute), z1.to(compute)
    vu, vc = v_uncond.to(compute), v_cond.to(compute)
    n = z0.dim()
    s0, s1 = _bcast(sigma0.to(compute), n), _bcast(sigma1.to(compute), n)
    sa = _bcast(sigma_aux.to(compute), n)  # [M, B, 1, ...]

    z_t = (1 - s0) * z0_ + s0 * z1_  # forward state at σ0
    v_cfg = vu + guidance_scale * (vc - vu)  # rollout velocity with CFG
    z_hat = z_t + (s1 - s0) * v_cfg  # one Euler step: the model's own state at σ1
    alpha = ((sa - s1) / (1 - s1).clamp_min(1e-8)).clamp(0.0, 1.0)  # fraction of the way to z1
    z_aux = (1 - alpha) * z_hat + alpha * z1_  # re-noise toward the same z1, [M, B, ...]
    v_corr = (z_aux - z0_) / sa  # one Euler step of v_corr from z' over σ' lands on z0
    out_shape = aux_rows_shape(z0, sigma_aux)
    return z_aux.reshape(out_shape).to(z0.dtype), v_corr.reshape(out_shape).to(z0.dtype)
