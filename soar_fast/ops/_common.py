"""Helpers shared by the fused ops: optional-triton probe, the kernels' dtypes, [rows, N] views with a
row stride, fp32 copies of the per-sample scalars."""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import warnings

import torch

__all__ = [
    "KERNEL_DTYPES",
    "POISON_ENV",
    "as_rows",
    "check_kernel_dtype",
    "empty_output",
    "fp32_contiguous",
    "interpreting",
    "state_rows",
    "triton_available",
]

POISON_ENV = "SOAR_FAST_POISON_OUTPUTS"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the fused kernels store

log = logging.getLogger(__name__)
_warned: set[str] = set()


@functools.cache
def triton_available() -> bool:
    """True when the triton package can be imported (it is optional: `import soar_fast` works without)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def as_rows(t: torch.Tensor, op: str, name: str) -> tuple[torch.Tensor, int]:
    """View `t` `[R, ...]` as rows of N = prod(t.shape[1:]) contiguous elements with a row stride.

    A kernel reads row r at `ptr + r*stride + [0, N)`. Any row stride is fine (a batch slice such
    as `x[::2]`); rows whose elements are not contiguous (a transpose, a channel slice) are copied
    once, with a warning, since the kernels assume unit inner stride for coalesced loads.
    """
    if t.dim() == 0:
        raise ValueError(f"{op}: {name} must have a batch dimension")
    if t.dim() == 1:
        t = t.unsqueeze(1)
    rows_ok = t.shape[0] == 0 or t.numel() == 0 or t[0].is_contiguous()
    if not rows_ok:
        key = f"{op}.{name}"
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"{op}: {name} has non-contiguous rows (strides {t.stride()}); copying it to a "
                "contiguous tensor (costs one extra read and write)",
                stacklevel=3,
            )
        t = t.contiguous()
    stride = t.stride(0) if t.shape[0] > 1 else math.prod(t.shape[1:])
    return t, stride


def check_kernel_dtype(op: str, dtype: torch.dtype) -> None:
    """Raise TypeError unless a kernel serves `dtype` (fp32, fp16, bf16)."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: dtype {dtype} is not supported (fp32, fp16, bf16)")


def state_rows(op: str, z0, z1, v_uncond, v_cond) -> tuple[tuple[torch.Tensor, int], ...]:
    """`as_rows` of the four `[B, ...]` state inputs of the aux- and path-state kernels, in order:
    ((z0, stride), (z1, stride), (v_uncond, stride), (v_cond, stride))."""
    named = (("z0", z0), ("z1", z1), ("v_uncond", v_uncond), ("v_cond", v_cond))
    return tuple(as_rows(t, op, name) for name, t in named)


def fp32_contiguous(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor as a contiguous fp32 tensor on `device` (the kernels' sigma and noise inputs)."""
    return tuple(t.to(device=device, dtype=torch.float32).contiguous() for t in tensors)


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor when $SOAR_FAST_POISON_OUTPUTS=1 (tests: an element a
    kernel fails to write then fails the parity check instead of passing by luck)."""
    if os.environ.get(POISON_ENV, "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
