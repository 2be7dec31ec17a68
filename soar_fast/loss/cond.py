"""Conditions: a tensor or a tuple of tensors batched along dim 0 (SOAR.md's `velocity_fn` API)."""

from __future__ import annotations

import torch

__all__ = ["Cond", "as_tuple", "broadcast_uncond", "cat_cond", "like", "repeat_cond", "to_device", "where_cond"]

Cond = torch.Tensor | tuple[torch.Tensor, ...]


def as_tuple(c: Cond) -> tuple[torch.Tensor, ...]:
    return c if isinstance(c, tuple) else (c,)


def like(c: Cond, parts: list[torch.Tensor]) -> Cond:
    return tuple(parts) if isinstance(c, tuple) else parts[0]


def to_device(c: Cond, device: torch.device | str, non_blocking: bool = False) -> Cond:
    """Every tensor part moved to `device`; a `None` part (of an uncond: see `broadcast_uncond`) stays None."""
    return like(c, [None if t is None else t.to(device, non_blocking=non_blocking) for t in as_tuple(c)])


def broadcast_uncond(uncond: Cond, cond: Cond, b: int) -> Cond:
    """The empty-prompt condition of one sample, expanded to a batch of b (leading 1 optional).

    A `None` part of `uncond` keeps each row's own part of `cond` (a condition CFG does not drop,
    e.g. FLUX.1 Kontext's reference image: the unconditional branch is the empty prompt with the
    same image)."""
    us, cs = as_tuple(uncond), as_tuple(cond)
    if len(us) != len(cs):
        raise ValueError(f"uncond has {len(us)} tensors but cond has {len(cs)}: pass the same structure")
    out = []
    for u, c in zip(us, cs):
        if u is None:
            out.append(c)
            continue
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
        c if u is c else torch.where(drop.view(-1, *([1] * (c.dim() - 1))), u, c)  # `u is c`: a part CFG keeps
        for u, c in zip(as_tuple(uncond_b), as_tuple(cond))
    ]
    return like(cond, parts)


def cat_cond(a: Cond, b: Cond) -> Cond:
    return like(b, [torch.cat([x, y]) for x, y in zip(as_tuple(a), as_tuple(b))])


def repeat_cond(c: Cond, times: int) -> Cond:
    """The batch repeated `times` times along dim 0 ([N, ...] -> [times*N, ...], block-major)."""
    return like(c, [x.repeat(times, *([1] * (x.dim() - 1))) for x in as_tuple(c)])
