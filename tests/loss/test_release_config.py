"""SoarConfig's reference-release fields: defaults (ours), validation, and reference_release()."""

import pytest

from soar_fast import ConfigError, SoarConfig


def test_new_fields_default_to_ours():
    c = SoarConfig()
    assert (c.aux_timestep, c.num_rollout_paths, c.sde_rollout_type, c.sde_noise_scale) == ("sigma", 1, "flow_sde", 0.5)
    assert (c.cond_dropout_per, c.target_dtype, c.time_density) == ("sample", "fp32", "logit_normal")
    assert c.num_points == 6 and SoarConfig(num_aux=0).num_points == 0
    assert SoarConfig(num_aux=3, num_rollout_paths=2).num_points == 6


def test_reference_release_matches_the_release_parse_args_defaults():
    # Tencent-Hunyuan/HY-SOAR @ 59f0e02, soar/train_soar_sd3_5m.py parse_args: --trajectory_length 6,
    # --num_sampling_steps 40, --cfg_scale_sampling 4.5, --lambda_aux 1.0, --num_rollout_paths 1,
    # --sde_rollout_type flow_sde, --sde_noise_scale 0.5, --cond_dropout_rate 0.0, --weighting_scheme
    # logit_normal, --logit_mean 0.0, --logit_std 1.0; --sigma_upper_ratio 1.5 is passed but
    # soar/utils/algorithm.py single_step_aux_points always uses sigma_upper = 1 (our None).
    c = SoarConfig.reference_release()
    assert c.num_aux == 6
    assert c.rollout_steps == 40
    assert c.guidance_scale == 4.5
    assert c.lambda_aux == 1.0
    assert c.num_rollout_paths == 1
    assert c.sde_rollout_type == "flow_sde"
    assert c.sde_noise_scale == 0.5
    assert c.cond_dropout == 0.0
    assert c.weighting == "logit_normal"
    assert (c.logit_mean, c.logit_std) == (0.0, 1.0)
    assert c.sigma_hi_ratio is None
    # choices the release's code makes without a flag (train_soar_sd3_5m.py main, algorithm.py):
    assert c.shift == 3.0  # the SD3.5-Medium scheduler config
    assert c.normalization == "points"  # (loss_main + loss_aux) / (main_count + λ·aux_count)
    assert c.timestep_quantization is True  # t_to_sigma_timestep: σ0, σ1 are table entries
    assert c.aux_timestep == "table"  # sigma_to_t then t_to_sigma_timestep at aux points
    assert c.cond_dropout_per == "batch"  # one random.random() per batch
    assert c.target_dtype == "model"  # z_0.to(weight_dtype), targets in weight_dtype
    assert c.time_density == "by_weighting"  # compute_density_for_timestep_sampling


def test_reference_release_takes_overrides_and_validates_them():
    c = SoarConfig.reference_release(num_rollout_paths=4, sde_rollout_type="cps")
    assert (c.num_rollout_paths, c.sde_rollout_type, c.aux_timestep) == (4, "cps", "table")
    with pytest.raises(ConfigError, match="SoarConfig.num_rollout_paths=0"):
        SoarConfig.reference_release(num_rollout_paths=0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("aux_timestep", "discrete"),
        ("num_rollout_paths", 0),
        ("num_rollout_paths", 1.5),
        ("num_rollout_paths", True),
        ("sde_rollout_type", "ddim"),
        ("sde_noise_scale", -0.1),
        ("sde_noise_scale", float("inf")),
        ("cond_dropout_per", "step"),
        ("target_dtype", "bf16"),
        ("time_density", "uniform"),
    ],
)
def test_bad_values_raise_one_line_error_naming_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        SoarConfig(**{field: value})
    msg = str(err.value)
    assert f"SoarConfig.{field}=" in msg and "\n" not in msg


def test_reference_release_round_trips_through_a_run_config():
    import dataclasses

    from soar_fast.config import TrainConfig, config_from_dict, config_to_dict

    cfg = dataclasses.replace(TrainConfig(), soar=SoarConfig.reference_release(num_rollout_paths=3))
    back = config_from_dict(TrainConfig(), config_to_dict(cfg))
    assert back.soar == cfg.soar
    with pytest.raises(ConfigError, match="sde_rollout_type"):
        config_from_dict(TrainConfig(), {"soar": {"sde_rollout_type": "bogus"}})
