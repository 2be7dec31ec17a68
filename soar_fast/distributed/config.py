"""`ParallelConfig`: how a model is spread over ranks (FSDP2, checkpointing, compile).

Lives here until the trainer's `TrainConfig` composes it (then it moves to `soar_fast/config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["DTYPES", "ParallelConfig"]

ShardMode = Literal["full", "hybrid"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
            raise ValueError(f"ParallelConfig.shard={self.shard!r} is invalid: choose 'full' or 'hybrid'")
        if self.shard_degree is not None and self.shard_degree < 1:
            raise ValueError(f"ParallelConfig.shard_degree={self.shard_degree!r} is invalid: need >= 1")
        if self.param_dtype not in DTYPES or self.reduce_dtype not in DTYPES:
            raise ValueError(f"ParallelConfig dtypes must be one of {', '.join(DTYPES)}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"ParallelConfig.backend={self.backend!r} is invalid: auto, nccl or gloo")
        if self.timeout_minutes <= 0:
            raise ValueError("ParallelConfig.timeout_minutes must be > 0")
