"""Several rollout paths and the release's aux timestep (SOAR.md, "What the public reference
release does"): the stochastic one-step rollouts of paths 1..P-1, the re-noising of any path's ẑ,
which aux points exist, and the sigma the model sees at an aux point. The step formulas
(`sde_step_moments`) are the spec of the fused path-state op (soar_fast/ops/soar_path_states).

Layout of P paths of M points: `sigma_aux` is `[P·M, B]`, path-major (row p·M + m is point m of
path p); z' is `[P·M·B, ...]` (row (p·M + m)·B + b), so P = 1 is the contract's point-major layout.
"""

from __future__ import annotations

import functools

import torch

from soar_fast.config import SoarConfig
from soar_fast.loss.schedule import release_table_sigma, sigma_table
from soar_fast.ops.soar_path_states import sde_step_moments, stochastic_step  # the formulas, once

__all__ = ["aux_model_sigma", "lowp_aux_states", "point_count", "point_mask", "points_per_path", "renoise",
           "rollout_paths", "sde_path_states", "sde_step_moments", "sigma_max_value", "stochastic_step", "v_corr_of"]


def _col(s: torch.Tensor, ndim: int) -> torch.Tensor:
    return s.reshape(-1, *([1] * (ndim - 1)))


@functools.cache
def sigma_max_value(shift: float) -> float:
    """σ used in place of σ0 = 1 in flow_sde's 1/(1 − σ0): the scheduler table's second entry
    (a host float of a CPU table, computed once per shift: no device read per step)."""
    return float(sigma_table(shift)[1])


def rollout_paths(z_t: torch.Tensor, v_cfg: torch.Tensor, sigma0: torch.Tensor, sigma1: torch.Tensor,
                  sde_noise: torch.Tensor, config: SoarConfig) -> torch.Tensor:
    """ẑ of paths 1..P-1 `[P-1, B, ...]` fp32: one stochastic step each from z_t `[B, ...]` with
    v_cfg on its own noise `sde_noise[p-1]`. Rows whose sample has u1 = 0 are computed too (finite)
    and masked out by `point_mask`."""
    sig_max = sigma_max_value(config.shift)
    return torch.stack([
        stochastic_step(z_t, v_cfg, sigma0, sigma1, eps, config.sde_rollout_type, config.sde_noise_scale, sig_max)
        for eps in sde_noise
    ])


def renoise(z_hat: torch.Tensor, z1: torch.Tensor, sigma1: torch.Tensor, sigma_aux: torch.Tensor) -> torch.Tensor:
    """z' = (1 − α)·ẑ + α·z1 of one path, `[M·B, ...]` point-major, α = (σ' − σ1)/(1 − σ1) in
    [0, 1] formed in fp32 and applied in ẑ's dtype (the release's arithmetic; fp32 for ours)."""
    compute = torch.float64 if sigma_aux.dtype == torch.float64 else torch.float32
    s1, sa = sigma1.to(compute), sigma_aux.to(compute)
    alpha = ((sa - s1) / (1.0 - s1).clamp_min(1e-8)).clamp(0.0, 1.0)  # [M, B]
    alpha = alpha.reshape(*alpha.shape, *([1] * (z_hat.dim() - 1))).to(z_hat.dtype)
    z_aux = (1.0 - alpha) * z_hat + alpha * z1.to(z_hat.dtype)
    return z_aux.reshape(-1, *z_hat.shape[1:])


def point_mask(u0: torch.Tensor, config: SoarConfig) -> torch.Tensor | None:
    """Which aux points exist, `[P·M, B]` bool (None when all do: P = 1 or SFT). Path 0 always;
    paths 1..P-1 where u1 = max(u0 − 1/N, 0) > 0, the release's `t1 <= 0` test in float32."""
    p, m = config.num_rollout_paths, config.num_aux
    if p == 1 or config.is_sft:
        return None
    active = (u0.float() - 1.0 / float(config.rollout_steps)).clamp_min(0.0) > 0
    rows = [torch.ones_like(active)] * m + [active] * ((p - 1) * m)
    return torch.stack(rows)


