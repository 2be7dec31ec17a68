"""Scale-out: process groups (a plain process is a one-rank group), device meshes, the FSDP2 and
activation-checkpointing wrappers, the copy of sharded weights into a plain replica, and the
communication-volume estimate (`scaling`). May import models and config; never the trainer or the cli."""

from soar_fast.config.parallel import ParallelConfig
from soar_fast.distributed.env import (
    DistEnv,
    barrier,
    build_device_mesh,
    cleanup,
    detect_torchrun,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from soar_fast.distributed.parallelize import (
    apply_activation_checkpointing,
    apply_fsdp,
    copy_full_params,
    fsdp_units,
    unwrap_name,
)

__all__ = [
    "DistEnv",
    "ParallelConfig",
    "apply_activation_checkpointing",
    "apply_fsdp",
    "barrier",
    "build_device_mesh",
    "cleanup",
    "copy_full_params",
    "detect_torchrun",
    "fsdp_units",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "unwrap_name",
]
