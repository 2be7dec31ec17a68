"""Parity of the fused aux-state op (Triton in the interpreter on CPU, native CPU C++; real CUDA
under the cuda marker) against the reference computed in fp64."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from soar_ops_cases import DTYPES, LOWP, assert_close_to_oracle, cpu_cases, layout, sigmas

from soar_fast.ops import soar_aux_states, soar_aux_z
from soar_fast.ops.soar_aux_states.reference import soar_aux_states_reference

G = 4.5
SHAPES = [
    pytest.param((1, 16), 4, id="b1_n16_m4"),
    pytest.param((3, 5, 7), 4, id="odd_3x5x7_m4"),
    pytest.param((2, 3, 5, 7), 6, id="odd_2x3x5x7_m6"),
    pytest.param((2, 4231), 3, id="odd_n4231_m3"),
    pytest.param((2, 16, 8, 8), 0, id="m0"),
    pytest.param((2, 16, 64, 64), 4, id="sd35m_512px_b2_m4"),
    pytest.param((1, 16, 64, 64), 6, id="sd35m_512px_b1_m6"),
    pytest.param((1, 16, 128, 128), 6, id="sd35m_1024px_b1_m6"),
]


def make_case(shape, m, dtype, device="cpu", seed=0):
    """Inputs in `dtype` plus their exact fp64 copies (the oracle sees what the kernel sees)."""
    gen = torch.Generator().manual_seed(seed)
    b = shape[0]
    xs = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4)]
    s0, s1, sa = sigmas(b, m, gen)
    sig = [s.float() for s in (s0, s1, sa)]  # σ are fp32 in a step
    args = [x.to(device) for x in xs] + [s.to(device) for s in sig]
    oracle = soar_aux_states_reference(*[x.double() for x in xs], *[s.double() for s in sig], G)
    return args, oracle


def _backend(request, backend):
    if backend == "native":
        request.getfixturevalue("native_lib")
    return backend


def _check(outs, oracle, args, dtype, name):
    lowp = soar_aux_states_reference(*args, G) if dtype in LOWP else (None, None)
    for out, ora, lp, what in zip(outs, oracle, lowp, ("z_aux", "v_corr"), strict=True):
        assert out.dtype == dtype and out.shape == ora.shape, (
            f"{name}.{what}: {out.dtype} {tuple(out.shape)}"
        )
        assert_close_to_oracle(
            out.cpu(), ora, dtype, None if lp is None else lp.cpu(), f"{name}.{what}"
        )


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("shape,m,dtype", cpu_cases(SHAPES, DTYPES))
def test_aux_states_parity(request, backend, shape, m, dtype):
    backend = _backend(request, backend)
    args, oracle = make_case(shape, m, dtype)
    outs = soar_aux_states(*args, G, backend=backend)
    _check(outs, oracle, args, dtype, f"{backend}{shape}")
    z_only = soar_aux_z(*args, G, backend=backend)
    assert torch.equal(z_only, outs[0]), "aux_z must write the same z' as aux_states"


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("kind", ["batch_strided", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_aux_states_noncontiguous(request, monkeypatch, backend, kind, dtype):
    backend = _backend(request, backend)
    monkeypatch.setattr(
        "soar_fast.ops._common._warned", set()
    )  # the copy warning is once per process
    args, oracle = make_case((3, 4, 5, 7), 4, dtype)
    nc = [layout(x, kind) for x in args[:4]]
    assert not any(x.is_contiguous() for x in nc)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = soar_aux_states(*nc, *args[4:], G, backend=backend)
    _check(outs, oracle, args, dtype, f"{backend}-{kind}")
    if (
        backend == "triton"
    ):  # batch strides are read in place; non-contiguous rows are copied with a warning
        copied = [w for w in rec if "non-contiguous rows" in str(w.message)]
        assert bool(copied) == (kind == "permuted")


def test_aux_states_no_rollout_error_gives_sft_target():
    """With v_cfg = z1 − z0 (no rollout error), v_corr = z1 − z0 exactly for every point (SOAR.md 4)."""
    args, _ = make_case((2, 3, 5, 7), 4, torch.float32, seed=3)
    z0, z1 = args[0], args[1]
    v = z1 - z0
    z_aux, v_corr = soar_aux_states(z0, z1, v, v, *args[4:], G, backend="triton")
    torch.testing.assert_close(v_corr, (z1 - z0).repeat(4, 1, 1, 1), rtol=1e-5, atol=1e-5)


def test_aux_states_rejects_fp64_in_triton():
    args, _ = make_case((2, 8), 2, torch.float64)
    with pytest.raises(TypeError, match="not supported"):
        soar_aux_states(*args, G, backend="triton")


def test_aux_states_opcheck():
    args, _ = make_case((2, 3, 5, 7), 3, torch.float32)
    torch.library.opcheck(torch.ops.soar_fast.aux_states.default, (*args, G))
    torch.library.opcheck(torch.ops.soar_fast.aux_states_z.default, (*args, G))


def test_aux_states_native_opcheck(native_lib):
    args, _ = make_case((2, 3, 5, 7), 3, torch.float32)
    torch.library.opcheck(torch.ops.soar_fast_native.aux_states.default, (*args, G))
    torch.library.opcheck(torch.ops.soar_fast_native.aux_states_z.default, (*args, G))


def test_aux_states_compiles_as_one_node():
    """fullgraph trace through the fake impl (aot_eager: no inductor codegen, kernel runs eagerly)."""
    from soar_fast.ops import dispatch

    dispatch._logged.clear()  # the first (logging) dispatch happens while dynamo traces
    args, oracle = make_case((2, 3, 5, 7), 3, torch.float32)
    fn = torch.compile(
        lambda *a: soar_aux_states(*a, G, backend="triton"), fullgraph=True, backend="aot_eager"
    )
    _check(fn(*args), oracle, args, torch.float32, "compiled")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,m", SHAPES + [pytest.param((4, 16, 128, 128), 6, id="sd35m_1024px_b4_m6")]
)
def test_aux_states_cuda(shape, m, dtype):
    args, oracle = make_case(shape, m, dtype, device="cuda")
    _check(soar_aux_states(*args, G, backend="triton"), oracle, args, dtype, "cuda-triton")
    _check(soar_aux_states(*args, G, backend="auto"), oracle, args, dtype, "cuda-auto")


@pytest.mark.cuda
def test_aux_states_cuda_native(request):
    if not os.environ.get("SOAR_FAST_NATIVE_LIB"):
        pytest.skip(
            "set SOAR_FAST_NATIVE_LIB to a CUDA build (benchmarks/run_gpu_kernels.sh builds one)"
        )
    request.getfixturevalue("native_lib")
    if not torch.ops.soar_fast_native.aux_states.default.has_kernel_for_dispatch_key("CUDA"):
        pytest.skip("native extension built without CUDA")
    for dtype in (torch.float32, torch.bfloat16):
        args, oracle = make_case((2, 16, 64, 64), 6, dtype, device="cuda")
        _check(soar_aux_states(*args, G, backend="native"), oracle, args, dtype, "cuda-native")


@pytest.mark.cuda
def test_aux_states_cuda_compile_and_graph():
    args, oracle = make_case((2, 16, 64, 64), 6, torch.bfloat16, device="cuda")
    fn = torch.compile(lambda *a: soar_aux_states(*a, G, backend="triton"), fullgraph=True)
    _check(fn(*args), oracle, args, torch.bfloat16, "cuda-compiled")
    soar_aux_states(*args, G, backend="triton")  # warm up (compile the kernel) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = soar_aux_states(*args, G, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    _check(outs, oracle, args, torch.bfloat16, "cuda-graph")


def test_aux_states_mixed_dtypes_triton():
    """Rollout velocities in bf16 (the model's dtype) with fp32 latents: fp32 outputs, fp32 accuracy."""
    args, _ = make_case((2, 3, 5, 7), 4, torch.float32)
    args[2], args[3] = args[2].bfloat16(), args[3].bfloat16()
    oracle = soar_aux_states_reference(*[a.double() for a in args[:7]], G)
    outs = soar_aux_states(*args, G, backend="triton")
    _check(outs, oracle, args, torch.float32, "mixed")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["batch_strided", "permuted"])
def test_aux_states_cuda_noncontiguous(kind):
    args, oracle = make_case((3, 16, 8, 8), 4, torch.bfloat16, device="cuda")
    nc = [layout(x, kind) for x in args[:4]]
    _check(
        soar_aux_states(*nc, *args[4:], G, backend="triton"),
        oracle,
        args,
        torch.bfloat16,
        f"cuda-{kind}",
    )
