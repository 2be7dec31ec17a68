"""`build_train_step`: the one constructor of a training step, used by the trainer, the step
benchmark and `soar-fast parity`.

It takes a model of a family (`soar_fast.models.spec`) and a `TrainConfig`, and applies, in this
fixed order: LoRA (already on the model) -> rollout replica (a plain copy, when the rollout mode
needs unsharded weights) -> FP8 training swap -> activation checkpointing -> compile -> FSDP2 on
the mesh (world size 1 for a plain process) -> AdamW -> EMA. The `TrainStep` it returns runs one
optimizer step: keyed draws, the micro-batches' forward and backward (the eager reference
`soar_loss_from_draws` or the batched (1+M)B step; the rollout guided by true CFG or, for a
guidance-distilled model, by its guidance embedding: `SoarConfig.rollout_guidance`), the NaN/inf and stop decision agreed by all
ranks in the step's one host sync, clipping, the optimizer, EMA and the rollout weights' refresh.

Precision (`runtime.mixed_precision`, `runtime.weight_dtype`), the field's habit: fp32 master
weights and AdamW states, bf16 compute and all-gathers, fp32 gradient reduction, through FSDP2's
MixedPrecisionPolicy at any world size; `weight_dtype="bf16"` stores weights and AdamW states in
bf16 (pure bf16).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from soar_fast.config import ConfigError, TrainConfig
from soar_fast.distributed import DistEnv, build_device_mesh
from soar_fast.distributed.parallelize import (
    apply_activation_checkpointing,
    apply_fsdp,
    copy_full_params,
)
from soar_fast.fast import RolloutEngine, batched_soar_step
from soar_fast.fast.attention import attention_context
from soar_fast.fast.compile import compile_model
from soar_fast.fast.fp8 import enable_fp8_training
from soar_fast.fast.profiling import nvtx_range
from soar_fast.loss import SoarDraws, SoarOutput, keyed_draws, soar_loss_from_draws
from soar_fast.loss.paths import point_mask
from soar_fast.models.spec import ModelFamily
from soar_fast.train.ema import EMA

__all__ = ["StepResult", "TrainStep", "build_train_step", "learning_rate_at", "precision_dtypes"]

log = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_REPLICA_MODES = ("cuda_graph", "fp8", "cuda_graph_fp8", "te_fp8")


def precision_dtypes(cfg: TrainConfig) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(weight dtype, compute dtype, gradient-reduction dtype) of the run."""
    weight = _DTYPES[cfg.runtime.weight_dtype]
    compute = torch.bfloat16 if cfg.runtime.mixed_precision == "bf16" or weight == torch.bfloat16 else torch.float32
    return weight, compute, _DTYPES[cfg.parallel.reduce_dtype]


def learning_rate_at(step: int, cfg: Any) -> float:
    """Constant LR after a linear warm-up: the LR of optimizer step `step` (0-based). Stateless,
    so resuming needs no scheduler state."""
    if cfg.lr_warmup_steps > 0 and step < cfg.lr_warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.lr_warmup_steps
    return cfg.learning_rate


@dataclass
class StepResult:
    """One optimizer step. `stats`: this rank's step means as device tensors (loss, base_loss,
    aux_loss, rollout deviation, ...); `TrainStep.global_stats` reduces them over ranks."""

    applied: bool
    grad_norm: float
    lr: float
    stop: bool
    stats: dict[str, torch.Tensor]


