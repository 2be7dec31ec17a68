"""The training loop: SFT (num_aux=0) and SOAR through the same code, resumable bitwise on CPU.

Every random draw of a step comes from `self.generator` (the SOAR draws) and `self.sampler` (the
data order, a pure function of seed and position), both saved in checkpoints; the LR is a pure
function of the step. So N steps == N/2 steps + resume + N/2 steps, bit for bit, on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from soar_fast.config.fast import FastConfig
from soar_fast.data import ResumableSampler, build_dataset
from soar_fast.eval.grid import make_grid, save_png
from soar_fast.eval.sampler import generate_digits
from soar_fast.models import SD3VelocityFn
from soar_fast.train.build import (
    build_loss_step,
    build_model,
    build_optimizer,
    learning_rate_at,
    parallelize_model,
)
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
    if not ckpts and _dcp_latest(out / "checkpoints") is not None:  # a torchrun run's DCP checkpoints
        ckpts = [_dcp_latest(out / "checkpoints")]
    if ckpts or (out / "final").exists():
        what = f"{len(ckpts)} checkpoint(s)" if ckpts else "a final model"
        raise ConfigError(f"output_dir {str(out)!r} already holds another run ({what}); pass "
                          "--resume_from_checkpoint latest (or --resume) to continue it, or choose a new --output_dir")


def _dcp_latest(root: Path) -> Path | None:
    from soar_fast.distributed.checkpoint import latest_checkpoint

    return latest_checkpoint(root)


def _check_fast_under_torchrun(fast: FastConfig) -> None:
    """The fast step's parts that run on FSDP2-sharded parameters; the rest get a one-line error."""
    if fast.compile != "none":
        raise ConfigError(f"fast.compile={fast.compile!r}: under torchrun compile the blocks with --parallel.compile "
                          "(applied before FSDP2); set --fast.compile none")
    if fast.rollout != "eager":
        raise ConfigError(f"fast.rollout={fast.rollout!r} needs unsharded weights (CUDA graphs, FP8 weight copies); "
                          "use --fast.rollout eager under torchrun")
    if fast.fp8_training:
        raise ConfigError("fast.fp8_training is single-process for now; pass --no_fast.fp8_training under torchrun")


def keyed_draws(z0: torch.Tensor, keys: list[int], seed: int, soar: Any):
    """SOAR draws of a (local) batch whose row j is sample number `keys[j]` of the global sample
    stream: each row's draws come from a generator seeded by (seed, key) only, so they are the
    same at any world size and need no RNG state in checkpoints (the torchrun path's draws)."""
    from soar_fast.loss import SoarDraws, sample_draws

    parts = []
    for row, key in enumerate(keys):
        g = torch.Generator().manual_seed((seed * 1_000_003 + _GEN_SEED_OFFSET) * 1_000_003 + int(key))
        parts.append(sample_draws(z0[row:row + 1].cpu(), soar, g))
    dev = z0.device
    return SoarDraws(z1=torch.cat([d.z1 for d in parts]).to(dev), u0=torch.cat([d.u0 for d in parts]).to(dev),
                     sigma0=torch.cat([d.sigma0 for d in parts]).to(dev),
                     sigma1=torch.cat([d.sigma1 for d in parts]).to(dev),
                     sigma_aux=torch.cat([d.sigma_aux for d in parts], dim=1).to(dev),
                     drop=torch.cat([d.drop for d in parts]).to(dev))


