"""Triton kernels of the fused SOAR loss (forward and backward), recomputing targets in-kernel.

Grid: (cdiv(N, BLOCK), B). Program (j, b) loads block j of z0[b] and z1[b] once and serves all
1 + M rows of sample b: the base row b (target z1 − z0) and the aux rows B + m*B + b (target
(z'_{mB+b} − z0)/σ'_{m,b}), so v_corr is never stored and z0 is read once, not 1 + M times.
Forward writes fp32 partial sums of (v − t)² per (row, block), reduced in a fixed order by torch
(deterministic, no atomics). Backward writes grad_v = c_row·(v − t), c_row = 2·w·g_row / N. The
fused loss-and-grad mode does both in one pass with g = 1 (the caller folds any normalisation into
w), so a training step reads v, z0, z1 and z' once instead of twice and never re-reads them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soar_fast.ops._common import as_rows, empty_output, interpreting
from soar_fast.ops._triton_utils import interp_block, needs_rne_fix, round_bf16_rne

__all__ = ["fused_mse_and_grad_triton", "fused_mse_backward_triton", "fused_mse_forward_triton"]


@triton.jit
def _row_out(
    err,
    c_ptr,
    row,
    part_ptr,
    grad_ptr,
    N,
    NBLK,
    pid_n,
    offs,
    mask,
    WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    RNE_FIX: tl.constexpr,
):
    if WRITE_LOSS:
        tl.store(part_ptr + row * NBLK + pid_n, tl.sum(err * err, axis=0))
    if WRITE_GRAD:
        g = tl.load(c_ptr + row) * err
        if RNE_FIX:
            g = round_bf16_rne(g)
        tl.store(grad_ptr + row * N + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_mse_kernel(
    v_ptr,
    z0_ptr,
    z1_ptr,
    za_ptr,
    sa_ptr,  # v [(1+M)B, N], z0/z1 [B, N], z' [MB, N]: row strides
    c_ptr,  # fp32 [(1+M)B] gradient coefficient per row (WRITE_GRAD)
    part_ptr,  # fp32 partial sums of (v - t)^2 [(1+M)B, NBLK] (WRITE_LOSS)
    grad_ptr,  # grad_v [(1+M)B, N] contiguous, v's dtype (WRITE_GRAD)
    B,
    N,
    M,
    NBLK,
    stride_v,
    stride_z0,
    stride_z1,
    stride_za,
    WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    RNE_FIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    z0 = tl.load(z0_ptr + b * stride_z0 + offs, mask=mask, other=0.0).to(tl.float32)
    z1 = tl.load(z1_ptr + b * stride_z1 + offs, mask=mask, other=0.0).to(tl.float32)
    # Base row b: target z1 - z0.
    v = tl.load(v_ptr + b * stride_v + offs, mask=mask, other=0.0).to(tl.float32)
    _row_out(
        v - (z1 - z0),
        c_ptr,
        b,
        part_ptr,
        grad_ptr,
        N,
        NBLK,
        pid_n,
        offs,
        mask,
        WRITE_LOSS,
        WRITE_GRAD,
        RNE_FIX,
    )
    # Aux rows: point m of sample b is z' row m*B + b and v row B + m*B + b; target (z' - z0)/σ'.
    for m in range(M):
        za = tl.load(za_ptr + (m * B + b) * stride_za + offs, mask=mask, other=0.0).to(tl.float32)
        sa = tl.load(sa_ptr + m * B + b).to(tl.float32)
        row = B + m * B + b
        v = tl.load(v_ptr + row * stride_v + offs, mask=mask, other=0.0).to(tl.float32)
        _row_out(
            v - (za - z0) / sa,
            c_ptr,
            row,
            part_ptr,
            grad_ptr,
            N,
            NBLK,
            pid_n,
            offs,
            mask,
            WRITE_LOSS,
            WRITE_GRAD,
            RNE_FIX,
        )


# CUDA: autotuned per (N, M). The forward's partial sums are laid out for the smallest block
# (zero-filled, so columns a larger block leaves unwritten add nothing). The interpreter cannot
# autotune: one config with large blocks (its cost is per program).
_CUDA_CONFIGS = [
    triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8))
]
_MIN_CUDA_BLOCK = min(c.kwargs["BLOCK"] for c in _CUDA_CONFIGS)
_fused_mse_kernel_tuned = triton.autotune(configs=_CUDA_CONFIGS, key=["N", "M"])(_fused_mse_kernel)


def _prepare(v, z0, z1, z_aux, sigma_aux):
    op = "soar_fused_mse[triton]"
    for name, t in (("v", v), ("z0", z0), ("z1", z1), ("z_aux", z_aux)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: fp32, fp16, bf16")
    b, m = z0.shape[0], sigma_aux.shape[0]
    n = z0[0].numel() if b > 0 else 0
    rows = [
        as_rows(t, op, name) for name, t in (("v", v), ("z0", z0), ("z1", z1), ("z_aux", z_aux))
    ]
    if m == 0:  # no aux rows: pass any valid pointer, the loop body never runs
        rows[3] = (rows[1][0], 0)
    sa = sigma_aux.to(device=z0.device, dtype=torch.float32).contiguous()
    return b, m, n, rows, sa


def _launch(v, z0, z1, z_aux, sigma_aux, weights, grad, write_loss: bool, write_grad: bool):
    """Shared launcher: returns (losses or None, grad_v or None). grad is the upstream grad [(1+M)B]
    (None: d(sum of losses)/dv, i.e. upstream ones, for the fused loss-and-grad)."""
    b, m, n, rows, sa = _prepare(v, z0, z1, z_aux, sigma_aux)
    r = (1 + m) * b
    dev = v.device
    w = weights.to(device=dev, dtype=torch.float32)
    losses = grad_v = None
    if write_loss and (r == 0 or n == 0):
        losses = torch.zeros(r, dtype=torch.float32, device=dev)
        write_loss = False
    if write_grad:
        grad_v = empty_output(v.shape, v.dtype, dev)
        write_grad = grad_v.numel() > 0
    if not (write_loss or write_grad):
        return losses, grad_v
    interp = interpreting()
    nblk = triton.cdiv(n, interp_block(n) if interp else _MIN_CUDA_BLOCK)
    if not write_loss:
        partials = w  # unused
    elif interp:
        partials = empty_output(
            (r, nblk), torch.float32, dev
        )  # every column written: poison-checked
    else:
        partials = torch.zeros((r, nblk), dtype=torch.float32, device=dev)
    c = w * (2.0 / n) if grad is None else grad.to(device=dev, dtype=torch.float32) * w * (2.0 / n)
    (vr, sv), (z0r, sz0), (z1r, sz1), (zar, sza) = rows
    args = (
        vr,
        z0r,
        z1r,
        zar,
        sa,
        c.contiguous(),
        partials,
        grad_v if write_grad else vr,
        b,
        n,
        m,
        nblk,
        sv,
        sz0,
        sz1,
        sza,
    )
    if interp:
        block = interp_block(n)
        _fused_mse_kernel[(triton.cdiv(n, block), b)](
            *args,
            WRITE_LOSS=write_loss,
            WRITE_GRAD=write_grad,
            RNE_FIX=write_grad and needs_rne_fix(v.dtype),
            BLOCK=block,
            num_warps=4,
        )
    else:
        _fused_mse_kernel_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]), b)](
            *args, WRITE_LOSS=write_loss, WRITE_GRAD=write_grad, RNE_FIX=False
        )
    if write_loss:
        losses = partials.sum(dim=1) * w / n
    return losses, grad_v


def fused_mse_forward_triton(v, z0, z1, z_aux, sigma_aux, weights) -> torch.Tensor:
    """Per-row losses `[(1+M)B]` fp32 (shapes in reference.py)."""
    return _launch(v, z0, z1, z_aux, sigma_aux, weights, None, True, False)[0]


def fused_mse_backward_triton(grad, v, z0, z1, z_aux, sigma_aux, weights) -> torch.Tensor:
    """grad_v `[(1+M)B, ...]` in v's dtype, contiguous, for upstream grad `[(1+M)B]`."""
    return _launch(v, z0, z1, z_aux, sigma_aux, weights, grad, False, True)[1]


def fused_mse_and_grad_triton(
    v, z0, z1, z_aux, sigma_aux, weights
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: per-row losses and grad_v = d(sum_r losses_r)/dv (forward and backward fused)."""
    return _launch(v, z0, z1, z_aux, sigma_aux, weights, None, True, True)
