"""The σ schedule each family's diffusers pipeline samples with, for our own Euler sampler (validation).

A pipeline sets its scheduler per call: FluxPipeline, QwenImagePipeline and ZImagePipeline pass
`sigmas = linspace(1, 1/N, N)` and a resolution-dependent `mu = calculate_shift(image tokens, ...)`
(the scheduler config's base/max shift; used where `use_dynamic_shifting`), Flux2Pipeline the same
sigmas with `mu = compute_empirical_mu(image tokens, N)`, StableDiffusion3Pipeline and WanPipeline
`set_timesteps(N)` (static `shift` / `flow_shift`; SD3 with `mu` where its config shifts
dynamically). `pipeline_sigmas` loads `<pipeline>/scheduler`, sets it as the pipeline does for a
latent of the given shape and returns its σ_0 = 1 > ... > σ_N = 0. The Euler steps on them are the
pipeline's own for the flow-match schedulers; WanPipeline's UniPC is a multistep solver on the same
σs, so there the validation sampler is an Euler approximation of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

__all__ = ["pipeline_sigmas"]

#: Image tokens per latent of shape [.., h, w]: the families that pack 2x2 latent patches, FLUX.2 whose
#: model latents are already patchified, SD3 (patch size 2 in its transformer).
_PACKED = ("flux", "qwenimage", "zimage", "sd3")


def pipeline_sigmas(pipeline_dir: str | Path, family: str, num_steps: int,
                    latent_shape: tuple[int, ...]) -> torch.Tensor | None:
    """σ `[num_steps + 1]` fp32 of the family's pipeline at this latent size (its `scheduler/` set as the
    pipeline sets it), or None when the folder has no scheduler config."""
    import diffusers

    folder = Path(pipeline_dir) / "scheduler"
    config = folder / "scheduler_config.json"
    if not config.is_file():
        return None
    scheduler = getattr(diffusers, json.loads(config.read_text(encoding="utf-8"))["_class_name"]).from_pretrained(
        folder, local_files_only=True)
    c = scheduler.config
    h, w = latent_shape[-2:]
    tokens = (h // 2) * (w // 2) if family in _PACKED else h * w

    def shift_mu() -> float:  # calculate_shift of the pipelines (one formula, copied across them)
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.16 if family == "sd3" else 1.15)
        m = (top - base) / (max_len - base_len)
        return tokens * m + (base - m * base_len)

    if family in ("flux", "qwenimage", "zimage", "flux2"):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        mu = compute_empirical_mu(tokens, num_steps) if family == "flux2" else shift_mu()
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", mu=mu)
    elif family == "sd3" and c.get("use_dynamic_shifting"):
        scheduler.set_timesteps(num_steps, device="cpu", mu=shift_mu())
    else:  # SD3 (static shift), Wan (UniPC, flow_shift)
        scheduler.set_timesteps(num_steps, device="cpu")
    sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float32).flatten()
    return sigmas if sigmas.numel() == num_steps + 1 else None
