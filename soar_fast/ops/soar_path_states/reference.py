"""Pure-torch reference of the fused path-state op (several rollout paths): the spec, the test
oracle and the fallback.

Shapes: z0, z1, v_uncond, v_cond `[B, ...]`; sigma0, sigma1 `[B]`; sigma_aux `[(P-1)*M, B]` the σ'
of paths 1..P-1 (path-major); noise `[P-1, B, ...]`. Returns z' `[(P-1)*M*B, ...]` (row
(p*M + m)*B + b is point m of stochastic path p+1 of sample b) in z0's dtype, computed in fp32.

Each stochastic path takes one step from z_t = (1 − σ0)·z0 + σ0·z1 with v_cfg = v_u + g(v_c − v_u)
to σ1 (`sde_step_moments`: mean + c·ε), then every point re-noises it toward z1 as path 0 does:
α = clamp((σ' − σ1)/max(1 − σ1, 1e-8), 0, 1), z' = (1 − α)·ẑ + α·z1.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SDE_KINDS", "path_counts", "sde_step_moments", "soar_path_states_reference", "stochastic_step"]

SDE_KINDS = ("simple", "sde", "flow_sde", "cps")


def path_counts(noise: torch.Tensor, sigma_aux: torch.Tensor) -> tuple[int, int]:
    """(P-1, M): the stochastic paths (noise `[P-1, B, ...]`) and the points of each (sigma_aux
    `[(P-1)*M, B]`); M = 0 when there are no paths."""
    p1 = noise.shape[0]
    return p1, (sigma_aux.shape[0] // p1 if p1 > 0 else 0)


def _col(s: torch.Tensor, ndim: int) -> torch.Tensor:
    return s.reshape(-1, *([1] * (ndim - 1)))


def sde_step_moments(z: torch.Tensor, v: torch.Tensor, sigma_curr: torch.Tensor, sigma_next: torch.Tensor,
                     kind: str, scale: float, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean `[B, ...]`, noise coefficient `[B, 1, ...]`) of one stochastic step from z (at σ_curr)
    with velocity v to σ_next, in fp32: the step is mean + coefficient·ε, ε ~ N(0, I) per element,
    so its per-element variance is coefficient². `kind` is SoarConfig.sde_rollout_type."""
    z, v = z.float(), v.float()
    sc, sn = _col(sigma_curr.float(), z.dim()), _col(sigma_next.float(), z.dim())
    dt = sn - sc
    if kind == "simple":  # Euler step plus additive noise of variance scale²·|dt|
        return z + v * dt, scale * dt.abs().sqrt()
    if kind == "sde":  # predicted x0, re-noised with fresh noise at σ_next
        return (1.0 - sn) * (z - sc * v), sn
    if kind == "flow_sde":  # flow-GRPO reverse SDE, std_t = scale·sqrt(σ/(1 − σ)) (σ = 1 read as σ_max)
        safe = torch.where(sc == 1, torch.full_like(sc, sigma_max), sc)
        std = (sc / (1 - safe)).sqrt() * scale
        mean = z * (1 + (std.square() / (2 * sc)) * dt)
        mean = mean + v * (1 + (std.square() * (1 - sc) / (2 * sc))) * dt
        return mean, std * (-dt).clamp_min(0.0).sqrt()
    if kind == "cps":  # coefficients-preserving: x0 and the noise estimate, std = σ_next·sin(scale·π/2)
        std = sn * math.sin(scale * math.pi / 2)
        x0, eps = z - sc * v, z + v * (1 - sc)
        mean = x0 * (1 - sn) + eps * (sn.square() - std.square()).clamp_min(0.0).sqrt()
        return mean, std
    raise ValueError(f"unknown sde_rollout_type {kind!r}: choose one of {', '.join(SDE_KINDS)}")


def stochastic_step(z: torch.Tensor, v: torch.Tensor, sigma_curr: torch.Tensor, sigma_next: torch.Tensor,
                    noise: torch.Tensor, kind: str, scale: float, sigma_max: float) -> torch.Tensor:
    """One stochastic step `[B, ...]` fp32 on the given noise ε `[B, ...]` (see `sde_step_moments`)."""
    mean, coef = sde_step_moments(z, v, sigma_curr, sigma_next, kind, scale, sigma_max)
    return mean + coef * noise.float()


def soar_path_states_reference(
    z0: torch.Tensor,
    z1: torch.Tensor,
    v_uncond: torch.Tensor,
    v_cond: torch.Tensor,
    sigma0: torch.Tensor,
    sigma1: torch.Tensor,
    sigma_aux: torch.Tensor,
    noise: torch.Tensor,
    guidance_scale: float,
    kind: str,
    noise_scale: float,
    sigma_max: float,
) -> torch.Tensor:
    """z' of the stochastic paths, `[(P-1)*M*B, ...]` in z0's dtype (module docstring)."""
    (p1, m), b = path_counts(noise, sigma_aux), z0.shape[0]
    z0_, z1_ = z0.float(), z1.float()
    s0, s1 = _col(sigma0.float(), z0.dim()), _col(sigma1.float(), z0.dim())
    z_t = (1 - s0) * z0_ + s0 * z1_
    v_cfg = v_uncond.float() + guidance_scale * (v_cond.float() - v_uncond.float())
    sa = sigma_aux.float().reshape(p1, m, b, *([1] * (z0.dim() - 1)))
    alpha = ((sa - s1) / (1 - s1).clamp_min(1e-8)).clamp(0.0, 1.0)  # [P-1, M, B, 1, ...]
    outs = []
    for p in range(p1):
        z_hat = stochastic_step(z_t, v_cfg, sigma0, sigma1, noise[p], kind, noise_scale, sigma_max)
        outs.append((1 - alpha[p]) * z_hat + alpha[p] * z1_)  # [M, B, ...]
    if not outs:
        return z0.new_empty((0, *z0.shape[1:]))
    return torch.cat(outs).reshape(p1 * m * b, *z0.shape[1:]).to(z0.dtype)
