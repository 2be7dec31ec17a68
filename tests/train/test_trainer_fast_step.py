"""`--runtime.step fast` inside the trainer: same draws, same losses as the eager step."""

import json

import pytest

from soar_fast.cli import main


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("extra", [[], ["--fast.micro_chunks", "2", "--gradient_accumulation_steps", "2"]],
                         ids=["plain", "chunks2-accum2"])
def test_fast_step_in_trainer_matches_eager(tmp_path, extra):
    common = ["train", "--recipe", "tiny", "--max_train_steps", "3", "--checkpointing_steps", "0",
              "--logging.logging_steps", "1", "--report_to", "none", *extra]
    assert main([*common, "--output_dir", str(tmp_path / "eager")]) == 0
    assert main([*common, "--runtime.step", "fast", "--output_dir", str(tmp_path / "fast")]) == 0
    eager, fast = _losses(tmp_path / "eager"), _losses(tmp_path / "fast")
    assert len(eager) == len(fast) >= 3
    for a, b in zip(eager, fast):
        assert abs(a - b) <= 1e-4 * abs(a), (eager, fast)


def test_parity_subcommand(capsys):
    assert main(["parity", "--variants", "batched,fp8_rollout"]) == 0
    assert "parity: 4 ok, 0 failed" in capsys.readouterr().out
