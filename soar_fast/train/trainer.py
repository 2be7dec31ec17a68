"""The training loop: SFT (num_aux=0) and SOAR through the same code, resumable bitwise on CPU.

Every random draw of a step comes from `self.generator` (the SOAR draws) and `self.sampler` (the
data order, a pure function of seed and position), both saved in checkpoints; the LR is a pure
function of the step. So N steps == N/2 steps + resume + N/2 steps, bit for bit, on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soar_fast.config import ConfigError, TrainConfig, config_from_dict, save_config_json
from soar_fast.data import ResumableSampler, build_dataset
from soar_fast.eval.grid import make_grid, save_png
from soar_fast.eval.sampler import generate_digits
from soar_fast.models import SD3VelocityFn
from soar_fast.train.build import build_loss_step, build_model, build_optimizer, learning_rate_at
from soar_fast.train.checkpoint import (
    find_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from soar_fast.train.ema import EMA
from soar_fast.train.logger import MetricsLogger

__all__ = ["TrainResult", "Trainer", "TrainingAborted", "check_output_dir"]

log = logging.getLogger(__name__)
_GEN_SEED_OFFSET = 7919  # the step generator's seed differs from the data order's


class TrainingAborted(RuntimeError):
    """The run stopped on purpose (e.g. a NaN streak); the message says why and what to change."""


@dataclass
class TrainResult:
    step: int
    interrupted: bool = False
    nan_skipped: int = 0
    wall_time_s: float = 0.0
    steps_per_s: float = 0.0
    last_checkpoint: str | None = None
    final_model: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse to start a fresh run in a folder that holds another run's checkpoints or model."""
    out = Path(cfg.runtime.output_dir)
    if cfg.checkpoint.resume_from_checkpoint is not None:
        return
    ckpts = find_checkpoints(out / "checkpoints")
    if ckpts or (out / "final").exists():
        what = f"{len(ckpts)} checkpoint(s)" if ckpts else "a final model"
        raise ConfigError(f"output_dir {str(out)!r} already holds another run ({what}); pass "
                          "--resume_from_checkpoint latest (or --resume) to continue it, or choose a new --output_dir")


