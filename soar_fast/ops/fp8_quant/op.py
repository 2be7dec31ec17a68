"""`fp8_quantize_many`: quantise a list of [R, K] weights to e4m3 into given buffers, in place.

The FP8 rollout keeps one e4m3 copy and one scale per weight and refreshes them after every
optimizer step. The reference backend quantises tensor by tensor (`quantize_fp8_reference`); the
Triton backend does all of them in 3 launches (per-tensor scales: zero, amax, scale-and-cast) or 1
(per-row scales) through pointer tables, whatever the number of weights (337 in SD3.5-Medium,
where the per-layer path was launch-bound: 41.9 ms on an H200, 2026-11-26). Both write the same
bits (the Triton kernels round to nearest even like torch's cast; checked in the interpreter).
The tables are cached per set of buffers, so a refresh reuses them and can be captured in a CUDA
graph (the pointers never change while the buffers live).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from soar_fast.ops._common import interpreting, triton_available
from soar_fast.ops.fp8_quant.reference import FP8_DTYPE, quantize_fp8_reference

__all__ = ["fp8_quantize_many"]

BLOCK = 4096
ROWS, BLOCK_K = 8, 256
_TABLES: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()


def _check(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
           rowwise: bool) -> None:
    if not (len(srcs) == len(dsts) == len(scales)):
        raise ValueError(f"fp8_quantize_many: {len(srcs)} weights, {len(dsts)} outputs, {len(scales)} scales")
    for s, d, c in zip(srcs, dsts, scales):
        if s.dim() != 2 or d.shape != s.shape or d.dtype != FP8_DTYPE or c.dtype != torch.float32:
            raise ValueError(f"fp8_quantize_many: need weight [R, K], an e4m3 output of its shape and an fp32 scale "
                             f"(got {tuple(s.shape)} {s.dtype}, {tuple(d.shape)} {d.dtype}, {c.dtype})")
        if c.shape != ((s.shape[0], 1) if rowwise else ()):
            raise ValueError(f"fp8_quantize_many: scale shape {tuple(c.shape)} for a {'row' if rowwise else 'tensor'}"
                             f"wise weight of {tuple(s.shape)}")


def _backend(srcs: Sequence[torch.Tensor], backend: str) -> str:
    if backend == "auto":
        on_gpu = bool(srcs) and srcs[0].is_cuda
        return "triton" if triton_available() and (on_gpu or interpreting()) else "reference"
    if backend not in ("reference", "triton"):
        raise ValueError(f"fp8_quantize_many: unknown backend {backend!r}; choose auto, reference or triton")
    return backend


def _tables(srcs, dsts, scales, rowwise: bool) -> dict[str, torch.Tensor]:
    key = (rowwise, *((s.data_ptr(), d.data_ptr(), c.data_ptr(), s.numel()) for s, d, c in zip(srcs, dsts, scales)))
    if key in _TABLES:
        _TABLES.move_to_end(key)
        return _TABLES[key]
    dev = srcs[0].device
    seg, idx = [], []
    for i, s in enumerate(srcs):
        n = -(-s.shape[0] // ROWS) if rowwise else -(-s.numel() // BLOCK)
        seg += [i] * n
        idx += [j * ROWS for j in range(n)] if rowwise else list(range(n))
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int64, device=dev)  # noqa: E731
    t = {"src": as_t([s.data_ptr() for s in srcs]), "dst": as_t([d.data_ptr() for d in dsts]),
         "scale": as_t([c.data_ptr() for c in scales]), "numel": as_t([s.numel() for s in srcs]),
         "rows": as_t([s.shape[0] for s in srcs]), "k": as_t([s.shape[1] for s in srcs]),
         "seg": as_t(seg), "idx": as_t(idx), "amax": torch.zeros(len(srcs), dtype=torch.float32, device=dev)}
    _TABLES[key] = t
    while len(_TABLES) > 8:  # buffers of models that are gone
        _TABLES.popitem(last=False)
    return t


def _triton(srcs, dsts, scales, rowwise: bool) -> None:
    from soar_fast.ops.fp8_quant import triton_kernels as k

    for dtype in dict.fromkeys(s.dtype for s in srcs):
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"fp8_quantize_many[triton]: weights must be bf16 or fp32, got {dtype}")
        group = [i for i, s in enumerate(srcs) if s.dtype == dtype]
        gs = [srcs[i].contiguous() for i in group]
        if any(a.data_ptr() != b.data_ptr() for a, b in zip(gs, (srcs[i] for i in group))):
            raise ValueError("fp8_quantize_many[triton]: weights must be contiguous")
        t = _tables(gs, [dsts[i] for i in group], [scales[i] for i in group], rowwise)
        bf16, rne, grid = dtype == torch.bfloat16, interpreting(), (t["seg"].numel(),)
        if rowwise:
            k._rowwise_kernel[grid](t["src"], t["dst"], t["scale"], t["rows"], t["k"], t["seg"], t["idx"],
                                    SRC_BF16=bf16, RNE=rne, ROWS=ROWS, BLOCK_K=BLOCK_K)
        else:
            t["amax"].zero_()
            k._amax_kernel[grid](t["src"], t["numel"], t["seg"], t["idx"], t["amax"], SRC_BF16=bf16, BLOCK=BLOCK)
            k._quant_kernel[grid](t["src"], t["dst"], t["scale"], t["numel"], t["seg"], t["idx"], t["amax"],
                                  SRC_BF16=bf16, RNE=rne, BLOCK=BLOCK)


@torch.no_grad()
def fp8_quantize_many(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                      rowwise: bool = False, backend: str = "auto") -> str:
    """dsts[i] = e4m3(srcs[i] / scales[i]) and scales[i] = max(amax, 1e-12) / 448 (amax over the
    tensor, or per row with `rowwise`; scales [] or [R, 1] fp32), written in place. Returns the
    backend that ran ('triton' on CUDA or under TRITON_INTERPRET, else 'reference')."""
    _check(srcs, dsts, scales, rowwise)
    if not srcs:
        return "reference"
    ran = _backend(srcs, backend)
    if ran == "triton":
        _triton(srcs, dsts, scales, rowwise)
        return ran
    for s, d, c in zip(srcs, dsts, scales):
        q, sc = quantize_fp8_reference(s, rowwise)
        d.copy_(q)
        c.copy_(sc)
    return ran
