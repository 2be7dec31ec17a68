"""torch.compile of the model, per transformer block (torchtitan style) or whole, in place: the
one compile routine (flag `fast.compile`), applied by the step constructor after activation
checkpointing and before FSDP2.

`nn.Module.compile` compiles in place, so parameter names and `state_dict` keys stay the stock
diffusers ones (no `_orig_mod.` prefix) and checkpoints stay interchangeable with eager runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["compile_model"]

log = logging.getLogger(__name__)


def compile_model(model: nn.Module, mode: str = "per_block", *, blocks: Sequence[nn.Module] = (),
                  fullgraph: bool = True, dynamic: bool = False) -> nn.Module:
    """Compile `model` in place: `per_block` compiles each of `blocks` (the family's transformer
    blocks; fast cold start, code shared across identical blocks), `full` the whole forward,
    `none` returns the model unchanged. Without `blocks`, those of the model's family spec."""
    if mode == "none":
        return model
    _raise_recompile_limit()
    if mode == "per_block":
        if not blocks:
            from soar_fast.models.spec import family_of

            blocks = family_of(model).blocks(model)
        for block in blocks:
            block.compile(fullgraph=fullgraph, dynamic=dynamic)
    elif mode == "full":
        model.compile(fullgraph=fullgraph, dynamic=dynamic)
    else:
        raise ValueError(f"unknown compile mode {mode!r}; choose none, per_block or full")
    log.info("torch.compile: %s (fullgraph=%s)", mode, fullgraph)
    return model


def _raise_recompile_limit(at_least: int = 64) -> None:
    """Per-block compile shares one code object (the block's forward) across block kinds (SD3.5's
    dual-attention and plain blocks, the last context-free block) x grad mode x batch size x FP8
    mode: more graphs than dynamo's default limit of 8, past which it silently runs eager."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.7
        if hasattr(cfg, name) and getattr(cfg, name) < at_least:
            setattr(cfg, name, at_least)
            return
