"""The eager reference of FP8 weight quantisation: x ≈ x_fp8 · scale, e4m3, round to nearest even."""

from __future__ import annotations

import torch

__all__ = ["EPS", "FP8_DTYPE", "FP8_MAX", "quantize_fp8_reference"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
EPS = 1e-12


def quantize_fp8_reference(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (x_fp8 [R, K], scale fp32 [] or [R, 1]) with scale = max(amax, 1e-12) / 448,
    computed in fp32 (amax over the tensor, or over each row)."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True) if rowwise else x32.abs().amax()
    scale = amax.clamp_min(EPS) / FP8_MAX
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
