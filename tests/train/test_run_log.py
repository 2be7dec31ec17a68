"""Run folder bookkeeping: metrics.jsonl holds one row per step on every start and resume (no
duplicates, a torn last line repaired), a run from step 0 never appends to an older log, and the
temporary folders of killed checkpoint writes are removed at the start and at the end of a run."""

import json

import pytest

from soar_fast.train import Trainer, find_checkpoints
from soar_fast.train import checkpoint as ckpt_mod
from soar_fast.train.logger import MetricsLogger, read_metrics


def _steps(path):
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines()]


def test_resume_drops_later_rows_duplicates_and_a_torn_line(tmp_path, make_cfg):
    run = tmp_path / "r"
    # "killed" after step 3: its checkpoint is step 2, the log already holds step 3
    Trainer(make_cfg(run, steps=3, checkpointing_steps=2, checkpoint__final_checkpoint=False)).train()
    log = run / "metrics.jsonl"
    first = log.read_text().splitlines()
    assert _steps(log) == [1, 2, 3] and [p.name for p in find_checkpoints(run / "checkpoints")] == ["step_00000002"]
    # an older bug's repeated row, then the partial JSON of a write cut by the kill
    log.write_text("\n".join([first[0], *first]) + '\n{"step": 4, "train/lo')
    t = Trainer(make_cfg(run, steps=5, checkpointing_steps=2, checkpoint__resume_from_checkpoint="latest"))
    assert t.step == 2 and _steps(log) == [1, 2]  # rewritten before the first new row
    t.train()
    assert _steps(log) == [1, 2, 3, 4, 5]
    assert log.read_text().splitlines()[:2] == first[:2]
    assert not (run / "metrics.prev.jsonl").exists()


def test_a_restart_before_the_first_checkpoint_starts_a_new_log(tmp_path, make_cfg):
    run = tmp_path / "r"
    Trainer(make_cfg(run, steps=2, checkpoint__final_checkpoint=False)).train()  # no checkpoint at all
    old = (run / "metrics.jsonl").read_text()
    # --resume finds no checkpoint: the run starts from step 0, so it must not append to the old log
    Trainer(make_cfg(run, steps=3, checkpoint__resume_from_checkpoint="latest")).train()
    assert _steps(run / "metrics.jsonl") == [1, 2, 3]
    assert (run / "metrics.prev.jsonl").read_text() == old


def test_a_fresh_run_moves_an_old_log_aside(tmp_path, make_cfg):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 7, "train/loss": 1.0}\n{"step": 8, "tr')
    (run / "metrics.prev.jsonl").write_text("older\n")
    Trainer(make_cfg(run, steps=2)).train()
    assert _steps(run / "metrics.jsonl") == [1, 2]
    assert (run / "metrics.prev.jsonl").read_text().startswith('{"step": 7')


def test_read_metrics_and_logger_survive_a_torn_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    lg = MetricsLogger(tmp_path, "none", resume_step=5)
    lg.log(3, {"a": 3.0})
    lg.close()
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]


def test_temporary_checkpoint_folders_are_removed_at_start_and_end(tmp_path, make_cfg, monkeypatch):
    run = tmp_path / "r"
    t = Trainer(make_cfg(run, steps=2, checkpointing_steps=2))
    t.train()
    root = run / "checkpoints"

    def crash(*a, **k):  # a write killed after the shards, before state.json and the manifest
        raise OSError("killed (simulated)")

    t.train_step()
    monkeypatch.setattr(ckpt_mod, "_fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        t.save()
    monkeypatch.undo()
    assert (root / ".tmp-step_00000003").is_dir()
    resumed = Trainer(make_cfg(run, steps=4, checkpointing_steps=2, checkpoint__resume_from_checkpoint="latest"))
    assert not (root / ".tmp-step_00000003").exists() and resumed.step == 2  # removed at the start

    (root / ".tmp-step_00000009").mkdir()  # e.g. a peer's write that died mid-run
    (root / ".tmp-step_00000009" / "__1_0.distcp").write_bytes(b"x")
    resumed.train()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]  # and at the end


def test_an_interrupted_re_save_puts_the_old_copy_back(tmp_path, make_cfg):
    run = tmp_path / "r"
    Trainer(make_cfg(run, steps=2, checkpointing_steps=2)).train()
    root = run / "checkpoints"
    # killed between the two renames of a re-save of step 2: only the old copy and the new temporary one
    (root / "step_00000002").rename(root / ".old-step_00000002")
    (root / ".tmp-step_00000002").mkdir()
    t = Trainer(make_cfg(run, steps=2, checkpoint__resume_from_checkpoint="latest"))
    assert t.step == 2 and sorted(p.name for p in root.iterdir()) == ["step_00000002"]
