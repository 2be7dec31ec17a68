"""The SOAR math: schedule, the draws (one owner of the RNG) and the eager reference loss."""

from soar_fast.loss.draws import SoarDraws, assemble_draws, draw_key, keyed_draws, sample_draws
from soar_fast.loss.soar import (
    Cond,
    SoarOutput,
    VelocityFn,
    soar_loss,
    soar_loss_from_draws,
)

__all__ = ["Cond", "SoarDraws", "SoarOutput", "VelocityFn", "assemble_draws", "draw_key", "keyed_draws",
           "sample_draws", "soar_loss", "soar_loss_from_draws"]
