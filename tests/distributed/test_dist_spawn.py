"""In-process 2-rank gloo checks (torch.multiprocessing spawn): the global SOAR normalisation on
leaf tensors, uneven local batches, and one SOAR step of the tiny SD3 model under full shard and
hybrid shard (2-D mesh), each rank comparing with the plain one-process oracle it computes itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 2


def _formula(base: torch.Tensor, aux: torch.Tensor, lam: float, normalization: str) -> torch.Tensor:
    """SOAR.md step 5 on the global batch: base [B], aux [M, B]."""
    if normalization == "points":
        return (base.sum() + lam * aux.sum()) / (base.numel() + lam * aux.numel())
    return base.mean() + (lam * aux.mean() if aux.numel() else 0.0)


def _check_loss_normalisation(rank: int) -> None:
    from soar_fast import SoarConfig
    from soar_fast.distributed import global_loss_value, global_metrics, global_soar_loss
    from soar_fast.loss import SoarOutput

    sizes = (3, 1)  # uneven local batches
    for m in (0, 2):
        for lam in (1.0, 0.5):
            for norm in ("points", "sum"):
                cfg = SoarConfig(num_aux=m, lambda_aux=lam, normalization=norm)
                g = torch.Generator().manual_seed(m * 10 + int(lam * 2))
                base_all = torch.rand(sum(sizes), generator=g, dtype=torch.float64)
                aux_all = torch.rand(m, sum(sizes), generator=g, dtype=torch.float64)
                lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
                base = base_all[lo:hi].clone().requires_grad_()
                aux = aux_all[:, lo:hi].clone().requires_grad_()
                out = SoarOutput(loss=torch.zeros(()), metrics={}, base_losses=base, aux_losses=aux)
                loss = global_soar_loss(out, cfg)
                loss.backward()
                # FSDP averages gradients over ranks; emulate that on the leaves (global layout)
                gb, ga = torch.zeros_like(base_all), torch.zeros_like(aux_all)
                gb[lo:hi] = base.grad
                if m:
                    ga[:, lo:hi] = aux.grad
                grads = torch.cat([gb, ga.flatten()])
                dist.all_reduce(grads)
                grads /= WORLD
                ref_b, ref_a = base_all.clone().requires_grad_(), aux_all.clone().requires_grad_()
                ref = _formula(ref_b, ref_a, lam, norm)
                ref.backward()
                ref_grads = torch.cat([ref_b.grad, ref_a.grad.flatten() if m else ref_a.detach().flatten()])
                torch.testing.assert_close(grads, ref_grads, rtol=1e-12, atol=1e-15)
                assert global_loss_value(loss) == pytest.approx(ref.item(), rel=1e-12), (m, lam, norm)
                gm = global_metrics(out, cfg)
                assert gm["loss"] == pytest.approx(ref.item(), rel=1e-12)
                assert gm["base_loss"] == pytest.approx(base_all.mean().item(), rel=1e-12)
                assert gm["aux_loss"] == pytest.approx(aux_all.mean().item() if m else 0.0, rel=1e-12)
                assert (gm["num_samples"], gm["num_aux_points"]) == (sum(sizes), m * sum(sizes))


def _check_sd3_step(rank: int, shard: str, shard_degree: int | None, sizes: tuple[int, int], norm: str) -> None:
    from soar_fast import SoarConfig
    from soar_fast.distributed import (
        DistEnv,
        ParallelConfig,
        build_device_mesh,
        global_soar_loss,
        parallelize_sd3,
    )
    from soar_fast.distributed.parallelize import unwrap_name
    from soar_fast.distributed.run import SyntheticLatents, step_draws
    from soar_fast.loss import soar_loss_from_draws
    from soar_fast.models import SD3VelocityFn, build_sd3_transformer

    cfg = SoarConfig(num_aux=2, normalization=norm)
    data = SyntheticLatents(8, seed=1)
    idx = list(range(sum(sizes)))
    items = [data[i] for i in idx]
    z0 = torch.stack([it[0] for it in items])
    cond = (torch.stack([it[1] for it in items]), torch.stack([it[2] for it in items]))
    uncond = (torch.zeros(data.seq_len, data.dim), torch.zeros(data.pooled))
    draws = step_draws(z0, idx, step=1, seed=1, config=cfg)

    oracle = build_sd3_transformer("tiny", num_layers=2)
    out = soar_loss_from_draws(SD3VelocityFn(oracle), z0, cond, uncond, cfg, draws)
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in oracle.named_parameters()}

    pcfg = ParallelConfig(shard=shard, shard_degree=shard_degree, param_dtype="fp32")
    env = DistEnv(rank, WORLD, rank, WORLD, torch.device("cpu"), distributed=True)
    mesh = build_device_mesh(env, pcfg)
    assert mesh.ndim == (2 if shard == "hybrid" else 1)
    model = parallelize_sd3(build_sd3_transformer("tiny", num_layers=2), pcfg, mesh)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    local = step_draws(z0[lo:hi], idx[lo:hi], step=1, seed=1, config=cfg)  # same draws, local rows
    out_l = soar_loss_from_draws(SD3VelocityFn(model), z0[lo:hi], tuple(c[lo:hi] for c in cond), uncond, cfg, local)
    global_soar_loss(out_l, cfg).backward()
    got = {unwrap_name(n): p.grad.full_tensor() for n, p in model.named_parameters()}
    assert got.keys() == ref_grads.keys()
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, g in got.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-5 * scale, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def _check_wrapping_order(rank: int) -> None:
    """Checkpointing inside compile inside FSDP, per block; the root sharded too."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    from soar_fast.distributed import DistEnv, ParallelConfig, build_device_mesh, parallelize_sd3
    from soar_fast.models import build_sd3_transformer

    pcfg = ParallelConfig(compile=True, param_dtype="bf16")
    env = DistEnv(rank, WORLD, rank, WORLD, torch.device("cpu"), distributed=True)
    model = parallelize_sd3(build_sd3_transformer("tiny", num_layers=2), pcfg, build_device_mesh(env, pcfg))
    assert isinstance(model, FSDPModule)
    for block in model.transformer_blocks:
        assert isinstance(block, FSDPModule) and isinstance(block, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(block._orig_mod, CheckpointWrapper)
        assert block._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16
        assert block._get_fsdp_state()._mp_policy.reduce_dtype == torch.float32


def _worker(rank: int, init_file: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _check_loss_normalisation(rank)
        from soar_fast.distributed import all_ranks_true

        assert all_ranks_true(True) and not all_ranks_true(rank == 0) and not all_ranks_true(False)
        _check_sd3_step(rank, "full", None, (3, 1), "points")
        _check_sd3_step(rank, "hybrid", 1, (2, 2), "sum")  # mesh (2 replicas, 1 shard): HSDP
        _check_sd3_step(rank, "hybrid", 2, (1, 2), "points")  # mesh (1, 2): 2-D, sharded
        _check_wrapping_order(rank)
    finally:
        dist.destroy_process_group()


def test_two_rank_loss_grads_and_wrapping(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"),), nprocs=WORLD, join=True)
