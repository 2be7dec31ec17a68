"""Fused ops: each a pure-torch reference, a Triton kernel and a native op, behind one dispatch.

Public API: `soar_aux_states` (z', v_corr), `soar_aux_z` (z' only), `soar_fused_mse` (per-row
SOAR losses with a fused backward), `soar_fused_mse_and_grad` (loss and grad in one pass),
`soar_path_states` (z' of the stochastic rollout paths), `resolve_backend`, `SoarFusedMSEFunction`.
"""

from soar_fast.ops.dispatch import (
    BACKENDS,
    resolve_backend,
    soar_aux_states,
    soar_aux_z,
    soar_fused_mse,
    soar_fused_mse_and_grad,
    soar_path_states,
)
from soar_fast.ops.soar_mse.op import SoarFusedMSEFunction

__all__ = [
    "BACKENDS",
    "SoarFusedMSEFunction",
    "resolve_backend",
    "soar_aux_states",
    "soar_aux_z",
    "soar_fused_mse",
    "soar_fused_mse_and_grad",
    "soar_path_states",
]
