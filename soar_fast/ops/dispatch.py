"""The one place that chooses a backend for each fused op: triton | native | reference.

`backend="auto"` on a CUDA device, for the dtypes the kernels serve (fp32, fp16, bf16), picks the
native op when the extension is built with CUDA kernels (on an H200 it ran 3-50x faster than the
Triton launch at SD3.5 shapes, whose ~0.13 ms floor is host-side launch cost: docs/kernels.md),
else Triton when it imports; the pure-torch reference elsewhere (CPU included, even when the
Triton interpreter is on). The environment variable `SOAR_FAST_OPS_BACKEND` (`reference`,
`triton`, `native`) overrides `"auto"`. Each (op, backend) choice is logged once at INFO.
"""

from __future__ import annotations

import logging
import os

import torch

from soar_fast.ops._common import KERNEL_DTYPES, interpreting, triton_available
from soar_fast.ops.native import load_native, native_cuda_ready
from soar_fast.ops.soar_aux_states.op import aux_states_op, aux_states_z_op
from soar_fast.ops.soar_aux_states.reference import soar_aux_states_reference
from soar_fast.ops.soar_mse.op import fused_mse_and_grad_op, fused_mse_op
from soar_fast.ops.soar_mse.reference import (
    soar_fused_mse_and_grad_reference,
    soar_fused_mse_reference,
)
from soar_fast.ops.soar_path_states.op import path_states_op
from soar_fast.ops.soar_path_states.reference import SDE_KINDS, soar_path_states_reference

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "resolve_backend",
    "soar_aux_states",
    "soar_aux_z",
    "soar_fused_mse",
    "soar_fused_mse_and_grad",
    "soar_path_states",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "triton", "native")
ENV_VAR = "SOAR_FAST_OPS_BACKEND"
_logged: set[tuple[str, str]] = set()


def _log_once(op: str, backend: str, why: str) -> None:
    if (op, backend) not in _logged:
        _logged.add((op, backend))
        log.info("soar_fast.ops.%s: using the %s backend (%s)", op, backend, why)


@torch.compiler.assume_constant_result
def resolve_backend(
    op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None
) -> str:
    """Map a requested backend to the one that runs. Raises on an unknown name, or when an explicitly
    requested backend cannot run here (Triton without CUDA or interpreter, native not built).
    Under torch.compile it runs once at trace time (a constant of the graph), so it logs there."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    why = "requested"
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced:
            if forced not in BACKENDS[1:]:
                raise ValueError(
                    f"{ENV_VAR}={forced!r} is invalid; set it to reference, triton or native"
                )
            backend, why = forced, f"forced by {ENV_VAR}"
        elif device.type == "cuda" and (dtype is None or dtype in KERNEL_DTYPES) and native_cuda_ready():
            backend, why = "native", "auto: CUDA device, native extension built with CUDA kernels"
        elif (
            device.type == "cuda"
            and triton_available()
            and (dtype is None or dtype in KERNEL_DTYPES)
        ):
            backend, why = "triton", "auto: CUDA device with triton"
        else:
            backend, why = "reference", f"auto: no fused kernel chosen for {device.type}/{dtype}"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{op}: backend 'triton' needs the triton package (pip install triton)"
            )
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{op}: backend 'triton' needs a CUDA device or TRITON_INTERPRET=1 (got {device})"
            )
    elif backend == "native":
        load_native()
    _log_once(op, backend, why)
    return backend


def _run(chosen: str, args: tuple, triton_op, native_op, reference):
    """Call the chosen backend's implementation of an op on `args`. `native_op` looks the native
    op up when called (torch.ops.soar_fast_native exists only once the extension is loaded)."""
    if chosen == "triton":
        return triton_op(*args)
    if chosen == "native":
        return native_op(*args)
    return reference(*args)


def soar_aux_states(
    z0: torch.Tensor,
    z1: torch.Tensor,
    v_uncond: torch.Tensor,
    v_cond: torch.Tensor,
    sigma0: torch.Tensor,
    sigma1: torch.Tensor,
    sigma_aux: torch.Tensor,
    guidance_scale: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-noised states z' and correction targets v_corr, `[M*B, ...]` point-major (SOAR.md).

    z0, z1, v_uncond, v_cond `[B, ...]`; sigma0, sigma1 `[B]`; sigma_aux `[M, B]`. Outputs are in
    z0's dtype, computed in fp32 (fp64 inputs: reference only, computed in fp64)."""
    _check_aux_inputs(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux)
    chosen = resolve_backend("soar_aux_states", backend, z0.device, z0.dtype)
    args = (z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, float(guidance_scale))
    return _run(chosen, args, aux_states_op, lambda *a: torch.ops.soar_fast_native.aux_states(*a),
                soar_aux_states_reference)