class TrainStep:
    """One optimizer step of SOAR (or SFT, num_aux = 0) at any world size; built by `build_train_step`."""

    def __init__(self, *, family: ModelFamily, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: EMA | None, rollout: RolloutEngine | None, replica: nn.Module | None,
                 cfg: TrainConfig, env: DistEnv):
        self.family, self.model, self.optimizer, self.ema = family, model, optimizer, ema
        self.rollout, self.replica, self.cfg, self.env = rollout, replica, cfg, env
        self.velocity_fn = family.velocity(model)
        self.rollout_guidance = family.rollout_guidance(model, cfg.soar.rollout_guidance)
        self.rollout_fn = family.rollout_velocity(model, cfg.soar)  # None: true CFG
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.lora = bool(cfg.model.lora_rank)

    # --- one micro-batch ---------------------------------------------------------------------
    def micro_step(self, z0: torch.Tensor, cond: Any, uncond: Any, draws: SoarDraws,
                   grad_scale: float | torch.Tensor | tuple = 1.0) -> SoarOutput:
        """Forward and backward of one micro-batch on given draws; gradients (times `grad_scale`:
        a number, a 0-d tensor, or a (base, auxiliary) pair) accumulate into the parameters.
        `.loss` is the unscaled local SOAR loss (detached)."""
        soar, fast = self.cfg.soar, self.cfg.fast
        # targets in the model's compute dtype (the release's bf16 arithmetic) or in fp32
        z0 = z0.to(precision_dtypes(self.cfg)[1]) if soar.target_dtype == "model" else z0.float()
        with attention_context(fast.attention_backend):
            if self.cfg.runtime.step == "eager":
                out = soar_loss_from_draws(self.velocity_fn, z0, cond, uncond, soar, draws, rollout_fn=self.rollout_fn)
                if not out.loss.requires_grad:  # every row went to a frozen part (a Wan 2.2 expert not trained)
                    pass
                elif isinstance(grad_scale, tuple):
                    (out.parts[0] * grad_scale[0] + out.parts[1] * grad_scale[1]).backward()
                else:
                    (out.loss * grad_scale).backward()
                out.loss = out.loss.detach()
                return out
            return batched_soar_step(self.velocity_fn, z0, cond, uncond, soar, draws, rollout=self.rollout,
                                     ops_backend=fast.ops_backend, micro_chunks=fast.micro_chunks,
                                     backward=True, grad_scale=grad_scale)

    # --- one optimizer step --------------------------------------------------------------------
    def __call__(self, step: int, batches: Sequence[tuple[torch.Tensor, Any, Sequence[int]]], uncond: Any,
                 stop: bool = False) -> StepResult:
        """Optimizer step number `step` (0-based) over the micro-batches `(z0, cond, global_indices)`;
        `global_indices[j]` is row j's index in the step's global batch (it keys the draws).
        `stop`: this rank wants to stop after this step (a signal); every rank learns it."""
        oc = self.cfg.optim
        lr = learning_rate_at(step, oc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        bad = torch.zeros((), device=self.env.device)
        k = len(batches)
        all_draws = [keyed_draws(z0, self.cfg.soar, seed=self.cfg.runtime.seed, step=step, indices=indices)
                     for z0, _, indices in batches]
        scales = self.grad_scales(all_draws)
        for (z0, cond, _), draws, scale in zip(batches, all_draws, scales):
            out = self.micro_step(z0, cond, uncond, draws, grad_scale=scale)
            bad = bad + (~torch.isfinite(out.loss)).float()
            for name, v in out.stats.items():
                sums[name] = sums[name] + v / k if name in sums else v / k
        flags = torch.stack([bad, torch.full((), float(stop), device=bad.device)])
        if self.env.world_size > 1:  # a NaN or a stop request on any rank decides for all
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        max_norm = oc.max_grad_norm if oc.max_grad_norm > 0 else float("inf")
        with nvtx_range("soar/optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        bad_t, stop_t, norm_v = torch.stack([flags[0], flags[1], norm.float().to(flags.device)]).tolist()  # the sync
        applied = bad_t == 0 and math.isfinite(norm_v)
        if applied:
            with nvtx_range("soar/optimizer"):
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.model)
            with nvtx_range("soar/refresh"):
                self.refresh_rollout()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return StepResult(applied=applied, grad_norm=norm_v, lr=lr, stop=stop_t > 0, stats=sums)

    def describe(self) -> dict[str, Any]:
        """What this step runs, resolved (the rows of `soar-fast parity` and the benchmarks record it):
        step kind, ops backend, rollout mode (as it ran: a CUDA-graph fallback shows), compile,
        precision policy, FP8 training, activation checkpointing, micro-chunks, world size."""
        from soar_fast.ops.dispatch import resolve_backend

        cfg, fast = self.cfg, self.cfg.fast
        weight, compute, reduce = (str(d).removeprefix("torch.") for d in precision_dtypes(cfg))
        ops = "reference" if cfg.runtime.step == "eager" else resolve_backend(
            "soar_fused_mse", fast.ops_backend, self.env.device, torch.float32)
        return {"step": cfg.runtime.step, "ops_backend": ops,
                "rollout": self.rollout.mode if self.rollout is not None else "reference",
                "rollout_requested": fast.rollout, "rollout_guidance": self.rollout_guidance,
                "compile": fast.compile, "weight_dtype": weight,
                "compute_dtype": compute, "reduce_dtype": reduce, "fp8_training": fast.fp8_training,
                "activation_checkpointing": fast.activation_checkpointing, "micro_chunks": fast.micro_chunks,
                "world_size": self.env.world_size}

    def grad_scales(self, draws: Sequence[SoarDraws]) -> list:
        """The gradient scale of each micro-batch, so that the step's gradient is that of the loss
        over the whole global batch (every micro-batch of every rank), normalised by the global
        counts. With every auxiliary point present (one rollout path) the counts are the same in
        every micro-batch: 1/k each (FSDP averages the ranks). With several paths, points where
        u1 = 0 do not exist and the counts vary: the local-to-global count ratios (0-d device
        tensors, one all-reduce of two numbers, no host sync), times W for FSDP's average. The
        logged loss stays the mean of the micro-batch losses."""
        soar, k, w = self.cfg.soar, len(draws), self.env.world_size
        masks = [point_mask(d.u0, soar) if d.sigma_aux.shape[0] > 0 else None for d in draws]
        if all(m is None for m in masks):
            return [1.0 / k] * k
        dev = draws[0].u0.device
        b = torch.tensor([float(d.u0.shape[0]) for d in draws], device=dev)
        n = torch.stack([m.sum().float() for m in masks])
        total = torch.stack([b.sum(), n.sum()])
        if w > 1:
            dist.all_reduce(total)
        lam = soar.lambda_aux
        if soar.normalization == "points":
            return list(w * (b + lam * n) / (total[0] + lam * total[1]))
        return list(zip(w * b / total[0], w * n / total[1]))

    def refresh_rollout(self) -> None:
        """Bring the rollout's own weights (replica, FP8 copies) to the current weights."""
        if self.replica is not None:
            copy_full_params(self.model, self.replica, trainable_only=self.lora)
        if self.rollout is not None:
            self.rollout.after_optimizer_step()

    def global_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Step means over all ranks (equal local batches: the mean of the rank means) as floats.
        Collective: every rank calls it on logging steps only (one all-reduce, one host sync)."""
        keys = sorted(stats)
        if not keys:
            return {}
        vec = torch.stack([stats[k].detach().double() for k in keys])
        if self.env.world_size > 1:
            dist.all_reduce(vec)
            vec = vec / self.env.world_size
        return dict(zip(keys, vec.tolist()))


def _to(model: nn.Module, device: torch.device, dtype: torch.dtype, *, keep_fp32_params: bool = False) -> nn.Module:
    """Move, and cast to `dtype` but for what the model keeps in fp32 (diffusers' `_keep_in_fp32_modules`,
    as `from_pretrained(torch_dtype=...)` keeps them; e.g. Wan's RoPE tables, timestep embedder,
    modulation tables and norms): their buffers always (the RoPE angle tables), their parameters
    with `keep_fp32_params` (the rollout replica; FSDP2 needs one parameter dtype per unit, so the
    trained model's are cast, as torchtitan's pure bf16 does)."""
    model = model.to(device=device)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for mod_name, mod in model.named_modules():
        for slot, keeps in ((mod._parameters, keep_fp32_params), (mod._buffers, True)):
            for key, t in slot.items():
                kept = keeps and any(k in f"{mod_name}.{key}".split(".") for k in keep)  # diffusers' name match
                want = torch.float32 if kept else dtype
                if t is None or not t.is_floating_point() or t.dtype == want:
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(want)
                else:
                    slot[key] = t.to(want)
    return model


def build_train_step(family: ModelFamily, model: nn.Module, cfg: TrainConfig, env: DistEnv) -> TrainStep:
    """Convert `model` (a plain module of `family`, LoRA already applied) in the fixed order and
    return its `TrainStep`. The model is modified in place; `TrainStep.model` is the wrapped one."""
    fast = cfg.fast
    if cfg.runtime.step not in ("eager", "fast"):
        raise ConfigError(f"runtime.step={cfg.runtime.step!r} is invalid: choose 'eager' or 'fast'")
    weight_dtype, compute, reduce = precision_dtypes(cfg)
    model = _to(model, env.device, weight_dtype)
    replica = None
    if cfg.runtime.step == "fast" and fast.rollout in _REPLICA_MODES:
        # CUDA graphs and FP8 weight copies need plain, unsharded weights: the rollout runs on its
        # own copy in the compute dtype, refreshed after every optimizer step.
        replica = _to(copy.deepcopy(model), env.device, compute, keep_fp32_params=True).requires_grad_(False).eval()
    if fast.fp8_training and enable_fp8_training(model, backend=fast.fp8_training_backend,
                                                 scaling=fast.fp8_scaling) == 0:
        log.warning("fp8_training: no eligible Linear layer; training stays in full precision")
    if fast.activation_checkpointing:
        apply_activation_checkpointing(model, family)
    if fast.compile != "none":
        compile_model(model, fast.compile, blocks=family.blocks(model))
        if replica is not None:
            compile_model(replica, fast.compile, blocks=family.blocks(replica))
    mesh = build_device_mesh(env, cfg.parallel)
    model = apply_fsdp(model, family, mesh, param_dtype=compute, reduce_dtype=reduce,
                       reshard_after_forward=cfg.parallel.reshard_after_forward)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameter; check --model.lora_target_modules")
    oc = cfg.optim
    # foreach (multi-tensor) AdamW on every device: torch's CPU default is the per-parameter loop
    optimizer = torch.optim.AdamW(params, lr=oc.learning_rate, betas=(oc.adam_beta1, oc.adam_beta2),
                                  weight_decay=oc.adam_weight_decay, eps=oc.adam_epsilon, foreach=True)
    ema = EMA(model, oc.ema_decay) if oc.use_ema else None
    rollout = None
    if cfg.runtime.step == "fast":
        target = replica if replica is not None else model
        distilled_fn = family.rollout_velocity(target, cfg.soar)
        rollout = RolloutEngine(distilled_fn or family.velocity(target), target, fast.rollout,
                                fp8_rowwise=fast.fp8_scaling == "rowwise", distilled=distilled_fn is not None)
    step = TrainStep(family=family, model=model, optimizer=optimizer, ema=ema, rollout=rollout, replica=replica,
                     cfg=cfg, env=env)
    if replica is not None:
        step.refresh_rollout()
    log.info("train step: %s, world %d, weights %s, compute %s, reduce %s, rollout=%s, compile=%s, "
             "fp8_training=%s, activation_checkpointing=%s, ops=%s", cfg.runtime.step, env.world_size,
             weight_dtype, compute, reduce, rollout.mode if rollout else "-", fast.compile, fast.fp8_training,
             fast.activation_checkpointing, fast.ops_backend)
    return step
