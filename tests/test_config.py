"""SoarConfig: defaults follow SOAR.md, bad values raise a one-line error naming the field."""

import pytest

from soar_fast import ConfigError, SoarConfig


def test_defaults_match_the_contract():
    c = SoarConfig()
    assert (c.num_aux, c.rollout_steps, c.guidance_scale, c.lambda_aux) == (6, 40, 4.5, 1.0)
    assert (c.sigma_hi_ratio, c.sigma_min, c.shift) == (None, 1e-3, 3.0)
    assert (c.logit_mean, c.logit_std, c.weighting, c.normalization) == (0.0, 1.0, "logit_normal", "points")
    assert c.timestep_quantization is False and c.cond_dropout == 0.0
    assert not c.is_sft and SoarConfig(num_aux=0).is_sft and SoarConfig(lambda_aux=0.0).is_sft


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_aux", -1),
        ("num_aux", 2.5),
        ("rollout_steps", 0),
        ("guidance_scale", -0.1),
        ("guidance_scale", float("nan")),
        ("lambda_aux", -1.0),
        ("sigma_hi_ratio", 0.0),
        ("sigma_min", 0.0),
        ("sigma_min", 1.5),
        ("shift", 0.0),
        ("logit_std", 0.0),
        ("weighting", "snr"),
        ("normalization", "mean"),
        ("timestep_quantization", "yes"),
        ("cond_dropout", 1.2),
    ],
)
def test_bad_values_raise_one_line_error_naming_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        SoarConfig(**{field: value})
    msg = str(err.value)
    assert f"SoarConfig.{field}=" in msg
    assert "\n" not in msg


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        SoarConfig(num_aux=-3)


def test_tiny_family_recipes_train_their_family():
    """`tiny-<family>`: the family's tiny preset on synthetic latents (the families' own tests train them)."""
    from soar_fast.config import get_recipe
    from soar_fast.config.recipes import TINY_FAMILIES

    for fam in TINY_FAMILIES:
        cfg = get_recipe(f"tiny-{fam}")
        assert (cfg.model.family, cfg.model.preset, cfg.data.source, cfg.recipe) == (fam, "tiny", "synthetic", f"tiny-{fam}")


def test_the_config_knows_every_family_the_spec_defines():
    from soar_fast.config.train import FAMILY_NAMES
    from soar_fast.models import spec

    assert set(FAMILY_NAMES) == {"sd3", "flux", *spec._MODULES}
