"""Every model family besides SD3 (tests/distributed/test_dist_trainer.py) through the one trainer under torchrun: 2 ranks (CPU, gloo, FSDP2, fast
step, LoRA, EMA) equal 1 process with the same global batch, step for step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ARGS = ["--report_to", "none", "--runtime.step", "fast", "--model.lora_rank", "4", "--use_ema",
        "--max_train_steps", "2", "--checkpointing_steps", "0", "--checkpoint.no-final_checkpoint"]


def _train(nproc: int, family: str, batch: int, out: Path, extra: tuple[str, ...] = ()) -> dict[int, dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "soar_fast.train", "--recipe", f"tiny-{family}",
           *ARGS, *extra, "--train_batch_size", str(batch), "--output_dir", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("family", ["flux", "flux2", "qwenimage", "zimage", "wan"])
def test_two_ranks_equal_one_process(family, tmp_path):
    two, one = _train(2, family, 2, tmp_path / "two"), _train(1, family, 4, tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2]
    for step in (1, 2):
        for key in ("train/loss", "train/aux_loss", "train/grad_norm"):
            assert math.isclose(two[step][key], one[step][key], rel_tol=1e-5), (family, step, key)


def test_several_rollout_paths_normalise_by_the_global_counts(tmp_path):
    """3 paths, 3 rollout steps: a third of the samples have no points on paths 1-2, so the ranks'
    counts differ; the gradient (its norm, and through the update the next step's) is the global
    batch's. The logged loss is a mean of rank means there, so only the gradient norm is compared."""
    paths = ("--soar.num_rollout_paths", "3", "--soar.rollout_steps", "3", "--soar.sde_rollout_type", "sde")
    two = _train(2, "sd3", 4, tmp_path / "two", paths)
    one = _train(1, "sd3", 8, tmp_path / "one", paths)
    for step in (1, 2):
        assert math.isclose(two[step]["train/grad_norm"], one[step]["train/grad_norm"], rel_tol=1e-5), step


def test_wan22_two_experts_two_ranks_equal_one_process(tmp_path):
    """Wan 2.2's two experts (a WanExperts, every call routed by σ; boundary 0.75 gives both rows) under
    FSDP2: 2 ranks equal 1 process, LoRA on both experts."""
    from soar_fast.models.spec import get_family

    wan, folder = get_family("wan"), tmp_path / "wan22"
    wan.build("tiny", seed=0).save_pretrained(folder / "transformer")
    wan.build("tiny", seed=1).save_pretrained(folder / "transformer_2")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "boundary_ratio": 0.75, "transformer": ["diffusers", "WanTransformer3DModel"],
         "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    extra = ("--pretrained_model_name_or_path", str(folder))
    two, one = _train(2, "wan", 2, tmp_path / "two", extra), _train(1, "wan", 4, tmp_path / "one", extra)
    for step in (1, 2):
        for key in ("train/loss", "train/aux_loss", "train/grad_norm"):
            assert math.isclose(two[step][key], one[step][key], rel_tol=1e-5), (step, key)