def soar_aux_z(
    z0: torch.Tensor,
    z1: torch.Tensor,
    v_uncond: torch.Tensor,
    v_cond: torch.Tensor,
    sigma0: torch.Tensor,
    sigma1: torch.Tensor,
    sigma_aux: torch.Tensor,
    guidance_scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Only the re-noised states z' `[M*B, ...]` (no v_corr written): pair it with
    `soar_fused_mse`, which recomputes v_corr = (z' − z0)/σ' in-kernel."""
    _check_aux_inputs(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux)
    chosen = resolve_backend("soar_aux_z", backend, z0.device, z0.dtype)
    args = (z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, float(guidance_scale))
    return _run(chosen, args, aux_states_z_op, lambda *a: torch.ops.soar_fast_native.aux_states_z(*a),
                lambda *a: soar_aux_states_reference(*a)[0])


def soar_path_states(
    z0: torch.Tensor,
    z1: torch.Tensor,
    v_uncond: torch.Tensor,
    v_cond: torch.Tensor,
    sigma0: torch.Tensor,
    sigma1: torch.Tensor,
    sigma_aux: torch.Tensor,
    noise: torch.Tensor,
    guidance_scale: float,
    kind: str,
    noise_scale: float,
    sigma_max: float,
    backend: str = "auto",
) -> torch.Tensor:
    """z' of the stochastic rollout paths 1..P-1 `[(P-1)*M*B, ...]` (row (p*M + m)*B + b), in one
    launch: each path's one stochastic step from z_t with v_cfg on its noise, then its M points
    re-noised toward z1 (soar_fast/ops/soar_path_states/reference.py). z0, z1, v_* `[B, ...]`;
    sigma0, sigma1 `[B]`; sigma_aux `[(P-1)*M, B]`; noise `[P-1, B, ...]`; `kind` one of simple,
    sde, flow_sde, cps. In z0's dtype, computed in fp32. No native kernel: "native" runs Triton."""
    _check_aux_inputs(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux)
    if kind not in SDE_KINDS:
        raise ValueError(f"soar_path_states: unknown kind {kind!r}; choose one of {', '.join(SDE_KINDS)}")
    if noise.shape[1:] != z0.shape or (noise.shape[0] and sigma_aux.shape[0] % noise.shape[0]):
        raise ValueError(f"soar_path_states: noise has shape {tuple(noise.shape)} for sigma_aux "
                         f"{tuple(sigma_aux.shape)}, expected (P-1, {', '.join(map(str, z0.shape))}) with "
                         "(P-1)*M rows of sigma_aux")
    chosen = resolve_backend("soar_path_states", backend, z0.device, z0.dtype)
    if chosen == "native":  # this op has no native kernel
        chosen = "triton" if triton_available() and z0.is_cuda else "reference"
        _log_once("soar_path_states", chosen, "no native kernel for this op")
    args = (z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, noise, float(guidance_scale), kind,
            float(noise_scale), float(sigma_max))
    return _run(chosen, args, path_states_op, None, soar_path_states_reference)  # chosen is not native here


def soar_fused_mse(
    v: torch.Tensor,
    z0: torch.Tensor,
    z1: torch.Tensor,
    z_aux: torch.Tensor,
    sigma_aux: torch.Tensor,
    weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-row SOAR losses `[(1+M)*B]` fp32: mean over elements of w·(v − target)².

    v `[(1+M)*B, ...]` (base rows first, then aux row B + m*B + b); z0, z1 `[B, ...]`; z_aux
    `[M*B, ...]`; sigma_aux `[M, B]`; weights `[(1+M)*B]`. Targets: z1 − z0 (base) and
    (z' − z0)/σ' (aux), formed in fp32. Differentiable in v only. The caller forms either
    normalisation of SOAR.md: "points" = (Σ base + λ Σ aux)/(B + λMB)."""
    _check_mse_inputs(v, z0, z1, z_aux, sigma_aux, weights)
    chosen = resolve_backend(
        "soar_fused_mse", backend, v.device, v.dtype if z0.dtype != torch.float64 else z0.dtype
    )
    args = (v, z0, z1, z_aux, sigma_aux, weights)
    return _run(chosen, args, fused_mse_op, lambda *a: torch.ops.soar_fast_native.fused_mse(*a),
                soar_fused_mse_reference)


def soar_fused_mse_and_grad(
    v: torch.Tensor,
    z0: torch.Tensor,
    z1: torch.Tensor,
    z_aux: torch.Tensor,
    sigma_aux: torch.Tensor,
    weights: torch.Tensor,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient in one pass: (per-row losses `[(1+M)*B]` fp32, grad_v = d(Σ_r losses_r)/dv
    `[(1+M)*B, ...]` in v's dtype). Shapes as `soar_fused_mse`. No autograd graph: fold the SOAR
    normalisation into `weights` (e.g. w_r/(B + λMB), λ on aux rows) and call `v.backward(grad_v)`.
    It reads v, z0, z1 and z' once for forward and backward together, never saving them."""
    _check_mse_inputs(v, z0, z1, z_aux, sigma_aux, weights)
    chosen = resolve_backend(
        "soar_fused_mse_and_grad",
        backend,
        v.device,
        v.dtype if z0.dtype != torch.float64 else z0.dtype,
    )
    args = (v.detach(), z0, z1, z_aux, sigma_aux, weights)
    return _run(chosen, args, fused_mse_and_grad_op,
                lambda *a: torch.ops.soar_fast_native.fused_mse_and_grad(*a), soar_fused_mse_and_grad_reference)


def _check_aux_inputs(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux) -> None:
    for name, t in (("z1", z1), ("v_uncond", v_uncond), ("v_cond", v_cond)):
        if t.shape != z0.shape:
            raise ValueError(
                f"soar_aux_states: {name} has shape {tuple(t.shape)}, expected z0's {tuple(z0.shape)}"
            )
    b = z0.shape[0]
    for name, t in (("sigma0", sigma0), ("sigma1", sigma1)):
        if t.shape != (b,):
            raise ValueError(f"soar_aux_states: {name} has shape {tuple(t.shape)}, expected ({b},)")
    if sigma_aux.dim() != 2 or sigma_aux.shape[1] != b:
        raise ValueError(
            f"soar_aux_states: sigma_aux has shape {tuple(sigma_aux.shape)}, expected (M, {b})"
        )


def _check_mse_inputs(v, z0, z1, z_aux, sigma_aux, weights) -> None:
    b = z0.shape[0]
    if sigma_aux.dim() != 2 or sigma_aux.shape[1] != b:
        raise ValueError(
            f"soar_fused_mse: sigma_aux has shape {tuple(sigma_aux.shape)}, expected (M, {b})"
        )
    m, tail = sigma_aux.shape[0], tuple(z0.shape[1:])
    for name, t, rows in (("z1", z1, b), ("z_aux", z_aux, m * b), ("v", v, (1 + m) * b)):
        if tuple(t.shape) != (rows, *tail):
            raise ValueError(
                f"soar_fused_mse: {name} has shape {tuple(t.shape)}, expected {(rows, *tail)}"
            )
    if weights.shape != ((1 + m) * b,):
        raise ValueError(
            f"soar_fused_mse: weights has shape {tuple(weights.shape)}, expected ({(1 + m) * b},)"
        )
