"""A NaN/inf streak never becomes the checkpoint 'latest' resumes: no checkpoint is written during a
streak, the one holding the weights the streak ran on is set aside, and the abort line names the
last good checkpoint and the resume command; resuming from it with a sane learning rate trains."""

import math

import pytest
import torch

from soar_fast.config import ConfigError
from soar_fast.train import Trainer, TrainingAborted
from soar_fast.train.checkpoint import checkpoint_step, find_checkpoints


def _steps(run):
    return sorted(checkpoint_step(p) for p in find_checkpoints(run / "checkpoints"))


def _max_abs_weight(t):
    return max(p.detach().to_local().abs().max().item() for p in t.model.parameters())


def test_no_checkpoint_is_written_during_a_nan_streak(tmp_path, make_cfg, monkeypatch):
    from soar_fast.train.step import TrainStep

    real, calls = TrainStep.micro_step, [0]

    def micro_step(self, *args, **kwargs):  # steps 3 and 4 (calls 2, 3) have a NaN loss
        out = real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] - 1 in (2, 3):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(TrainStep, "micro_step", micro_step)
    run = tmp_path / "r"
    res = Trainer(make_cfg(run, steps=6, checkpointing_steps=1, checkpoint__checkpoints_total_limit=10,
                           optim__max_nan_streak=5)).train()
    assert res.nan_skipped == 2 and _steps(run) == [1, 2, 5, 6]


def test_interrupted_during_a_streak_keeps_the_last_good_checkpoint_newest(tmp_path, make_cfg, monkeypatch):
    from soar_fast.train.step import TrainStep

    real = TrainStep.micro_step

    def micro_step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    run = tmp_path / "r"
    Trainer(make_cfg(run, steps=2, checkpointing_steps=2)).train()
    monkeypatch.setattr(TrainStep, "micro_step", micro_step)
    t = Trainer(make_cfg(run, steps=10, checkpointing_steps=2, checkpoint__resume_from_checkpoint="latest",
                         optim__max_nan_streak=5))
    t._stop_signal = 15  # as if SIGTERM arrived: the step stops the run, whose end save is skipped
    res = t.train()
    assert res.interrupted and res.step == 3 and _steps(run) == [2]
    assert res.last_checkpoint == str(run / "checkpoints" / "step_00000002")


def test_a_blown_up_run_resumes_from_the_last_good_checkpoint_with_a_lower_lr(tmp_path, make_cfg):
    run = tmp_path / "r"
    kw = dict(checkpointing_steps=1, checkpoint__checkpoints_total_limit=3, optim__max_nan_streak=3)
    Trainer(make_cfg(run, steps=4, **kw)).train()  # 4 sane steps at lr 1e-3
    # lr 1e6: step 5 is applied (finite, huge weights, checkpointed), then every step is NaN
    blown = Trainer(make_cfg(run, steps=20, optim__learning_rate=1e6, checkpoint__resume_from_checkpoint="latest",
                             **kw))
    with pytest.raises(TrainingAborted) as e:
        blown.train()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("aborted at step 8: 3 consecutive steps had a NaN/inf loss")
    assert "set aside step_00000005" in msg and f"last good checkpoint {run / 'checkpoints' / 'step_00000004'}" in msg
    assert f"--output_dir {run} --resume_from_checkpoint latest --learning_rate 100000" in msg
    assert _steps(run) == [3, 4] and (run / "checkpoints" / "nan-step_00000005" / "state.json").is_file()

    resumed = Trainer(make_cfg(run, steps=8, checkpoint__resume_from_checkpoint="latest", **kw))
    assert resumed.step == 4
    w = _max_abs_weight(resumed)
    assert math.isfinite(w) and w < 100  # the sane weights of step 4, not the blown-up ones of step 5
    res = resumed.train()
    assert res.step == 8 and res.nan_skipped == 0
    assert all(torch.isfinite(p.detach().to_local()).all() for p in resumed.model.parameters())


def test_a_streak_from_the_first_step_says_there_is_no_good_checkpoint(tmp_path, make_cfg):
    run = tmp_path / "r"
    t = Trainer(make_cfg(run, steps=10, checkpointing_steps=1, optim__learning_rate=1e6, optim__max_nan_streak=2))
    with pytest.raises(TrainingAborted, match=r"no good checkpoint yet \(a resume starts from step 0\)"):
        t.train()
    assert _steps(run) == []  # step 1's blown-up checkpoint is set aside
    with pytest.raises(ConfigError, match="already holds another run"):  # still another run's folder
        Trainer(make_cfg(run, steps=3))
    res = Trainer(make_cfg(run, steps=3, checkpoint__resume_from_checkpoint="latest")).train()
    assert res.step == 3 and res.nan_skipped == 0
