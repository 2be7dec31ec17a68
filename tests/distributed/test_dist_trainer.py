"""The real trainer under torchrun (CPU, gloo) against the same trainer in one process.

Launches (a 2-rank launch costs ~15 s on 2 cores), shared by the checks through module fixtures:
  a  the issue's command: 2 ranks x 4, fast step, LoRA rank 4, EMA, checkpoints at 2 and 4
  b  the same in one process with the global batch of 8 (the oracle)
  c  one process resuming a's step-2 checkpoint (written by 2 ranks) with batch 8
  d/e  compile per block + activation checkpointing + the replica rollout + micro-chunks +
     gradient accumulation + EMA, on 2 ranks (d) and on 1 (e)
  f  FP8 rollout + FP8 training on 2 ranks, SIGTERM to rank 1 only: both ranks save one checkpoint
  g  a rank killed with SIGKILL: the other exits at once with one line, no hang
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

TINY = ["--recipe", "tiny", "--report_to", "none"]
ISSUE = ["--runtime.step", "fast", "--model.lora_rank", "4", "--use_ema", "--checkpointing_steps", "2"]
COMPOSED = ["--runtime.step", "fast", "--fast.compile", "per_block", "--fast.activation_checkpointing",
            "--fast.rollout", "cuda_graph", "--fast.micro_chunks", "2", "--gradient_accumulation_steps", "2",
            "--use_ema", "--max_train_steps", "3", "--checkpointing_steps", "0"]
KEYS = ("train/loss", "train/base_loss", "train/aux_loss", "train/grad_norm")


def _cmd(nproc: int, args: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*(launcher if nproc else [sys.executable]), "-m", "soar_fast.train", *TINY, *args]


def _start(nproc: int, args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES"):
        env.pop(k, None)
    return subprocess.Popen(_cmd(nproc, args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"launch hung past {timeout} s:\n{out[-3000:]}") from None
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    return out


def _rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r for r in rows}


def _close(a: dict, b: dict, steps, rel: float) -> None:
    for step in steps:
        for key in KEYS:
            assert math.isclose(a[step][key], b[step][key], rel_tol=rel, abs_tol=1e-8), (step, key, a[step][key],
                                                                                          b[step][key])


def _ranks(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the workers under a torchrun launcher (their RANK environment variable)."""
    found = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == launcher.pid:  # parent pid
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = pid
    return found


def _wait_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = run / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.3)
    raise AssertionError(f"{run} logged fewer than {n} steps in {timeout} s")


@pytest.fixture(scope="module")
def issue_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_trainer")
    a = _start(2, [*ISSUE, "--train_batch_size", "4", "--output_dir", "a"], root)
    b = _start(0, [*ISSUE, "--train_batch_size", "8", "--output_dir", "b"], root)
    logs = {"a": _wait(a), "b": _wait(b)}
    (root / "c" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "a" / "checkpoints" / "step_00000002", root / "c" / "checkpoints" / "step_00000002")
    logs["c"] = _wait(_start(0, [*ISSUE, "--train_batch_size", "8", "--output_dir", "c",
                                 "--resume_from_checkpoint", "latest"], root))
    return root, logs


def test_two_ranks_equal_one_process_on_the_global_batch_and_resume_lands_on_it(issue_runs):
    root, logs = issue_runs
    ra, rb, rc = _rows(root / "a"), _rows(root / "b"), _rows(root / "c")
    assert sorted(ra) == sorted(rb) == [1, 2, 3, 4] and sorted(rc) == [3, 4]
    _close(ra, rb, (1, 2, 3, 4), rel=1e-5)  # the issue's bound
    _close(rc, ra, (3, 4), rel=1e-5)
    _close(rc, rb, (3, 4), rel=1e-5)
    assert "written by 2 rank(s), now 1" in logs["c"]
    assert logs["a"].count("done: 4 steps") == 1  # only rank 0 reports


