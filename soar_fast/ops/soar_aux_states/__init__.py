"""Fused SOAR auxiliary states: re-noised states z' and correction targets v_corr in one pass."""

from soar_fast.ops.soar_aux_states.reference import soar_aux_states_reference

__all__ = ["soar_aux_states_reference"]
