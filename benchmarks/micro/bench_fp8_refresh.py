"""Microbenchmark of the FP8 rollout's weight refresh (once per optimizer step): every FP8-eligible
Linear of a model quantised to e4m3, per tensor or per row. Providers: `per_layer` (one
`quantize_fp8` per layer: the launch-bound path of 2026-11-26, 41.9 ms on an H200 for
SD3.5-Medium's 337 layers), `fused` (soar_fast.ops.fp8_quant, Triton: 3 launches / 1 for all
layers). Bytes: per-tensor reads the weights twice (amax, then scale-and-cast) and writes one byte
each; per-row reads twice and writes once too. GPU: SD3.5-Medium's FP8-eligible layers (bf16);
CPU smoke: a tiny model under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from kernel_bench import device, report, smoke, triton_ready

from soar_fast.fast.fp8 import Fp8RolloutLinear, enable_fp8_rollout, refresh_fp8_weights
from soar_fast.models.spec import get_family


def _model(rowwise: bool):
    preset = "tiny" if smoke() else "sd35-medium"
    dtype = torch.float32 if smoke() else torch.bfloat16
    model = get_family("sd3").build(preset, seed=0, device=device()).to(dtype)
    enable_fp8_rollout(model, rowwise=rowwise)
    return model, [m for m in model.modules() if isinstance(m, Fp8RolloutLinear)], dtype


@pytest.mark.parametrize("provider", ["per_layer", "fused"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
def test_bench_fp8_refresh(bench, rowwise, provider):
    if provider == "fused" and not triton_ready():
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    model, layers, dtype = _model(rowwise)

    def per_layer():
        for m in layers:
            m.refresh()

    fn = per_layer if provider == "per_layer" else (lambda: refresh_fp8_weights(model, backend="triton"))
    elems = sum(m.weight.numel() for m in layers)
    nbytes = elems * (2 * dtype.itemsize + 1)
    shape = f"{len(layers)} layers, {elems / 1e6:.1f}M weights"
    report("fp8_refresh", provider, "rowwise" if rowwise else "tensorwise", shape, dtype, fn, nbytes, bench)
