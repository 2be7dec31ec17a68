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
import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["effective_shift", "pipeline_sigmas"]

#: Image tokens per latent of shape [.., h, w]: the families that pack 2x2 latent patches, FLUX.2 whose
#: model latents are already patchified, SD3 (patch size 2 in its transformer).
_PACKED = ("flux", "qwenimage", "zimage", "sd3")


def _scheduler(pipeline_dir: str | Path):
    import diffusers

    folder = Path(pipeline_dir) / "scheduler"
    config = folder / "scheduler_config.json"
    if not config.is_file():
        return None
    name = json.loads(config.read_text(encoding="utf-8"))["_class_name"]
    return getattr(diffusers, name).from_pretrained(folder, local_files_only=True)


def _mu(scheduler, family: str, num_steps: int, latent_shape: tuple[int, ...]) -> float | None:
    """The `mu` the family's pipeline passes its scheduler for this latent size (None: it passes none)."""
    c = scheduler.config
    h, w = latent_shape[-2:]
    tokens = (h // 2) * (w // 2) if family in _PACKED else h * w
    if family == "flux2":
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(tokens, num_steps)
    if family in ("flux", "qwenimage", "zimage") or (family == "sd3" and c.get("use_dynamic_shifting")):
        # calculate_shift of the pipelines (one formula, copied across them; SD3's default max_shift 1.16)
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.16 if family == "sd3" else 1.15)
        m = (top - base) / (max_len - base_len)
        return tokens * m + (base - m * base_len)
    return None


def pipeline_sigmas(pipeline_dir: str | Path, family: str, num_steps: int,
                    latent_shape: tuple[int, ...]) -> torch.Tensor | None:
    """σ `[num_steps + 1]` fp32 of the family's pipeline at this latent size (its `scheduler/` set as the
    pipeline sets it), or None when the folder has no scheduler config."""
    scheduler = _scheduler(pipeline_dir)
    if scheduler is None:
        return None
    mu = _mu(scheduler, family, num_steps, latent_shape)
    kw = {} if mu is None else {"mu": mu}
    if family in ("flux", "qwenimage", "zimage", "flux2"):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", **kw)
    else:  # SD3 (static shift, or mu where its config shifts dynamically), Wan (UniPC, flow_shift)
        scheduler.set_timesteps(num_steps, device="cpu", **kw)
    sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float32).flatten()
    return sigmas if sigmas.numel() == num_steps + 1 else None


def effective_shift(pipeline_dir: str | Path, family: str, num_steps: int, latent_shape: tuple[int, ...]) -> float | None:
    """The static shift the pipeline's schedule at this latent size amounts to: e^mu where its scheduler shifts
    by resolution (the exponential time shift σ = e^mu·u / (1 + (e^mu − 1)·u)), else the config's `shift`
    (`flow_shift` for UniPC); None without a scheduler. What `--soar.shift` should be for SOAR's rollout to
    step on the schedule inference uses."""
    scheduler = _scheduler(pipeline_dir)
    if scheduler is None:
        return None
    c = scheduler.config
    if c.get("use_dynamic_shifting"):
        mu = _mu(scheduler, family, num_steps, latent_shape)
        return math.exp(mu) if mu is not None and c.get("time_shift_type", "exponential") == "exponential" else None
    return float(c.get("shift") or c.get("flow_shift") or 1.0)
