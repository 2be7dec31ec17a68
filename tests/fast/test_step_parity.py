"""The batched fast step equals the eager reference (same weights, same draws) to fp32 rounding."""

import copy
import os

import pytest
import torch

import soar_fast as sf
from soar_fast.fast import RolloutEngine, batched_soar_step, row_coefficients
from soar_fast.models import SD3VelocityFn, build_sd3_transformer
from soar_fast.train.parity import main as parity_main
from soar_fast.train.parity import run_parity


def _setup(batch, num_aux, size=(6, 6), seed=0, **cfg):
    model = build_sd3_transformer("tiny", seed=seed)
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch, 4, *size, generator=g)
    cond = (torch.randn(batch, 5, 32, generator=g), torch.randn(batch, 64, generator=g))
    uncond = (torch.zeros(5, 32), torch.zeros(64))
    config = sf.SoarConfig(num_aux=num_aux, **cfg)
    draws = sf.sample_draws(z0, config, torch.Generator().manual_seed(seed + 1))
    return model, z0, cond, uncond, config, draws


def _ref(model, z0, cond, uncond, config, draws):
    m = copy.deepcopy(model)
    out = sf.soar_loss_from_draws(SD3VelocityFn(m), z0, cond, uncond, config, draws)
    out.loss.backward()
    return out, [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize(
    "batch,num_aux,chunks,size,extra",
    [
        pytest.param(1, 6, 1, (5, 7), {}, id="batch1-M6-odd5x7"),
        pytest.param(3, 4, 3, (6, 6), {}, id="b3-M4-chunks3"),
        pytest.param(4, 2, 2, (4, 4), {"normalization": "sum", "lambda_aux": 0.5}, id="b4-sum-lambda0.5"),
        pytest.param(2, 0, 1, (4, 4), {}, id="sft-M0"),
        pytest.param(3, 3, 2, (4, 4), {"cond_dropout": 0.5, "weighting": "cosmap"}, id="dropout-cosmap"),
    ],
)
def test_batched_step_matches_reference(batch, num_aux, chunks, size, extra):
    model, z0, cond, uncond, config, draws = _setup(batch, num_aux, size, **extra)
    ref, ref_grads = _ref(model, z0, cond, uncond, config, draws)
    out = batched_soar_step(SD3VelocityFn(model), z0, cond, uncond, config, draws, micro_chunks=chunks)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    torch.testing.assert_close(out.base_losses, ref.base_losses.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.aux_losses, ref.aux_losses.detach(), rtol=1e-5, atol=1e-7)
    for p, r in zip(model.parameters(), ref_grads):
        if r.abs().max() > 0:
            assert torch.nn.functional.cosine_similarity(p.grad.flatten(), r.flatten(), dim=0) >= 0.9999
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6)
    for key in ("rollout_deviation", "base_loss", "aux_loss"):
        assert abs(out.metrics[key] - ref.metrics[key]) <= 1e-5 * max(1.0, abs(ref.metrics[key]))


def test_no_backward_mode_keeps_the_graph():
    model, z0, cond, uncond, config, draws = _setup(2, 2)
    out = batched_soar_step(SD3VelocityFn(model), z0, cond, uncond, config, draws, backward=False)
    assert out.loss.requires_grad
    with pytest.raises(ValueError, match="micro_chunks"):
        batched_soar_step(SD3VelocityFn(model), z0, cond, uncond, config, draws, micro_chunks=2, backward=False)


def test_row_coefficients_sum_to_the_normalisations():
    c = row_coefficients(4, 6, sf.SoarConfig(lambda_aux=0.5), torch.device("cpu"))
    assert c.shape == (28,) and abs(c.sum().item() - (4 + 0.5 * 24) / (4 + 0.5 * 24)) < 1e-6
    c = row_coefficients(4, 6, sf.SoarConfig(lambda_aux=0.5, normalization="sum"), torch.device("cpu"))
    assert abs(c[:4].sum().item() - 1.0) < 1e-6 and abs(c[4:].sum().item() - 0.5) < 1e-6


def test_rollout_engine_modes_fall_back_on_cpu(caplog):
    model, z0, cond, uncond, config, draws = _setup(2, 2)
    vf = SD3VelocityFn(model)
    from soar_fast.loss.cond import broadcast_uncond

    ub = broadcast_uncond(uncond, cond, 2)
    eager = RolloutEngine(vf, model, "eager")(z0, draws.sigma0, ub, cond)
    graphed = RolloutEngine(vf, model, "cuda_graph")
    out = graphed(z0, draws.sigma0, ub, cond)
    assert graphed.mode == "eager" and "needs a CUDA device" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(out, eager))


def test_fp8_rollout_error_and_refresh_after_optimizer_step():
    """Emulated FP8 (e4m3, the GEMM numerics of torch._scaled_mm): v_cfg within 3e-2 relative;
    after a weight update, refresh re-quantises from the live weights."""
    rows = run_parity("tiny", batch=2, num_aux=2, variants=("fp8_rollout",))
    assert rows[0].ok and 0 < rows[0].value <= 3e-2  # FP8 is not exact, and not far off
    model, z0, cond, uncond, config, draws = _setup(2, 2)
    vf = SD3VelocityFn(model)
    from soar_fast.loss.cond import broadcast_uncond

    ub = broadcast_uncond(uncond, cond, 2)
    engine = RolloutEngine(vf, model, "fp8")
    assert engine.mode == "fp8"
    keys_before = set(model.state_dict())
    before = [t.clone() for t in engine(z0, draws.sigma0, ub, cond)]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    stale = [t.clone() for t in engine(z0, draws.sigma0, ub, cond)]
    engine.after_optimizer_step()
    fresh = [t.clone() for t in engine(z0, draws.sigma0, ub, cond)]
    exact = RolloutEngine(vf, None, "eager")(z0, draws.sigma0, ub, cond)
    err = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert err(fresh[1], exact[1]) < err(stale[1], exact[1])
    assert not torch.equal(before[1], fresh[1])
    assert set(model.state_dict()) == keys_before  # stock diffusers keys


