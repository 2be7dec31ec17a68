"""Triton kernel of the fused path-state op: reads z0, z1, v_uncond, v_cond once and each
stochastic path's noise once, writes z' for all (P-1)·M points. z_t, v_cfg and each path's ẑ
live only in registers, in fp32.

Grid: (cdiv(N, BLOCK), B). Program (j, b) loads block j of sample b, forms the step's mean and
noise coefficient (KIND: 0 simple, 1 sde, 2 flow_sde, 3 cps; formulas in reference.py), and
loops over the paths and their points, writing rows (p*M + m)*B + b of the [(P-1)*M*B, N] output.
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
from soar_fast.ops.soar_path_states.reference import SDE_KINDS, path_counts

__all__ = ["path_states_triton"]


@triton.jit
def _path_states_kernel(
    z0_ptr, z1_ptr, vu_ptr, vc_ptr,  # [B, N] rows with row strides
    noise_ptr,  # [P-1, B, N] contiguous
    s0_ptr, s1_ptr, sa_ptr,  # fp32 [B], [B], [(P-1)*M, B] contiguous
    zaux_ptr,  # [(P-1)*M*B, N] contiguous output
    B, N, M, P1,
    stride_z0, stride_z1, stride_vu, stride_vc,
    guidance, scale, sigma_max, sin_scale,
    KIND: tl.constexpr,
    RNE_FIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    z0 = tl.load(z0_ptr + b * stride_z0 + offs, mask=mask, other=0.0).to(tl.float32)
    z1 = tl.load(z1_ptr + b * stride_z1 + offs, mask=mask, other=0.0).to(tl.float32)
    vu = tl.load(vu_ptr + b * stride_vu + offs, mask=mask, other=0.0).to(tl.float32)
    vc = tl.load(vc_ptr + b * stride_vc + offs, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(s0_ptr + b).to(tl.float32)
    sn = tl.load(s1_ptr + b).to(tl.float32)

    z = (1.0 - sc) * z0 + sc * z1  # z_t
    v = vu + guidance * (vc - vu)  # v_cfg
    dt = sn - sc
    if KIND == 0:  # simple
        mean = z + v * dt
        coef = scale * tl.sqrt(tl.abs(dt))
    elif KIND == 1:  # sde
        mean = (1.0 - sn) * (z - sc * v)
        coef = sn
    elif KIND == 2:  # flow_sde
        safe = tl.where(sc == 1.0, sigma_max, sc)
        std = tl.sqrt(sc / (1.0 - safe)) * scale
        mean = z * (1.0 + (std * std / (2.0 * sc)) * dt)
        mean = mean + v * (1.0 + (std * std * (1.0 - sc) / (2.0 * sc))) * dt
        coef = std * tl.sqrt(tl.maximum(-dt, 0.0))
    else:  # cps
        std = sn * sin_scale
        mean = (z - sc * v) * (1.0 - sn) + (z + v * (1.0 - sc)) * tl.sqrt(tl.maximum(sn * sn - std * std, 0.0))
        coef = std
    denom = tl.maximum(1.0 - sn, 1e-8)
    for p in range(P1):
        eps = tl.load(noise_ptr + (p * B + b) * N + offs, mask=mask, other=0.0).to(tl.float32)
        z_hat = mean + coef * eps
        for m in range(M):
            sa = tl.load(sa_ptr + (p * M + m) * B + b).to(tl.float32)
            alpha = tl.minimum(tl.maximum((sa - sn) / denom, 0.0), 1.0)
            z_out = (1.0 - alpha) * z_hat + alpha * z1
            if RNE_FIX:
                z_out = round_bf16_rne(z_out)
            row = (p * M + m) * B + b
            tl.store(zaux_ptr + row * N + offs, z_out.to(zaux_ptr.dtype.element_ty), mask=mask)


_CUDA_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((512, 4), (1024, 4), (2048, 8))]
_path_states_kernel_tuned = triton.autotune(configs=_CUDA_CONFIGS, key=["N", "M", "P1"])(_path_states_kernel)


def path_states_triton(z0: torch.Tensor, z1: torch.Tensor, v_uncond: torch.Tensor, v_cond: torch.Tensor,
                       sigma0: torch.Tensor, sigma1: torch.Tensor, sigma_aux: torch.Tensor, noise: torch.Tensor,
                       guidance_scale: float, kind: str, noise_scale: float, sigma_max: float) -> torch.Tensor:
    """Launcher. Shapes as `soar_path_states`; returns z' `[(P-1)*M*B, ...]` in z0's dtype."""
    import math

    op = "soar_path_states[triton]"
    check_kernel_dtype(op, z0.dtype)
    b, (p1, m) = z0.shape[0], path_counts(noise, sigma_aux)
    z_aux = empty_output((p1 * m * b, *z0.shape[1:]), z0.dtype, z0.device)
    n = z0[0].numel() if b > 0 else 0
    if z_aux.numel() == 0:
        return z_aux
    (z0r, sz0), (z1r, sz1), (vur, svu), (vcr, svc) = state_rows(op, z0, z1, v_uncond, v_cond)
    eps, s0, s1, sa = fp32_contiguous(z0.device, noise, sigma0, sigma1, sigma_aux)
    args = (z0r, z1r, vur, vcr, eps, s0, s1, sa, z_aux, b, n, m, p1, sz0, sz1, svu, svc,
            float(guidance_scale), float(noise_scale), float(sigma_max), math.sin(noise_scale * math.pi / 2))
    kind_id = SDE_KINDS.index(kind)
    if interpreting():
        block = interp_block(n)
        _path_states_kernel[(triton.cdiv(n, block), b)](
            *args, KIND=kind_id, RNE_FIX=needs_rne_fix(z0.dtype), BLOCK=block, num_warps=4)
    else:
        _path_states_kernel_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]), b)](
            *args, KIND=kind_id, RNE_FIX=False)
    return z_aux
