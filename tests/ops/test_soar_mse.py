"""Parity of the fused SOAR loss (forward per-row losses and grad_v) against the reference in fp64,
its equality with soar_fast.loss.soar, opcheck, and its autograd.Function form."""

from __future__ import annotations

import os

import pytest
import torch
from soar_ops_cases import DTYPES, LOWP, assert_close_to_oracle, cpu_cases, layout, sigmas

from soar_fast.config import SoarConfig
from soar_fast.loss.schedule import loss_weight
from soar_fast.loss.soar import sample_draws, soar_loss_from_draws
from soar_fast.ops import (
    SoarFusedMSEFunction,
    soar_aux_states,
    soar_fused_mse,
    soar_fused_mse_and_grad,
)
from soar_fast.ops.soar_mse.reference import soar_fused_mse_reference

SHAPES = [
    pytest.param((1, 16), 4, id="b1_n16_m4"),
    pytest.param((3, 5, 7), 4, id="odd_3x5x7_m4"),
    pytest.param((2, 3, 5, 7), 6, id="odd_2x3x5x7_m6"),
    pytest.param((2, 4231), 3, id="odd_n4231_m3"),
    pytest.param((2, 16, 8, 8), 0, id="m0_sft"),
    pytest.param((1, 16, 64, 64), 4, id="sd35m_512px_b1_m4"),
    pytest.param((1, 16, 64, 64), 6, id="sd35m_512px_b1_m6"),
    pytest.param((1, 16, 128, 128), 6, id="sd35m_1024px_b1_m6"),
]


def make_case(shape, m, dtype, device="cpu", seed=0):
    """(v, z0, z1, z_aux, σ', w) in `dtype` (σ', w fp32) and a random upstream grad; v near its
    targets as in training (target + noise), z' from the aux-state reference."""
    gen = torch.Generator().manual_seed(seed)
    b = shape[0]
    z0, z1, vu, vc = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    s0, s1, sa = sigmas(b, m, gen)
    z_aux, v_corr = soar_aux_states(z0, z1, vu, vc, s0, s1, sa, 4.5, backend="reference")
    target = torch.cat([z1 - z0, v_corr])
    v = target + 0.3 * torch.randn(target.shape, generator=gen, dtype=torch.float64)
    w = torch.rand((1 + m) * b, generator=gen, dtype=torch.float64) + 0.5
    grad = torch.randn((1 + m) * b, generator=gen, dtype=torch.float64)
    ts = [t.to(dtype) for t in (v, z0, z1, z_aux)] + [sa.float(), w.float()]
    return [t.to(device) for t in ts], grad.float().to(device)


def run(args, grad, backend):
    v = args[0].detach().clone().requires_grad_()
    loss = soar_fused_mse(v, *args[1:], backend=backend)
    (gv,) = torch.autograd.grad(loss, v, grad.to(loss.dtype))
    return loss.detach(), gv


def oracle(args, grad):
    return run([a.detach().cpu().double() for a in args], grad.cpu().double(), "reference")


def _backend(request, backend):
    if backend == "native":
        request.getfixturevalue("native_lib")
    return backend


def _check(args, grad, backend, dtype, name):
    loss, gv = run(args, grad, backend)
    loss_o, gv_o = oracle(args, grad)
    assert loss.dtype == torch.float32 and loss.shape == loss_o.shape
    assert gv.dtype == args[0].dtype and gv.shape == args[0].shape
    lowp = run([a.cpu() for a in args], grad.cpu(), "reference") if dtype in LOWP else (None, None)
    assert_close_to_oracle(loss.cpu(), loss_o, dtype, lowp[0], f"{name}.loss")
    assert_close_to_oracle(gv.cpu(), gv_o, dtype, lowp[1], f"{name}.grad_v")


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("shape,m,dtype", cpu_cases(SHAPES, DTYPES))
def test_fused_mse_parity(request, backend, shape, m, dtype):
    backend = _backend(request, backend)
    args, grad = make_case(shape, m, dtype)
    _check(args, grad, backend, dtype, f"{backend}{shape}")


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("kind", ["batch_strided", "permuted"])
def test_fused_mse_noncontiguous(request, backend, kind):
    backend = _backend(request, backend)
    args, grad = make_case((3, 4, 5, 7), 4, torch.bfloat16)
    nc = [layout(a, kind) for a in args[:4]] + args[4:]
    assert not any(a.is_contiguous() for a in nc[:4])
    _check(nc, grad, backend, torch.bfloat16, f"{backend}-{kind}")


