"""The training loop: SFT (num_aux=0) and SOAR, one path from 1 process to N ranks.

A plain process is world size 1 of the same code (`init_distributed` gives it a one-rank group):
the model is built by its family spec, converted and FSDP2-wrapped by `build_train_step`, fed by
the rank-split resumable sampler through one DataLoader (`BatchStream`: workers, pinned memory,
prefetch; the checkpointed position is that of the batches consumed), and every SOAR draw is
keyed by (seed, step, global sample index). So a 1-process run with global batch G equals an
N-rank run with G/N per rank, step for step, and N steps == N/2 steps + resume + N/2 steps at any
world size. `train_batch_size` is per rank. Only rank 0 writes logs, samples and the run folder's
files; checkpoints and the export are collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from soar_fast.config import ConfigError, TrainConfig, config_from_dict, save_config_json
from soar_fast.data import BatchStream, ResumableSampler, build_dataset, default_num_workers
from soar_fast.distributed import barrier, cleanup, init_distributed
from soar_fast.eval.grid import make_grid, save_png
from soar_fast.eval.sampler import generate_digits
from soar_fast.loss.cond import to_device
from soar_fast.train.build import build_model
from soar_fast.train.checkpoint import (
    checkpoint_step,
    clean_partial_checkpoints,
    find_checkpoints,
    legacy_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    set_aside_checkpoints,
)
from soar_fast.train.export import export_final
from soar_fast.train.logger import MetricsLogger
from soar_fast.train.step import StepResult, build_train_step
from soar_fast.train.validation import LatentValidation, note_schedule_shift

__all__ = ["TrainResult", "Trainer", "TrainingAborted", "check_output_dir"]

log = logging.getLogger(__name__)


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
    root = out / "checkpoints"
    ckpts = find_checkpoints(root) or legacy_checkpoints(root) or sorted(root.glob("nan-step_*"))  # set aside
    if ckpts or (out / "final").exists():
        what = f"{len(ckpts)} checkpoint(s)" if ckpts else "a final model"
        raise ConfigError(f"output_dir {str(out)!r} already holds another run ({what}); pass "
                          "--resume_from_checkpoint latest (or --resume) to continue it, or choose a new --output_dir")


def _lost_peer(err: BaseException) -> bool:
    """A collective failed because a peer died or hung past the timeout (gloo / NCCL errors)."""
    text = str(err)
    return isinstance(err, dist.DistError) or any(k in text for k in ("gloo", "NCCL", "Connection", "imed out"))


class _NullLogger:
    """The logger of ranks other than 0: writes nothing."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def image(self, tag: str, array: Any, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Builds model, data and the train step from a `TrainConfig`, then `train()`s (any world size)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        check_output_dir(cfg)
        rt = cfg.runtime
        if rt.num_threads:
            torch.set_num_threads(rt.num_threads)
        random.seed(rt.seed)
        np.random.seed(rt.seed)
        torch.manual_seed(rt.seed)
        self.out = Path(rt.output_dir)
        self.env = init_distributed(cfg.parallel, rt.device)
        self.device = self.env.device
        self.is_main = self.env.rank == 0
        if self.is_main:  # debris of a checkpoint write that was killed, before anyone looks for checkpoints
            clean_partial_checkpoints(self.out / "checkpoints")
        barrier()
        self.family, model = build_model(cfg.model)
        mc = model.config
        channels = self.family.latent_channels(mc)
        text_dim, pooled_dim = self.family.text_dims(mc)
        self.dataset = build_dataset(cfg.data, joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim,
                                     latent_channels=channels)
        video, want = len(self.dataset.sample_shape) == 4, getattr(self.family.velocity, "latent_ndim", 4) == 5
        if video != want:  # one latent rank per family: [C, F, H, W] video (wan) or [C, H, W] images
            raise ConfigError(f"the data holds {'video' if video else 'image'} latents {tuple(self.dataset.sample_shape)} "
                              f"but model.family={self.family.name!r} takes {'video' if want else 'images'}; "
                              + ("set --data.latent_frames (e.g. 2) or cache videos" if want else
                                 "drop --data.latent_frames or pick a video family (wan)"))
        if tuple(self.dataset.sample_shape)[0] != channels:
            raise ConfigError(f"the data has {self.dataset.sample_shape[0]} channels but the model takes "
                              f"{channels}; pick a matching --model.preset or data.source")
        got = tuple(int(t.shape[-1]) for t in self.dataset.uncond()[:2])  # (text, pooled); a mask may follow
        if got != (text_dim, pooled_dim):  # e.g. a cache made with another text encoder
            raise ConfigError(f"the data's text embeddings are {got[0]} wide (pooled {got[1]}) but the model takes "
                              f"{text_dim} (pooled {pooled_dim}); cache the data with this model's pipeline, or pick "
                              "the model it was cached for")
        self.validation = LatentValidation.maybe(cfg, self.dataset)  # latent caches: their validation prompts
        if self.is_main:
            note_schedule_shift(cfg, self.dataset)
        self.sampler = ResumableSampler(len(self.dataset), cfg.optim.train_batch_size, rt.seed, rank=self.env.rank,
                                        world_size=self.env.world_size, groups=getattr(self.dataset, "groups", None))
        dc = cfg.data
        workers = default_num_workers(dc.source) if dc.num_workers is None else dc.num_workers
        self.batches = BatchStream(self.dataset, self.sampler, num_workers=workers, prefetch_factor=dc.prefetch_factor,
                                   pin_memory=self.device.type == "cuda")
        self.step_fn = build_train_step(self.family, model, cfg, self.env)
        self.model = self.step_fn.model
        self.uncond = to_device(self.dataset.uncond(), self.device)
        self.step, self.nan_skipped, self.nan_streak = 0, 0, 0
        self._stop_signal: int | None = None

        resumed_from = self._maybe_resume()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._note_config_change()
            save_config_json(cfg, self.out / "config.json")
            self.logger = MetricsLogger(self.out, cfg.logging.report_to,
                                        resume_step=self.step if resumed_from else None)
        else:
            self.logger = _NullLogger()

    # --- resume ------------------------------------------------------------------------------
    def _maybe_resume(self) -> Path | None:
        resume = self.cfg.checkpoint.resume_from_checkpoint
        if resume is None:
            return None
        candidates = resolve_resume(resume, self.out / "checkpoints")
        if not candidates:
            if self.is_main:
                log.info("no checkpoint in %s yet; starting a new run", self.out / "checkpoints")
            return None
        path, state = load_checkpoint(candidates, model=self.model, optimizer=self.step_fn.optimizer,
                                      ema=self.step_fn.ema, lora_rank=self.cfg.model.lora_rank)
        self.step_fn.refresh_rollout()
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.nan_skipped, self.nan_streak = int(state.get("nan_skipped", 0)), int(state.get("nan_streak", 0))
        if self.is_main:
            log.info("resumed from %s at step %d (written by %s rank(s), now %d)", path, self.step,
                     state.get("world_size", "?"), self.env.world_size)
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
    def micro_batches(self) -> list[tuple[torch.Tensor, Any, list[int]]]:
        """This rank's `gradient_accumulation_steps` micro-batches of the next global batch, each
        with its rows' indices in the step's global batch (over micro-batches, then ranks)."""
        b, w, r = self.cfg.optim.train_batch_size, self.env.world_size, self.env.rank
        out = []
        for k in range(self.cfg.optim.gradient_accumulation_steps):
            idx, (z0, cond, _labels) = next(self.batches)  # advances self.sampler by what is consumed
            cond = to_device(cond, self.device, non_blocking=True)
            first = (k * w + r) * b
            out.append((z0.to(self.device, non_blocking=True), cond, list(range(first, first + len(idx)))))
        return out

    def train_step(self) -> StepResult:
        """One optimizer step (accumulation, clip, NaN/inf skip agreed by all ranks, EMA, refresh)."""
        result = self.step_fn(self.step, self.micro_batches(), self.uncond, stop=self._stop_signal is not None)
        self.step += 1
        if result.applied:
            self.nan_streak = 0
        else:
            self.nan_skipped += 1
            self.nan_streak += 1
            if self.is_main:
                log.warning("step %d: non-finite loss or gradient, step skipped (%d skipped so far, streak %d of %d)",
                            self.step, self.nan_skipped, self.nan_streak, self.cfg.optim.max_nan_streak)
        if self.nan_streak >= self.cfg.optim.max_nan_streak:
            raise TrainingAborted(self._nan_abort_message())
        return result

    def _nan_abort_message(self) -> str:
        """The one line of a NaN/inf abort. Skipped steps leave the weights alone, so every step of the
        streak ran on the weights of the step before it: resuming from those (same batches, same draws)
        would fail the same way. Rank 0 sets their checkpoints aside (`nan-step_*`) so that 'latest'
        resumes from the last weights that still made a finite step."""
        root = self.out / "checkpoints"
        suspect = self.step - self.nan_streak  # the step whose weights the whole streak ran on
        good = [p for p in find_checkpoints(root) if checkpoint_step(p) < suspect]
        moved = set_aside_checkpoints(root, suspect) if self.is_main else []
        aside = "".join(f"; set aside {p.name.removeprefix('nan-')} as {p.name} (it holds those weights)" for p in moved)
        last = f"last good checkpoint {good[0]}" if good else "no good checkpoint yet (a resume starts from step 0)"
        lr = self.cfg.optim.learning_rate
        return (f"aborted at step {self.step}: {self.nan_streak} consecutive steps had a NaN/inf loss or gradient "
                f"on the weights of step {suspect}{aside}; {last}; continue with a lower --learning_rate: "
                f"`soar-fast train ... --output_dir {self.out} --resume_from_checkpoint latest --learning_rate {lr / 10:g}`"
                " (or use --mixed_precision no, or check the data)")

    # --- checkpoints, grids, final model --------------------------------------------------------------
    def save(self) -> Path:
        """Collective: a checkpoint of every rank's shards at the current step."""
        state = {"sampler": self.sampler.state_dict(), "nan_skipped": self.nan_skipped,
                 "nan_streak": self.nan_streak, "recipe": self.cfg.recipe}
        return save_checkpoint(self.out / "checkpoints", self.step, model=self.model,
                               optimizer=self.step_fn.optimizer, ema=self.step_fn.ema, state=state,
                               lora_rank=self.cfg.model.lora_rank, keep=self.cfg.checkpoint.checkpoints_total_limit)

    def _save_unless_nan(self, last: str | None) -> str | None:
        """Collective: `save()`, except during a NaN/inf streak (nothing is written: the weights
        are the ones the streak runs on, and rotating them in would drop an older good checkpoint).
        Returns the newest checkpoint's path."""
        if not self.nan_streak:
            return str(self.save())
        if self.is_main:
            log.warning("step %d: no checkpoint during a NaN/inf streak (%d steps); the last good one stays newest",
                        self.step, self.nan_streak)
        newest = find_checkpoints(self.out / "checkpoints")
        return str(newest[0]) if newest else last

    def sample_grid(self) -> Path | None:
        """A grid (rows: images per class, columns: classes) from a fixed noise seed; PNG + TensorBoard.
        Collective (every rank runs the sharded model on the same noise); rank 0 writes it."""
        lc = self.cfg.logging
        if self.validation is not None:  # a latent cache's validation prompts (train/validation.py)
            self.model.eval()
            # a distilled model samples as its pipeline does: the scale in the guidance embedding, no CFG pass
            distilled = self.step_fn.rollout_guidance == "distilled"
            vf = (self.family.velocity(self.model, guidance=lc.validation_guidance_scale) if distilled
                  else self.family.velocity(self.model))
            with torch.random.fork_rng(devices=[]):
                path = self.validation.run(vf, self.uncond, step=self.step, cfg=self.cfg, device=self.device,
                                           is_main=self.is_main, logger=self.logger, out=self.out, distilled=distilled)
            self.model.train()
            return path
        n_cls = getattr(self.dataset, "num_classes", 0)
        if not n_cls or lc.validation_images_per_class == 0:
            return None
        labels = torch.arange(n_cls).repeat(lc.validation_images_per_class)
        self.model.eval()
        with torch.no_grad():
            imgs = generate_digits(self.family.velocity(self.model), self.dataset, labels,
                                   num_steps=lc.validation_inference_steps, guidance_scale=lc.validation_guidance_scale,
                                   shift=self.cfg.soar.shift, seed=self.cfg.runtime.seed, device=self.device)
        self.model.train()
        if not self.is_main:
            return None
        grid = make_grid(imgs, nrow=n_cls)
        self.logger.image("samples", grid, self.step)
        return save_png(grid, self.out / "samples" / f"step-{self.step:06d}.png")

    def save_final_model(self) -> Path:
        """Collective: `<output_dir>/final` (transformer folder, a pipeline folder when the run started
        from one, or LoRA weights; EMA the default export), see export.py."""
        mc = self.cfg.model
        source = None
        if mc.pretrained_model_name_or_path and mc.subfolder:  # a pipeline folder's transformer
            source = mc.pretrained_model_name_or_path
        return export_final(self.model, self.family, self.out, lora_rank=mc.lora_rank, ema=self.step_fn.ema,
                            source=source)

    # --- the loop --------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum
        log.warning("received %s: every rank saves a checkpoint after this step, then exits",
                    signal.Signals(signum).name)

    def _log(self, result: StepResult, win: list[float]) -> dict[str, float]:
        """Collective on logging steps: the step's global means, then rank 0 writes them."""
        metrics = {**self.step_fn.global_stats(result.stats), "grad_norm": result.grad_norm, "lr": result.lr,
                   "nan_skipped": float(self.nan_skipped)}
        now = time.perf_counter()
        sps = win[1] / max(now - win[0], 1e-9)
        oc = self.cfg.optim
        samples = oc.train_batch_size * oc.gradient_accumulation_steps * self.env.world_size
        scalars = {f"train/{k}": v for k, v in metrics.items()}
        scalars.update({"perf/steps_per_s": sps, "perf/samples_per_s": sps * samples, "perf/epoch": self.sampler.epoch})
        self.logger.log(self.step, scalars)
        win[:] = [now, 0]
        return metrics

    def train(self, on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
        """Run to `max_train_steps` (from a resumed step). `on_step(trainer)` runs after every step's
        logging, checkpoint and grid (collective code may run there: e.g. the study's evaluations)."""
        cfg, oc, lc = self.cfg, self.cfg.optim, self.cfg.logging
        # Signals can only be caught in the main thread; elsewhere (a notebook worker) they keep their default.
        old = ({s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
               if threading.current_thread() is threading.main_thread() else {})
        bar = None
        if lc.progress_bar and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=oc.max_train_steps, initial=self.step, desc=cfg.recipe, unit="step", dynamic_ncols=True)
        result = TrainResult(step=self.step)
        start_step, t0 = self.step, time.perf_counter()
        win = [t0, 0]
        stopped = finished = False
        try:
            while self.step < oc.max_train_steps and not stopped:
                step_result = self.train_step()
                stopped = step_result.stop
                win[1] += 1
                if bar is not None:
                    bar.update(1)
                if self.step % lc.logging_steps == 0 or self.step == oc.max_train_steps or stopped:
                    result.metrics = self._log(step_result, win)
                    if bar is not None:
                        bar.set_postfix(loss=f"{result.metrics.get('loss', float('nan')):.4f}",
                                        aux=f"{result.metrics.get('aux_loss', 0.0):.4f}", refresh=False)
                if cfg.checkpoint.checkpointing_steps and self.step % cfg.checkpoint.checkpointing_steps == 0:
                    result.last_checkpoint = self._save_unless_nan(result.last_checkpoint)
                if lc.validation_steps and self.step % lc.validation_steps == 0 and not stopped:
                    self.sample_grid()
                if on_step is not None and not stopped:
                    on_step(self)
            wall = time.perf_counter() - t0
            result.step, result.nan_skipped, result.wall_time_s = self.step, self.nan_skipped, wall
            result.steps_per_s = (self.step - start_step) / max(wall, 1e-9)
            saved_now = result.last_checkpoint is not None and result.last_checkpoint.endswith(f"step_{self.step:08d}")
            if not saved_now and (stopped or cfg.checkpoint.final_checkpoint):
                result.last_checkpoint = self._save_unless_nan(result.last_checkpoint)
            if stopped:
                result.interrupted = True
                return result
            if not (lc.validation_steps and self.step % lc.validation_steps == 0):
                self.sample_grid()  # the final grid, unless the loop just wrote it
            if cfg.checkpoint.save_final_model:
                result.final_model = str(self.save_final_model())
            if self.is_main:
                (self.out / "train_summary.json").write_text(json.dumps(result.__dict__, indent=1))
            finished = True
            return result
        except RuntimeError as e:
            if self.env.world_size > 1 and _lost_peer(e):
                raise TrainingAborted(
                    f"rank {self.env.rank}: stopped at step {self.step}, another rank failed or stopped answering "
                    f"({str(e).splitlines()[0][:160]}); fix that rank's error (its log), then relaunch with "
                    "--resume_from_checkpoint latest") from None
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            self.batches.close()
            self.logger.close()
            if self.is_main:  # a killed write of an earlier run, or of a peer that failed mid-save
                with contextlib.suppress(OSError):
                    clean_partial_checkpoints(self.out / "checkpoints")
            cleanup(self.env, finished=finished)
