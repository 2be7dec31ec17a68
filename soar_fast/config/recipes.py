"""Recipes: named starting points of a `TrainConfig`, as plain Python functions.

`soar-fast train --recipe digits-soar --learning_rate 1e-4` starts from `digits_soar()` and applies
the flags on top. Choices the paper leaves open for this small CPU setting (model size, batch,
steps, learning rate, num_aux) are documented in docs/trainer.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from soar_fast.config.errors import ConfigError
from soar_fast.config.soar import SoarConfig
from soar_fast.config.train import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
)

__all__ = ["RECIPES", "get_recipe", "recipe_names"]

#: Where `digits-pretrain` writes its base and `digits-sft` / `digits-soar` read it by default.
DIGITS_BASE_DIR = "runs/digits-pretrain"
#: Post-training steps of digits-sft and digits-soar (equal iterations, the paper's comparison).
DIGITS_POST_STEPS = 300
#: Auxiliary points of the demo's SOAR (paper: 6). Fewer keep the demo within its CPU budget.
DIGITS_NUM_AUX = 2


def digits_pretrain() -> TrainConfig:
    """SFT from scratch on the 1,797 sklearn digits: the base model that post-training starts from.
    10% conditioning dropout makes the base usable with classifier-free guidance."""
    return TrainConfig(
        recipe="digits-pretrain",
        model=ModelConfig(preset="digits"),
        data=DataConfig(source="digits"),
        optim=OptimConfig(learning_rate=1e-3, lr_warmup_steps=100, train_batch_size=64, max_train_steps=1000,
                          adam_weight_decay=1e-2, max_grad_norm=1.0),
        soar=SoarConfig(num_aux=0, cond_dropout=0.1),
        checkpoint=CheckpointConfig(checkpointing_steps=400, checkpoints_total_limit=2),
        logging=LoggingConfig(logging_steps=10, validation_steps=0),
        runtime=RuntimeConfig(output_dir=DIGITS_BASE_DIR, seed=0),
    )


def _digits_post(name: str, num_aux: int) -> TrainConfig:
    return TrainConfig(
        recipe=name,
        model=ModelConfig(pretrained_model_name_or_path=f"{DIGITS_BASE_DIR}/final", subfolder="transformer"),
        data=DataConfig(source="digits"),
        optim=OptimConfig(learning_rate=2e-4, lr_warmup_steps=0, train_batch_size=64,
                          max_train_steps=DIGITS_POST_STEPS, adam_weight_decay=1e-2, max_grad_norm=1.0),
        soar=SoarConfig(num_aux=num_aux, rollout_steps=40, guidance_scale=4.5, cond_dropout=0.1),
        checkpoint=CheckpointConfig(checkpointing_steps=0, checkpoints_total_limit=1),
        logging=LoggingConfig(logging_steps=5, validation_steps=0),
        runtime=RuntimeConfig(output_dir=f"runs/{name}", seed=0),
    )


def digits_sft() -> TrainConfig:
    """Post-train the digits base with plain SFT (num_aux=0) for DIGITS_POST_STEPS steps."""
    return _digits_post("digits-sft", 0)


def digits_soar() -> TrainConfig:
    """Post-train the digits base with SOAR for the same steps, seeds and data order as digits-sft."""
    return _digits_post("digits-soar", DIGITS_NUM_AUX)


def tiny() -> TrainConfig:
    """A seconds-long smoke run: a 1-block digits model, 4 steps, SOAR with 2 auxiliary points."""
    return TrainConfig(
        recipe="tiny",
        model=ModelConfig(preset="digits", num_layers=1, num_attention_heads=2, attention_head_dim=8),
        data=DataConfig(source="digits"),
        optim=OptimConfig(learning_rate=1e-3, train_batch_size=8, max_train_steps=4),
        soar=SoarConfig(num_aux=2, rollout_steps=10, cond_dropout=0.1),
        checkpoint=CheckpointConfig(checkpointing_steps=2, checkpoints_total_limit=2),
        logging=LoggingConfig(logging_steps=1, validation_steps=0, validation_images_per_class=1,
                              validation_inference_steps=4, progress_bar=False),
        runtime=RuntimeConfig(output_dir="runs/tiny", seed=0),
    )


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "digits-pretrain": digits_pretrain,
    "digits-sft": digits_sft,
    "digits-soar": digits_soar,
    "tiny": tiny,
}


def recipe_names() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str) -> TrainConfig:
    """A fresh `TrainConfig` of the named recipe; a one-line ConfigError for an unknown name."""
    if name not in RECIPES:
        import difflib

        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown recipe {name!r}: {hint}choose one of {', '.join(recipe_names())}")
    return dataclasses.replace(RECIPES[name]())
