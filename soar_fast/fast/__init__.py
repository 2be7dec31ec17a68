"""Fast paths of the SOAR step: batched passes, rollout engine (CUDA graph, FP8), compile, attention."""

from soar_fast.fast.rollout import RolloutEngine
from soar_fast.fast.step import batched_soar_step, row_coefficients

__all__ = ["RolloutEngine", "batched_soar_step", "row_coefficients"]
