"""Validation images of a run on a latent cache (diffusers' `log_validation` habit).

The cache's validation prompts (`soar-fast cache ... --validation_prompts FILE`) are sampled with
fixed noise (its own generator: the training RNG and the data sampler are untouched, so a run
resumes bitwise across a validation) through the family's velocity and the Euler/CFG sampler on
the pipeline's own σ schedule at that size (`models.schedules`) on latents (FLUX.1 Kontext: each
edit of its input image, the inputs shown in the grid's first row).
Every rank runs the sharded model on the same noise (the FSDP2 forward is collective); rank 0
alone loads the VAE of the pipeline folder the cache was made from (kept on the CPU between
validations), decodes, writes `samples/step-XXXXXX.png`, the TensorBoard image and the
validation's cost in seconds (TensorBoard `validation/seconds` and `samples/validation.jsonl`;
metrics.jsonl keeps one row per step).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from soar_fast.config import ConfigError
from soar_fast.eval.grid import make_grid, save_png
from soar_fast.eval.sampler import euler_sample
from soar_fast.models.schedules import effective_shift, pipeline_sigmas

__all__ = ["LatentValidation", "decode_latents", "note_schedule_shift"]

log = logging.getLogger(__name__)


def decode_latents(vae, family: str, z: torch.Tensor) -> torch.Tensor:
    """The family's model latents `[N, C, h, w]` (Wan: `[N, C, f, h, w]`, its first frame shown) -> images
    `[N, 3, H, W]` in [-1, 1] (the inverse of the cache's encode)."""
    z = z.to(vae.device, vae.dtype)
    if family == "qwenimage":
        from soar_fast.models.qwenimage import latents_to_vae

        x = vae.decode(latents_to_vae(vae, z)).sample[:, :, 0]
    elif family == "flux2":
        from soar_fast.models.flux2 import latents_to_vae

        x = vae.decode(latents_to_vae(vae, z)).sample
    elif family == "wan":  # video [N, C, f, h, w]; the grid shows frame 0
        from soar_fast.models.wan import latents_to_vae

        x = vae.decode(latents_to_vae(vae, z)).sample[:, :, 0]
    else:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        x = vae.decode(z / vae.config.scaling_factor + shift).sample
    return x.float().clamp(-1, 1).cpu()


class LatentValidation:
    """Built by `maybe(...)` when a latent-cache run asks for validation images."""

    def __init__(self, prompts: list[str], cond: tuple[torch.Tensor, ...], shape: tuple[int, ...], pipeline: str,
                 family: str, reference: bool = False, sigmas: torch.Tensor | None = None):
        self.prompts, self.cond, self.shape, self.pipeline, self.family = prompts, cond, shape, pipeline, family
        self.reference = reference  # FLUX.1 Kontext: cond[-1] holds the input images; the grid shows them first
        self.sigmas = sigmas  # the pipeline's σ schedule at this size (`models.schedules`); None: SOAR's shift
        self.vae: Any = None

    @classmethod
    def maybe(cls, cfg, dataset) -> LatentValidation | None:
        """None unless `data.source='latents'` and `validation_steps > 0`; a one-line ConfigError when the
        cache holds no validation prompts or its pipeline folder is gone."""
        lc = cfg.logging
        if cfg.data.source != "latents" or not lc.validation_steps or not lc.validation_images_per_class:
            return None
        where = dataset.cache_dir
        kontext = getattr(dataset, "has_reference", False)
        val = dataset.validation()
        if val is None or (kontext and len(val[1]) < len(dataset.uncond())):
            what = "edits (prompts with input images)" if kontext else "prompts"
            file = "EDITS.jsonl" if kontext else "FILE"
            raise ConfigError(f"--validation_steps {lc.validation_steps}: the latent cache {where} holds no validation "
                              f"{what}; re-run `soar-fast cache ... --output_dir {where} --validation_prompts {file}` "
                              "(it keeps the shards) or pass --validation_steps 0")
        info = dataset.info
        pipeline = info.get("pipeline") or ""
        if not (Path(pipeline) / "model_index.json").is_file():
            alt = cfg.model.pretrained_model_name_or_path
            if alt and (Path(alt) / "model_index.json").is_file():
                pipeline = alt
            else:
                raise ConfigError(f"--validation_steps: the pipeline folder {pipeline!r} the cache {where} was made "
                                  "from is gone (its VAE decodes the images); restore it or pass --validation_steps 0")
        # Kontext edits come out at their input image's size (the reference latents' shape)
        shape = tuple(val[1][-1].shape[1:]) if kontext else tuple(dataset.sample_shape)
        family = info.get("family", "sd3")
        try:  # the pipeline's own schedule at this size
            sigmas = pipeline_sigmas(pipeline, family, lc.validation_inference_steps, shape)
        except Exception as e:  # noqa: BLE001 - an unreadable scheduler: SOAR's shift, said once
            log.warning("validation: cannot set up %s's scheduler (%s); sampling on --soar.shift's schedule",
                        pipeline, str(e).splitlines()[0] if str(e) else type(e).__name__)
            sigmas = None
        return cls(val[0], val[1], shape, pipeline, family, kontext, sigmas)

    def _load_vae(self):
        if self.vae is None:
            import diffusers

            index = json.loads((Path(self.pipeline) / "model_index.json").read_text())
            cls_name = index.get("vae", [None, "AutoencoderKL"])[1]
            self.vae = getattr(diffusers, cls_name).from_pretrained(
                self.pipeline, subfolder="vae", local_files_only=True, torch_dtype=torch.float32).eval()
            self.vae.requires_grad_(False)
        return self.vae

    @torch.no_grad()
    def run(self, velocity_fn, uncond: tuple[torch.Tensor, ...], *, step: int, cfg, device: torch.device,
            is_main: bool, logger, out: Path, distilled: bool = False) -> Path | None:
        """Collective: sample on every rank; rank 0 decodes and writes. Returns the PNG's path on rank 0.
        `distilled`: `velocity_fn` carries the guidance in the model's embedding (FLUX.1-dev, FLUX.2-dev, as
        their pipelines sample): one conditional pass a step, no CFG on top."""
        lc, t0 = cfg.logging, time.perf_counter()
        k, reps = len(self.prompts), lc.validation_images_per_class
        g = torch.Generator().manual_seed(cfg.runtime.seed)
        z1 = torch.randn(k * reps, *self.shape, generator=g).to(device)
        cond = tuple(t.repeat(reps, *([1] * (t.dim() - 1))).to(device) for t in self.cond)
        z0 = euler_sample(velocity_fn, z1, cond, uncond, num_steps=lc.validation_inference_steps,
                          guidance_scale=1.0 if distilled else lc.validation_guidance_scale, shift=cfg.soar.shift,
                          sigmas=self.sigmas,
                          batch_size=cfg.optim.train_batch_size)
        if not is_main:
            return None
        vae = self._load_vae().to(device)
        try:
            rows = torch.cat([self.cond[-1].to(device), z0]) if self.reference else z0  # inputs, then edits
            imgs = torch.cat([decode_latents(vae, self.family, rows[i : i + 1]) for i in range(rows.shape[0])])
        finally:
            self.vae = vae.to("cpu")
        grid = make_grid(imgs, nrow=k, scale=1, pad=2)
        logger.image("samples", grid, step)
        path = save_png(grid, out / "samples" / f"step-{step:06d}.png")
        seconds = time.perf_counter() - t0
        tb = getattr(logger, "tb", None)
        if tb is not None:
            tb.add_scalar("validation/seconds", seconds, step)
        with open(out / "samples" / "validation.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "seconds": seconds, "prompts": self.prompts}) + "\n")
        return path


def note_schedule_shift(cfg, dataset) -> None:
    """One log line when the cache's pipeline samples its latents' size with another shift than `soar.shift`
    (FLUX.1, FLUX.2, Qwen-Image, Z-Image shift by resolution): the rollout then steps on another schedule."""
    info = getattr(dataset, "info", {}) if cfg.data.source == "latents" else {}
    if not (info.get("pipeline") and Path(info["pipeline"]).is_dir()):
        return
    try:
        s = effective_shift(info["pipeline"], info.get("family", "sd3"), cfg.soar.rollout_steps,
                            tuple(dataset.sample_shape))
    except Exception:  # noqa: BLE001 - a note only: never stops a run
        return
    if s is not None and abs(s - cfg.soar.shift) > 0.1 * s:
        log.warning("the %s pipeline samples %s latents on a schedule of shift %.2f but --soar.shift is %.2f: SOAR's "
                    "rollout steps where inference does with --soar.shift %.2f", info.get("family"),
                    "x".join(map(str, dataset.sample_shape[-2:])), s, cfg.soar.shift, s)
