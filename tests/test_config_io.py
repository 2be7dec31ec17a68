"""soar_fast.config.io: the file/JSON round trips, re-exported from soar_fast.config."""

import pytest

import soar_fast.config as config
from soar_fast.config import ConfigError, TrainConfig, config_from_dict, get_recipe
from soar_fast.config import io as config_io
from soar_fast.config import train as config_train


def test_io_names_are_re_exported_from_soar_fast_config_only():
    for name in config_io.__all__:
        assert getattr(config, name) is getattr(config_io, name)
        assert name in config.__all__
        assert not hasattr(config_train, name)


def test_json_round_trip(tmp_path):
    cfg = get_recipe("digits-soar")
    config.save_config_json(cfg, tmp_path / "config.json")
    assert config.load_config_json(tmp_path / "config.json") == cfg


def test_unknown_field_suggests_the_close_name():
    with pytest.raises(ConfigError, match=r"unknown field 'optim.learning_rat'; did you mean 'optim.learning_rate'"):
        config_from_dict(TrainConfig(), {"optim": {"learning_rat": 1e-3}})


def test_values_are_type_checked_and_post_init_reruns():
    cfg = config_from_dict(TrainConfig(), {"optim": {"learning_rate": 1}, "model": {"lora_target_modules": None}})
    assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
    with pytest.raises(ConfigError, match="expects true/false"):
        config_from_dict(TrainConfig(), {"optim": {"use_ema": "yes"}})
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        config_from_dict(TrainConfig(), {"optim": {"learning_rate": -1.0}})
