"""Microbenchmark of the fused SOAR loss (per-row weighted MSE with recomputed targets), modes fwd,
fwd+bwd (autograd: forward pass, then backward pass) and loss+grad (losses and d(Σ losses)/dv;
the fused providers do it in one pass with soar_fused_mse_and_grad, torch providers by autograd),
and of the aux+loss pair (fused: aux_z + loss+grad; reference chains: aux_states storing v_corr +
a loss reading it, fwd+bwd). Providers: torch_eager, torch_compile, triton, native.
"""

from __future__ import annotations

import functools

import pytest
import torch
from bench_soar_aux_states import DTYPES, SHAPES, inputs
from kernel_bench import (
    bytes_aux_states,
    bytes_aux_z,
    bytes_loss,
    emit,
    native_ready,
    report,
    triton_ready,
    want_compile,
)

from soar_fast.ops import soar_aux_z, soar_fused_mse, soar_fused_mse_and_grad
from soar_fast.ops.soar_aux_states.reference import soar_aux_states_reference
from soar_fast.ops.soar_mse.reference import soar_fused_mse_reference

PROVIDERS = ["torch_eager", "torch_compile", "triton", "native"]


def mse_from_vcorr(v, z0, z1, v_corr, weights):
    """The reference chain's loss: targets z1 - z0 and the stored v_corr (what soar.py does)."""
    target = torch.cat([z1.float() - z0.float(), v_corr.float()])
    return (weights[:, None] * (v.float() - target).flatten(1).square()).mean(1)


@functools.cache
def _compiled(name: str):
    fns = {
        "mse": soar_fused_mse_reference,
        "aux": soar_aux_states_reference,
        "mse_vcorr": mse_from_vcorr,
    }
    return torch.compile(fns[name], dynamic=False)


def loss_inputs(shape, m, dtype):
    z0, z1, vu, vc, s0, s1, sa, g = inputs(shape, m, dtype)
    z_aux = soar_aux_states_reference(z0, z1, vu, vc, s0, s1, sa, g)[0]
    b = shape[0]
    v = torch.randn(((1 + m) * b, *shape[1:]), device=z0.device, dtype=dtype).requires_grad_()
    w = torch.rand((1 + m) * b, device=z0.device) + 0.5
    return (v, z0, z1, z_aux, sa, w), torch.randn((1 + m) * b, device=z0.device)


def loss_fn(provider, args, dtype):
    if provider == "torch_eager":
        return soar_fused_mse_reference
    if provider == "torch_compile":
        if not want_compile(dtype):
            pytest.skip("torch.compile provider off here (SOAR_FAST_BENCH_COMPILE=1 turns it on)")
        return _compiled("mse")
    if provider == "triton" and not triton_ready():
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    if provider == "native" and not native_ready():
        pytest.skip("native extension not built for this device (see docs/kernels.md)")
    return functools.partial(soar_fused_mse, backend=provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd", "loss+grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,shape,m", SHAPES, ids=[s[0] for s in SHAPES])
def test_bench_fused_mse(bench, name, shape, m, dtype, mode, provider):
    args, grad = loss_inputs(shape, m, dtype)
    f = loss_fn(provider, args, dtype)
    v = args[0]
    ones = torch.ones_like(grad)
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return f(*args)
    elif mode == "loss+grad" and provider in ("triton", "native"):

        def fn():
            return soar_fused_mse_and_grad(*args, backend=provider)
    elif mode == "loss+grad":

        def fn():
            loss = f(*args)
            return loss.detach(), torch.autograd.grad(loss, v, ones)[0]
    else:

        def fn():
            return torch.autograd.grad(f(*args), v, grad)

    e = shape[0] * int(torch.tensor(shape[1:]).prod())
    nbytes = bytes_loss(e, m, torch.empty((), dtype=dtype).element_size(), mode)
    report(
        "soar_fused_mse",
        provider,
        mode,
        f"{name}:{'x'.join(map(str, shape))}",
        dtype,
        fn,
        nbytes,
        bench,
    )


@pytest.mark.parametrize("provider", ["torch_eager", "torch_compile", "triton", "native"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,shape,m", SHAPES, ids=[s[0] for s in SHAPES])
def test_bench_aux_loss_pair(bench, name, shape, m, dtype, provider):
    """Aux states + loss forward and backward. Reference chains (eager, compiled) store v_corr, read
    it back in the forward and again in the backward; the fused pair writes z' only, recomputes
    v_corr and forms losses and grad_v in one pass (upstream grad folded into the weights)."""
    (v, z0, z1, _, sa, w), grad = loss_inputs(shape, m, dtype)
    z0_, z1_, vu, vc, s0, s1, _, g = inputs(shape, m, dtype)
    aux_args = (z0, z1, vu, vc, s0, s1, sa, g)
    e = shape[0] * int(torch.tensor(shape[1:]).prod())
    s = torch.empty((), dtype=dtype).element_size()
    if provider in ("torch_eager", "torch_compile"):
        if provider == "torch_compile" and not want_compile(dtype):
            pytest.skip("torch.compile provider off here (SOAR_FAST_BENCH_COMPILE=1 turns it on)")
        aux = _compiled("aux") if provider == "torch_compile" else soar_aux_states_reference
        mse = _compiled("mse_vcorr") if provider == "torch_compile" else mse_from_vcorr

        def fn():
            _, v_corr = aux(*aux_args)
            return torch.autograd.grad(mse(v, z0, z1, v_corr, w), v, grad)

        nbytes = bytes_aux_states(e, m, s) + bytes_loss(e, m, s, "fwd+bwd")
    else:
        if provider == "triton" and not triton_ready():
            pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
        if provider == "native" and not native_ready():
            pytest.skip("native extension not built for this device")

        def fn():
            z_aux = soar_aux_z(*aux_args, backend=provider)
            return soar_fused_mse_and_grad(v, z0, z1, z_aux, sa, w * grad, backend=provider)

        nbytes = bytes_aux_z(e, m, s) + bytes_loss(e, m, s, "loss+grad")
    report(
        "soar_aux+loss",
        provider,
        "fwd+bwd",
        f"{name}:{'x'.join(map(str, shape))}",
        dtype,
        fn,
        nbytes,
        bench,
    )
    ref_bytes = bytes_aux_states(e, m, s) + bytes_loss(e, m, s, "fwd+bwd")
    emit(
        op="soar_aux+loss",
        provider=provider,
        mode="fwd+bwd",
        shape=f"{name}:{'x'.join(map(str, shape))}",
        dtype=str(dtype).split(".")[-1],
        metric="bytes_saved_vs_reference_chain",
        value=100 * (1 - nbytes / ref_bytes),
        unit="%",
        baseline="aux_states (z', v_corr stored) + loss reading v_corr",
        bytes=nbytes,
        baseline_bytes=ref_bytes,
    )