class Trainer:
    """Builds model, data, optimizer, EMA and loss step from a `TrainConfig`, then `train()`s."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        check_output_dir(cfg)
        rt = cfg.runtime
        if rt.num_threads:
            torch.set_num_threads(rt.num_threads)
        random.seed(rt.seed)
        np.random.seed(rt.seed)
        torch.manual_seed(rt.seed)
        self.device = torch.device(rt.device)
        self.out = Path(rt.output_dir)

        # Construction in one place (build.py): a distributed/compiled path wraps these.
        self.model = build_model(cfg.model).to(self.device)
        self.model.train()
        mc = self.model.config
        self.dataset = build_dataset(cfg.data, joint_attention_dim=mc.joint_attention_dim,
                                     pooled_projection_dim=mc.pooled_projection_dim)
        if tuple(self.dataset.sample_shape)[0] != mc.in_channels:
            raise ConfigError(f"the data has {self.dataset.sample_shape[0]} channels but the model takes "
                              f"{mc.in_channels}; pick a matching --model.preset or data.source")
        self.sampler = ResumableSampler(len(self.dataset), cfg.optim.train_batch_size, rt.seed)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.use_ema else None
        self.generator = torch.Generator(self.device).manual_seed(rt.seed + _GEN_SEED_OFFSET)
        self.loss_step = build_loss_step(rt.step, self.model, cfg.soar, cfg.fast)
        self._step_backprops = bool(getattr(self.loss_step, "performs_backward", False))
        self._after_opt_step = getattr(self.loss_step, "after_optimizer_step", None)
        self.uncond = tuple(t.to(self.device) for t in self.dataset.uncond())
        self.step, self.nan_skipped, self.nan_streak = 0, 0, 0
        self._stop_signal: int | None = None

        resumed_from = self._maybe_resume()
        self.out.mkdir(parents=True, exist_ok=True)
        self._note_config_change()
        save_config_json(cfg, self.out / "config.json")
        self.logger = MetricsLogger(self.out, cfg.logging.report_to,
                                    resume_step=self.step if resumed_from else None)

    # --- resume ------------------------------------------------------------------------------
    def _maybe_resume(self) -> Path | None:
        resume = self.cfg.checkpoint.resume_from_checkpoint
        if resume is None:
            return None
        candidates = resolve_resume(resume, self.out / "checkpoints")
        if not candidates:
            log.info("no checkpoint in %s yet; starting a new run", self.out / "checkpoints")
            return None
        path, state = load_checkpoint(candidates, model=self.model, optimizer=self.optimizer,
                                      generator=self.generator, ema=self.ema)
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.nan_skipped = int(state.get("nan_skipped", 0))
        self.nan_streak = int(state.get("nan_streak", 0))
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def _note_config_change(self) -> None:
        old = self.out / "config.json"
        if not old.exists():
            return
        with contextlib.suppress(Exception):
            prev = config_from_dict(TrainConfig(), json.loads(old.read_text()))
            if prev.model != self.cfg.model or prev.soar != self.cfg.soar or prev.data != self.cfg.data:
                log.warning("the config differs from the one in %s (model/data/soar); continuing with the new one", old)
            old.replace(self.out / "config.prev.json")

    # --- one optimizer step ----------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.runtime.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """Accumulate `gradient_accumulation_steps` micro-batches, clip, step (or skip on NaN/inf)."""
        oc = self.cfg.optim
        lr = learning_rate_at(self.step, oc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = True
        for _ in range(oc.gradient_accumulation_steps):
            z0, cond, _labels = self.dataset.batch(self.sampler.next_indices())
            z0 = z0.to(self.device)
            cond = tuple(t.to(self.device) for t in cond)
            scale = 1.0 / oc.gradient_accumulation_steps
            with self._autocast():
                if self._step_backprops:  # a fused step accumulates its own (scaled) gradients
                    out = self.loss_step(z0, cond, self.uncond, self.generator, grad_scale=scale)
                else:
                    out = self.loss_step(z0, cond, self.uncond, self.generator)
            if not torch.isfinite(out.loss).item():
                finite = False
                continue  # keep drawing the other micro-batches: data position and draws stay aligned
            if not self._step_backprops:
                (out.loss * scale).backward()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v / oc.gradient_accumulation_steps
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = oc.max_grad_norm if oc.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if finite and math.isfinite(grad_norm):
            self.optimizer.step()
            if self._after_opt_step is not None:  # e.g. re-quantise a fast step's FP8 rollout weights
                self._after_opt_step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.nan_streak = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nan_skipped += 1
            self.nan_streak += 1
            log.warning("step %d: non-finite %s, step skipped (%d skipped so far, streak %d of %d)",
                        self.step + 1, "loss" if not finite else "gradient", self.nan_skipped,
                        self.nan_streak, oc.max_nan_streak)
        self.step += 1
        if self.nan_streak >= oc.max_nan_streak:
            raise TrainingAborted(
                f"aborted at step {self.step}: {self.nan_streak} consecutive steps had a NaN/inf loss or gradient; "
                f"lower --learning_rate, use --mixed_precision no, or check the data (last good checkpoint kept)")
        return {**sums, "grad_norm": grad_norm, "lr": lr, "nan_skipped": float(self.nan_skipped)}

    # --- checkpoints, grids, final model --------------------------------------------------------------
    def save(self) -> Path:
        state = {"sampler": self.sampler.state_dict(), "nan_skipped": self.nan_skipped,
                 "nan_streak": self.nan_streak, "recipe": self.cfg.recipe}
        return save_checkpoint(self.out / "checkpoints", self.step, model=self.model, optimizer=self.optimizer,
                               generator=self.generator, state=state,
                               ema=self.ema.state_dict() if self.ema is not None else None,
                               total_limit=self.cfg.checkpoint.checkpoints_total_limit)

    def sample_grid(self) -> Path | None:
        """A grid (rows: images per class, columns: classes) from a fixed noise seed; PNG + TensorBoard."""
        lc = self.cfg.logging
        n_cls = getattr(self.dataset, "num_classes", 0)
        if not n_cls or lc.validation_images_per_class == 0:
            return None
        labels = torch.arange(n_cls).repeat(lc.validation_images_per_class)
        was_training = self.model.training
        self.model.eval()
        with self._autocast():
            imgs = generate_digits(SD3VelocityFn(self.model), self.dataset, labels,
                                   num_steps=lc.validation_inference_steps, guidance_scale=lc.validation_guidance_scale,
                                   shift=self.cfg.soar.shift, seed=self.cfg.runtime.seed, device=self.device)
        self.model.train(was_training)
        grid = make_grid(imgs, nrow=n_cls)
        self.logger.image("samples", grid, self.step)
        return save_png(grid, self.out / "samples" / f"step-{self.step:06d}.png")

    def save_final_model(self) -> Path:
        """`<output_dir>/final/transformer` (+ `transformer_ema`) as diffusers folders, atomically; with
        LoRA (`--model.lora_rank >= 1`) `final/pytorch_lora_weights.safetensors` instead (+ `final/ema/`),
        loadable by `StableDiffusion3Pipeline.load_lora_weights(<output_dir>/final)`."""
        final, tmp = self.out / "final", self.out / f".tmp-final-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        lora = bool(self.cfg.model.lora_rank)
        if lora:
            from soar_fast.models.lora import save_lora_weights

            save_lora_weights(self.model, tmp)
        else:
            self.model.save_pretrained(tmp / "transformer")
        if self.ema is not None:
            backup = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            self.ema.copy_to(self.model)
            if lora:
                save_lora_weights(self.model, tmp / "ema")
            else:
                self.model.save_pretrained(tmp / "transformer_ema")
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.copy_(backup[n])
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final

    # --- the loop --------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    def train(self) -> TrainResult:
        cfg, oc, lc = self.cfg, self.cfg.optim, self.cfg.logging
        # Signals can only be caught in the main thread; elsewhere (a notebook worker) they keep their default.
        old = ({s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
               if threading.current_thread() is threading.main_thread() else {})
        bar = None
        if lc.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=oc.max_train_steps, initial=self.step, desc=cfg.recipe, unit="step", dynamic_ncols=True)
        result = TrainResult(step=self.step)
        start_step, t0 = self.step, time.perf_counter()
        win_t, win_steps = t0, 0
        try:
            while self.step < oc.max_train_steps and self._stop_signal is None:
                metrics = self.train_step()
                win_steps += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                    aux=f"{metrics.get('aux_loss', 0.0):.4f}", refresh=False)
                if self.step % lc.logging_steps == 0 or self.step == oc.max_train_steps:
                    now = time.perf_counter()
                    sps = win_steps / max(now - win_t, 1e-9)
                    win_t, win_steps = now, 0
                    samples = oc.train_batch_size * oc.gradient_accumulation_steps
                    scalars = {f"train/{k}": v for k, v in metrics.items()}
                    scalars.update({"perf/steps_per_s": sps, "perf/samples_per_s": sps * samples,
                                    "perf/epoch": self.sampler.epoch})
                    self.logger.log(self.step, scalars)
                    result.metrics = metrics
                if cfg.checkpoint.checkpointing_steps and self.step % cfg.checkpoint.checkpointing_steps == 0:
                    result.last_checkpoint = str(self.save())
                if lc.validation_steps and self.step % lc.validation_steps == 0:
                    self.sample_grid()
            wall = time.perf_counter() - t0
            result.step, result.nan_skipped, result.wall_time_s = self.step, self.nan_skipped, wall
            result.steps_per_s = (self.step - start_step) / max(wall, 1e-9)
            if self._stop_signal is not None:
                result.interrupted = True
                result.last_checkpoint = str(self.save())
                return result
            if result.last_checkpoint is None or not result.last_checkpoint.endswith(f"-{self.step}"):
                result.last_checkpoint = str(self.save())
            if not (lc.validation_steps and self.step % lc.validation_steps == 0):
                self.sample_grid()  # the final grid, unless the loop just wrote it
            if cfg.checkpoint.save_final_model:
                result.final_model = str(self.save_final_model())
            (self.out / "train_summary.json").write_text(json.dumps(result.__dict__, indent=1))
            return result
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            self.logger.close()
