"""Triton kernels: FP8 quantisation of a list of tensors through pointer tables, so one launch (two
for per-tensor scales: amax, then scale-and-cast) covers every weight of a model, whatever their
number: the refresh is bandwidth-bound instead of launch-bound.

Per-tensor: the work is cut into BLOCK-element blocks; `blk_seg[b]` / `blk_idx[b]` name block b's
tensor and its place in it. `_amax_kernel` reduces each block's |x| max and `atomic_max`es it into
its tensor's slot (non-negative floats order like their bits, so the float atomic is exact);
`_quant_kernel` divides by the tensor's scale, clamps to ±448 and casts. Per-row: one program per
block of ROWS rows of one tensor (`blk_seg`, `blk_idx` = its first row), looping over K.

The cast to e4m3 rounds to nearest even on a GPU (`cvt.rn.satfinite`); the interpreter's cast
does not, so under TRITON_INTERPRET the kernels round explicitly first (`RNE` constexpr), and the
CPU parity tests see the GPU's rounding: the outputs equal the torch reference bitwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_MAX_F = tl.constexpr(448.0)
EPS_F = tl.constexpr(1e-12)


@triton.jit
def _round_e4m3_rne(y):
    """fp32 in [-448, 448] -> the nearest e4m3 value (ties to even), as fp32. e4m3 keeps 3
    mantissa bits down to 2^-6 and is subnormal below (step 2^-9)."""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3), a power of two: exact
    v = y / step
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |v| < 2^22 to nearest even
    r = (v + magic) - magic
    return tl.where(r == 0.0, y * 0.0, r * step)  # y * 0 keeps the sign of a value that rounds to zero


@triton.jit
def _src_ptr(tab, seg, SRC_BF16: tl.constexpr):
    raw = tl.load(tab + seg)
    if SRC_BF16:
        return raw.to(tl.pointer_type(tl.bfloat16))
    return raw.to(tl.pointer_type(tl.float32))


@triton.jit
def _amax_kernel(src_tab, numel_tab, blk_seg, blk_idx, amax_ptr, SRC_BF16: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    seg = tl.load(blk_seg + b)
    j = tl.load(blk_idx + b).to(tl.int64)
    n = tl.load(numel_tab + seg)
    src = _src_ptr(src_tab, seg, SRC_BF16)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr + seg, tl.max(tl.abs(x), axis=0))


@triton.jit
def _quant_kernel(src_tab, dst_tab, scale_tab, numel_tab, blk_seg, blk_idx, amax_ptr, SRC_BF16: tl.constexpr,
                  RNE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    seg = tl.load(blk_seg + b)
    j = tl.load(blk_idx + b).to(tl.int64)
    n = tl.load(numel_tab + seg)
    src = _src_ptr(src_tab, seg, SRC_BF16)
    dst = tl.load(dst_tab + seg).to(tl.pointer_type(tl.float8e4nv))
    scale = tl.div_rn(tl.maximum(tl.load(amax_ptr + seg), EPS_F), FP8_MAX_F)
    if j == 0:  # the tensor's first block publishes its scale
        tl.store(tl.load(scale_tab + seg).to(tl.pointer_type(tl.float32)), scale)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.div_rn(tl.load(src + offs, mask=mask, other=0.0).to(tl.float32), scale)
    y = tl.minimum(tl.maximum(y, -FP8_MAX_F), FP8_MAX_F)
    if RNE:
        y = _round_e4m3_rne(y)
    tl.store(dst + offs, y.to(tl.float8e4nv), mask=mask)


@triton.jit
def _rowwise_kernel(src_tab, dst_tab, scale_tab, rows_tab, k_tab, blk_seg, blk_idx, SRC_BF16: tl.constexpr,
                    RNE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    seg = tl.load(blk_seg + b)
    r0 = tl.load(blk_idx + b).to(tl.int64)
    n_rows = tl.load(rows_tab + seg)
    k = tl.load(k_tab + seg)
    src = _src_ptr(src_tab, seg, SRC_BF16)
    dst = tl.load(dst_tab + seg).to(tl.pointer_type(tl.float8e4nv))
    sc = tl.load(scale_tab + seg).to(tl.pointer_type(tl.float32))
    rows = r0 + tl.arange(0, ROWS)
    rmask = rows < n_rows
    amax = tl.zeros([ROWS], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (cols[None, :] < k)
        x = tl.load(src + rows[:, None] * k + cols[None, :], mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.div_rn(tl.maximum(amax, EPS_F), tl.full([ROWS], FP8_MAX_F, tl.float32))
    tl.store(sc + rows, scale, mask=rmask)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (cols[None, :] < k)
        x = tl.load(src + rows[:, None] * k + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.div_rn(x, scale[:, None]), -FP8_MAX_F), FP8_MAX_F)
        if RNE:
            y = _round_e4m3_rne(y)
        tl.store(dst + rows[:, None] * k + cols[None, :], y.to(tl.float8e4nv), mask=m)
