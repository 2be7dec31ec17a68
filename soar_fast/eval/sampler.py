"""Euler sampling with classifier-free guidance, from σ = 1 to 0 (SOAR.md convention).

The grid is u_i = 1 − i/N mapped through the SD3 shift, so one sampler step is exactly the
one-step rollout SOAR trains on (u1 = u0 − 1/N).
"""

from __future__ import annotations

from typing import Any

import torch

from soar_fast.loss.cond import broadcast_uncond, cat_cond, to_device
from soar_fast.loss.schedule import shift_sigma

__all__ = ["cfg_velocity", "euler_sample", "generate_digits", "sampler_sigmas"]


def sampler_sigmas(num_steps: int, shift: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """σ_0 = 1 > σ_1 > ... > σ_N = 0, fp32 `[N + 1]`."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_sigma(u, shift).to(device=device, dtype=torch.float32)


@torch.no_grad()
def cfg_velocity(velocity_fn, z: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond_b: Any,
                 guidance_scale: float) -> torch.Tensor:
    """v_u + g (v_c − v_u) in fp32; g = 1 runs only the conditional pass, g = 0 only the empty one."""
    if guidance_scale == 1.0:
        return velocity_fn(z, sigma, cond).float()
    if guidance_scale == 0.0:
        return velocity_fn(z, sigma, uncond_b).float()
    v_u, v_c = velocity_fn(torch.cat([z, z]), torch.cat([sigma, sigma]), cat_cond(uncond_b, cond)).float().chunk(2)
    return v_u + guidance_scale * (v_c - v_u)


@torch.no_grad()
def euler_sample(velocity_fn, z1: torch.Tensor, cond: Any, uncond: Any, *, num_steps: int,
                 guidance_scale: float, shift: float, batch_size: int | None = None,
                 sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """z0 `[N, ...]` from noise z1 `[N, ...]`: z ← z + (σ_next − σ) v_cfg, N steps, in fp32, on
    `sampler_sigmas(num_steps, shift)` or the given `sigmas` `[num_steps + 1]` (a pipeline's schedule)."""
    n = z1.shape[0]
    bs = batch_size or n
    outs = []
    sig = sampler_sigmas(num_steps, shift, z1.device) if sigmas is None else sigmas.to(z1.device, torch.float32)
    num_steps = sig.numel() - 1
    for start in range(0, n, bs):
        rows = slice(start, min(start + bs, n))
        z = z1[rows].float()
        c = tuple(t[rows] for t in cond) if isinstance(cond, tuple) else cond[rows]
        ub = broadcast_uncond(uncond, c, z.shape[0])  # a None part (Kontext's image) keeps each row's own
        for i in range(num_steps):
            s = sig[i].expand(z.shape[0])
            z = z + (sig[i + 1] - sig[i]) * cfg_velocity(velocity_fn, z, s, c, ub, guidance_scale)
        outs.append(z)
    return torch.cat(outs)


@torch.no_grad()
def generate_digits(velocity_fn, dataset, labels: torch.Tensor, *, num_steps: int, guidance_scale: float,
                    shift: float, seed: int, batch_size: int | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Images `[N, C, H, W]` in [-1, 1] (clamped) for class `labels` `[N]`, noise from `seed`."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(labels.shape[0], *dataset.sample_shape, generator=g).to(device)
    cond = tuple(t.to(device) for t in dataset.condition(labels))
    uncond = to_device(dataset.uncond(), device)
    z0 = euler_sample(velocity_fn, z1, cond, uncond, num_steps=num_steps, guidance_scale=guidance_scale,
                      shift=shift, batch_size=batch_size)
    return z0.clamp(-1, 1).cpu()
