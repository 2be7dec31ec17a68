"""Parity of the fused path-state op (several rollout paths): Triton (its interpreter on CPU, CUDA
when present) against the reference, the reference against the eager loss's own path states,
odd shapes, bf16, non-contiguous inputs, opcheck and one compiled node. Outputs are NaN-poisoned
(tests/ops/conftest.py), so a row the kernel fails to write fails."""

import warnings

import pytest
import torch

import soar_fast as sf
from soar_fast.loss.paths import sde_path_states, sigma_max_value
from soar_fast.ops import soar_path_states
from soar_fast.ops.soar_path_states import SDE_KINDS, soar_path_states_reference

G = 4.5
S_MAX = sigma_max_value(3.0)


def make_case(shape, m, p1, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    z0, z1, vu, vc = (torch.randn(shape, generator=g) for _ in range(4))
    sigma0 = torch.rand(b, generator=g) * 0.9 + 0.05
    sigma0[0] = 1.0  # flow_sde reads σ0 = 1 as table[1]
    sigma1 = (sigma0 - 0.05).clamp_min(0.0)
    sigma_aux = sigma1 + torch.rand(p1 * m, b, generator=g) * (1 - sigma1)
    noise = torch.randn(p1, *shape, generator=g)
    out = [z0.to(dtype), z1.to(dtype), vu.to(dtype), vc.to(dtype), sigma0, sigma1, sigma_aux, noise]
    return [t.to(device) for t in out]


def _tol(dtype):
    return {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_reference_equals_the_eager_loss_path_states(kind):
    z0, z1, vu, vc, s0, s1, sa, noise = make_case((3, 4, 5, 7), 2, 2, torch.float32)
    ref = soar_path_states_reference(z0, z1, vu, vc, s0, s1, sa, noise, G, kind, 0.5, S_MAX)
    cfg = sf.SoarConfig(num_aux=2, num_rollout_paths=3, sde_rollout_type=kind, guidance_scale=G)
    z_t = (1 - s0.view(-1, 1, 1, 1)) * z0 + s0.view(-1, 1, 1, 1) * z1
    eager = sde_path_states(z_t, vu + G * (vc - vu), z1, s0, s1, sa, noise, cfg)
    torch.testing.assert_close(ref, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", SDE_KINDS)
@pytest.mark.parametrize("shape,m,p1", [
    pytest.param((1, 4, 5, 7), 3, 1, id="b1-odd5x7-M3-P2"),
    pytest.param((3, 16, 4, 4), 2, 3, id="b3-M2-P4"),
    pytest.param((2, 341), 1, 2, id="b2-n341-M1-P3"),
])
def test_triton_matches_the_reference(kind, shape, m, p1, dtype):
    args = make_case(shape, m, p1, dtype)
    ref32 = soar_path_states_reference(*[a.float() if i < 4 else a for i, a in enumerate(args)], G, kind, 0.5, S_MAX)
    out = soar_path_states(*args, G, kind, 0.5, S_MAX, backend="triton")
    assert out.dtype == dtype and out.shape == (p1 * m * shape[0], *shape[1:])
    assert torch.isfinite(out).all()
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(out.float(), ref32, rtol=rtol, atol=atol)


def test_noncontiguous_rows_and_batch_slices():
    z0, z1, vu, vc, s0, s1, sa, noise = make_case((4, 4, 6, 6), 2, 2, torch.float32)
    wide = torch.randn(8, 4, 6, 6)
    wide[::2] = vu
    vu_sliced = wide[::2]  # a batch slice: a row stride, contiguous rows
    vc_t = vc.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous rows (copied, warned)
    ref = soar_path_states_reference(z0, z1, vu, vc, s0, s1, sa, noise, G, "cps", 0.5, S_MAX)
    with warnings.catch_warnings():  # the copy warns once per process (maybe already, in another test)
        warnings.simplefilter("ignore")
        out = soar_path_states(z0, z1, vu_sliced, vc_t, s0, s1, sa, noise, G, "cps", 0.5, S_MAX, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_in_one_line():
    z0, z1, vu, vc, s0, s1, sa, noise = make_case((2, 8), 2, 2, torch.float32)
    for bad in (noise[:, :1], noise[:1, :, :3]):
        with pytest.raises(ValueError) as err:
            soar_path_states(z0, z1, vu, vc, s0, s1, sa[:3], bad, G, "sde", 0.5, S_MAX)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown kind"):
        soar_path_states(z0, z1, vu, vc, s0, s1, sa, noise, G, "ddim", 0.5, S_MAX)


def test_path_states_opcheck():
    args = make_case((2, 3, 5, 7), 2, 2, torch.float32)
    torch.library.opcheck(torch.ops.soar_fast.path_states.default, (*args, G, "flow_sde", 0.5, S_MAX))


def test_path_states_compiles_as_one_node():
    from soar_fast.ops import dispatch

    dispatch._logged.clear()
    args = make_case((2, 3, 5, 7), 2, 2, torch.float32)
    ref = soar_path_states_reference(*args, G, "simple", 0.5, S_MAX)
    fn = torch.compile(lambda *a: soar_path_states(*a, G, "simple", 0.5, S_MAX, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(*args), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", SDE_KINDS)
def test_path_states_cuda(kind, dtype):
    args = make_case((4, 16, 64, 64), 6, 2, dtype, device="cuda")
    ref32 = soar_path_states_reference(*[a.float() if i < 4 else a for i, a in enumerate(args)], G, kind, 0.5, S_MAX)
    out = soar_path_states(*args, G, kind, 0.5, S_MAX, backend="triton")
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(out.float(), ref32, rtol=rtol, atol=atol)
