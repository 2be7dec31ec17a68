"""Conditions: a tensor or a tuple of tensors batched along dim 0 (SOAR.md's `velocity_fn` API)."""

from __future__ import annotations

import torch

__all__ = ["Cond", "as_tuple", "broadcast_uncond", "cat_cond", "like", "repeat_cond", "where_cond"]

Cond = torch.Tensor | tuple[torch.Tensor, ...]


def as_tuple(c: Cond) -> tuple[torch.Tensor, ...]:
    return c if isinstance(c, tuple) else (c,)


def like(c: Cond, parts: list[torch.Tensor]) -> Cond:
    return tuple(parts) if isinstance(c, tuple) else parts[0]


def broadcast_uncond(uncond: Cond, cond: Cond, b: int) -> Cond:
    """The empty-prompt condition of one sample, expanded to a batch of b (leading 1 optional)."""
    us, cs = as_tuple(uncond), as_tuple(cond)
    if len(us) != len(cs):
        raise ValueError(f"uncond has {len(us)} tensors but cond has {len(cs)}: pass the same structure")
    out = []
    for u, c in zip(us, cs):
        if u.dim() == c.dim() - 1:
            u = u.unsqueeze(0)
        if u.dim() != c.dim() or u.shape[0] != 1 or u.shape[1:] != c.shape[1:]:
            raise ValueError(
                f"uncond part has shape {tuple(u.shape)}, expected one sample of cond {tuple(c.shape[1:])}"
            )
        out.append(u.to(c.dtype).expand(b, *c.shape[1:]))
    return like(cond, out)


def where_cond(drop: torch.Tensor, uncond_b: Cond, cond: Cond) -> Cond:
    """Rows with `drop` take the empty prompt. Always a `where` (no `drop.any()` test: that would
    read the device once per micro-batch)."""
    parts = [
        torch.where(drop.view(-1, *([1] * (c.dim() - 1))), u, c)
        for u, c in zip(as_tuple(uncond_b), as_tuple(cond))
    ]
    return like(cond, parts)


def cat_cond(a: Cond, b: Cond) -> Cond:
    return like(b, [torch.cat([x, y]) for x, y in zip(as_tuple(a), as_tuple(b))])


def repeat_cond(c: Cond, times: int) -> Cond:
    """The batch repeated `times` times along dim 0 ([N, ...] -> [times*N, ...], block-major)."""
    return like(c, [x.repeat(times, *([1] * (x.dim() - 1))) for x in as_tuple(c)])
