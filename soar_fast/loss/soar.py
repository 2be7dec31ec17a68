"""The SOAR loss, eager reference: the contract of SOAR.md written out in plain torch.

Every fast variant (batched, compiled, graphed, FP8) is compared with this file. The names follow
the contract: z0 (clean), z1 (noise), σ0 / σ1 (rollout from / to), σ' (`sigma_aux`), ẑ (`z_hat`),
z' (`z_aux`), v_corr. The random draws live in `sample_draws` (one owner of the RNG), so other
step implementations can be fed identical draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from soar_fast.config import SoarConfig
from soar_fast.loss.cond import Cond, broadcast_uncond, cat_cond, where_cond
from soar_fast.loss.draws import SoarDraws, sample_draws
from soar_fast.loss.paths import (
    aux_model_sigma,
    lowp_aux_states,
    point_count,
    point_mask,
    points_per_path,
    sde_path_states,
    v_corr_of,
)
from soar_fast.loss.schedule import loss_weight
from soar_fast.ops import soar_aux_states

__all__ = ["Cond", "SoarDraws", "SoarOutput", "VelocityFn", "loss_metrics", "rollout_metrics", "sample_draws",
           "soar_loss", "soar_loss_from_draws"]

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


@dataclass
class SoarOutput:
    """`loss`: the differentiable scalar. `stats`: the logged quantities as 0-d tensors on the
    device (no host sync); `metrics` reads them as floats (one sync, for library callers and
    logging steps). The per-sample losses are kept for callers that aggregate over batches."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    base_losses: torch.Tensor  # [B] L_base_i (with graph)
    aux_losses: torch.Tensor  # [M, B] L_aux_i,m (with graph)
    parts: tuple[torch.Tensor, torch.Tensor] | None = None
    """(base term, auxiliary term) of `loss` (their sum, up to rounding): a trainer that weights
    them apart (global point counts over micro-batches and ranks) backpropagates through these."""

    @property
    def metrics(self) -> dict[str, float]:
        """The stats as floats: loss, base_loss, aux_loss, rollout_deviation, ... (one host sync)."""
        keys = list(self.stats)
        values = torch.stack([self.stats[k].detach().double() for k in keys]).tolist() if keys else []
        return dict(zip(keys, values))


def soar_loss(
    velocity_fn: VelocityFn,
    z0: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    config: SoarConfig,
    generator: torch.Generator | None = None,
) -> SoarOutput:
    """One SOAR step's loss (SOAR.md). `velocity_fn(z, sigma, cond) -> v`; `uncond` is the
    empty-prompt condition of one sample, broadcast over the batch. M = 0 or λ = 0 is SFT."""
    if config.target_dtype == "fp32" or z0.dtype not in (torch.float16, torch.bfloat16):
        z0 = z0.float() if z0.dtype != torch.float64 else z0
    return soar_loss_from_draws(velocity_fn, z0, cond, uncond, config, sample_draws(z0, config, generator))


def target_dtype_of(z0: torch.Tensor, config: SoarConfig) -> torch.dtype:
    """The dtype the targets are formed in: fp64 for fp64 latents (test oracles), z0's own dtype
    with `target_dtype="model"` (the release under bf16), else fp32."""
    if z0.dtype == torch.float64:
        return torch.float64
    return z0.dtype if config.target_dtype == "model" else torch.float32


