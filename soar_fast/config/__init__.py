"""Typed configuration. The lowest room: imports nothing else of soar_fast."""

from soar_fast.config.errors import ConfigError
from soar_fast.config.soar import SoarConfig

__all__ = ["ConfigError", "SoarConfig"]
