"""Fused SOAR loss: per-row weighted MSE against base and correction targets, with its backward."""

from soar_fast.ops.soar_mse.reference import (
    soar_fused_mse_and_grad_reference,
    soar_fused_mse_reference,
)

__all__ = ["soar_fused_mse_and_grad_reference", "soar_fused_mse_reference"]
