"""`ParallelConfig`: how a model is spread over ranks under torchrun (FSDP2, checkpointing, compile).

The `parallel` section of `TrainConfig` (`--parallel.*` flags). Used only when the trainer runs
under torchrun; a plain single process ignores it. Dtypes are names here (this room imports no
torch); `soar_fast.distributed.config.DTYPES` maps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from soar_fast.config.errors import ConfigError

__all__ = ["DTYPE_NAMES", "ParallelConfig"]

ShardMode = Literal["full", "hybrid"]
DTYPE_NAMES = ("fp32", "bf16", "fp16")


@dataclass(kw_only=True)
class ParallelConfig:
    """Data parallelism with FSDP2 over a 1-D (full shard) or 2-D (hybrid shard) device mesh."""

    shard: ShardMode = "full"
    """'full': shard parameters over all ranks (1-D mesh). 'hybrid': shard within a group of
    `shard_degree` ranks (a node) and replicate across groups (2-D mesh (replicate, shard))."""
    shard_degree: int | None = None
    """Ranks per shard group for 'hybrid' (default: LOCAL_WORLD_SIZE, i.e. one node)."""
    activation_checkpointing: bool = True
    """Recompute each transformer block's activations in backward (non-reentrant checkpoint)."""
    compile: bool = False
    """torch.compile each transformer block (after checkpointing, before FSDP)."""
    compile_fullgraph: bool = False
    """Pass fullgraph=True to torch.compile (diffusers blocks may graph-break on some versions)."""
    param_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Dtype FSDP2 all-gathers parameters in and computes with (the sharded master copy stays fp32)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the gradient reduce-scatter / all-reduce."""
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
        if self.param_dtype not in DTYPE_NAMES or self.reduce_dtype not in DTYPE_NAMES:
            raise ConfigError(f"parallel.param_dtype/reduce_dtype must be one of {', '.join(DTYPE_NAMES)}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend={self.backend!r} is invalid: choose auto, nccl or gloo")
        if not self.timeout_minutes > 0:
            raise ConfigError(f"parallel.timeout_minutes={self.timeout_minutes!r} is invalid: need > 0")
