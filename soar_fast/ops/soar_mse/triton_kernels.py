"""Triton kernels of the fused SOAR loss (forward and backward), recomputing targets in-kernel.

Grid: (cdiv(N, BLOCK), B). Program (j, b) loads block j of z0[b] and z1[b] once and serves all
1 + M rows of sample b: the base row b (target z1 − z0) and the aux rows B + m*B + b (target
(z'_{mB+b} − z0)/σ'_{m,b}), so v_corr is never stored and z0 is read once, not 1 + M times.
Forward writes fp32 partial sums of (v − t)² per (row, block), reduced in a fixed order by torch
(deterministic, no atomics). Backward writes grad_v = c_row·(v − t), c_row = 2·w·g_row / N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soar_fast.ops._common import as_rows, empty_output, interpreting
from soar_fast.ops._triton_utils import needs_rne_fix, round_bf16_rne

__all__ = ["fused_mse_backward_triton", "fused_mse_forward_triton"]


@triton.jit
def _fused_mse_kernel(
    v_ptr, z0_ptr, z1_ptr, za_ptr, sa_ptr,  # v [(1+M)B, N], z0/z1 [B, N], z' [MB, N]: row strides
    c_ptr,  # fp32 [(1+M)B] row coefficients (backward only)
    out_ptr,  # forward: fp32 partials [(1+M)B, NBLK]; backward: grad_v [(1+M)B, N] contiguous
    B, N, M, NBLK,
    stride_v, stride_z0, stride_z1, stride_za,
    BACKWARD: tl.constexpr,
    RNE_FIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    z0 = tl.load(z0_ptr + b * stride_z0 + offs, mask=mask, other=0.0).to(tl.float32)
    z1 = tl.load(z1_ptr + b * stride_z1 + offs, mask=mask, other=0.0).to(tl.float32)
    # Base row b.
    v = tl.load(v_ptr + b * stride_v + offs, mask=mask, other=0.0).to(tl.float32)
    err = v - (z1 - z0)
    if BACKWARD:
        g = tl.load(c_ptr + b) * err
        if RNE_FIX:
            g = round_bf16_rne(g)
        tl.store(out_ptr + b * N + offs, g.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + b * NBLK + pid_n, tl.sum(err * err, axis=0))
    # Aux rows: point m of sample b is z' row m*B + b and v row B + m*B + b.
    for m in range(M):
        za = tl.load(za_ptr + (m * B + b) * stride_za + offs, mask=mask, other=0.0).to(tl.float32)
        sa = tl.load(sa_ptr + m * B + b).to(tl.float32)
        row = B + m * B + b
        v = tl.load(v_ptr + row * stride_v + offs, mask=mask, other=0.0).to(tl.float32)
        err = v - (za - z0) / sa
        if BACKWARD:
            g = tl.load(c_ptr + row) * err
            if RNE_FIX:
                g = round_bf16_rne(g)
            tl.store(out_ptr + row * N + offs, g.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + row * NBLK + pid_n, tl.sum(err * err, axis=0))


def _block(n: int) -> tuple[int, int]:
    if interpreting():
        return min(16384, max(16, triton.next_power_of_2(n))), 4
    return 2048, 8


def _prepare(v, z0, z1, z_aux, sigma_aux):
    op = "soar_fused_mse[triton]"
    for name, t in (("v", v), ("z0", z0), ("z1", z1), ("z_aux", z_aux)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: fp32, fp16, bf16")
    b, m = z0.shape[0], sigma_aux.shape[0]
    n = z0[0].numel() if b > 0 else 0
    rows = [as_rows(t, op, name) for name, t in (("v", v), ("z0", z0), ("z1", z1), ("z_aux", z_aux))]
    if m == 0:  # no aux rows: pass any valid pointer, the loop body never runs
        rows[3] = (rows[1][0], 0)
    sa = sigma_aux.to(device=z0.device, dtype=torch.float32).contiguous()
    block, warps = _block(n)
    return b, m, n, rows, sa, block, warps


def fused_mse_forward_triton(v, z0, z1, z_aux, sigma_aux, weights) -> torch.Tensor:
    """Per-row losses `[(1+M)B]` fp32 (shapes in reference.py)."""
    b, m, n, rows, sa, block, warps = _prepare(v, z0, z1, z_aux, sigma_aux)
    r = (1 + m) * b
    w = weights.to(device=z0.device, dtype=torch.float32)
    if r == 0 or n == 0:
        return torch.zeros(r, dtype=torch.float32, device=z0.device)
    nblk = triton.cdiv(n, block)
    partials = empty_output((r, nblk), torch.float32, z0.device)
    (vr, sv), (z0r, sz0), (z1r, sz1), (zar, sza) = rows
    _fused_mse_kernel[(nblk, b)](
        vr, z0r, z1r, zar, sa, w, partials, b, n, m, nblk, sv, sz0, sz1, sza,
        BACKWARD=False, RNE_FIX=False, BLOCK=block, num_warps=warps,
    )
    return partials.sum(dim=1) * w / n


def fused_mse_backward_triton(grad, v, z0, z1, z_aux, sigma_aux, weights) -> torch.Tensor:
    """grad_v `[(1+M)B, ...]` in v's dtype, contiguous, for upstream grad `[(1+M)B]`."""
    b, m, n, rows, sa, block, warps = _prepare(v, z0, z1, z_aux, sigma_aux)
    grad_v = empty_output(v.shape, v.dtype, v.device)
    if grad_v.numel() == 0:
        return grad_v
    c = (grad.to(torch.float32) * weights.to(device=z0.device, dtype=torch.float32) * (2.0 / n)).contiguous()
    (vr, sv), (z0r, sz0), (z1r, sz1), (zar, sza) = rows
    _fused_mse_kernel[(triton.cdiv(n, block), b)](
        vr, z0r, z1r, zar, sa, c, grad_v, b, n, m, 0, sv, sz0, sz1, sza,
        BACKWARD=True, RNE_FIX=needs_rne_fix(v.dtype), BLOCK=block, num_warps=warps,
    )
    return grad_v
