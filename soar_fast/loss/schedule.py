"""Noise schedule of SD3-class rectified flow: training-time density, shift, table, weighting.

u ∈ [0, 1] is training time (u = 1 is noise); σ(u) = s·u / (1 + (s − 1)·u) is the noise level.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "loss_weight",
    "quantize_sigma",
    "quantize_u",
    "release_table_sigma",
    "sample_logit_normal",
    "shift_sigma",
    "sigma_table",
]

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ(u) = s·u / (1 + (s − 1)·u): the time shift of SD3's FlowMatchEulerDiscreteScheduler."""
    return shift * u / (1 + (shift - 1) * u)


def sample_logit_normal(
    n: int, mean: float, std: float, *, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """u = sigmoid(mean + std·ε), ε ~ N(0, 1): the logit-normal training-time density, fp32 [n]."""
    eps = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(mean + std * eps)


def sigma_table(shift: float, device: torch.device | None = None) -> torch.Tensor:
    """The scheduler's 1000 training sigmas, descending from 1: table[i] = σ((1000 − i)/1000), in
    the float32 arithmetic of diffusers' FlowMatchEulerDiscreteScheduler (bit for bit: the release
    indexes this table, and the model sees its timesteps table·1000)."""
    u = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32, device=device) / NUM_TRAIN_TIMESTEPS
    return shift_sigma(u, shift)


def quantize_u(u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ of the table entry that time u falls in (index ⌊(1 − u)·1000⌋, as the reference release)."""
    table = sigma_table(shift, u.device)
    idx = ((1.0 - u) * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return table[idx]


def quantize_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The largest table sigma ≤ σ (the reference release's searchsorted), clamped to the table."""
    table = sigma_table(shift, sigma.device)
    idx = torch.searchsorted(-table, -sigma.contiguous()).clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return table[idx]


def release_table_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The table sigma whose timestep the reference release gives the model at an aux point σ'
    (`aux_timestep="table"`): i = the first table index with table[i] ≤ σ' (its searchsorted),
    t = 1 − i/1000, then index ⌊(1 − t)·1000⌋, all in float32. The round trip returns i − 1 (one
    entry higher) for the bins where the float32 rounding of 1 − (1 − i/1000) falls below i/1000."""
    table = sigma_table(shift, sigma.device)
    i = torch.searchsorted(-table, -sigma.float().contiguous()).clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    t = 1.0 - i.float() / NUM_TRAIN_TIMESTEPS
    j = ((1.0 - t) * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return table[j]


def loss_weight(sigma: torch.Tensor, weighting: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """w(σ) of diffusers' compute_loss_weighting_for_sd3; 1 for 'logit_normal' and 'none'. Formed
    in fp32, or in a low-precision `dtype` and then read as fp32 (the release weights with σ in
    the model dtype, `target_dtype="model"`)."""
    low = dtype is not None and dtype not in (torch.float32, torch.float64)
    sigma = sigma.to(dtype) if low else sigma.float()
    if weighting == "sigma_sqrt":
        return (sigma**-2.0).float()
    if weighting == "cosmap":
        return (2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))).float()
    return torch.ones_like(sigma, dtype=torch.float32)
