"""`ParallelConfig`: how a model is spread over ranks (FSDP2 over a device mesh).

The `parallel` section of `TrainConfig` (`--parallel.*` flags). A plain process is a one-rank
mesh of the same code, so these apply to it too (sharding over one rank is the identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from soar_fast.config.errors import ConfigError

__all__ = ["DTYPE_NAMES", "ParallelConfig"]

ShardMode = Literal["full", "hybrid"]
DTYPE_NAMES = ("fp32", "bf16")


@dataclass(kw_only=True)
class ParallelConfig:
    """Data parallelism with FSDP2 over a 1-D (full shard) or 2-D (hybrid shard) device mesh."""

    shard: ShardMode = "full"
    """'full': shard parameters over all ranks (1-D mesh). 'hybrid': shard within a group of
    `shard_degree` ranks (a node) and replicate across groups (2-D mesh (replicate, shard))."""
    shard_degree: int | None = None
    """Ranks per shard group for 'hybrid' (default: LOCAL_WORLD_SIZE, i.e. one node)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the gradient reduce-scatter / all-reduce (the compute and all-gather dtype is
    `runtime.mixed_precision`, the master weights' `runtime.weight_dtype`)."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each forward (ZeRO-3). False keeps them gathered until
    backward (ZeRO-2-like): fewer all-gathers for SOAR's 2 + M forwards, more memory."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: 'auto' is nccl on CUDA, gloo on CPU."""
    timeout_minutes: float = 30.0
    """Collective timeout (a hung rank fails the job after this long, so torchrun can restart it)."""

    def __post_init__(self) -> None:
        if self.shard not in ("full", "hybrid"):
            raise ConfigError(f"parallel.shard={self.shard!r} is invalid: choose 'full' or 'hybrid'")
        if self.shard_degree is not None and self.shard_degree < 1:
            raise ConfigError(f"parallel.shard_degree={self.shard_degree!r} is invalid: need >= 1")
        if self.reduce_dtype not in DTYPE_NAMES:
            raise ConfigError(f"parallel.reduce_dtype={self.reduce_dtype!r} is invalid: choose one of {', '.join(DTYPE_NAMES)}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend={self.backend!r} is invalid: choose auto, nccl or gloo")
        if not self.timeout_minutes > 0:
            raise ConfigError(f"parallel.timeout_minutes={self.timeout_minutes!r} is invalid: need > 0")
