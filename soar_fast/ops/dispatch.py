"""The one place that chooses a backend for each fused op: triton | native | reference.

`backend="auto"` picks the fastest backend that can run here and falls back to the reference,
logging the choice once per (op, backend). The environment variable `SOAR_FAST_OPS_BACKEND`
(`reference`, `triton`, `native`) overrides `"auto"`.
"""

from __future__ import annotations

import logging
import os

import torch

from soar_fast.ops.soar_aux_states.reference import soar_aux_states_reference

__all__ = ["BACKENDS", "resolve_backend", "soar_aux_states"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "triton", "native")
ENV_VAR = "SOAR_FAST_OPS_BACKEND"
_logged: set[tuple[str, str]] = set()


def _log_once(op: str, backend: str, why: str) -> None:
    if (op, backend) not in _logged:
        _logged.add((op, backend))
        log.info("soar_fast.ops.%s: using the %s backend (%s)", op, backend, why)


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Map a requested backend to the one that runs. Raises on an unknown name."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced:
            if forced not in BACKENDS[1:]:
                raise ValueError(f"{ENV_VAR}={forced!r} is invalid; set it to reference, triton or native")
            _log_once(op, forced, f"forced by {ENV_VAR}")
            return forced
        _log_once(op, "reference", "no fused kernel is available for this device yet")
        return "reference"
    return backend


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
    """Re-noised states z' and correction targets v_corr, `[M*B, ...]` point-major (SOAR.md)."""
    _check_aux_inputs(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux)
    chosen = resolve_backend("soar_aux_states", backend, z0.device)
    if chosen == "reference":
        return soar_aux_states_reference(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux, guidance_scale)
    raise NotImplementedError(
        f"soar_aux_states: the {chosen!r} backend is not built in this version; use backend='reference'"
    )


def _check_aux_inputs(z0, z1, v_uncond, v_cond, sigma0, sigma1, sigma_aux) -> None:
    for name, t in (("z1", z1), ("v_uncond", v_uncond), ("v_cond", v_cond)):
        if t.shape != z0.shape:
            raise ValueError(f"soar_aux_states: {name} has shape {tuple(t.shape)}, expected z0's {tuple(z0.shape)}")
    b = z0.shape[0]
    for name, t in (("sigma0", sigma0), ("sigma1", sigma1)):
        if t.shape != (b,):
            raise ValueError(f"soar_aux_states: {name} has shape {tuple(t.shape)}, expected ({b},)")
    if sigma_aux.dim() != 2 or sigma_aux.shape[1] != b:
        raise ValueError(f"soar_aux_states: sigma_aux has shape {tuple(sigma_aux.shape)}, expected (M, {b})")