def _check_and_grad(args, backend, dtype, name):
    """Loss and grad in one pass = forward + backward at upstream grad 1."""
    ones = torch.ones(args[0].shape[0], device=args[0].device)
    loss, gv = soar_fused_mse_and_grad(*args, backend=backend)
    loss_o, gv_o = oracle(args, ones)
    assert loss.dtype == torch.float32 and gv.dtype == args[0].dtype and gv.shape == args[0].shape
    lowp = run([a.cpu() for a in args], ones.cpu(), "reference") if dtype in LOWP else (None, None)
    assert_close_to_oracle(loss.cpu(), loss_o, dtype, lowp[0], f"{name}.loss")
    assert_close_to_oracle(gv.cpu(), gv_o, dtype, lowp[1], f"{name}.grad_v")


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("shape,m,dtype", cpu_cases(SHAPES, DTYPES))
def test_fused_mse_and_grad_parity(request, backend, shape, m, dtype):
    backend = _backend(request, backend)
    args, _ = make_case(shape, m, dtype)
    _check_and_grad(args, backend, dtype, f"and_grad-{backend}{shape}")


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_fused_mse_and_grad_noncontiguous_and_reference(request, backend):
    backend = _backend(request, backend)
    args, _ = make_case((3, 4, 5, 7), 4, torch.bfloat16)
    nc = [layout(a, "batch_strided") for a in args[:4]] + args[4:]
    _check_and_grad(nc, backend, torch.bfloat16, f"and_grad-{backend}-strided")
    args, _ = make_case((2, 3, 5, 7), 2, torch.float32)
    _check_and_grad(args, "reference", torch.float32, "and_grad-reference")