def soar_loss_from_draws(
    velocity_fn: VelocityFn,
    z0: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    config: SoarConfig,
    draws: SoarDraws,
    aux_backend: str = "reference",
    rollout_fn: VelocityFn | None = None,
) -> SoarOutput:
    """The deterministic part of `soar_loss`, given the draws. Targets are formed in fp32 (or in
    z0's dtype with `target_dtype="model"`); losses are accumulated in fp32. `rollout_fn`: a
    distilled-guidance rollout (`ModelFamily.rollout_velocity`), one B pass of the prompt whose
    velocity is v_cfg itself; None: true CFG through `velocity_fn`."""
    compute = target_dtype_of(z0, config)
    lowp = compute not in (torch.float32, torch.float64)
    z0 = z0.to(compute)
    b = z0.shape[0]
    z1, sigma0, sigma1, sigma_aux = draws.z1.to(compute), draws.sigma0, draws.sigma1, draws.sigma_aux
    pm = sigma_aux.shape[0]  # P·M rows of points
    m = points_per_path(pm, config)  # M per path
    uncond_b = broadcast_uncond(uncond, cond, b)
    cond = where_cond(draws.drop, uncond_b, cond)  # conditioning dropout (default off)
    wdt = compute if lowp else None  # the release weights with σ in the model dtype

    # 1. Base (SFT) term at the forward state z_σ0.
    s0 = sigma0.to(compute).view(b, *([1] * (z0.dim() - 1)))
    z_t = (1 - s0) * z0 + s0 * z1
    v_base = velocity_fn(z_t, sigma0, cond)
    base_losses = _weighted_mse(v_base, z1 - z0, loss_weight(sigma0, config.weighting, wdt))

    aux_losses = z0.new_zeros(0, b, dtype=base_losses.dtype)
    metrics: dict[str, torch.Tensor] = {}
    mask = point_mask(draws.u0, config) if pm > 0 else None
    if pm > 0:
        # 2. Rollout: one no-grad CFG forward of 2B (uncond + cond) with the current weights, or
        # of B with distilled guidance (v_u = v_c = v: every op's v_u + g (v_c - v_u) is v exactly).
        with torch.no_grad():
            if rollout_fn is not None:
                v_u = v_c = rollout_fn(z_t, sigma0, cond)
            else:
                v_u, v_c = velocity_fn(
                    torch.cat([z_t, z_t]), torch.cat([sigma0, sigma0]), cat_cond(uncond_b, cond)
                ).chunk(2)
            z_aux, v_corr = _aux_states(z0, z1, z_t, v_u, v_c, sigma0, sigma1, sigma_aux, m, draws, config,
                                        aux_backend, lowp)
        # Auxiliary term: conditional only, at each z'_m; the model sees `aux_model_sigma` of σ'.
        sig_model = aux_model_sigma(sigma_aux, config)
        aux = []
        for i in range(pm):
            rows = slice(i * b, (i + 1) * b)
            v_aux = velocity_fn(z_aux[rows], sig_model[i], cond)
            loss_i = _weighted_mse(v_aux, v_corr[rows], loss_weight(sigma_aux[i], config.weighting, wdt))
            aux.append(loss_i if mask is None else torch.where(mask[i], loss_i, torch.zeros_like(loss_i)))
        aux_losses = torch.stack(aux)
        zf, z1f = (z0.float(), z1.float()) if lowp else (z0, z1)
        metrics.update(rollout_metrics(zf, z1f, v_u, v_c, sigma0, sigma1, sigma_aux[:m],
                                       config.guidance_scale))

    # 5. Total: "points" divides by the point count (reference release), "sum" adds two means.
    lam, n = config.lambda_aux, point_count(mask, pm, b)
    if config.normalization == "points":
        loss = (base_losses.sum() + lam * aux_losses.sum()) / (b + lam * n)
        parts = (base_losses.sum() / (b + lam * n), lam * aux_losses.sum() / (b + lam * n))
    elif mask is None:
        loss = base_losses.mean() + (lam * aux_losses.mean() if pm > 0 else 0.0)
        parts = (base_losses.mean(), lam * aux_losses.mean() if pm > 0 else base_losses.new_zeros(()))
    else:
        loss = base_losses.mean() + lam * aux_losses.sum() / n
        parts = (base_losses.mean(), lam * aux_losses.sum() / n)

    metrics = {**loss_metrics(loss, base_losses, aux_losses, sigma0, mask), **metrics}
    return SoarOutput(loss=loss, stats=metrics, base_losses=base_losses, aux_losses=aux_losses, parts=parts)


