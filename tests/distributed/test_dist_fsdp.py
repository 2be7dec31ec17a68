"""2-rank gloo runs of the distributed harness against one process on the global batch.

Few launches, several checks each (a 2-rank launch costs ~15-25 s on 2 cores):
  two_rank   the documented single-node command: 4 steps, DCP checkpoints at 2 and 4, grads of
             step 1, export, collective counts
  one_rank   load the 2-rank step-2 checkpoint on 1 rank (FSDP, world 1) and continue
  elastic    torchrun --max-restarts 1, rank 1 exits at step 3 once; the restart loads on 2 ranks
The oracle is the same harness run in this process without torchrun: a plain module, no FSDP, and
the loss is `soar_loss`'s own `out.loss`. Uneven local batches and hybrid shard are checked in
test_dist_spawn.py (one SOAR step, in-process ranks).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soar_fast.distributed import load_checkpoint
from soar_fast.distributed.run import parse_args, train
from soar_fast.distributed.scaling import all_gathers_per_step
from soar_fast.models import build_sd3_transformer

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "distributed.md"
DOC_PREFIX = "torchrun --standalone --nproc_per_node 2 -m soar_fast.distributed.run"
COMMON = ["--steps", "4", "--ckpt_every", "2", "--export"]
LAUNCH_TIMEOUT = 240


def _doc_command() -> list[str]:
    """The single-node command exactly as docs/distributed.md writes it."""
    lines = [ln.strip() for ln in DOC.read_text().splitlines() if ln.strip().startswith(DOC_PREFIX)]
    assert lines, f"docs/distributed.md lost its single-node command ({DOC_PREFIX} ...)"
    return shlex.split(lines[0])


def _with_args(cmd: list[str], extra: list[str]) -> list[str]:
    """cmd with each --flag of `extra` replacing the same flag of cmd (or appended)."""
    out, i, given = [], 0, {a for a in extra if a.startswith("--")}
    while i < len(cmd):
        if cmd[i] in given:
            i += 2 if i + 1 < len(cmd) and not cmd[i + 1].startswith("--") else 1
            continue
        out.append(cmd[i])
        i += 1
    return out + extra


def _start(cmd: list[str]) -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    exe = Path(sys.executable).parent / "torchrun"
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]) + cmd[1:]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, cmd


def _wait(started: tuple[subprocess.Popen, list[str]]) -> str:
    proc, cmd = started
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed ({proc.returncode}):\n{log[-4000:]}"
    return log


def _launch(cmd: list[str]) -> str:
    return _wait(_start(cmd))


def _rows(out: Path) -> tuple[dict[int, dict], list[dict]]:
    rows = [json.loads(ln) for ln in (out / "losses.jsonl").read_text().splitlines() if ln.strip()]
    steps = {r["step"]: r for r in rows if "event" not in r}
    return steps, [r for r in rows if "event" in r]


def _export(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "export" / "diffusion_pytorch_model.safetensors"))


def _close_losses(a: dict[int, dict], b: dict[int, dict], steps, rtol: float) -> None:
    for s in steps:
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=rtol, abs=0), f"step {s}"


def _close_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def runs(work) -> tuple[Path, Path]:
    """(reference, two_rank): the 2-rank launch runs while this process computes the oracle."""
    ref, two = work / "ref", work / "two"
    started = _start(_with_args(_doc_command(), ["--out", str(two), *COMMON, "--dump_grads_step", "1",
                                                 "--count_collectives"]))
    try:
        train(parse_args(["--out", str(ref), *COMMON, "--dump_grads_step", "1", "--no_activation_checkpointing"]))
    finally:
        _wait(started)
    return ref, two


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    return runs[0]


@pytest.fixture(scope="module")
def two_rank(runs) -> Path:
    return runs[1]


def test_two_ranks_equal_one_process_on_the_global_batch(reference, two_rank):
    ref, two = _rows(reference)[0], _rows(two_rank)[0]
    assert sorted(two) == [1, 2, 3, 4] and all(two[s]["world_size"] == 2 and two[s]["local_batch"] == 2 for s in two)
    _close_losses(two, ref, range(1, 5), rtol=1e-5)
    for s in range(1, 5):
        assert two[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4)
        for k in ("base_loss", "aux_loss"):
            assert two[s][k] == pytest.approx(ref[s][k], rel=1e-5)
    g2, g1 = load_file(str(two_rank / "grads_step1.safetensors")), load_file(str(reference / "grads_step1.safetensors"))
    scale = max(g.abs().max().item() for g in g1.values())
    _close_tensors(g2, g1, atol=1e-5 * scale)
    _close_tensors(_export(two_rank), _export(reference), atol=2e-5)  # weights after 4 AdamW steps


def test_export_is_a_diffusers_folder_with_stock_keys(two_rank):
    from diffusers import SD3Transformer2DModel

    loaded = SD3Transformer2DModel.from_pretrained(two_rank / "export")
    plain = build_sd3_transformer("tiny", num_layers=2)
    assert set(loaded.state_dict()) == set(plain.state_dict()) == set(_export(two_rank))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, _export(two_rank)[k])


def test_fsdp_collective_counts_match_the_scaling_model(two_rank):
    """The all-gather counts of docs/distributed.md's estimate, measured: per step, each block is
    gathered 15 times and the root 9 times at M = 6 (fp32 here, 4 bytes); one reduce-scatter per unit."""
    model = build_sd3_transformer("tiny", num_layers=2)
    blocks = sum(p.numel() for p in model.transformer_blocks.parameters())
    root = sum(p.numel() for p in model.parameters()) - blocks
    g_block, g_root = all_gathers_per_step(6)
    for row in _rows(two_rank)[0].values():
        c = row["collectives"]
        ag = c.get("all_gather_single") or c["all_gather_into_tensor"]
        rs = c.get("reduce_scatter_single") or c["reduce_scatter_tensor"]
        assert ag == [2 * g_block + g_root, 4 * (g_block * blocks + g_root * root)]
        assert rs == [3, 4 * (blocks + root)]


def test_checkpoint_written_on_two_ranks_loads_in_one_plain_process(reference, two_rank):
    """DCP reshards: the 2-rank FSDP checkpoint loads into an unsharded module (no process group),
    with the same weights and AdamW state as the one-process run's own checkpoint."""
    states = []
    for run in (two_rank, reference):
        model = build_sd3_transformer("tiny", num_layers=2, seed=123)  # other init: load must overwrite
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        meta = load_checkpoint(run / "ckpt" / "step_00000002", model, opt)
        assert meta["step"] == 2 and meta["extra"]["sampler"]["position"] == 8
        fingerprint = sum(float(p.detach().double().square().sum()) for p in model.parameters())
        states.append((model.state_dict(), opt.state_dict()["state"], fingerprint))
    (m2, o2, fp2), (m1, o1, _) = states
    _close_tensors(m2, m1, atol=1e-5)
    assert o2.keys() == o1.keys() and all(float(o2[k]["step"]) == 2 for k in o2)
    for k in o2:
        torch.testing.assert_close(o2[k]["exp_avg"], o1[k]["exp_avg"], atol=1e-6, rtol=1e-4)
    saved = {e["step"]: e["fingerprint"] for e in _rows(two_rank)[1] if e["event"] == "save"}
    assert fp2 == pytest.approx(saved[2], rel=1e-12)