def points_per_path(point_rows: int, config: SoarConfig) -> int:
    """M from the draws' P·M point rows: all of them for one path (any M the draws carry), else
    `config.num_aux`, checked against the rows (draws and config must agree on P and M)."""
    p = config.num_rollout_paths
    if p == 1 or point_rows == 0:
        return point_rows
    if point_rows != p * config.num_aux:
        raise ValueError(f"draws have {point_rows} point rows but num_rollout_paths={p} x num_aux={config.num_aux} "
                         f"= {p * config.num_aux}: draw them with the same SoarConfig")
    return config.num_aux


def point_count(mask: torch.Tensor | None, m_rows: int, b: int) -> torch.Tensor | int:
    """The number of aux points that exist: m_rows·b without a mask (a Python int, so the default
    numbers stay those of the contract), else a 0-d device tensor (no host sync)."""
    return m_rows * b if mask is None else mask.sum()


def aux_model_sigma(sigma_aux: torch.Tensor, config: SoarConfig) -> torch.Tensor:
    """The σ the model is called with at aux points (its timestep is 1000·σ): σ' itself, or with
    `aux_timestep="table"` the release's table entry of σ' (`release_table_sigma`)."""
    if config.aux_timestep == "table":
        return release_table_sigma(sigma_aux, config.shift)
    return sigma_aux


def sde_path_states(z_t: torch.Tensor, v_cfg: torch.Tensor, z1: torch.Tensor, sigma0: torch.Tensor,
                    sigma1: torch.Tensor, sigma_aux_sde: torch.Tensor, sde_noise: torch.Tensor,
                    config: SoarConfig) -> torch.Tensor:
    """z' of paths 1..P-1, `[(P-1)·M·B, ...]` in z_t's dtype: each path's stochastic ẑ (fp32, then
    read in z_t's dtype as the release does), re-noised toward z1 at its own σ' (`sigma_aux_sde`
    `[(P-1)·M, B]`, path-major)."""
    m = config.num_aux
    z_hats = rollout_paths(z_t, v_cfg, sigma0, sigma1, sde_noise, config).to(z_t.dtype)
    return torch.cat([renoise(z_hats[p], z1, sigma1, sigma_aux_sde[p * m:(p + 1) * m])
                      for p in range(z_hats.shape[0])])


def lowp_aux_states(z0: torch.Tensor, z1: torch.Tensor, z_t: torch.Tensor, v_cfg: torch.Tensor,
                    sigma0: torch.Tensor, sigma1: torch.Tensor, sigma_aux: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z', v_corr) `[M·B, ...]` of the ODE path formed in z0's low-precision dtype, the release's
    arithmetic under bf16 (`target_dtype="model"`): σ read in that dtype, ẑ = z_t + v_cfg·(σ1 − σ0)
    with torch's type promotion, z' read in that dtype, v_corr = (z' − z0)/σ'."""
    td = z0.dtype
    s0, s1 = _col(sigma0.to(td), z0.dim()), _col(sigma1.to(td), z0.dim())
    z_hat = z_t + v_cfg * (s1 - s0)
    z_aux = renoise(z_hat, z1, sigma1, sigma_aux).to(td)
    return z_aux, v_corr_of(z_aux, z0, sigma_aux)


def v_corr_of(z_aux: torch.Tensor, z0: torch.Tensor, sigma_aux: torch.Tensor) -> torch.Tensor:
    """v_corr = (z′ − z0)/σ′ `[R·B, ...]` in the dtype of z′ (σ′ `[R, B]` read in it)."""
    r, b = sigma_aux.shape
    za = z_aux.reshape(r, b, *z0.shape[1:])
    sa = sigma_aux.to(z_aux.dtype).reshape(r, b, *([1] * (z0.dim() - 1)))
    return ((za - z0.to(z_aux.dtype)) / sa).reshape(z_aux.shape)
