"""The fused FP8 weight quantisation (soar_fast/ops/fp8_quant): the Triton kernels (in the
interpreter on CPU, on the GPU when lent) write the reference's bits, for per-tensor and per-row
scales, fp32 and bf16 weights, every awkward value; the tables are cached and reused."""

import os

import pytest
import torch

from soar_fast.ops.fp8_quant import fp8_quantize_many, quantize_fp8_reference
from soar_fast.ops.fp8_quant import op as fp8_op

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    DEV == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="Triton needs CUDA or TRITON_INTERPRET=1")


def _weights(dtype):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(r, k, generator=g) * s for r, k, s in [(16, 32, 1.0), (40, 48, 1e-3), (9, 4100, 30.0),
                                                              (3, 16, 1e-30)]]
    edge = torch.tensor([[0.0, -0.0, 1e-9, -1e-9, 448.0, -448.0, 447.9, 0.01953125, 0.009765625, 1.0, -1.0,
                          3.0e38, 2.0**-7, 2.0**-10, 5.0, 7.5]])
    ws += [edge, torch.zeros(8, 16)]
    return [w.to(dtype).to(DEV) for w in ws]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rowwise", [False, True])
def test_triton_writes_the_reference_bits(dtype, rowwise):
    ws = _weights(dtype)
    out = [torch.full(w.shape, float("nan"), device=DEV).to(torch.float8_e4m3fn) for w in ws]
    scales = [torch.full((w.shape[0], 1) if rowwise else (), -1.0, device=DEV) for w in ws]
    assert fp8_quantize_many(ws, out, scales, rowwise=rowwise, backend="triton") == "triton"
    for w, q, s in zip(ws, out, scales):
        rq, rs = quantize_fp8_reference(w, rowwise)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), (tuple(w.shape), dtype, rowwise)
        assert torch.equal(s, rs)
        err = (q.float() * s - w.float()).abs()  # e4m3 keeps 3 mantissa bits: within half a step
        assert (err <= 2.0**-4 * w.float().abs() + s * 2.0**-10 + 1e-45).all()


@needs_triton
def test_tables_are_cached_and_buffers_written_in_place():
    fp8_op._TABLES.clear()
    ws = _weights(torch.float32)[:3]
    out = [torch.empty(w.shape, device=DEV, dtype=torch.float8_e4m3fn) for w in ws]
    scales = [torch.empty((), device=DEV) for _ in ws]
    ptrs = [q.data_ptr() for q in out]
    fp8_quantize_many(ws, out, scales, backend="triton")
    with torch.no_grad():
        for w in ws:
            w.mul_(2)
    fp8_quantize_many(ws, out, scales, backend="triton")
    assert len(fp8_op._TABLES) == 1 and [q.data_ptr() for q in out] == ptrs
    for w, s in zip(ws, scales):
        assert torch.equal(s, quantize_fp8_reference(w, False)[1])


def test_reference_backend_and_bad_input():
    ws = _weights(torch.float32)[:2]
    out = [torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=DEV) for w in ws]
    scales = [torch.empty((), device=DEV) for _ in ws]
    assert fp8_quantize_many(ws, out, scales, backend="reference") == "reference"
    assert torch.equal(out[0].view(torch.uint8), quantize_fp8_reference(ws[0], False)[0].view(torch.uint8))
    with pytest.raises(ValueError, match="scale shape"):
        fp8_quantize_many(ws, out, scales, rowwise=True)
    with pytest.raises(ValueError, match="2 weights, 1 outputs"):
        fp8_quantize_many(ws, out[:1], scales)
    with pytest.raises(ValueError, match="unknown backend"):
        fp8_quantize_many(ws, out, scales, backend="cuda")


@pytest.mark.cuda
def test_on_the_gpu_the_kernels_write_the_reference_bits():
    """The same check on a GPU (the suite's `-m cuda` stage): the hardware cast rounds itself."""
    for dtype in (torch.float32, torch.bfloat16):
        for rowwise in (False, True):
            test_triton_writes_the_reference_bits(dtype, rowwise)
