"""The fast SOAR step as a trainer loss step (`--runtime.step fast`), configured by `FastConfig`.

It composes the pieces of `soar_fast.fast`: compile (per block or whole), FP8 training GEMMs,
the rollout engine (eager | CUDA graph | FP8), the attention backend and the batched (1+M)B step
with the fused ops, which runs the backward pass itself (`performs_backward`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from soar_fast.config import SoarConfig
from soar_fast.config.fast import FastConfig
from soar_fast.fast import RolloutEngine, batched_soar_step
from soar_fast.fast.attention import attention_context
from soar_fast.fast.compile import compile_model
from soar_fast.fast.fp8 import enable_fp8_training
from soar_fast.loss import SoarDraws, SoarOutput, sample_draws
from soar_fast.models import SD3VelocityFn

__all__ = ["FastStep"]

log = logging.getLogger(__name__)


class FastStep:
    """`step(z0, cond, uncond, generator, grad_scale) -> SoarOutput` with gradients accumulated.

    Draws come from `sample_draws(z0, soar, generator)`, exactly as the eager reference, so a run
    with `--runtime.step fast` consumes the same random numbers as `--runtime.step eager`."""

    performs_backward = True

    def __init__(self, model: nn.Module, soar: SoarConfig, fast: FastConfig | None = None):
        self.soar, self.fast = soar, fast or FastConfig()
        compile_model(model, self.fast.compile)
        if self.fast.fp8_training and enable_fp8_training(model) == 0:
            log.warning("fp8_training: no eligible Linear layer; training stays in full precision")
        self.velocity_fn = SD3VelocityFn(model)
        self.rollout = RolloutEngine(self.velocity_fn, model, self.fast.rollout,
                                     fp8_rowwise=self.fast.fp8_scaling == "rowwise")
        log.info("fast step: rollout=%s compile=%s ops=%s attention=%s micro_chunks=%d",
                 self.rollout.mode, self.fast.compile, self.fast.ops_backend, self.fast.attention_backend,
                 self.fast.micro_chunks)

    def __call__(self, z0: torch.Tensor, cond: Any, uncond: Any, generator: torch.Generator,
                 grad_scale: float = 1.0) -> SoarOutput:
        z0 = z0.float()
        return self.from_draws(z0, cond, uncond, sample_draws(z0, self.soar, generator), grad_scale)

    def from_draws(self, z0: torch.Tensor, cond: Any, uncond: Any, draws: SoarDraws,
                   grad_scale: float = 1.0) -> SoarOutput:
        """The step on given draws (the torchrun path keys them by global sample number)."""
        z0 = z0.float()
        with attention_context(self.fast.attention_backend):
            return batched_soar_step(self.velocity_fn, z0, cond, uncond, self.soar, draws, rollout=self.rollout,
                                     ops_backend=self.fast.ops_backend, micro_chunks=self.fast.micro_chunks,
                                     backward=True, grad_scale=grad_scale)

    def after_optimizer_step(self) -> None:
        """Re-quantise the FP8 rollout weights from the updated live weights."""
        self.rollout.after_optimizer_step()
