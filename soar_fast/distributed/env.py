"""Process groups and device meshes: torchrun detection, init, mesh, rank helpers, cleanup.

NCCL is configured by its own environment variables (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG,
...): we never set them, only log the ones present on rank 0.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from soar_fast.distributed.config import ParallelConfig

__all__ = [
    "DistEnv",
    "all_ranks_true",
    "barrier",
    "build_device_mesh",
    "cleanup",
    "detect_torchrun",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
]

log = logging.getLogger(__name__)
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands. `distributed` is False for a plain single process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    distributed: bool


def detect_torchrun() -> bool:
    """True when launched by torchrun (or any launcher exporting RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(k in os.environ for k in _TORCHRUN_VARS)


def init_distributed(cfg: ParallelConfig | None = None) -> DistEnv:
    """Initialise the default process group from torchrun's environment (no-op without it).

    nccl on CUDA (one GPU per LOCAL_RANK), gloo on CPU; the timeout comes from `cfg`.
    """
    cfg = cfg or ParallelConfig()
    if not detect_torchrun():
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistEnv(0, 1, 0, 1, dev, distributed=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(minutes=cfg.timeout_minutes)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timeout, store=_attempt_store(timeout),
                                rank=rank, world_size=world, **kwargs)
    if rank == 0:
        nccl = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL_"))}
        log.info("process group %s: world %d (%d per node)%s", backend, world, local_world,
                 f", env {nccl}" if nccl else "")
    return DistEnv(rank, world, local_rank, local_world, device, distributed=True)


def _attempt_store(timeout: timedelta) -> dist.Store:
    """torchrun's store, under a prefix unique to this restart attempt.

    After an elastic restart the workers reuse the agent's TCPStore, which still holds the
    previous attempt's addresses; a new rank can read a dead peer's address before the peer
    rewrites it (gloo: "connectFullMesh failed ... Connection refused", seen in about half of
    our restarts). A per-attempt prefix makes every key fresh.
    """
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"soar_fast/attempt_{attempt}/", store)


def build_device_mesh(env: DistEnv, cfg: ParallelConfig | None = None) -> DeviceMesh | None:
    """1-D mesh ('dp_shard',) for full shard; 2-D ('dp_replicate', 'dp_shard') for hybrid shard.

    Returns None for a plain single process (no FSDP).
    """
    cfg = cfg or ParallelConfig()
    if not env.distributed:
        return None
    dev_type = env.device.type
    if cfg.shard == "full":
        return init_device_mesh(dev_type, (env.world_size,), mesh_dim_names=("dp_shard",))
    shard = cfg.shard_degree or env.local_world_size
    if env.world_size % shard:
        raise ValueError(f"hybrid shard: world size {env.world_size} is not a multiple of shard_degree {shard}")
    return init_device_mesh(
        dev_type, (env.world_size // shard, shard), mesh_dim_names=("dp_replicate", "dp_shard")
    )


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain single process)."""
    return get_rank() == 0


def all_ranks_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only if `flag` is True on every rank (collective). Use it for decisions that must not
    diverge between ranks, e.g. skipping a step on a non-finite loss: a rank that skips backward
    while the others run it leaves FSDP's collectives waiting forever."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier() -> None:
    """A barrier across all ranks; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the default process group if one exists (call once at the end of training)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
