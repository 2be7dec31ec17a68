"""Triton kernel of the fused aux-state op: reads z0, z1, v_uncond, v_cond once, writes z' and
(optionally) v_corr for all M points. z_t, v_cfg and ẑ live only in registers, in fp32.

Grid: (cdiv(N, BLOCK), B). Program (j, b) loads block j of sample b's four inputs and loops over
the M points, writing rows m*B + b of the [M*B, N] outputs.

Algebra (SOAR.md steps 2-4, rewritten to avoid cancellation in v_corr):
    d = z1 - z0,  v = v_u + g (v_c - v_u),  e = ẑ - z0 = σ0 d + (σ1 - σ0) v
    α = clamp((σ' - σ1) / max(1 - σ1, 1e-8), 0, 1),  δ = z' - z0 = (1 - α) e + α d
    z' = z0 + δ,  v_corr = δ / σ'
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soar_fast.ops._common import (
    check_kernel_dtype,
    empty_output,
    fp32_contiguous,
    interpreting,
    state_rows,
)
from soar_fast.ops._triton_utils import interp_block, needs_rne_fix, round_bf16_rne
from soar_fast.ops.soar_aux_states.reference import aux_rows_shape

__all__ = ["aux_states_triton"]


@triton.jit
def _aux_states_kernel(
    z0_ptr,
    z1_ptr,
    vu_ptr,
    vc_ptr,  # [B, N] rows with row strides
    s0_ptr,
    s1_ptr,
    sa_ptr,  # fp32 [B], [B], [M, B] contiguous
    zaux_ptr,
    vcorr_ptr,  # [M*B, N] contiguous outputs
    B,
    N,
    M,
    stride_z0,
    stride_z1,
    stride_vu,
    stride_vc,
    guidance,
    WRITE_VCORR: tl.constexpr,
    RNE_FIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # Convert right after the load: all arithmetic is fp32 whatever the storage dtype.
    z0 = tl.load(z0_ptr + b * stride_z0 + offs, mask=mask, other=0.0).to(tl.float32)
    z1 = tl.load(z1_ptr + b * stride_z1 + offs, mask=mask, other=0.0).to(tl.float32)
    vu = tl.load(vu_ptr + b * stride_vu + offs, mask=mask, other=0.0).to(tl.float32)
    vc = tl.load(vc_ptr + b * stride_vc + offs, mask=mask, other=0.0).to(tl.float32)
    s0 = tl.load(s0_ptr + b).to(tl.float32)
    s1 = tl.load(s1_ptr + b).to(tl.float32)

    d = z1 - z0
    v = vu + guidance * (vc - vu)
    e = s0 * d + (s1 - s0) * v
    denom = tl.maximum(1.0 - s1, 1e-8)
    for m in range(M):
        sa = tl.load(sa_ptr + m * B + b).to(tl.float32)
        alpha = tl.minimum(tl.maximum((sa - s1) / denom, 0.0), 1.0)
        delta = (1.0 - alpha) * e + alpha * d
        row = m * B + b
        z_out = z0 + delta
        if RNE_FIX:
            z_out = round_bf16_rne(z_out)
        tl.store(zaux_ptr + row * N + offs, z_out.to(zaux_ptr.dtype.element_ty), mask=mask)
        if WRITE_VCORR:
            v_out = delta / sa
            if RNE_FIX:
                v_out = round_bf16_rne(v_out)
            tl.store(vcorr_ptr + row * N + offs, v_out.to(vcorr_ptr.dtype.element_ty), mask=mask)


# CUDA: a few configs autotuned per (N, M) (the interpreter cannot autotune; it gets one config
# with large blocks, since its cost is per program).
_CUDA_CONFIGS = [
    triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((512, 4), (1024, 4), (2048, 8))
]
_aux_states_kernel_tuned = triton.autotune(configs=_CUDA_CONFIGS, key=["N", "M"])(
    _aux_states_kernel
)


def aux_states_triton(
    z0: torch.Tensor,
    z1: torch.Tensor,
    v_uncond: torch.Tensor,
    v_cond: torch.Tensor,
    sigma0: torch.Tensor,
    sigma1: torch.Tensor,
    sigma_aux: torch.Tensor,
    guidance_scale: float,
    write_v_corr: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launcher. Shapes as `soar_aux_states`; returns (z_aux, v_corr or None) `[M*B, ...]` in z0's dtype."""
    op = "soar_aux_states[triton]"
    check_kernel_dtype(op, z0.dtype)
    b, m = z0.shape[0], sigma_aux.shape[0]
    out_shape = aux_rows_shape(z0, sigma_aux)
    z_aux = empty_output(out_shape, z0.dtype, z0.device)
    v_corr = empty_output(out_shape, z0.dtype, z0.device) if write_v_corr else None
    n = z0[0].numel() if b > 0 else 0
    if z_aux.numel() == 0:
        return z_aux, v_corr
    (z0r, sz0), (z1r, sz1), (vur, svu), (vcr, svc) = state_rows(op, z0, z1, v_uncond, v_cond)
    s0, s1, sa = fp32_contiguous(z0.device, sigma0, sigma1, sigma_aux)
    args = (
        z0r,
        z1r,
        vur,
        vcr,
        s0,
        s1,
        sa,
        z_aux,
        v_corr if write_v_corr else z_aux,
        b,
        n,
        m,
        sz0,
        sz1,
        svu,
        svc,
        float(guidance_scale),
    )
    if interpreting():
        block = interp_block(n)
        _aux_states_kernel[(triton.cdiv(n, block), b)](
            *args,
            WRITE_VCORR=write_v_corr,
            RNE_FIX=needs_rne_fix(z0.dtype),
            BLOCK=block,
            num_warps=4,
        )
    else:
        _aux_states_kernel_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]), b)](
            *args, WRITE_VCORR=write_v_corr, RNE_FIX=False
        )
    return z_aux, v_corr
