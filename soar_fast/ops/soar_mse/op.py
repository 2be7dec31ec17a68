"""The fused SOAR loss as a torch.library custom op (Triton forward and backward, fake impls,
registered autograd) and as a `torch.autograd.Function` for any backend's kernel pair.

    torch.ops.soar_fast.fused_mse(v, z0, z1, z_aux, sigma_aux, weights) -> losses [(1+M)B] fp32
    torch.ops.soar_fast.fused_mse_backward(grad, v, z0, z1, z_aux, sigma_aux, weights) -> grad_v
    torch.ops.soar_fast.fused_mse_and_grad(v, z0, z1, z_aux, sigma_aux, weights) -> (losses, grad_v)
        forward and backward in one pass, grad_v = d(Σ losses)/dv (no autograd: the caller feeds
        grad_v to `v.backward(grad_v)`, folding the loss normalisation into the weights)
Only v gets a gradient: targets and weights are constants of the SOAR loss (SOAR.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SoarFusedMSEFunction", "fused_mse_and_grad_op", "fused_mse_backward_op", "fused_mse_op"]


@torch.library.custom_op("soar_fast::fused_mse", mutates_args=())
def fused_mse_op(
    v: Tensor, z0: Tensor, z1: Tensor, z_aux: Tensor, sigma_aux: Tensor, weights: Tensor
) -> Tensor:
    from soar_fast.ops.soar_mse.triton_kernels import fused_mse_forward_triton

    return fused_mse_forward_triton(v, z0, z1, z_aux, sigma_aux, weights)


@fused_mse_op.register_fake
def _(v, z0, z1, z_aux, sigma_aux, weights):
    return v.new_empty((v.shape[0],), dtype=torch.float32)


@torch.library.custom_op("soar_fast::fused_mse_backward", mutates_args=())
def fused_mse_backward_op(
    grad: Tensor,
    v: Tensor,
    z0: Tensor,
    z1: Tensor,
    z_aux: Tensor,
    sigma_aux: Tensor,
    weights: Tensor,
) -> Tensor:
    from soar_fast.ops.soar_mse.triton_kernels import fused_mse_backward_triton

    return fused_mse_backward_triton(grad, v, z0, z1, z_aux, sigma_aux, weights)


@fused_mse_backward_op.register_fake
def _(grad, v, z0, z1, z_aux, sigma_aux, weights):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("soar_fast::fused_mse_and_grad", mutates_args=())
def fused_mse_and_grad_op(
    v: Tensor, z0: Tensor, z1: Tensor, z_aux: Tensor, sigma_aux: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor]:
    from soar_fast.ops.soar_mse.triton_kernels import fused_mse_and_grad_triton

    return fused_mse_and_grad_triton(v, z0, z1, z_aux, sigma_aux, weights)


@fused_mse_and_grad_op.register_fake
def _(v, z0, z1, z_aux, sigma_aux, weights):
    return v.new_empty((v.shape[0],), dtype=torch.float32), torch.empty_like(
        v, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    v, z0, z1, z_aux, sigma_aux, weights = ctx.saved_tensors
    grad_v = (
        fused_mse_backward_op(grad, v, z0, z1, z_aux, sigma_aux, weights)
        if ctx.needs_input_grad[0]
        else None
    )
    return grad_v, None, None, None, None, None


fused_mse_op.register_autograd(_backward, setup_context=_setup_context)


class SoarFusedMSEFunction(torch.autograd.Function):
    """Autograd wrapper around a (forward, backward) kernel pair of the fused loss (eager use; the
    native backend uses it). `apply(v, z0, z1, z_aux, sigma_aux, weights, fwd, bwd)`."""

    @staticmethod
    def forward(ctx, v, z0, z1, z_aux, sigma_aux, weights, fwd: Callable, bwd: Callable):
        ctx.save_for_backward(v, z0, z1, z_aux, sigma_aux, weights)
        ctx.bwd = bwd
        return fwd(v, z0, z1, z_aux, sigma_aux, weights)

    @staticmethod
    def backward(ctx, grad):
        v, z0, z1, z_aux, sigma_aux, weights = ctx.saved_tensors
        grad_v = (
            ctx.bwd(grad.contiguous(), v, z0, z1, z_aux, sigma_aux, weights)
            if ctx.needs_input_grad[0]
            else None
        )
        return grad_v, None, None, None, None, None, None, None
