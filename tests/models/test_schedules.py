"""`models.schedules.pipeline_sigmas`: the σ schedule each family's pipeline sets its scheduler to, for a
resolution-dependent (dynamic) shift as for a static one, against diffusers' own helpers."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu  # noqa: E402

from soar_fast.models.schedules import pipeline_sigmas  # noqa: E402

N = 8


def _save(tmp_path, scheduler):
    scheduler.save_pretrained(tmp_path / "scheduler")
    return tmp_path


@pytest.mark.parametrize("family, shape, tokens", [("flux", (16, 64, 96), 32 * 48), ("qwenimage", (16, 64, 64), 32 * 32),
                                                   ("zimage", (16, 128, 128), 64 * 64), ("flux2", (128, 64, 64), 64 * 64)])
def test_dynamic_shift_follows_the_image_tokens(tmp_path, family, shape, tokens):
    cfg = dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    got = pipeline_sigmas(_save(tmp_path, FlowMatchEulerDiscreteScheduler(**cfg)), family, N, shape)
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    mu = compute_empirical_mu(tokens, N) if family == "flux2" else calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N), mu=mu)
    torch.testing.assert_close(got, ref.sigmas.float())
    assert got[0] == 1 and got[-1] == 0 and got.numel() == N + 1
    bigger = pipeline_sigmas(tmp_path, family, N, (shape[0], 2 * shape[1], 2 * shape[2]))
    assert (bigger[1:-1] > got[1:-1]).all()  # more image tokens: a larger shift, more steps at high noise


def test_static_schedules_and_a_folder_without_one(tmp_path):
    sd3 = pipeline_sigmas(_save(tmp_path / "a", FlowMatchEulerDiscreteScheduler(shift=3.0)), "sd3", N, (16, 64, 64))
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(N)
    torch.testing.assert_close(sd3, ref.sigmas.float())
    wan = pipeline_sigmas(_save(tmp_path / "b", UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                         use_flow_sigmas=True, flow_shift=3.0)),
                          "wan", N, (16, 5, 60, 104))
    assert wan.numel() == N + 1 and wan[-1] == 0 and (wan[:-1] > wan[1:]).all()
    assert pipeline_sigmas(tmp_path / "none", "flux", N, (16, 8, 8)) is None


def test_effective_shift_is_e_to_the_mu_or_the_static_shift(tmp_path):
    from soar_fast.models.schedules import effective_shift

    cfg = dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    got = effective_shift(_save(tmp_path / "a", FlowMatchEulerDiscreteScheduler(**cfg)), "flux", 40, (16, 64, 64))
    assert got == pytest.approx(np.exp(calculate_shift(32 * 32, 256, 4096, 0.5, 1.15)), rel=1e-4)  # 512 px: 1.88
    assert effective_shift(_save(tmp_path / "b", FlowMatchEulerDiscreteScheduler(shift=3.0)), "sd3", 40,
                           (16, 64, 64)) == pytest.approx(3.0, rel=1e-4)


def test_an_unreadable_scheduler_falls_back_to_the_soar_shift(tmp_path, caplog):
    """Validation of a cache whose pipeline's scheduler cannot be built samples on --soar.shift, with one warning."""
    from types import SimpleNamespace

    from soar_fast.config import TrainConfig
    from soar_fast.train.validation import LatentValidation

    pipe = tmp_path / "pipe"
    (pipe / "scheduler").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "NoSuchScheduler"}')
    cfg = TrainConfig()
    cfg.data.source, cfg.logging.validation_steps = "latents", 1
    ds = SimpleNamespace(cache_dir=str(tmp_path), has_reference=False, info={"pipeline": str(pipe), "family": "flux"},
                         sample_shape=(16, 8, 8), uncond=lambda: (torch.zeros(3, 4), torch.zeros(0)),
                         validation=lambda: (["a"], (torch.zeros(1, 3, 4), torch.zeros(1, 0))))
    val = LatentValidation.maybe(cfg, ds)
    assert val is not None and val.sigmas is None
    assert sum("--soar.shift's schedule" in r.getMessage() for r in caplog.records) == 1
