"""The trainer: the step constructor, the loop, checkpoints, export, EMA, logging (see trainer.py)."""

from soar_fast.train.build import build_model
from soar_fast.train.checkpoint import (
    CheckpointError,
    find_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from soar_fast.train.step import StepResult, TrainStep, build_train_step, learning_rate_at
from soar_fast.train.trainer import Trainer, TrainingAborted, TrainResult, check_output_dir

__all__ = [
    "CheckpointError",
    "StepResult",
    "TrainResult",
    "TrainStep",
    "Trainer",
    "TrainingAborted",
    "build_model",
    "build_train_step",
    "check_output_dir",
    "find_checkpoints",
    "learning_rate_at",
    "load_checkpoint",
    "save_checkpoint",
]
