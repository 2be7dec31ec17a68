"""The trainer: step composition, optimizer, EMA, checkpoints, logging (see trainer.py)."""

from soar_fast.train.build import (
    LOSS_STEPS,
    EagerStep,
    LossStep,
    build_loss_step,
    build_model,
    build_optimizer,
    learning_rate_at,
    register_loss_step,
)
from soar_fast.train.checkpoint import (
    CheckpointError,
    find_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from soar_fast.train.trainer import Trainer, TrainingAborted, TrainResult, check_output_dir

__all__ = [
    "LOSS_STEPS",
    "CheckpointError",
    "EagerStep",
    "LossStep",
    "TrainResult",
    "Trainer",
    "TrainingAborted",
    "build_loss_step",
    "build_model",
    "build_optimizer",
    "check_output_dir",
    "find_checkpoints",
    "learning_rate_at",
    "load_checkpoint",
    "register_loss_step",
    "save_checkpoint",
]
