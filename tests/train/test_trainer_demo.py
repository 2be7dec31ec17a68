"""The demo (the study at one seed) end to end at toy size: report with tables, plots and grids;
base reuse; folder guard."""

import pytest

from soar_fast.config import ConfigError, DemoConfig
from soar_fast.train.study import run_demo


def test_demo_writes_the_report_and_reuses_the_base(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOAR_FAST_CACHE", str(tmp_path / "cache"))
    dc = DemoConfig(output_dir=str(tmp_path / "demo"), pretrain_steps=2, post_train_steps=2, num_samples=10,
                    num_inference_steps=4, exposure_samples=6, exposure_sigmas=2, progress_bar=False)
    assert dc.num_seeds == 1 and dc.guidance_scales == (1.0,) and dc.exposure_guidance_scale == 4.5 and dc.eval_every == 0
    report = run_demo(dc)
    text = report.read_text()
    for needle in ("the demo, 1 seed", "| base |", "| sft |", "| soar |", "Frechet distance", "precision",
                   "coverage", "exposure bias", "## Verdict", "`soar-fast study`", "loss_curves.png",
                   "exposure_bias.png", "metrics_vs_cfg.png", "grid_soar_cfg1.png", "Exposure bias (sampler CFG 4.5)"):
        assert needle in text, needle
    assert "metrics_vs_steps.png" not in text  # no intermediate evaluations in the demo
    assert "CFG 4.5**" not in text  # the sample metrics at one scale, exposure bias alone at the rollout's
    for f in ("loss_curves.png", "exposure_bias.png", "grid_base_cfg1.png", "grid_sft_cfg1.png", "study.json"):
        assert (tmp_path / "demo" / f).stat().st_size > 0
    out = capsys.readouterr().out
    assert f"report: {report.resolve()}" in out and "pretraining the base" in out
    run_demo(dc)  # a second demo into the same report folder reuses the cached base
    assert "reusing the pretrained base" in capsys.readouterr().out


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a study or demo report folder"):
        run_demo(DemoConfig(output_dir=str(tmp_path), progress_bar=False))
    assert (tmp_path / "mine.txt").read_text() == "keep me"
