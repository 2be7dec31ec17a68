"""Fused ops: each a pure-torch reference, a Triton kernel and a native op, behind one dispatch."""

from soar_fast.ops.dispatch import BACKENDS, resolve_backend, soar_aux_states

__all__ = ["BACKENDS", "resolve_backend", "soar_aux_states"]
