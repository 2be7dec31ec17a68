"""Wrappers that spread a transformer over the mesh: activation checkpointing and FSDP2, per block.

The step constructor (`soar_fast.train.step.build_train_step`) applies the converters in one fixed
order (torchtitan's): FP8 swap -> activation checkpointing -> compile -> FSDP2, each over the
model family's block list. FSDP2 shards every block, then the root (embeddings, final norm and
projection form one more unit), at any world size: a plain process is a one-rank mesh, so the
mixed-precision policy (bf16 compute and all-gathers over fp32 master weights, fp32 gradient
reduction) is the same with and without torchrun.

SOAR calls the model several times before one backward (the base+aux pass and, with the eager
rollout, the no-grad rollout): FSDP2 all-gathers a unit on each forward and again for backward.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from soar_fast.models.spec import ModelFamily

__all__ = ["apply_activation_checkpointing", "apply_fsdp", "copy_full_params", "fsdp_units", "unwrap_name"]

log = logging.getLogger(__name__)
# diffusers transformers return views (unpatchify reshapes); nothing of ours writes into them in place
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def unwrap_name(name: str) -> str:
    """A parameter name without the checkpoint / compile wrapper prefixes (stock diffusers keys)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def apply_activation_checkpointing(model: nn.Module, family: ModelFamily) -> int:
    """Wrap each transformer block in a non-reentrant checkpoint (recomputed in backward)."""
    if getattr(model, "gradient_checkpointing", False):
        model.gradient_checkpointing = False  # ours replaces diffusers' own, never both
    n = 0
    for blocks in family.block_lists(model):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            n += 1
    return n


def apply_fsdp(model: nn.Module, family: ModelFamily, mesh: DeviceMesh, *, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype, reshard_after_forward: bool = True) -> nn.Module:
    """`fully_shard` each transformer block, then the root, with one mixed-precision policy.

    On a 2-D mesh ('dp_replicate', 'dp_shard') this is hybrid shard (HSDP). Gradients are averaged
    over every rank of the mesh: each rank's loss is the SOAR loss of its own (equal-sized) local
    batch, so the average is the loss of the global batch.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in family.blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    log.info("FSDP2 over mesh %s: %d block units + root, param %s, reduce %s, reshard_after_forward=%s",
             tuple(mesh.shape), len(family.blocks(model)), param_dtype, reduce_dtype, reshard_after_forward)
    return model


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    """The FSDP2 units of `model` (root last), e.g. to unshard them all at once."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)][::-1]


@torch.no_grad()
def copy_full_params(model: nn.Module, replica: nn.Module, trainable_only: bool) -> None:
    """Copy `model`'s parameters (FSDP2-sharded DTensors) into the plain module `replica` of the
    same architecture, in the replica's dtype: the rollout engine's weights after an optimizer step.

    Full fine-tune: every unit is unsharded at once (one all-gather per unit), copied, resharded.
    LoRA (`trainable_only`): only the adapters change; each is gathered alone (small tensors).
    Collective: every rank calls it in the same order."""
    dst = {unwrap_name(n): p for n, p in replica.named_parameters()}
    if trainable_only:
        for name, p in model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                dst[unwrap_name(name)].copy_(full)
        return
    units = fsdp_units(model)
    for unit in units:
        unit.unshard()
    try:
        srcs, outs = [], []
        for name, p in model.named_parameters():
            srcs.append(p.to_local() if hasattr(p, "to_local") else p)
            outs.append(dst[unwrap_name(name)])
        torch._foreach_copy_(outs, srcs)
    finally:
        for unit in units:
            unit.reshard()