def test_parity_cli_passes_and_fails(tmp_path, capsys, monkeypatch):
    assert parity_main(["--variants", "batched,batched_chunked,graphed_rollout,fp8_rollout",
                        "--json", str(tmp_path / "p.json")]) == 0
    assert "parity:" in capsys.readouterr().out and (tmp_path / "p.json").exists()
    # a broken variant must make the harness fail
    import soar_fast.train.parity as parity

    monkeypatch.setitem(parity.TOL, "vcfg_rel", 1e-9)
    assert parity_main(["--variants", "fp8_rollout"]) == 1


@pytest.mark.parametrize("backend", ["native", "torchao"])
def test_fp8_training_linears_track_the_fp32_loss_curve(backend):
    """FP8 training GEMMs (ours emulated on CPU, torchao's on torch._scaled_mm's CPU float8: e4m3
    forward, e5m2 gradients, per-tensor scales): over a short SOAR run the loss curve stays within
    1% of full precision at every step."""
    from soar_fast.fast.fp8 import Fp8TrainLinear, enable_fp8_training

    if backend == "torchao":
        pytest.importorskip("torchao.float8")
    model = build_sd3_transformer("digits")
    model8 = copy.deepcopy(model)
    assert enable_fp8_training(model8, backend=backend) > 0
    assert set(model8.state_dict()) == set(model.state_dict())
    assert any(isinstance(m, Fp8TrainLinear) for m in model8.modules()) == (backend == "native")
    z0 = torch.randn(8, 1, 8, 8)
    cond, uncond = (torch.randn(8, 3, 64), torch.randn(8, 64)), (torch.zeros(3, 64), torch.zeros(64))
    config = sf.SoarConfig(num_aux=2)
    opts = [torch.optim.AdamW(m.parameters(), 1e-3) for m in (model, model8)]
    curves = [[], []]
    for step in range(8):
        draws = sf.sample_draws(z0, config, torch.Generator().manual_seed(step))
        for i, m in enumerate((model, model8)):
            out = sf.soar_loss_from_draws(SD3VelocityFn(m), z0, cond, uncond, config, draws)
            opts[i].zero_grad()
            out.loss.backward()
            opts[i].step()
            curves[i].append(out.loss.item())
    rel = [abs(a - b) / a for a, b in zip(*curves)]
    assert max(rel) < 1e-2, rel
    assert max(rel) > 0  # FP8 really ran (not bitwise equal)


def _qdq(x, dtype):
    """Per-tensor quantise-dequantise (the numerics of one FP8 GEMM operand)."""
    scale = x.abs().amax().clamp_min(1e-12) / torch.finfo(dtype).max
    return (x / scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype).float() * scale


@pytest.mark.parametrize("rows", [16, 21])  # 21: the weight-gradient GEMM's K gets zero-padded to 32
def test_fp8_training_linear_matches_quantise_dequantise_math(rows):
    """Fp8TrainLinear (emulated) = y = q(x) q(W)ᵀ + b, dx = q5(g) q(W), dW = q5(g)ᵀ q(x), with
    e4m3 operands and e5m2 gradients; the K padding that torch._scaled_mm needs changes nothing."""
    from soar_fast.fast.fp8 import FP8_DTYPE, FP8_GRAD_DTYPE, enable_fp8_training

    lin = torch.nn.Sequential()
    lin.add_module("blocks", torch.nn.ModuleList([torch.nn.Linear(32, 48)]))
    assert enable_fp8_training(lin) == 1
    layer = lin.blocks[0]
    x = torch.randn(rows, 32, requires_grad=True)
    g = torch.randn(rows, 48)
    y = layer(x)
    y.backward(g)
    xq, wq, gq = _qdq(x.detach(), FP8_DTYPE), _qdq(layer.weight.detach(), FP8_DTYPE), _qdq(g, FP8_GRAD_DTYPE)
    torch.testing.assert_close(y, xq @ wq.t() + layer.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, gq @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, gq.t() @ xq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_fp8_refresh_equals_per_layer_quantisation(backend, rowwise):
    """refresh_fp8_weights (every layer in one fused pass) = quantize_fp8 per layer, bitwise, and
    writes into the existing buffers (a captured CUDA graph keeps reading them)."""
    from soar_fast.fast.fp8 import (
        Fp8RolloutLinear,
        enable_fp8_rollout,
        quantize_fp8,
        refresh_fp8_weights,
    )

    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    model = build_sd3_transformer("tiny")
    assert enable_fp8_rollout(model, rowwise=rowwise) > 0
    layers = [m for m in model.modules() if isinstance(m, Fp8RolloutLinear)]
    buffers = [(m.w_fp8.data_ptr(), m.w_scale.data_ptr()) for m in layers]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) + 0.5)
    assert refresh_fp8_weights(model, backend=backend) == backend
    for m, ptrs in zip(layers, buffers):
        q, s = quantize_fp8(m.weight.detach(), rowwise=rowwise)
        assert torch.equal(m.w_fp8.view(torch.uint8), q.view(torch.uint8)) and torch.equal(m.w_scale, s)
        assert (m.w_fp8.data_ptr(), m.w_scale.data_ptr()) == ptrs
