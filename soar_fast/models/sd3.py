"""SD3 / SD3.5 MMDiT (diffusers `SD3Transformer2DModel`) as a SOAR `velocity_fn`, plus configs.

The condition is `(prompt_embeds [N, L, joint_attention_dim], pooled [N, pooled_projection_dim])`,
as `StableDiffusion3Pipeline.encode_prompt` returns them; the timestep is 1000·σ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SD3_PRESETS", "SD3VelocityFn", "build_sd3_transformer", "sd3_config"]

# Architecture presets. "tiny" is the config diffusers' own SD3 transformer tests use;
# "sd35-medium" is stabilityai/stable-diffusion-3.5-medium's transformer/config.json (random init).
SD3_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4,
    ),
    # "digits": the embedded CPU default (8x8 sklearn digits, pixels as latents): 2 blocks of width
    # 128, 1.1M parameters, sized so that pretraining + SFT + SOAR + eval fit 10 min on 2 cores.
    "digits": dict(
        sample_size=8, patch_size=1, in_channels=1, num_layers=2, attention_head_dim=32,
        num_attention_heads=4, caption_projection_dim=128, joint_attention_dim=64,
        pooled_projection_dim=64, out_channels=1, pos_embed_max_size=8,
    ),
    "sd35-medium": dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, caption_projection_dim=1536, joint_attention_dim=4096,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ),
    # stabilityai/stable-diffusion-3.5-large's transformer/config.json (38 heads x 64 = 2432 wide,
    # no dual-attention layers; the same in -large-turbo), as quoted by several public loaders.
    "sd35-large": dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, caption_projection_dim=2432, joint_attention_dim=4096,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
    ),
}


def sd3_config(preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """The constructor kwargs of a preset, with overrides. Raises on an unknown preset."""
    if preset not in SD3_PRESETS:
        raise ValueError(f"unknown SD3 preset {preset!r}; choose one of {', '.join(SD3_PRESETS)}")
    return {**SD3_PRESETS[preset], **overrides}


def build_sd3_transformer(preset: str = "tiny", *, seed: int | None = 0, device: str | torch.device | None = None,
                          **overrides: Any) -> nn.Module:
    """A randomly initialised `SD3Transformer2DModel` of a preset architecture (no download).

    `device` initialises the weights there (a GPU initialises the 2.2B-parameter SD3.5-Medium in
    well under a second; the CPU takes tens of seconds). The seed drives that device's generator."""
    from soar_fast.models.spec import FAMILIES

    sd3_config(preset)  # the one-line error of an unknown preset
    return FAMILIES["sd3"].build(preset, seed=seed, device=device, **overrides)


class SD3VelocityFn:
    """`velocity_fn(z [N, C, H, W], sigma [N], (prompt_embeds, pooled)) -> v [N, C, H, W]`.

    Inputs are cast to the transformer's dtype (or left to autocast when it is active); the
    output keeps the transformer's dtype and the loss upcasts it.
    """

    def __init__(self, transformer: nn.Module, timestep_scale: float = 1000.0):
        self.transformer = transformer
        self.timestep_scale = timestep_scale

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        prompt_embeds, pooled = cond
        dtype = _param_dtype(self.transformer)
        return self.transformer(
            hidden_states=z.to(dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=(self.timestep_scale * sigma).to(dtype),
            return_dict=False,
        )[0]


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
