"""Microbenchmark of the fused aux-state op (z' and v_corr; and z' alone, "soar_aux_z").

Providers: torch_eager (the reference), torch_compile (torch.compile of the reference), triton,
native. Rows: time p20/p50/p80, minimal bytes, GB/s, % of the copy bandwidth measured in the run.
"""

from __future__ import annotations

import functools

import pytest
import torch
from kernel_bench import (
    bytes_aux_states,
    bytes_aux_z,
    device,
    full,
    native_ready,
    report,
    smoke,
    triton_ready,
    want_compile,
)

from soar_fast.ops import soar_aux_states, soar_aux_z
from soar_fast.ops.soar_aux_states.reference import soar_aux_states_reference

G = 4.5
if smoke():
    SHAPES = [("smoke_2x4x8x8_m2", (2, 4, 8, 8), 2)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    SHAPES = [
        ("sd35m_512_b4_m6", (4, 16, 64, 64), 6),
        ("sd35m_1024_b2_m6", (2, 16, 128, 128), 6),
        ("sd35m_512_b32_m6", (32, 16, 64, 64), 6),
    ]
    if full():
        SHAPES += [
            ("sd35m_512_b4_m4", (4, 16, 64, 64), 4),
            ("sd35m_1024_b8_m6", (8, 16, 128, 128), 6),
        ]
    DTYPES = [torch.bfloat16, torch.float32]
PROVIDERS = ["torch_eager", "torch_compile", "triton", "native"]


@functools.cache
def _compiled(which: str):
    if which == "z":
        return torch.compile(lambda *a: soar_aux_states_reference(*a)[0], dynamic=False)
    return torch.compile(soar_aux_states_reference, dynamic=False)


def inputs(shape, m, dtype):
    dev = device()
    b = shape[0]
    z = [torch.randn(shape, device=dev, dtype=dtype) for _ in range(4)]
    s0 = torch.rand(b, device=dev) * 0.8 + 0.1
    s1 = (s0 - 0.02).clamp_min(0)
    sa = s1 + torch.rand(m, b, device=dev) * (1 - s1)
    return (*z, s0, s1, sa, G)


def provider_fn(provider: str, which: str, args, dtype):
    if provider == "torch_eager":
        return (
            (lambda: soar_aux_states_reference(*args)[0])
            if which == "z"
            else (lambda: soar_aux_states_reference(*args))
        )
    if provider == "torch_compile":
        if not want_compile(dtype):
            pytest.skip("torch.compile provider off here (SOAR_FAST_BENCH_COMPILE=1 turns it on)")
        f = _compiled(which)
        return lambda: f(*args)
    if provider == "triton" and not triton_ready():
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    if provider == "native" and not native_ready():
        pytest.skip("native extension not built for this device (see docs/kernels.md)")
    op = soar_aux_z if which == "z" else soar_aux_states
    return lambda: op(*args, backend=provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,shape,m", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("which", ["both", "z"], ids=["aux_states", "aux_z"])
def test_bench_aux_states(bench, which, name, shape, m, dtype, provider):
    args = inputs(shape, m, dtype)
    fn = provider_fn(provider, which, args, dtype)
    e = shape[0] * int(torch.tensor(shape[1:]).prod())
    s = torch.empty((), dtype=dtype).element_size()
    nbytes = bytes_aux_z(e, m, s) if which == "z" else bytes_aux_states(e, m, s)
    op = "soar_aux_z" if which == "z" else "soar_aux_states"
    rows = report(
        op, provider, "fwd", f"{name}:{'x'.join(map(str, shape))}", dtype, fn, nbytes, bench
    )
    assert rows[1]["metric"] == "time_ms_p50" and rows[1]["value"] > 0
