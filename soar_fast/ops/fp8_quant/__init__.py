"""Fused FP8 (e4m3) quantisation of many weight tensors in one pass (the FP8 rollout's refresh)."""

from soar_fast.ops.fp8_quant.op import fp8_quantize_many
from soar_fast.ops.fp8_quant.reference import FP8_MAX, quantize_fp8_reference

__all__ = ["FP8_MAX", "fp8_quantize_many", "quantize_fp8_reference"]
