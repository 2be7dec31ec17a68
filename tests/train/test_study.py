"""`soar-fast study` at toy size: report, JSON rows, and the resume of an interrupted study
(finished runs and evaluations are kept, the run in progress continues from its checkpoint, and
the numbers equal those of an uninterrupted study)."""

import json
import signal

import pytest

from soar_fast.config import ConfigError, StudyConfig
from soar_fast.train import study as study_mod
from soar_fast.train.study import run_study
from soar_fast.train.trainer import Trainer

TOY = dict(pretrain_steps=2, post_train_steps=4, eval_every=2, num_samples=10, num_inference_steps=4,
           num_seeds=2, guidance_scales=(1.0, 4.5), curve_guidance_scales=(1.0,), exposure_samples=6,
           exposure_sigmas=2, progress_bar=False)


def _values(out):
    rows = json.loads((out / "study.json").read_text())["rows"]
    return {(r["model"], r["seed"], r["step"], r["guidance_scale"], r["metric"], r.get("sigma")): r["value"]
            for r in rows}


@pytest.fixture
def counted(monkeypatch):
    """Counts the evaluations the study runs (each one samples a model)."""
    calls = []
    real = study_mod.evaluate_model

    def wrapped(model, ds, ec, **kw):
        calls.append((ec.guidance_scale, ec.seed))
        return real(model, ds, ec, **kw)

    monkeypatch.setattr(study_mod, "evaluate_model", wrapped)
    return calls


def test_study_report_rows_and_an_interrupted_study_resumes_to_the_same_numbers(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("SOAR_FAST_CACHE", str(tmp_path / "cache"))
    whole = tmp_path / "whole"
    report = run_study(StudyConfig(output_dir=str(whole), **TOY))
    text = report.read_text()
    for needle in ("2 seeds", "| base |", "| sft |", "| soar |", "**soar − sft**", "**sft − base**", "## Verdict",
                   "metrics_vs_cfg.png", "metrics_vs_steps.png", "exposure_bias.png", "grid_soar_cfg4.5.png"):
        assert needle in text, needle
    for f in ("metrics_vs_cfg.png", "metrics_vs_steps.png", "exposure_bias.png", "loss_curves.png",
              "grid_base_cfg1.png", "grid_sft_cfg4.5.png"):
        assert (whole / f).stat().st_size > 0
    n_whole = len(counted)
    # base 2 seeds x 2 scales, then per seed and model: 1 intermediate (step 2, CFG 1) + 2 final
    assert n_whole == 2 * 2 + 2 * 2 * (1 + 2)
    ref = _values(whole)
    assert {k[0] for k in ref} == {"base", "sft", "soar", "real"}
    assert {k[2] for k in ref if k[0] == "soar"} == {2, 4}

    # Interrupt the second seed's SOAR run after its step 2 (as Ctrl-C would: a checkpoint, then exit).
    part = tmp_path / "part"
    real_train = Trainer.train

    def train(self, on_step=None):
        def hook(tr):
            if on_step is not None:
                on_step(tr)
            if tr.out.name == "soar-seed1" and tr.step == 2:
                tr._on_signal(signal.SIGINT, None)
        return real_train(self, on_step=hook)

    monkeypatch.setattr(Trainer, "train", train)
    counted.clear()
    with pytest.raises(KeyboardInterrupt):
        run_study(StudyConfig(output_dir=str(part), **TOY))
    done_before = len(counted)
    assert (part / "runs" / "soar-seed1" / "checkpoints" / "step_00000003").is_dir()
    assert not (part / "report.md").exists()
    monkeypatch.setattr(Trainer, "train", real_train)
    counted.clear()
    run_study(StudyConfig(output_dir=str(part), **TOY))
    assert len(counted) == 2  # only soar seed 1's two final evaluations were left
    assert done_before + len(counted) == n_whole
    got = _values(part)
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_study_refuses_a_folder_it_did_not_write_and_bad_flags(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a study or demo report folder"):
        run_study(StudyConfig(output_dir=str(tmp_path), progress_bar=False))
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    # an unfinished study of another configuration is refused, its measured rows kept
    other = tmp_path / "other"
    other.mkdir()
    (other / "study_state.json").write_text(json.dumps({"status": "running", "config": {"num_seeds": 7}}))
    (other / "rows.jsonl").write_text('{"unit": "base/seed0/step0/cfg1", "rows": []}\n')
    for extra in ({}, {"report_only": True}):
        with pytest.raises(ConfigError, match="unfinished study"):
            run_study(StudyConfig(output_dir=str(other), progress_bar=False, **extra))
    assert "base/seed0" in (other / "rows.jsonl").read_text()
    for kw, needle in ((dict(num_seeds=0), "num_seeds"), (dict(guidance_scales=()), "guidance_scales"),
                       (dict(num_aux=(0,)), "num_aux"), (dict(lambda_aux=(-1.0,)), "lambda_aux"),
                       (dict(curve_guidance_scales=(-2.0,)), "guidance_scale")):
        with pytest.raises(ConfigError, match=needle):
            StudyConfig(**kw)
