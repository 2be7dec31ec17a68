"""Triton helpers shared by the kernels (imported only by triton_kernels modules)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soar_fast.ops._common import interpreting

__all__ = ["interp_block", "needs_rne_fix", "round_bf16_rne"]


def interp_block(n: int) -> int:
    """The interpreter's one BLOCK for rows of n elements: large (its cost is per program), a power
    of two in [16, 16384]."""
    return min(16384, max(16, triton.next_power_of_2(n)))


def needs_rne_fix(dtype: torch.dtype) -> bool:
    """The Triton interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest even), which
    doubles the storage error; kernels round explicitly there so CPU parity tests see GPU rounding."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def round_bf16_rne(x):
    """fp32 -> fp32 value exactly representable in bf16, rounded to nearest even (finite x)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
