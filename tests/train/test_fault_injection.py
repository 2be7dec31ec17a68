"""Fault injection: SIGKILL a real `soar-fast train` process at seeded random moments, and once
in the middle of its first checkpoint write, then resume until it finishes. The final weights
equal an uninterrupted run's bitwise and the log holds one row per step with the same losses."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

STEPS = 6
CMD = [sys.executable, "-m", "soar_fast.train", "--recipe", "tiny", "--report_to", "none",
       "--logging.validation_images_per_class", "0", "--max_train_steps", str(STEPS), "--checkpointing_steps", "1",
       "--checkpoints_total_limit", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(out: Path, resume: bool = False, kill_when=None, timeout: float = 120) -> int:
    """Run to the end, or SIGKILL it once `kill_when()` is true; the exit code (-9 when killed)."""
    proc = subprocess.Popen([*CMD, "--output_dir", str(out), *(["--resume"] if resume else [])], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while proc.poll() is None:
        if kill_when is not None and kill_when():
            proc.send_signal(signal.SIGKILL)
            return proc.wait()
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("the run hung")
        time.sleep(0.002)
    return proc.returncode


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict:
    return load_file(out / "final" / "transformer" / "diffusion_pytorch_model.safetensors")


def test_random_kills_then_resume_equal_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    assert _run(ref) == 0
    run, rng = tmp_path / "run", random.Random(0)
    ckpts = run / "checkpoints"
    # 1. during the first checkpoint write (its temporary folder exists), or at the latest just after it
    first = lambda: (ckpts / ".tmp-step_00000001").exists() or (ckpts / "step_00000001").exists()  # noqa: E731
    assert _run(run, kill_when=first) == -signal.SIGKILL
    # 2. three kills at random moments after the first checkpoint, each followed by a resume
    kills = 0
    for _ in range(3):
        start = time.monotonic()
        delay = rng.uniform(0.5, 3.0)
        rc = _run(run, resume=True, kill_when=lambda s=start, d=delay: time.monotonic() - s > d)
        kills += rc == -signal.SIGKILL
        if rc == 0:
            break
    assert kills >= 1
    if not (run / "final").exists():
        assert _run(run, resume=True) == 0
    want, got = _weights(ref), _weights(run)
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)  # bitwise
    rows, ref_rows = _rows(run), _rows(ref)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref_rows]
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
