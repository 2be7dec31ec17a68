"""A tiny digits config for trainer tests: a 1-block, width-16 model, batch 8, no TensorBoard."""

import pytest

from soar_fast.config import get_recipe


def tiny_config(out, steps=4, **kw):
    cfg = get_recipe("tiny")
    cfg.runtime.output_dir = str(out)
    cfg.optim.max_train_steps = steps
    cfg.logging.report_to = "none"
    cfg.logging.validation_images_per_class = 0
    cfg.checkpoint.checkpointing_steps = kw.pop("checkpointing_steps", 0)
    cfg.checkpoint.save_final_model = kw.pop("save_final_model", False)
    for key, value in kw.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.fixture
def make_cfg():
    return tiny_config
