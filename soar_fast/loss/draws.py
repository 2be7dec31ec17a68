"""Every random draw of a SOAR step, in one owner: `sample_draws` (one generator, the eager
library call) and `keyed_draws` (the trainer's: each sample's draws from a generator seeded by
(seed, step, global sample index) alone, so a step draws the same numbers at any world size,
any micro-batch split and after any resume, and no RNG state is saved in checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from soar_fast.config import SoarConfig
from soar_fast.loss.schedule import quantize_sigma, quantize_u, sample_logit_normal, shift_sigma

__all__ = ["SoarDraws", "assemble_draws", "draw_key", "keyed_draws", "sample_draws"]

_SALT = 7919  # keyed draws never share a seed with the data order's generator (seed, epoch)


_BATCH_INDEX = -1  # the key "index" of the draws made once per batch (cond_dropout_per="batch")


@dataclass
class SoarDraws:
    """Everything random in one SOAR step. Shapes: z1 `[B, ...]`, u0/sigma0/sigma1 `[B]`,
    sigma_aux `[P·M, B]` (path-major: row p·M + m is point m of path p; `[M, B]` for one path),
    drop `[B]` (bool, True = train this sample on the empty prompt), sde_noise `[P-1, B, ...]` the
    noise of the stochastic paths' steps (None for one path). Which points exist follows from u0
    (`soar_fast.loss.paths.point_mask`); σ' of a point that does not exist is drawn all the same."""

    z1: torch.Tensor
    u0: torch.Tensor
    sigma0: torch.Tensor
    sigma1: torch.Tensor
    sigma_aux: torch.Tensor
    drop: torch.Tensor
    sde_noise: torch.Tensor | None = None


def _sample_u0(b: int, config: SoarConfig, generator: torch.Generator | None, dev: torch.device) -> torch.Tensor:
    """Training times u0 `[B]`: logit-normal, or uniform where `time_density="by_weighting"` and the
    weighting is sigma_sqrt/cosmap (diffusers' compute_density_for_timestep_sampling)."""
    if config.time_density == "by_weighting" and config.weighting in ("sigma_sqrt", "cosmap"):
        return torch.rand(b, generator=generator, device=dev, dtype=torch.float32)
    return sample_logit_normal(b, config.logit_mean, config.logit_std, generator=generator, device=dev)


def sample_draws(
    z0: torch.Tensor, config: SoarConfig, generator: torch.Generator | None = None
) -> SoarDraws:
    """Draw z1, u0, σ', the dropout mask and the stochastic paths' noise, in a fixed order, on the
    generator's device."""
    b, m = z0.shape[0], config.num_aux if config.lambda_aux > 0 else 0
    paths = config.num_rollout_paths if m > 0 else 1
    dev = generator.device if generator is not None else z0.device
    z1 = torch.randn(z0.shape, generator=generator, device=dev, dtype=torch.float32)
    u0 = _sample_u0(b, config, generator, dev)
    frac = torch.rand(m, b, generator=generator, device=dev, dtype=torch.float32)
    keep = torch.rand(b, generator=generator, device=dev, dtype=torch.float32)
    if config.cond_dropout_per == "batch":
        keep = keep[:1].expand(b)  # one draw for the whole batch
    sde_noise = None
    if paths > 1:  # drawn after the one-path draws, so P = 1 draws the same numbers as before
        extra = torch.rand((paths - 1) * m, b, generator=generator, device=dev, dtype=torch.float32)
        frac = torch.cat([frac, extra])
        sde_noise = torch.randn((paths - 1, *z0.shape), generator=generator, device=dev,
                                dtype=torch.float32).to(z0.device)
    z1, u0, frac, keep = (t.to(z0.device) for t in (z1, u0, frac, keep))
    return assemble_draws(config, z1=z1, u0=u0, frac=frac, keep=keep, sde_noise=sde_noise)


def assemble_draws(config: SoarConfig, *, z1: torch.Tensor, u0: torch.Tensor, frac: torch.Tensor,
                   keep: torch.Tensor, sde_noise: torch.Tensor | None = None) -> SoarDraws:
    """The deterministic part of `sample_draws`: the step's draws from raw random numbers (no RNG
    here), so another trainer's numbers can be replayed (the release's z_1, t0, its `rand_fracs`
    per path, its `random.random()` for dropout, its SDE noise). z1 `[B, ...]`, u0 `[B]` training
    times, frac `[P·M, B]` in [0, 1) (σ' = σ1 + frac·(σ_hi − σ1)), keep `[B]` (drop where
    keep < cond_dropout), sde_noise `[P-1, B, ...]` or None."""
    drop = keep < config.cond_dropout
    u1 = (u0 - 1.0 / config.rollout_steps).clamp_min(0.0)
    if config.timestep_quantization:
        sigma0, sigma1 = quantize_u(u0, config.shift), quantize_u(u1, config.shift)
    else:
        sigma0, sigma1 = shift_sigma(u0, config.shift), shift_sigma(u1, config.shift)
    sigma_hi = torch.ones_like(sigma0)
    if config.sigma_hi_ratio is not None:
        sigma_hi = (config.sigma_hi_ratio * sigma0).clamp(max=1.0)
    sigma_aux = sigma1 + frac * (sigma_hi - sigma1).clamp_min(0.0)  # σ' ~ U[σ1, σ_hi]
    if config.timestep_quantization and config.aux_timestep == "sigma":
        sigma_aux = quantize_sigma(sigma_aux, config.shift)  # "table" keeps σ' continuous, as the release
    sigma_aux = sigma_aux.clamp_min(config.sigma_min)
    return SoarDraws(z1=z1, u0=u0, sigma0=sigma0, sigma1=sigma1, sigma_aux=sigma_aux, drop=drop,
                     sde_noise=sde_noise)


def draw_key(seed: int, step: int, index: int) -> int:
    """The generator seed of global sample `index` of optimizer step `step` (a 63-bit mix)."""
    return (((seed * 1_000_003 + _SALT) * 1_000_003 + step) * 1_000_003 + index) % (2**63)


def keyed_draws(z0: torch.Tensor, config: SoarConfig, *, seed: int, step: int, indices: Sequence[int]) -> SoarDraws:
    """The draws of a local batch whose row j is global sample `indices[j]` of optimizer step
    `step` (global index: position in the step's global batch, over ranks and micro-batches).
    Drawn on z0's device (no host round trip); equal on every rank and world size."""
    parts = []
    row_shape = (1, *z0.shape[1:])
    for index in indices:
        g = torch.Generator(device=z0.device).manual_seed(draw_key(seed, step, int(index)))
        parts.append(sample_draws(torch.empty(row_shape, device=z0.device), config, g))
    drop = torch.cat([d.drop for d in parts])
    if config.cond_dropout_per == "batch":  # one draw per optimizer step, equal at any world size
        g = torch.Generator(device=z0.device).manual_seed(draw_key(seed, step, _BATCH_INDEX))
        keep = torch.rand(1, generator=g, device=z0.device, dtype=torch.float32)
        drop = (keep < config.cond_dropout).expand(len(parts))
    noise = None if parts[0].sde_noise is None else torch.cat([d.sde_noise for d in parts], dim=1)
    return SoarDraws(z1=torch.cat([d.z1 for d in parts]), u0=torch.cat([d.u0 for d in parts]),
                     sigma0=torch.cat([d.sigma0 for d in parts]), sigma1=torch.cat([d.sigma1 for d in parts]),
                     sigma_aux=torch.cat([d.sigma_aux for d in parts], dim=1), drop=drop, sde_noise=noise)