def test_fused_reference_equals_soar_loss():
    """The fused reference computes exactly the per-sample terms of soar_fast.loss.soar."""
    cfg = SoarConfig(num_aux=3, weighting="cosmap")
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    calls = []

    def velocity_fn(z, sigma, cond):
        v = lin(z) * (1 + sigma.view(-1, 1, 1)) + cond
        calls.append(v)
        return v

    z0 = torch.randn(2, 5, 6, dtype=torch.float64)
    cond = torch.randn(2, 1, 6, dtype=torch.float64)
    draws = sample_draws(z0, cfg, torch.Generator().manual_seed(1))
    out = soar_loss_from_draws(
        velocity_fn, z0, cond, torch.zeros(1, 1, 6, dtype=torch.float64), cfg, draws
    )
    b, m = 2, 3
    v = torch.cat([calls[0]] + calls[2:])  # base, (rollout skipped), aux points in order
    z_aux, _ = soar_aux_states(
        z0,
        draws.z1.double(),
        *calls[1].chunk(2),
        draws.sigma0,
        draws.sigma1,
        draws.sigma_aux,
        cfg.guidance_scale,
        backend="reference",
    )
    w = torch.cat(
        [
            loss_weight(draws.sigma0, cfg.weighting),
            loss_weight(draws.sigma_aux, cfg.weighting).flatten(),
        ]
    )
    fused = soar_fused_mse_reference(v, z0, draws.z1.double(), z_aux, draws.sigma_aux, w)
    torch.testing.assert_close(fused[:b], out.base_losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(fused[b:].view(m, b), out.aux_losses, rtol=1e-12, atol=0)
    # And the Triton kernel on the fp32 versions of the same tensors.
    args32 = [t.detach().float() for t in (v, z0, draws.z1, z_aux, draws.sigma_aux, w)]
    torch.testing.assert_close(
        soar_fused_mse(*args32, backend="triton").double(), fused.detach(), rtol=1e-5, atol=1e-7
    )


def test_fused_mse_autograd_function_and_gradcheck():
    from soar_fast.ops.soar_mse.triton_kernels import (
        fused_mse_backward_triton,
        fused_mse_forward_triton,
    )

    args, grad = make_case((2, 3, 5, 7), 2, torch.float32)
    v = args[0].clone().requires_grad_()
    loss = SoarFusedMSEFunction.apply(
        v, *args[1:], fused_mse_forward_triton, fused_mse_backward_triton
    )
    (gv,) = torch.autograd.grad(loss, v, grad)
    loss_o, gv_o = oracle(args, grad)
    assert_close_to_oracle(loss, loss_o, torch.float32, None, "function.loss")
    assert_close_to_oracle(gv, gv_o, torch.float32, None, "function.grad_v")


def test_fused_mse_opcheck():
    args, grad = make_case((2, 3, 5, 7), 3, torch.float32)
    v = args[0].clone().requires_grad_()
    torch.library.opcheck(torch.ops.soar_fast.fused_mse.default, (v, *args[1:]))
    torch.library.opcheck(torch.ops.soar_fast.fused_mse_backward.default, (grad, *args))
    torch.library.opcheck(torch.ops.soar_fast.fused_mse_and_grad.default, tuple(args))


def test_fused_mse_native_opcheck(native_lib):
    args, grad = make_case((2, 3, 5, 7), 3, torch.float32)
    v = args[0].clone().requires_grad_()
    torch.library.opcheck(torch.ops.soar_fast_native.fused_mse.default, (v, *args[1:]))
    torch.library.opcheck(torch.ops.soar_fast_native.fused_mse_and_grad.default, tuple(args))
    torch.library.opcheck(torch.ops.soar_fast_native.fused_mse_backward.default, (grad, *args))


def test_fused_mse_compiles_as_one_node():
    from soar_fast.ops import dispatch

    dispatch._logged.clear()  # the first (logging) dispatch happens while dynamo traces
    args, grad = make_case((2, 3, 5, 7), 3, torch.float32)
    fn = torch.compile(
        lambda *a: soar_fused_mse(*a, backend="triton"), fullgraph=True, backend="aot_eager"
    )
    v = args[0].clone().requires_grad_()
    loss = fn(v, *args[1:])
    (gv,) = torch.autograd.grad(loss, v, grad)
    loss_o, gv_o = oracle(args, grad)
    assert_close_to_oracle(gv, gv_o, torch.float32, None, "compiled.grad_v")


def test_fused_mse_shape_errors():
    args, _ = make_case((2, 8), 2, torch.float32)
    with pytest.raises(ValueError, match="weights"):
        soar_fused_mse(*args[:5], args[5][:-1], backend="triton")
    with pytest.raises(ValueError, match="z_aux"):
        soar_fused_mse(args[0], args[1], args[2], args[3][:-1], *args[4:], backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,m", SHAPES + [pytest.param((4, 16, 128, 128), 6, id="sd35m_1024px_b4_m6")]
)
def test_fused_mse_cuda(shape, m, dtype):
    args, grad = make_case(shape, m, dtype, device="cuda")
    _check(args, grad, "triton", dtype, "cuda-triton")
    _check(args, grad, "auto", dtype, "cuda-auto")
    _check_and_grad(args, "triton", dtype, "cuda-and_grad")


@pytest.mark.cuda
def test_fused_mse_cuda_native(request):
    if not os.environ.get("SOAR_FAST_NATIVE_LIB"):
        pytest.skip(
            "set SOAR_FAST_NATIVE_LIB to a CUDA build (benchmarks/run_gpu_kernels.sh builds one)"
        )
    request.getfixturevalue("native_lib")
    if not torch.ops.soar_fast_native.fused_mse.default.has_kernel_for_dispatch_key("CUDA"):
        pytest.skip("native extension built without CUDA")
    for dtype in (torch.float32, torch.bfloat16):
        args, grad = make_case((2, 16, 64, 64), 6, dtype, device="cuda")
        _check(args, grad, "native", dtype, "cuda-native")
        _check_and_grad(args, "native", dtype, "cuda-native-and_grad")


@pytest.mark.cuda
def test_fused_mse_cuda_compile():
    args, grad = make_case((2, 16, 64, 64), 6, torch.bfloat16, device="cuda")
    fn = torch.compile(lambda *a: soar_fused_mse(*a, backend="triton").sum(), fullgraph=True)
    v = args[0].clone().requires_grad_()
    fn(v, *args[1:]).backward()
    _, gv_o = oracle(args, torch.ones_like(grad))
    lowp = run([a.cpu() for a in args], torch.ones_like(grad).cpu(), "reference")[1]
    assert_close_to_oracle(v.grad.cpu(), gv_o, torch.bfloat16, lowp, "cuda-compiled.grad_v")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fused_mse_mixed_dtypes(backend):
    """A step feeds bf16 model outputs against fp32 latents and states: each is loaded in its own dtype."""
    args, grad = make_case((2, 3, 5, 7), 3, torch.float32)
    args = [args[0].bfloat16()] + args[1:]
    _check(args, grad, backend, torch.bfloat16, f"mixed-{backend}")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["batch_strided", "permuted"])
def test_fused_mse_cuda_noncontiguous(kind):
    args, grad = make_case((3, 16, 8, 8), 4, torch.bfloat16, device="cuda")
    nc = [layout(a, kind) for a in args[:4]] + args[4:]
    _check(nc, grad, "triton", torch.bfloat16, f"cuda-{kind}")
    _check_and_grad(nc, "triton", torch.bfloat16, f"cuda-{kind}-and_grad")


@pytest.mark.cuda
def test_fused_mse_and_grad_cuda_graph():
    args, _ = make_case((2, 16, 64, 64), 6, torch.bfloat16, device="cuda")
    soar_fused_mse_and_grad(
        *args, backend="triton"
    )  # warm up (compile + autotune) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, gv = soar_fused_mse_and_grad(*args, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    ones = torch.ones(args[0].shape[0])
    loss_o, gv_o = oracle(args, ones)
    lowp = run([a.cpu() for a in args], ones, "reference")
    assert_close_to_oracle(loss.cpu(), loss_o, torch.bfloat16, lowp[0], "graph.loss")
    assert_close_to_oracle(gv.cpu(), gv_o, torch.bfloat16, lowp[1], "graph.grad_v")