def test_two_rank_run_writes_one_format_lora_and_ema(issue_runs):
    root, _ = issue_runs
    run = root / "a"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    state = json.loads((run / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert (state["world_size"], state["step"], state["lora_rank"], state["has_ema"]) == (2, 4, 4, True)
    assert state["sampler"]["position"] == 4 * 8  # global samples drawn
    manifest = json.loads((run / "checkpoints" / "step_00000004" / "manifest.json").read_text())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "state.json"} <= set(manifest["files"])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # rank 0 alone writes it
    # The adapters (and their EMA) load into a fresh base with diffusers' own LoRA loader.
    from safetensors.torch import load_file

    from soar_fast.config import get_recipe
    from soar_fast.train.build import build_model

    for folder in (run / "final", run / "final" / "ema"):
        _, base = build_model(get_recipe("tiny").model)
        base.load_lora_adapter(str(folder), weight_name="pytorch_lora_weights.safetensors", prefix="transformer",
                               adapter_name="soar")
        saved = load_file(str(folder / "pytorch_lora_weights.safetensors"))
        key = next(k for k in saved if "lora_B" in k)
        name = key.removeprefix("transformer.").replace("lora_B.weight", "lora_B.soar.weight")
        assert torch.equal(dict(base.named_parameters())[name].detach(), saved[key])
        assert saved[key].abs().max() > 0  # trained: B starts at zero
    ema = load_file(str(run / "final" / "ema" / "pytorch_lora_weights.safetensors"))
    live = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    assert ema.keys() == live.keys() and any(not torch.equal(ema[k], live[k]) for k in ema)


@pytest.mark.compile
def test_compile_checkpointing_replica_rollout_chunks_and_accumulation_compose(tmp_path):
    d = _start(2, [*COMPOSED, "--train_batch_size", "2", "--output_dir", "d"], tmp_path)
    log_d = _wait(d)
    e = _start(0, [*COMPOSED, "--train_batch_size", "4", "--output_dir", "e"], tmp_path)
    _wait(e)
    rd, re_ = _rows(tmp_path / "d"), _rows(tmp_path / "e")
    assert sorted(rd) == sorted(re_) == [1, 2, 3]
    _close(rd, re_, (1, 2, 3), rel=1e-5)
    assert "compile=per_block" in log_d and "activation_checkpointing=True" in log_d
    assert "running the rollout eagerly" in log_d  # cuda_graph falls back on CPU, on its replica
    assert (tmp_path / "d" / "final" / "transformer_online" / "config.json").is_file()


def test_sigterm_on_one_rank_saves_one_checkpoint_on_all_and_resumes(tmp_path):
    fp8 = ["--runtime.step", "fast", "--fast.rollout", "fp8", "--fast.fp8_training", "--checkpointing_steps", "0",
           "--output_dir", "f"]
    f = _start(2, [*fp8, "--max_train_steps", "100000", "--train_batch_size", "4"], tmp_path)
    _wait_rows(tmp_path / "f", 2, f)
    os.kill(_ranks(f)[1], signal.SIGTERM)
    log = _wait(f, timeout=120)
    ckpts = sorted((tmp_path / "f" / "checkpoints").iterdir())
    assert len(ckpts) == 1, ckpts
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == max(_rows(tmp_path / "f")) >= 2
    assert "received SIGTERM" in log
    assert not (tmp_path / "f" / "final").exists()  # interrupted: no final model
    steps = state["step"] + 1
    log = _wait(_start(0, [*fp8, "--train_batch_size", "8", "--max_train_steps", str(steps),
                           "--resume_from_checkpoint", "latest"], tmp_path))
    assert f"resumed from {ckpts[0].relative_to(tmp_path)}" in log and math.isfinite(_rows(tmp_path / "f")[steps]["train/loss"])


def test_a_dead_rank_makes_the_other_exit_with_one_line(tmp_path):
    g = _start(2, ["--max_train_steps", "100000", "--checkpointing_steps", "0", "--output_dir", "g",
                   "--parallel.timeout_minutes", "1"], tmp_path)
    _wait_rows(tmp_path / "g", 2, g)
    os.kill(_ranks(g)[1], signal.SIGKILL)
    t0 = time.time()
    out, _ = g.communicate(timeout=90)
    assert time.time() - t0 < 60 and g.returncode != 0
    lines = [ln for ln in out.splitlines() if "another rank failed or stopped answering" in ln]
    assert lines and "relaunch with --resume_from_checkpoint latest" in lines[0], out[-3000:]
