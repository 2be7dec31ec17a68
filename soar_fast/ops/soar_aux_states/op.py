"""torch.library custom ops of the fused aux-state kernel, with fake (meta) implementations, so
`torch.compile(fullgraph=True)` and CUDA graphs see one shape-known node. No autograd: the
outputs are constants of the SOAR loss (SOAR.md: no gradient flows through z' or v_corr).

    torch.ops.soar_fast.aux_states(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, g)
        -> (z_aux, v_corr)  `[M*B, ...]` in z0's dtype
    torch.ops.soar_fast.aux_states_z(...) -> z_aux   (v_corr not written: the fused loss
        recomputes it, which saves M*B*N stores)
The Triton module is imported on first call, so registering the ops needs no triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from soar_fast.ops.soar_aux_states.reference import aux_rows_shape

__all__ = ["aux_states_op", "aux_states_z_op"]


def _out(z0: Tensor, sigma_aux: Tensor) -> Tensor:
    return z0.new_empty(aux_rows_shape(z0, sigma_aux))


@torch.library.custom_op("soar_fast::aux_states", mutates_args=())
def aux_states_op(
    z0: Tensor,
    z1: Tensor,
    v_uncond: Tensor,
    v_cond: Tensor,
    sigma0: Tensor,
    sigma1: Tensor,
    sigma_aux: Tensor,
    guidance_scale: float,
) -> tuple[Tensor, Tensor]:
    from soar_fast.ops.soar_aux_states.triton_kernels import aux_states_triton

    z_aux, v_corr = aux_states_triton(
        z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, guidance_scale
    )
    assert v_corr is not None
    return z_aux, v_corr


@aux_states_op.register_fake
def _(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, guidance_scale):
    return _out(z0, sigma_aux), _out(z0, sigma_aux)


@torch.library.custom_op("soar_fast::aux_states_z", mutates_args=())
def aux_states_z_op(
    z0: Tensor,
    z1: Tensor,
    v_uncond: Tensor,
    v_cond: Tensor,
    sigma0: Tensor,
    sigma1: Tensor,
    sigma_aux: Tensor,
    guidance_scale: float,
) -> Tensor:
    from soar_fast.ops.soar_aux_states.triton_kernels import aux_states_triton

    z_aux, _ = aux_states_triton(
        z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, guidance_scale, write_v_corr=False
    )
    return z_aux


@aux_states_z_op.register_fake
def _(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, guidance_scale):
    return _out(z0, sigma_aux)
