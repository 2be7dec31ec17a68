"""Fused path-state op: z' of the stochastic rollout paths (reference, Triton kernel, custom op)."""

from soar_fast.ops.soar_path_states.reference import (
    SDE_KINDS,
    sde_step_moments,
    soar_path_states_reference,
    stochastic_step,
)

__all__ = ["SDE_KINDS", "sde_step_moments", "soar_path_states_reference", "stochastic_step"]
