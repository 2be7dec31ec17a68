"""Construction in one place: model, optimizer, loss step. A later FSDP2/compile path wraps here.

Extension points (registries, keyed by config strings):
- `MODEL_SOURCES`: how `ModelConfig` becomes an `nn.Module` ('preset' random init, 'folder' =
  `SD3Transformer2DModel.from_pretrained(path, subfolder=...)`).
- `LOSS_STEPS`: `RuntimeConfig.step` -> a factory `(model, soar_cfg, fast_cfg) -> LossStep`, where
  `LossStep(z0, cond, uncond, generator) -> SoarOutput` computes one micro-batch's loss with all
  randomness drawn from `generator`. 'eager' is the reference `soar_loss` on an `SD3VelocityFn`.
  A step that runs its own backward (e.g. a fused loss+grad) sets `performs_backward = True`; it is
  then called with `grad_scale=1/gradient_accumulation_steps`, must accumulate `grad_scale`-scaled
  gradients into the parameters, and returns the unscaled loss (detached is fine). A step with an
  `after_optimizer_step()` method gets it called after every optimizer step.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from soar_fast.config import ConfigError, ModelConfig, OptimConfig, SoarConfig
from soar_fast.config.fast import FastConfig
from soar_fast.loss import SoarOutput, soar_loss
from soar_fast.models import SD3_PRESETS, SD3VelocityFn, build_sd3_transformer

__all__ = ["LOSS_STEPS", "EagerStep", "LossStep", "build_loss_step", "build_model", "build_optimizer",
           "learning_rate_at", "parallelize_model", "register_loss_step"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LossStep(Protocol):
    """One micro-batch's loss; every random draw comes from `generator` (saved in checkpoints)."""

    def __call__(self, z0: torch.Tensor, cond: Any, uncond: Any, generator: torch.Generator) -> SoarOutput: ...


class EagerStep:
    """The eager reference: `soar_loss(SD3VelocityFn(model), ...)`."""

    def __init__(self, model: nn.Module, soar: SoarConfig, fast: FastConfig | None = None):
        self.velocity_fn, self.soar = SD3VelocityFn(model), soar

    def __call__(self, z0: torch.Tensor, cond: Any, uncond: Any, generator: torch.Generator) -> SoarOutput:
        return soar_loss(self.velocity_fn, z0, cond, uncond, self.soar, generator=generator)


def _fast_step(model: nn.Module, soar: SoarConfig, fast: FastConfig | None = None) -> LossStep:
    """`--runtime.step fast`: soar_fast.train.fast_step.FastStep (imported lazily: compile, FP8, graphs)."""
    from soar_fast.train.fast_step import FastStep

    return FastStep(model, soar, fast)


StepFactory = Callable[[nn.Module, SoarConfig, FastConfig | None], LossStep]
LOSS_STEPS: dict[str, StepFactory] = {"eager": EagerStep, "fast": _fast_step}


def register_loss_step(name: str, factory: StepFactory) -> None:
    """Make `--runtime.step <name>` use `factory(model, soar_cfg, fast_cfg)` (e.g. a compiled step)."""
    LOSS_STEPS[name] = factory


def build_loss_step(name: str, model: nn.Module, soar: SoarConfig, fast: FastConfig | None = None) -> LossStep:
    if name not in LOSS_STEPS:
        raise ConfigError(f"runtime.step={name!r} is invalid: choose one of {', '.join(sorted(LOSS_STEPS))}")
    return LOSS_STEPS[name](model, soar, fast)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The transformer of `cfg`: a local diffusers folder when given, else a random-init preset;
    with `cfg.lora_rank >= 1` frozen, with LoRA adapters added (only those train)."""
    return _with_lora(_build_base_model(cfg), cfg)


def _with_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    if not cfg.lora_rank:
        return model
    from soar_fast.models.lora import DEFAULT_TARGET_MODULES, LoraSettings, apply_lora

    settings = LoraSettings(rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                            target_modules=tuple(cfg.lora_target_modules or DEFAULT_TARGET_MODULES))
    return apply_lora(model, settings)


def _build_base_model(cfg: ModelConfig) -> nn.Module:
    path = cfg.pretrained_model_name_or_path
    if path is not None:
        return _from_folder(path, cfg.subfolder)
    if cfg.preset not in SD3_PRESETS:
        raise ConfigError(f"model.preset={cfg.preset!r} is invalid: choose one of {', '.join(SD3_PRESETS)}")
    overrides: dict[str, Any] = {}
    for name in ("num_layers", "num_attention_heads", "attention_head_dim"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    if "num_attention_heads" in overrides or "attention_head_dim" in overrides:
        base = SD3_PRESETS[cfg.preset]
        heads = overrides.get("num_attention_heads", base["num_attention_heads"])
        overrides["caption_projection_dim"] = heads * overrides.get("attention_head_dim", base["attention_head_dim"])
    return build_sd3_transformer(cfg.preset, seed=cfg.init_seed, **overrides)


def _from_folder(path: str, subfolder: str) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    local = os.path.expanduser(path)
    if not os.path.isdir(local):
        if not _HUB_ID.match(path) or path.startswith((".", "/", "~")):
            raise ConfigError(f"model folder {path!r} does not exist; train a base first "
                              f"(soar-fast train --recipe digits-pretrain) or pass --pretrained_model_name_or_path")
    elif subfolder and not os.path.isdir(os.path.join(local, subfolder)):
        raise ConfigError(f"model folder {path!r} has no '{subfolder}' subfolder; pass --model.subfolder ''"
                          f" or a diffusers pipeline/run folder")
    try:
        return SD3Transformer2DModel.from_pretrained(local if os.path.isdir(local) else path,
                                                     subfolder=subfolder or None)
    except Exception as e:  # noqa: BLE001 - one line for the user
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot load a transformer from {path!r} ({first}); pass a diffusers model folder") from None


def parallelize_model(model: nn.Module, parallel: Any, mesh: Any) -> nn.Module:
    """Under torchrun: activation checkpointing, compile and FSDP2 (`parallelize_sd3`) of `model`,
    in place; call before `build_optimizer` so the optimizer sees the sharded parameters."""
    from soar_fast.distributed import parallelize_sd3

    return parallelize_sd3(model, parallel, mesh)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (one param group; the LR is set per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def learning_rate_at(step: int, cfg: OptimConfig) -> float:
    """Constant LR after a linear warm-up: the LR of optimizer step `step` (0-based). Stateless,
    so resuming needs no scheduler state."""
    if cfg.lr_warmup_steps > 0 and step < cfg.lr_warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.lr_warmup_steps
    return cfg.learning_rate
