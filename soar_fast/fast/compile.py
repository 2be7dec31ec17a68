"""torch.compile of the model, per transformer block (torchtitan style) or whole, in place.

`nn.Module.compile` compiles in place, so parameter names and `state_dict` keys stay the stock
diffusers ones (no `_orig_mod.` prefix) and checkpoints stay interchangeable with eager runs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["compile_model", "compile_optimizer_step"]

log = logging.getLogger(__name__)


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(model, name, None) or [])
    return blocks


def compile_model(model: nn.Module, mode: str = "per_block", fullgraph: bool = True, dynamic: bool = False) -> nn.Module:
    """Compile `model` in place: `per_block` compiles each transformer block (fast cold start,
    shared code across blocks), `full` the whole forward. `none` returns the model unchanged."""
    if mode == "none":
        return model
    _raise_recompile_limit()
    if mode == "per_block":
        blocks = _blocks(model)
        if not blocks:
            raise ValueError("compile='per_block' needs a model with transformer_blocks; use compile='full'")
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


def compile_optimizer_step(optimizer: torch.optim.Optimizer):
    """`optimizer.step` compiled (fuses the per-parameter AdamW updates); returns the callable."""
    return torch.compile(optimizer.step, fullgraph=False)
