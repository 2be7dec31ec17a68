"""The demo end to end at toy size: report with table, plots and grids; base reuse; folder guard."""

import pytest

from soar_fast.config import ConfigError, DemoConfig
from soar_fast.train.demo import run_demo


def test_demo_writes_the_report_and_reuses_the_base(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOAR_FAST_CACHE", str(tmp_path / "cache"))
    dc = DemoConfig(output_dir=str(tmp_path / "demo"), pretrain_steps=2, post_train_steps=2, num_samples=10,
                    num_inference_steps=4, progress_bar=False)
    report = run_demo(dc)
    text = report.read_text()
    for needle in ("| base |", "| SFT |", "| SOAR |", "Frechet distance", "exposure bias", "## Verdict",
                   "loss_curves.png", "exposure_bias.png", "grid_soar.png"):
        assert needle in text
    for f in ("loss_curves.png", "exposure_bias.png", "grid_base.png", "grid_sft.png", "grid_soar.png", "results.json"):
        assert (tmp_path / "demo" / f).stat().st_size > 0
    out = capsys.readouterr().out
    assert f"report: {report.resolve()}" in out and "pretraining the base" in out
    run_demo(dc)  # a second demo into the same report folder reuses the cached base
    assert "reusing the pretrained base" in capsys.readouterr().out


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a demo report folder"):
        run_demo(DemoConfig(output_dir=str(tmp_path), progress_bar=False))
    assert (tmp_path / "mine.txt").read_text() == "keep me"
