"""In-process 2-rank gloo checks (torch.multiprocessing spawn) of `build_train_step`: one SOAR
micro-step of the tiny SD3 model under full shard and hybrid shard (2-D mesh), each rank comparing
its gathered gradients with the plain one-process oracle it computes itself; the converters'
order (checkpoint inside compile inside FSDP2) and the mixed-precision policy; the replica copy;
a NaN on one rank skips the step on all, and one rank's stop request reaches every rank."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 2


def _cfg(**fast):
    from soar_fast.config import TrainConfig

    cfg = TrainConfig()
    cfg.fast = dataclasses.replace(cfg.fast, **fast)
    return cfg


def _check_step(rank: int, shard: str, shard_degree: int | None, norm: str, step_kind: str) -> None:
    from soar_fast import SoarConfig
    from soar_fast.distributed import init_distributed, unwrap_name
    from soar_fast.loss import keyed_draws, soar_loss_from_draws
    from soar_fast.models.spec import get_family
    from soar_fast.train.step import build_train_step

    family = get_family("sd3")
    cfg = _cfg()
    cfg.soar = SoarConfig(num_aux=2, normalization=norm)
    cfg.runtime = dataclasses.replace(cfg.runtime, step=step_kind)
    cfg.parallel = dataclasses.replace(cfg.parallel, shard=shard, shard_degree=shard_degree)
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(4, 4, 8, 8, generator=g)
    cond = (torch.randn(4, 5, 32, generator=g), torch.randn(4, 64, generator=g))
    uncond = (torch.zeros(5, 32), torch.zeros(64))
    base = family.build("tiny", num_layers=2)

    oracle = copy.deepcopy(base)
    draws = keyed_draws(z0, cfg.soar, seed=0, step=3, indices=range(4))
    soar_loss_from_draws(family.velocity(oracle), z0, cond, uncond, cfg.soar, draws).loss.backward()
    ref = {n: p.grad for n, p in oracle.named_parameters()}

    env = init_distributed(cfg.parallel)
    step = build_train_step(family, copy.deepcopy(base), cfg, env)
    lo, hi = 2 * rank, 2 * rank + 2
    local = keyed_draws(z0[lo:hi], cfg.soar, seed=0, step=3, indices=range(lo, hi))  # the same draws, local rows
    step.micro_step(z0[lo:hi], tuple(c[lo:hi] for c in cond), uncond, local)
    got = {unwrap_name(n): p.grad.full_tensor() for n, p in step.model.named_parameters()}
    assert got.keys() == ref.keys()
    scale = max(v.abs().max().item() for v in ref.values())
    for n, v in got.items():
        torch.testing.assert_close(v, ref[n], atol=1e-5 * scale, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def _check_wrapping_and_replica(rank: int) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    from soar_fast.distributed import copy_full_params, init_distributed, unwrap_name
    from soar_fast.models.spec import get_family
    from soar_fast.train.step import build_train_step

    family = get_family("sd3")
    cfg = _cfg(activation_checkpointing=True, compile="per_block", rollout="fp8")
    cfg.runtime = dataclasses.replace(cfg.runtime, step="fast", mixed_precision="bf16")
    step = build_train_step(family, family.build("tiny", num_layers=2), cfg, init_distributed(cfg.parallel))
    model = step.model
    assert isinstance(model, FSDPModule)
    for block in model.transformer_blocks:
        assert isinstance(block, FSDPModule) and isinstance(block, CheckpointWrapper)
        assert block._compiled_call_impl is not None  # compiled in place, inside FSDP, around the checkpoint
        policy = block._get_fsdp_state()._mp_policy
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    # the rollout replica: plain, bf16, equal to the gathered weights, refreshed after an update
    replica = step.replica
    assert replica is not None and not isinstance(replica, FSDPModule)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    copy_full_params(model, replica, trainable_only=False)
    full = {unwrap_name(n): p.full_tensor() for n, p in model.named_parameters()}
    for n, p in replica.named_parameters():
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), full[unwrap_name(n)], atol=0, rtol=1e-2)


def _check_nan_on_one_rank_skips_on_all(rank: int) -> None:
    from soar_fast.distributed import init_distributed
    from soar_fast.models.spec import get_family
    from soar_fast.train.step import build_train_step

    family = get_family("sd3")
    cfg = _cfg()
    cfg.runtime = dataclasses.replace(cfg.runtime, step="fast")
    step = build_train_step(family, family.build("tiny", num_layers=1), cfg, init_distributed(cfg.parallel))
    before = [p.detach().full_tensor().clone() for p in step.model.parameters()]
    z0 = torch.randn(2, 4, 8, 8)
    if rank == 1:
        z0[0, 0, 0, 0] = float("nan")  # one bad sample on one rank
    cond, uncond = (torch.randn(2, 5, 32), torch.randn(2, 64)), (torch.zeros(5, 32), torch.zeros(64))
    result = step(0, [(z0, cond, [2 * rank, 2 * rank + 1])], uncond, stop=rank == 0)
    assert not result.applied and result.stop  # both ranks: skipped, and rank 0's stop request seen by rank 1
    for p, b in zip(step.model.parameters(), before, strict=True):
        assert torch.equal(p.detach().full_tensor(), b)
    z0[0, 0, 0, 0] = 0.0
    assert step(1, [(z0, cond, [2 * rank, 2 * rank + 1])], uncond).applied


def _worker(rank: int, init_file: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _check_step(rank, "full", None, "points", "fast")
        _check_step(rank, "hybrid", 1, "sum", "eager")  # mesh (2 replicas, 1 shard): HSDP
        _check_step(rank, "hybrid", 2, "points", "fast")  # mesh (1, 2): 2-D, sharded
        _check_wrapping_and_replica(rank)
        _check_nan_on_one_rank_skips_on_all(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.compile
def test_two_rank_grads_wrapping_order_and_replica(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"),), nprocs=WORLD, join=True)
