"""soar_fast: a performance-first trainer for SOAR post-training of rectified-flow MMDiT models."""

from soar_fast.config import ConfigError, SoarConfig
from soar_fast.loss import SoarDraws, SoarOutput, sample_draws, soar_loss, soar_loss_from_draws

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "SoarConfig",
    "SoarDraws",
    "SoarOutput",
    "__version__",
    "sample_draws",
    "soar_loss",
    "soar_loss_from_draws",
]
