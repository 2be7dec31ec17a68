"""The SOAR math: schedule and the eager reference loss."""

from soar_fast.loss.soar import (
    Cond,
    SoarDraws,
    SoarOutput,
    VelocityFn,
    sample_draws,
    soar_loss,
    soar_loss_from_draws,
)

__all__ = ["Cond", "SoarDraws", "SoarOutput", "VelocityFn", "sample_draws", "soar_loss", "soar_loss_from_draws"]
