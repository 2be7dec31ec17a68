"""The real trainer under torchrun (CPU, gloo): `torchrun -m soar_fast.train --recipe tiny`.

Two launches, shared by the checks through a module fixture:
  A: 2 ranks x train_batch_size 4, 4 steps, DCP checkpoints at steps 2 and 4, final export.
  B: 1 rank x train_batch_size 8 (the same global batch), resumed from A's step-2 checkpoint.
B's steps 3 and 4 see A's weights after step 2 and the same 8 samples with the same draws, so
their global loss (step 3: the data split, the draws, the global normalisation) and grad norm /
step-4 loss (the gradient averaged over ranks) must equal A's: the 2-rank run is the one-process
run over the global batch, and a 2-rank checkpoint resumes on 1 rank.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

TINY = ["--recipe", "tiny", "--parallel.param_dtype", "fp32", "--report_to", "none"]


def _torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "soar_fast.train", *TINY, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_trainer")
    a = _torchrun(2, ["--output_dir", "a", "--train_batch_size", "4"], root)
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    # B continues a copy of A from its step-2 checkpoint on one rank with the whole global batch.
    shutil.copytree(root / "a", root / "b")
    shutil.rmtree(root / "b" / "checkpoints" / "step_00000004")
    shutil.rmtree(root / "b" / "final")
    b = _torchrun(1, ["--output_dir", "b", "--train_batch_size", "8", "--resume_from_checkpoint", "latest"], root)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    return root, a, b


def test_two_rank_run_writes_checkpoints_final_model_and_rank0_logs(runs):
    root, a, _ = runs
    run = root / "a"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000004"], ckpts
    meta = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 4
    assert meta["extra"]["sampler"]["position"] == 4 * 8  # global samples drawn
    assert sorted(_rows(run)) == [1, 2, 3, 4]  # rank 0 alone writes metrics.jsonl (4 rows, not 8)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert a.stdout.count("done: 4 steps") == 1  # only rank 0 reports
    assert json.loads((run / "train_summary.json").read_text())["step"] == 4
    # A plain process pointed at these DCP checkpoints refuses in one line instead of starting over.
    from soar_fast.config import ConfigError, get_recipe
    from soar_fast.train import Trainer

    cfg = get_recipe("tiny")
    cfg.runtime.output_dir, cfg.checkpoint.resume_from_checkpoint = str(run), "latest"
    with pytest.raises(ConfigError, match="written under torchrun"):
        Trainer(cfg)

    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(run / "final" / "transformer")
    assert model.config.num_layers == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The export is the trained weights, not the initial ones.
    from soar_fast.train.build import build_model

    init = build_model(get_recipe("tiny").model)
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), init.parameters(), strict=True))
    assert diff > 1e-4


def test_two_rank_loss_equals_one_rank_on_the_global_batch_after_resume(runs):
    root, _, b = runs
    ra, rb = _rows(root / "a"), _rows(root / "b")
    assert "resumed from" in b.stderr and "written by 2 ranks, now 1" in b.stderr
    assert sorted(rb) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("train/loss", "train/base_loss", "train/aux_loss", "train/grad_norm"):
            va, vb = ra[step][key], rb[step][key]
            assert math.isclose(va, vb, rel_tol=2e-5, abs_tol=1e-7), (step, key, va, vb)
    # The 1-rank run resumed at A's data position and wrote its own final checkpoint and model.
    meta = json.loads((root / "b" / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["extra"]["sampler"]["position"] == 32
    assert (root / "b" / "final" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_fast_step_under_torchrun_equals_the_eager_step(runs):
    """`--runtime.step fast` on 2 ranks (batched (1+M)B pass, fused loss + gradient, its own
    backward scaled to the global batch) follows run A (eager, 2 ranks) step for step."""
    root, _, _ = runs
    f = _torchrun(2, ["--output_dir", "fast", "--train_batch_size", "4", "--runtime.step", "fast"], root)
    assert f.returncode == 0, f.stdout[-3000:] + f.stderr[-3000:]
    ra, rf = _rows(root / "a"), _rows(root / "fast")
    assert sorted(rf) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for key in ("train/loss", "train/base_loss", "train/aux_loss", "train/grad_norm"):
            va, vf = ra[step][key], rf[step][key]
            assert math.isclose(va, vf, rel_tol=1e-4, abs_tol=1e-7), (step, key, va, vf)


def test_fast_step_parts_that_need_unsharded_weights_refuse_under_torchrun():
    from soar_fast.config import ConfigError
    from soar_fast.config.fast import FastConfig
    from soar_fast.train.trainer import _check_fast_under_torchrun

    _check_fast_under_torchrun(FastConfig())  # batched step, eager rollout, fused ops: allowed
    for bad, flag in ((FastConfig(compile="per_block"), "parallel.compile"), (FastConfig(rollout="cuda_graph"),
                      "fast.rollout eager"), (FastConfig(fp8_training=True), "fp8_training")):
        with pytest.raises(ConfigError, match=flag):
            _check_fast_under_torchrun(bad)


def test_sampler_rank_split_is_the_single_process_batch():
    from soar_fast.data import ResumableSampler

    aligned = [ResumableSampler(12, 3, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [set(s.next_indices().tolist()) for _ in range(2) for s in aligned]  # one epoch of 12 rows
    assert set().union(*seen) == set(range(12)) and sum(map(len, seen)) == 12  # disjoint shards
    one = ResumableSampler(10, 6, seed=3)
    ranks = [ResumableSampler(10, 3, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):  # crosses epoch boundaries
        whole = one.next_indices()
        parts = [s.next_indices() for s in ranks]
        assert torch.equal(torch.cat(parts), whole)
    assert ranks[0].position == ranks[1].position == one.position
    resumed = ResumableSampler(10, 2, seed=3, rank=1, world_size=3)  # resume at another world size
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(resumed.next_indices(), _peek(one, 6)[2:4])


def _peek(sampler, k: int) -> torch.Tensor:
    from soar_fast.data import ResumableSampler

    s = ResumableSampler(sampler.n, k, sampler.seed, position=sampler.position)
    return s.next_indices()


def test_unsupported_fast_parts_and_ema_under_torchrun_are_one_line_config_errors(tmp_path, monkeypatch):
    from soar_fast.config import ConfigError, get_recipe
    from soar_fast.train import Trainer

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    cfg = get_recipe("tiny")
    cfg.runtime.output_dir = str(tmp_path / "x")
    cfg.runtime.step = "fast"
    cfg.fast.compile = "per_block"
    with pytest.raises(ConfigError, match="parallel.compile") as e:
        Trainer(cfg)
    assert "\n" not in str(e.value)
    cfg.runtime.step = "eager"
    cfg.optim.use_ema = True
    with pytest.raises(ConfigError, match="use_ema"):
        Trainer(cfg)
