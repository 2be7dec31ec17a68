"""Checkpoints through the trainer: atomic writes, keep-last-N, corrupt/truncated fallback, refusal."""

import logging

import pytest
import torch

from soar_fast.train import CheckpointError, Trainer, find_checkpoints
from soar_fast.train import checkpoint as ckpt_mod


def _trained(tmp_path, make_cfg, steps=4, every=2, limit=3):
    t = Trainer(make_cfg(tmp_path / "run", steps=steps, checkpointing_steps=every,
                         checkpoint__checkpoints_total_limit=limit))
    t.train()
    return t


def _weights(t):
    return {n: p.detach().full_tensor().clone() for n, p in t.model.named_parameters()}


def test_keeps_the_last_n_checkpoints(tmp_path, make_cfg):
    _trained(tmp_path, make_cfg, steps=6, every=1, limit=2)
    assert [p.name for p in find_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000006", "step_00000005"]


def test_an_interrupted_write_leaves_the_last_good_checkpoint_loadable(tmp_path, make_cfg, monkeypatch):
    t = _trained(tmp_path, make_cfg, steps=2, every=2)
    good = _weights(t)
    t.train_step()

    def crash(*a, **k):  # dies after the shards are written, before state.json and the manifest
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "_fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        t.save()
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in find_checkpoints(root)] == ["step_00000002"]
    assert any(p.name.startswith(".tmp-step_00000003") for p in root.iterdir())  # the debris is ignored
    fresh = Trainer(make_cfg(tmp_path / "run", steps=4, checkpointing_steps=2,
                             checkpoint__resume_from_checkpoint="latest"))
    assert fresh.step == 2
    assert all(torch.equal(v, _weights(fresh)[k]) for k, v in good.items())


def test_a_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, make_cfg, caplog):
    _trained(tmp_path, make_cfg, steps=4, every=2)
    newest = tmp_path / "run" / "checkpoints" / "step_00000004" / "__0_0.distcp"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        t = Trainer(make_cfg(tmp_path / "run", steps=4, checkpoint__resume_from_checkpoint="latest"))
    assert t.step == 2
    assert "step_00000004 is unusable" in caplog.text and "truncated" in caplog.text
    assert newest.exists()  # nothing already written is deleted


def test_a_corrupt_byte_is_detected(tmp_path, make_cfg):
    t = _trained(tmp_path, make_cfg, steps=2, every=2)
    f = tmp_path / "run" / "checkpoints" / "step_00000002" / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"sha256 mismatch.*start fresh in a new --output_dir"):
        ckpt_mod.load_checkpoint([f.parent], model=t.model, optimizer=t.step_fn.optimizer, ema=None)


def test_an_explicit_corrupt_checkpoint_is_refused_not_replaced(tmp_path, make_cfg):
    _trained(tmp_path, make_cfg, steps=4, every=2)
    target = tmp_path / "run" / "checkpoints" / "step_00000004"
    (target / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        Trainer(make_cfg(tmp_path / "run", steps=4, checkpoint__resume_from_checkpoint=str(target)))


def test_a_single_process_checkpoint_of_soar_fast_0_1_is_refused_in_one_line(tmp_path, make_cfg):
    """The old `checkpoint-<step>` folders (safetensors) are not resumed, and never silently
    skipped: 'latest' and an explicit folder both raise one line naming the way out; nothing
    in the folder is touched, and a fresh run there is refused as another run's folder."""
    from soar_fast.config import ConfigError

    old = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    old.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "state.json", "manifest.json"):
        (old / name).write_bytes(b"0.1")
    files = sorted(p.name for p in old.iterdir())
    for resume in ("latest", str(old)):
        with pytest.raises(ConfigError, match=r"checkpoint-4'? is a single-process checkpoint of soar_fast 0\.1.*"
                                              r"new run in another --output_dir") as err:
            Trainer(make_cfg(tmp_path / "run", checkpoint__resume_from_checkpoint=resume))
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="already holds another run"):
        Trainer(make_cfg(tmp_path / "run"))
    assert sorted(p.name for p in old.iterdir()) == files
    assert find_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_final_checkpoint_off_saves_nothing_at_the_end(tmp_path, make_cfg):
    """Timing runs of big models skip the end-of-run checkpoint; periodic ones are still written."""
    Trainer(make_cfg(tmp_path / "a", steps=3, checkpoint__final_checkpoint=False)).train()
    assert find_checkpoints(tmp_path / "a" / "checkpoints") == []
    Trainer(make_cfg(tmp_path / "b", steps=3, checkpointing_steps=2, checkpoint__final_checkpoint=False)).train()
    assert [p.name for p in find_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_00000002"]
