"""Model adapters: diffusers MMDiT transformers as SOAR `velocity_fn`s, and preset configs."""

from soar_fast.models.flux import FLUX_PRESETS, FluxVelocityFn, build_flux_transformer
from soar_fast.models.sd3 import SD3_PRESETS, SD3VelocityFn, build_sd3_transformer, sd3_config

__all__ = [
    "FLUX_PRESETS",
    "SD3_PRESETS",
    "FluxVelocityFn",
    "SD3VelocityFn",
    "build_flux_transformer",
    "build_sd3_transformer",
    "sd3_config",
]
