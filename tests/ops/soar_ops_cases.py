"""Shared inputs and error measures of the fused-op parity tests (imported by tests/ops/test_*)."""

from __future__ import annotations

import pytest
import torch

LOWP = (torch.bfloat16, torch.float16)
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float32, torch.bfloat16, torch.float16)]


def sigmas(b: int, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SOAR.md draws (shift 3, 40 steps, σ' ~ U[σ1, 1] ≥ 1e-3), fp64: σ0, σ1 `[B]`, σ' `[M, B]`."""
    u0 = torch.sigmoid(torch.randn(b, generator=gen, dtype=torch.float64))
    u1 = (u0 - 1 / 40).clamp_min(0)
    shift = lambda u: 3 * u / (1 + 2 * u)  # noqa: E731
    s0, s1 = shift(u0), shift(u1)
    sa = (s1 + torch.rand(m, b, generator=gen, dtype=torch.float64) * (1 - s1)).clamp_min(1e-3)
    return s0, s1, sa


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout: 'contig', 'batch_strided' (rows of a wider tensor,
    kernel reads with a row stride) or 'permuted' (rows not contiguous: copy-and-warn path)."""
    if kind == "contig":
        return t.contiguous()
    if kind == "batch_strided":
        wide = torch.full(
            (2 * t.shape[0], *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device
        )
        wide[::2] = t
        return wide[::2]
    if kind == "permuted":
        if t.dim() < 3:
            raise ValueError("permuted layout needs >= 2 trailing dims")
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(kind)


def rel_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    """max|out − oracle| / max|oracle| (inf when out has NaN: poisoned, unwritten elements fail)."""
    out = out.detach().double()
    if out.numel() == 0 and oracle.numel() == 0:
        return 0.0
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - oracle).abs().max() / oracle.abs().max().clamp_min(1e-30)).item()


def assert_close_to_oracle(
    out: torch.Tensor,
    oracle: torch.Tensor,
    dtype: torch.dtype,
    lowp_ref: torch.Tensor | None,
    name: str,
):
    """fp32: relative error <= 1e-6. bf16/fp16: error <= 2x that of the reference run in the same
    low precision (+ 1e-6 relative slack for fp32 accumulation-order differences)."""
    err = rel_err(out, oracle)
    if dtype == torch.float32 or lowp_ref is None:
        assert err <= 1e-6, f"{name}: fp32 relative error {err:.3e} > 1e-6"
    else:
        ref_err = rel_err(lowp_ref, oracle)
        assert err <= 2 * ref_err + 1e-6, (
            f"{name}: {dtype} error {err:.3e} > 2 x reference's {ref_err:.3e}"
        )


def cpu_cases(shapes, dtypes):
    """shape x dtype params for the CPU parity tests: fp16 runs on the small shapes only (it takes
    the same code path as bf16; the SD3.5-M shapes cost seconds each in the interpreter)."""
    out = []
    for s in shapes:
        for d in dtypes:
            if s.id.startswith("sd35m") and d.values[0] == torch.float16:
                continue
            out.append(pytest.param(*s.values, *d.values, id=f"{s.id}-{d.id}"))
    return out
