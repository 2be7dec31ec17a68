"""`parallelize_sd3`: activation checkpointing, then torch.compile, then FSDP2, per transformer block.

The order is torchtitan's: checkpointing wraps the eager block, compile traces the wrapped block,
and FSDP2 shards the compiled block (its hooks stay outside the compiled region). The root module
is sharded last, so the embeddings and the final norm/projection form one more FSDP unit.

SOAR calls the model 2 + M times per step (base, the no-grad rollout, M auxiliary passes) before a
single backward: FSDP2 all-gathers a unit on each forward, re-gathers it for each recorded graph in
backward and accumulates the gradient; the 2-rank parity test checks this against one process.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from soar_fast.distributed.config import DTYPES, ParallelConfig

__all__ = ["apply_activation_checkpointing", "apply_compile", "apply_fsdp", "parallelize_sd3", "unwrap_name"]

log = logging.getLogger(__name__)
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def unwrap_name(name: str) -> str:
    """A parameter name without the checkpoint / compile wrapper prefixes (stock diffusers keys)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `transformer_blocks` ModuleList to parallelize")
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each transformer block in a non-reentrant checkpoint (recomputed in backward)."""
    blocks = _blocks(model)
    if getattr(model, "gradient_checkpointing", False):
        model.gradient_checkpointing = False  # ours replaces diffusers' own, never both
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_compile(model: nn.Module, fullgraph: bool = False) -> None:
    """torch.compile each transformer block (one graph reused by every identical block)."""
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = torch.compile(block, fullgraph=fullgraph)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig) -> None:
    """`fully_shard` each transformer block, then the root, with the mixed-precision policy of cfg.

    On a 2-D mesh ('dp_replicate', 'dp_shard') this is hybrid shard (HSDP). Gradients are averaged
    over every rank of the mesh, which `global_soar_loss` compensates for.
    """
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])
    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)


def parallelize_sd3(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh | None) -> nn.Module:
    """Apply checkpointing, compile and FSDP2 to an SD3/SD3.5 (or Flux-like) transformer in place.

    `model` must already be on the mesh's device (or on meta, materialised after). With
    `mesh=None` (a plain single process) only checkpointing and compile are applied.
    """
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model, fullgraph=cfg.compile_fullgraph)
    if mesh is not None:
        apply_fsdp(model, mesh, cfg)
    log.info(
        "parallelized %s: checkpointing=%s compile=%s fsdp=%s (param %s, reduce %s, reshard=%s)",
        type(model).__name__, cfg.activation_checkpointing, cfg.compile,
        None if mesh is None else tuple(mesh.shape), cfg.param_dtype, cfg.reduce_dtype,
        cfg.reshard_after_forward,
    )
    return model
