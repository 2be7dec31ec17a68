"""Process groups and device meshes: torchrun detection, init, mesh, rank helpers, cleanup.

A process that torchrun did not launch is world size 1 of the same code (torchtitan's habit): it
gets a one-rank process group (an in-process `HashStore`) and a one-device mesh, so FSDP2, its
mixed-precision policy and DCP checkpoints run the same at 1 and at N ranks.

NCCL is configured by its own environment variables (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG,
...): we never set them, only log the ones present on rank 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from soar_fast.config.parallel import ParallelConfig

__all__ = [
    "DistEnv",
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
    launched: bool


def detect_torchrun() -> bool:
    """True when launched by torchrun (or any launcher exporting RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(k in os.environ for k in _TORCHRUN_VARS)


def init_distributed(cfg: ParallelConfig | None = None, device: str | torch.device | None = None) -> DistEnv:
    """Initialise the default process group: torchrun's world, or a one-rank group of this process.

    Backend: nccl on CUDA (one GPU per LOCAL_RANK), gloo on CPU; `cfg.backend` can force one. A
    CPU `device` (e.g. `--runtime.device cpu`) means gloo even where GPUs exist. An already
    initialised default group is reused. The collective timeout comes from `cfg`.
    """
    cfg = cfg or ParallelConfig()
    launched = detect_torchrun()
    if launched:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
    want = torch.device(device) if device is not None else None
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and (want is None or want.type == "cuda") else "gloo"
    if backend == "nccl":
        index = local_rank if launched or want is None or want.index is None else want.index
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu") if want is None or launched else want
    if not dist.is_initialized():
        timeout = timedelta(minutes=cfg.timeout_minutes)
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        store = _attempt_store(timeout) if launched else dist.HashStore()
        dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=rank, world_size=world, **kwargs)
    if rank == 0 and launched:
        nccl = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL_"))}
        log.info("process group %s: world %d (%d per node)%s", backend, world, local_world,
                 f", env {nccl}" if nccl else "")
    return DistEnv(rank, world, local_rank, local_world, dev, launched=launched)


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


def build_device_mesh(env: DistEnv, cfg: ParallelConfig | None = None) -> DeviceMesh:
    """1-D mesh ('dp_shard',) for full shard; 2-D ('dp_replicate', 'dp_shard') for hybrid shard.
    A plain process gets the 1-D mesh of its one rank."""
    cfg = cfg or ParallelConfig()
    dev_type = env.device.type
    if cfg.shard == "full" or env.world_size == 1:
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


def barrier() -> None:
    """A barrier across all ranks; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup(env: DistEnv | None = None, finished: bool = False) -> None:
    """Destroy the default process group at the end of a torchrun job. A plain process keeps its
    one-rank group (cheap; the next trainer in the same process reuses it). `finished` (every rank ended
    normally): a barrier first, so no rank tears down while another still talks to rank 0's rendezvous
    store (a rank can abort at exit otherwise); never after a failure, where peers may be elsewhere."""
    if (env is None or env.launched) and dist.is_available() and dist.is_initialized():
        if finished:
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()