def _aux_states(z0, z1, z_t, v_u, v_c, sigma0, sigma1, sigma_aux, m: int, draws: SoarDraws, config: SoarConfig,
                aux_backend: str, lowp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4 for every path (M = m points each): z' and v_corr `[P·M·B, ...]` (constants)."""
    if lowp:  # the release's arithmetic in the model dtype
        v_cfg = v_u + config.guidance_scale * (v_c - v_u)
        z_aux, v_corr = lowp_aux_states(z0, z1, z_t, v_cfg, sigma0, sigma1, sigma_aux[:m])
    else:  # re-noise ẑ toward the same z1 and form v_corr = (z' − z0)/σ' in fp32 (the op)
        z_aux, v_corr = soar_aux_states(z0, z1, v_u, v_c, sigma0, sigma1, sigma_aux[:m], config.guidance_scale,
                                        backend=aux_backend)
        v_cfg = v_u.to(z0.dtype) + config.guidance_scale * (v_c.to(z0.dtype) - v_u.to(z0.dtype))
    if sigma_aux.shape[0] == m:
        return z_aux, v_corr
    if draws.sde_noise is None:
        raise ValueError(f"draws have {sigma_aux.shape[0]} point rows for num_aux={m} but no sde_noise: "
                         "draw them with the same SoarConfig (num_rollout_paths)")
    z_sde = sde_path_states(z_t, v_cfg, z1, sigma0, sigma1, sigma_aux[m:], draws.sde_noise, config)
    return torch.cat([z_aux, z_sde]), torch.cat([v_corr, v_corr_of(z_sde, z0, sigma_aux[m:])])


@torch.no_grad()
def rollout_metrics(z0, z1, v_u, v_c, sigma0, sigma1, sigma_aux, guidance_scale: float) -> dict[str, torch.Tensor]:
    """How far the rollout left the trajectory: ‖ẑ − z_σ1‖ per sample, computed through the
    identity ẑ − z_σ1 = (σ1 − σ0)·(v_cfg − (z1 − z0)), its per-element RMS, and the mean σ'.
    Batch means as 0-d device tensors (no host sync)."""
    compute = z0.dtype
    v_cfg = v_u.to(compute) + guidance_scale * (v_c.to(compute) - v_u.to(compute))
    dev = (sigma0 - sigma1).to(compute) * (v_cfg - (z1 - z0)).flatten(1).norm(dim=1)
    return {
        "rollout_deviation": dev.mean(),
        "rollout_deviation_rms": (dev / z0[0].numel() ** 0.5).mean(),
        "sigma_aux_mean": sigma_aux.float().mean(),
    }


@torch.no_grad()
def loss_metrics(loss: torch.Tensor, base_losses: torch.Tensor, aux_losses: torch.Tensor,
                 sigma0: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The logged totals of a step as 0-d device tensors: loss, base and aux means (over the
    points that exist, `mask`), mean σ0."""
    m = aux_losses.shape[0]
    zero = loss.new_zeros(()).detach().float()
    aux = aux_losses.detach().float()
    aux_mean = aux.mean() if mask is None else aux.sum() / mask.sum().clamp_min(1)
    out = {
        "loss": loss.detach().float(),
        "base_loss": base_losses.detach().float().mean(),
        "aux_loss": aux_mean if m > 0 else zero,
        "sigma0_mean": sigma0.float().mean(),
        "rollout_deviation": zero,  # overwritten by rollout_metrics when there is a rollout
    }
    if mask is not None:
        out["aux_points_per_sample"] = mask.float().sum() / max(base_losses.shape[0], 1)
    return out


def _weighted_mse(v: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over elements of w·(v − target)², in fp32 (fp64 for fp64 targets), whatever
    precision the target was formed in."""
    acc = torch.float64 if target.dtype == torch.float64 else torch.float32
    err = (v.to(acc) - target.to(acc)).flatten(1)
    return (w.to(acc)[:, None] * err.square()).mean(dim=1)