def test_resume_on_one_rank_continues_the_two_rank_run(work, two_rank):
    out = work / "one"
    cmd = _with_args(_doc_command(), ["--out", str(out), *COMMON, "--resume_from", str(two_rank / "ckpt" / "step_00000002")])
    _launch([c if c != "2" or cmd[i - 1] != "--nproc_per_node" else "1" for i, c in enumerate(cmd)])
    one, events = _rows(out)
    two, two_events = _rows(two_rank)
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 2 and resume[0]["world_size"] == 1
    assert resume[0]["saved_world_size"] == 2
    saved = {e["step"]: e["fingerprint"] for e in two_events if e["event"] == "save"}
    assert resume[0]["fingerprint"] == pytest.approx(saved[2], rel=1e-12)  # identical weights after load
    assert sorted(one) == [3, 4] and all(one[s]["local_batch"] == 4 for s in one)
    _close_losses(one, two, (3, 4), rtol=1e-5)
    _close_tensors(_export(out), _export(two_rank), atol=2e-5)


def test_elastic_restart_resumes_with_nothing_lost(work, two_rank):
    out, marker = work / "elastic", work / "died_once"
    cmd = _with_args(_doc_command(), ["--out", str(out), *COMMON, "--die_at_step", "3", "--die_rank", "1",
                                      "--die_marker", str(marker)])
    cmd = cmd[:1] + ["--max-restarts", "1"] + cmd[1:]
    log = _launch(cmd)
    assert marker.exists(), "the rank never exited: the test did not test a restart"
    assert re.search(r"exits at step 3", log)
    el, events = _rows(out)
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["restart_count"] == 1 and resume[0]["step"] == 2
    assert resume[0]["world_size"] == resume[0]["saved_world_size"] == 2
    saved = {e["step"]: e["fingerprint"] for e in events if e["event"] == "save"}
    assert resume[0]["fingerprint"] == pytest.approx(saved[2], rel=1e-12)
    two = _rows(two_rank)[0]
    assert sorted(el) == [1, 2, 3, 4]
    _close_losses(el, two, range(1, 5), rtol=1e-6)  # same world size: the same computation
    _close_tensors(_export(out), _export(two_rank), atol=1e-6, rtol=1e-6)
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_00000002", "step_00000004"]
