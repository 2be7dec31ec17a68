"""Flux (diffusers `FluxTransformer2DModel`) as a SOAR `velocity_fn`.

What differs from SD3 (and is handled here): latents are packed into 2x2 patches
`[N, C, H, W] -> [N, (H/2)(W/2), 4C]` with positional ids per token (`img_ids`, `txt_ids`); the
timestep is σ itself (the pipeline divides by 1000); Flux-dev is guidance-distilled, so it takes
a `guidance` embedding instead of true CFG. The training passes embed FluxPipeline's default 3.5;
SOAR's rollout on Flux-dev is by default (`SoarConfig.rollout_guidance="auto"`) the distilled
velocity with `guidance_scale` in the embedding (one B pass, no unconditional branch), or true CFG
against the empty prompt with `rollout_guidance="cfg"`; schnell (no guidance embedding) and
de-distilled checkpoints take true CFG. Flux's flow direction is the same as SD3's (σ = 1 noise),
so the loss, targets and aux-state op are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FLUX_PRESETS", "FluxVelocityFn", "build_flux_transformer", "pack_latents", "unpack_latents"]

FLUX_PRESETS: dict[str, dict[str, Any]] = {
    # diffusers' own FluxTransformer2DModel test config
    "tiny": dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8), guidance_embeds=True,
    ),
    # black-forest-labs/FLUX.1-dev transformer/config.json (guidance-distilled: guidance_embeds);
    # FLUX.1-schnell is the same architecture without the guidance embedder.
    "flux1-dev": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56), guidance_embeds=True,
    ),
    "flux1-schnell": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56), guidance_embeds=False,
    ),
}


def build_flux_transformer(preset: str = "tiny", *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised `FluxTransformer2DModel` of a preset architecture (no download)."""
    from soar_fast.models.spec import FAMILIES

    if preset not in FLUX_PRESETS:
        raise ValueError(f"unknown Flux preset {preset!r}; choose one of {', '.join(FLUX_PRESETS)}")
    return FAMILIES["flux"].build(preset, seed=seed, **overrides)


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/2)(W/2), 4C], the token layout of FluxPipeline._pack_latents."""
    n, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}x{w}")
    z = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: [N, (H/2)(W/2), 4C] -> [N, C, H, W]."""
    n, _, d = tokens.shape
    c = d // 4
    z = tokens.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(n, c, h, w)


def _image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxVelocityFn:
    """`velocity_fn(z [N, C, H, W], sigma [N], (prompt_embeds [N, T, D], pooled [N, P][, reference [N, C, h, w]])) -> v`.

    FLUX.1 Kontext: a third condition tensor is the reference image's latents (normalised as `z`);
    as FluxKontextPipeline does, they are packed into tokens appended after the noisy latent's,
    with position ids whose first axis is 1, and the output keeps the noisy latent's tokens only.
    The reference is never dropped for CFG: the empty-prompt condition keeps each row's own.
    """

    def __init__(self, transformer: nn.Module, guidance: float | None = 3.5):
        self.transformer = transformer
        self.guidance = guidance if transformer.config.guidance_embeds else None

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        prompt_embeds, pooled = cond[0], cond[1]
        dtype = next(self.transformer.parameters()).dtype
        n, _, h, w = z.shape
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((n,), self.guidance, device=z.device, dtype=dtype)
        tokens, ids = pack_latents(z.to(dtype)), _image_ids(h, w, z.device, dtype)
        n_tokens = tokens.shape[1]
        if len(cond) > 2:  # Kontext: FluxKontextPipeline's cat([latents, image_latents]) and image_ids[..., 0] = 1
            ref = cond[2]
            ref_ids = _image_ids(ref.shape[-2], ref.shape[-1], z.device, dtype)
            ref_ids[:, 0] = 1
            tokens, ids = torch.cat([tokens, pack_latents(ref.to(dtype))], dim=1), torch.cat([ids, ref_ids])
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=sigma.to(dtype),
            img_ids=ids,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=z.device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, :n_tokens], h, w)