class _NullLogger:
    """The logger of ranks other than 0 under torchrun: writes nothing."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def image(self, tag: str, array: Any, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Builds model, data, optimizer, EMA and loss step from a `TrainConfig`, then `train()`s.

    Under torchrun (`detect_torchrun()`) the same class trains data-parallel with FSDP2 (see
    docs/distributed.md): `train_batch_size` is per rank, the loss is the global-batch SOAR loss,
    checkpoints are DCP folders `checkpoints/step_<step>` and only rank 0 writes logs and files.
    """

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
        self.dist = self._init_distributed()  # None for a single process (the path below is unchanged)

        # Construction in one place (build.py): a distributed/compiled path wraps these.
        self.model = build_model(cfg.model).to(self.device)
        self.model.train()
        if self.dist is not None:
            self.model = parallelize_model(self.model, cfg.parallel, self.dist_mesh)
        mc = self.model.config
        self.dataset = build_dataset(cfg.data, joint_attention_dim=mc.joint_attention_dim,
                                     pooled_projection_dim=mc.pooled_projection_dim)
        if tuple(self.dataset.sample_shape)[0] != mc.in_channels:
            raise ConfigError(f"the data has {self.dataset.sample_shape[0]} channels but the model takes "
                              f"{mc.in_channels}; pick a matching --model.preset or data.source")
        groups = getattr(self.dataset, "groups", None)  # aspect buckets: one bucket per batch
        if self.dist is None:
            self.sampler = ResumableSampler(len(self.dataset), cfg.optim.train_batch_size, rt.seed, groups=groups)
        else:
            self.sampler = ResumableSampler(len(self.dataset), cfg.optim.train_batch_size, rt.seed,
                                            rank=self.dist.rank, world_size=self.dist.world_size, groups=groups)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.use_ema else None
        rank_offset = 0 if self.dist is None else self.dist.rank  # per-rank stream under torchrun
        self.generator = torch.Generator(self.device).manual_seed(rt.seed + _GEN_SEED_OFFSET + rank_offset)
        self.loss_step = build_loss_step(rt.step, self.model, cfg.soar, cfg.fast)
        self._step_backprops = bool(getattr(self.loss_step, "performs_backward", False))
        self._after_opt_step = getattr(self.loss_step, "after_optimizer_step", None)
        self.uncond = tuple(t.to(self.device) for t in self.dataset.uncond())
        self.step, self.nan_skipped, self.nan_streak = 0, 0, 0
        self._stop_signal: int | None = None

        resumed_from = self._maybe_resume() if self.dist is None else self._maybe_resume_dist()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            self._note_config_change()
            save_config_json(cfg, self.out / "config.json")
            self.logger = MetricsLogger(self.out, cfg.logging.report_to,
                                        resume_step=self.step if resumed_from else None)
        else:
            self.logger = _NullLogger()

    # --- torchrun ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.rank == 0

    def _init_distributed(self):
        """Under torchrun: the process group and mesh (else None). Checks what the path supports."""
        from soar_fast.distributed import build_device_mesh, detect_torchrun, init_distributed

        self.dist_mesh = None
        if not detect_torchrun():
            return None
        cfg = self.cfg
        if cfg.runtime.step not in ("eager", "fast"):
            raise ConfigError(f"runtime.step={cfg.runtime.step!r} is single-process; use eager or fast under torchrun")
        if cfg.runtime.step == "fast":
            _check_fast_under_torchrun(cfg.fast)
        if cfg.optim.use_ema:
            raise ConfigError("optim.use_ema is single-process for now; pass --no_use_ema under torchrun")
        if getattr(cfg.model, "lora_rank", 0):
            raise ConfigError("model.lora_rank is single-process for now; train LoRA without torchrun")
        pcfg = cfg.parallel
        if pcfg.backend == "auto" and self.device.type == "cpu":
            pcfg = dataclasses.replace(pcfg, backend="gloo")  # --runtime.device cpu: gloo even with GPUs present
        env = init_distributed(pcfg)
        self.device = env.device
        self.dist_mesh = build_device_mesh(env, pcfg)
        if env.rank != 0:
            self.cfg = cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, progress_bar=False))
        log.info("torchrun: rank %d of %d on %s, FSDP2 %s shard, param dtype %s", env.rank, env.world_size,
                 env.device, pcfg.shard, pcfg.param_dtype)
        return env

    def _maybe_resume_dist(self) -> Path | None:
        from soar_fast.distributed import latest_checkpoint
        from soar_fast.distributed import load_checkpoint as dcp_load

        resume = self.cfg.checkpoint.resume_from_checkpoint
        if resume is None:
            return None
        path = latest_checkpoint(self.out / "checkpoints") if resume == "latest" else Path(resume)
        if path is None:
            log.info("no checkpoint in %s yet; starting a new run", self.out / "checkpoints")
            return None
        if not (path / "meta.json").is_file():
            raise ConfigError(f"checkpoint folder {resume!r} is not a torchrun (DCP) checkpoint with meta.json; "
                              "pass 'latest' or a checkpoints/step_<step> folder")
        meta = dcp_load(path, self.model, self.optimizer)
        extra = meta["extra"]
        self.sampler.load_state_dict(extra["sampler"])
        self.step = int(meta["step"])
        self.nan_skipped, self.nan_streak = int(extra.get("nan_skipped", 0)), int(extra.get("nan_streak", 0))
        if self.is_main:
            log.info("resumed from %s at step %d (written by %d ranks, now %d)", path, self.step,
                     meta.get("world_size", 0), self.dist.world_size)
        return path

    # --- resume ------------------------------------------------------------------------------
    def _maybe_resume(self) -> Path | None:
        resume = self.cfg.checkpoint.resume_from_checkpoint
        if resume is None:
            return None
        candidates = resolve_resume(resume, self.out / "checkpoints")
        if not candidates and _dcp_latest(self.out / "checkpoints") is not None:
            raise ConfigError(f"the checkpoints in {str(self.out / 'checkpoints')!r} were written under torchrun (DCP); "
                              "resume them with `torchrun --standalone --nproc_per_node 1 -m soar_fast.train ...`")
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
        if self.dist is not None and self.cfg.parallel.param_dtype != "fp32":
            return contextlib.nullcontext()  # FSDP's param policy already computes in bf16/fp16
        if self.cfg.runtime.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """Accumulate `gradient_accumulation_steps` micro-batches, clip, step (or skip on NaN/inf)."""
        if self.dist is not None:
            return self._train_step_dist()
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
        grad_norm = self._clip_and_update(params, max_norm, finite)
        return {**sums, "grad_norm": grad_norm, "lr": lr, "nan_skipped": float(self.nan_skipped)}

    def _clip_and_update(self, params: list[torch.nn.Parameter], max_norm: float, finite: bool) -> float:
        """Clip, then take the optimizer step, or skip it on a non-finite loss or gradient (counted);
        abort after `max_nan_streak` skips in a row. Returns the gradient norm before clipping."""
        oc = self.cfg.optim
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP2
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
        return grad_norm

    def _train_step_dist(self) -> dict[str, float]:
        """`train_step` under torchrun: global-batch loss (`global_soar_loss`), draws keyed by the
        global sample number (`keyed_draws`), non-finite decisions agreed by all ranks."""
        from soar_fast.distributed import (
            all_ranks_true,
            global_batch_scale,
            global_metrics,
            global_soar_loss,
        )
        from soar_fast.loss import soar_loss_from_draws

        oc, sc, env = self.cfg.optim, self.cfg.soar, self.dist
        lr = learning_rate_at(self.step, oc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = True
        for _ in range(oc.gradient_accumulation_steps):
            first = self.sampler.position + env.rank * self.sampler.batch_size
            idx = self.sampler.next_indices()
            z0, cond, _labels = self.dataset.batch(idx)
            z0 = z0.to(self.device).float()
            cond = tuple(t.to(self.device) for t in cond)
            draws = keyed_draws(z0, list(range(first, first + len(idx))), self.cfg.runtime.seed, sc)
            if self._step_backprops:  # the fast step runs its own backward: scale it to the global batch
                scale = global_batch_scale(len(idx)) / oc.gradient_accumulation_steps
                with self._autocast():
                    out = self.loss_step.from_draws(z0, cond, self.uncond, draws, grad_scale=scale)
            else:
                with self._autocast():
                    out = soar_loss_from_draws(self.loss_step.velocity_fn, z0, cond, self.uncond, sc, draws)
            loss = global_soar_loss(out, sc)
            if not all_ranks_true(bool(torch.isfinite(loss).item())):
                finite = False  # (the fast step's gradients are dropped with the update)
                continue
            if not self._step_backprops:
                (loss / oc.gradient_accumulation_steps).backward()
            metrics = {**out.metrics, **global_metrics(out, sc)}  # loss, base/aux loss: global; others rank 0's
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / oc.gradient_accumulation_steps
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = oc.max_grad_norm if oc.max_grad_norm > 0 else float("inf")
        grad_norm = self._clip_and_update(params, max_norm, finite)
        return {**sums, "grad_norm": grad_norm, "lr": lr, "nan_skipped": float(self.nan_skipped)}

    # --- checkpoints, grids, final model --------------------------------------------------------------
    def save(self) -> Path:
        if self.dist is not None:  # collective: DCP shards of every rank
            from soar_fast.distributed import save_checkpoint as dcp_save

            extra = {"sampler": self.sampler.state_dict(), "nan_skipped": self.nan_skipped,
                     "nan_streak": self.nan_streak, "recipe": self.cfg.recipe}
            return dcp_save(self.out / "checkpoints", self.step, self.model, self.optimizer, extra=extra,
                            keep_last=self.cfg.checkpoint.checkpoints_total_limit)
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
        if self.dist is not None:
            if self.is_main:
                log.info("step %d: sample grid skipped under torchrun (FSDP); run `soar-fast sample` on the "
                         "final model", self.step)
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
    def export_final_model_dist(self) -> Path:
        """Under torchrun (collective): the full weights gathered to rank 0 as
        `<output_dir>/final/transformer`, a diffusers folder."""
        from soar_fast.distributed import barrier, export_full_state_dict

        final, tmp = self.out / "final", self.out / ".tmp-final-dist"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        export_full_state_dict(self.model, tmp / "transformer")
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        barrier()
        return final

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum
        if self.dist is not None:
            log.warning("received %s: stopping after this step without a collective save (resume from the "
                        "last periodic checkpoint)", signal.Signals(signum).name)
            return
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    def train(self) -> TrainResult:
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
                if self.dist is None:
                    result.last_checkpoint = str(self.save())
                return result
            if result.last_checkpoint is None or not result.last_checkpoint.endswith(
                    (f"-{self.step}", f"step_{self.step:08d}")):
                result.last_checkpoint = str(self.save())
            if not (lc.validation_steps and self.step % lc.validation_steps == 0):
                self.sample_grid()  # the final grid, unless the loop just wrote it
            if cfg.checkpoint.save_final_model:
                final = self.save_final_model() if self.dist is None else self.export_final_model_dist()
                result.final_model = str(final)
            if self.is_main:
                (self.out / "train_summary.json").write_text(json.dumps(result.__dict__, indent=1))
            return result
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            self.logger.close()
            if self.dist is not None:
                from soar_fast.distributed import cleanup

                cleanup()
