"""torch.library custom op of the fused path-state kernel, with a fake (meta) implementation, so
`torch.compile(fullgraph=True)` and CUDA graphs see one shape-known node. No autograd: z' is a
constant of the SOAR loss.

    torch.ops.soar_fast.path_states(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, noise,
                                    g, kind, noise_scale, sigma_max) -> z_aux `[(P-1)*M*B, ...]`
The Triton module is imported on first call, so registering the op needs no triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from soar_fast.ops.soar_path_states.reference import path_counts

__all__ = ["path_states_op"]


@torch.library.custom_op("soar_fast::path_states", mutates_args=())
def path_states_op(
    z0: Tensor,
    z1: Tensor,
    v_uncond: Tensor,
    v_cond: Tensor,
    sigma0: Tensor,
    sigma1: Tensor,
    sigma_aux: Tensor,
    noise: Tensor,
    guidance_scale: float,
    kind: str,
    noise_scale: float,
    sigma_max: float,
) -> Tensor:
    from soar_fast.ops.soar_path_states.triton_kernels import path_states_triton

    return path_states_triton(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, noise, guidance_scale, kind,
                              noise_scale, sigma_max)


@path_states_op.register_fake
def _(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, noise, guidance_scale, kind, noise_scale, sigma_max):
    p1, m = path_counts(noise, sigma_aux)
    return z0.new_empty((p1 * m * z0.shape[0], *z0.shape[1:]))
