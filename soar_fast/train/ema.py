"""Exponential moving average of the trainable weights, kept in fp32 and sharded like them.

Under FSDP2 each shadow tensor is a DTensor with its parameter's sharding, so the EMA costs
1/W of the weights per rank and is saved and resumed by DCP with the model (at any world size).
Keys are the stock parameter names (no checkpoint or compile wrapper prefixes).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


def _named_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    from soar_fast.distributed.parallelize import unwrap_name

    return {unwrap_name(n): p for n, p in model.named_parameters() if p.requires_grad}


class EMA:
    """`shadow = decay * shadow + (1 - decay) * param` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Restart the average from the model's current weights."""
        self.shadow = {n: p.detach().float().clone() for n, p in _named_trainable(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = _named_trainable(model)
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names],
                             1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)
