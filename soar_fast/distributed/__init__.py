"""Scale-out: torchrun process groups, FSDP2 wrapping, the global SOAR loss, a resumable sampler
and DCP checkpoints. May import models (and config, loss); never the trainer or the cli."""

from soar_fast.distributed.checkpoint import (
    export_full_state_dict,
    full_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from soar_fast.distributed.config import ParallelConfig
from soar_fast.distributed.env import (
    DistEnv,
    all_ranks_true,
    barrier,
    build_device_mesh,
    cleanup,
    detect_torchrun,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from soar_fast.distributed.loss import (
    global_batch_scale,
    global_loss_value,
    global_metrics,
    global_soar_loss,
)
from soar_fast.distributed.parallelize import parallelize_sd3
from soar_fast.distributed.sampler import ResumableDistributedSampler

__all__ = [
    "DistEnv",
    "ParallelConfig",
    "ResumableDistributedSampler",
    "all_ranks_true",
    "barrier",
    "build_device_mesh",
    "cleanup",
    "detect_torchrun",
    "export_full_state_dict",
    "full_state_dict",
    "get_rank",
    "get_world_size",
    "global_batch_scale",
    "global_loss_value",
    "global_metrics",
    "global_soar_loss",
    "init_distributed",
    "is_main_process",
    "latest_checkpoint",
    "load_checkpoint",
    "parallelize_sd3",
    "save_checkpoint",
]
