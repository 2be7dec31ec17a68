"""Typed configuration. The lowest room: imports nothing else of soar_fast."""

from soar_fast.config.commands import DemoConfig, EvalConfig, SampleConfig, StudyConfig
from soar_fast.config.errors import ConfigError
from soar_fast.config.io import (
    config_from_dict,
    config_to_dict,
    load_config_file,
    load_config_json,
    save_config_json,
)
from soar_fast.config.parallel import ParallelConfig
from soar_fast.config.recipes import RECIPES, get_recipe, recipe_names
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

__all__ = [
    "RECIPES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RuntimeConfig",
    "SampleConfig",
    "SoarConfig",
    "StudyConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "get_recipe",
    "load_config_file",
    "load_config_json",
    "recipe_names",
    "save_config_json",
]
