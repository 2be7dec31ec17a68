"""GPU checks of the fast step (run on the H100/H200 machine; skipped without CUDA)."""

import copy

import pytest
import torch

import soar_fast as sf
from soar_fast.fast import RolloutEngine, batched_soar_step
from soar_fast.fast.attention import attention_context
from soar_fast.models import SD3VelocityFn, build_sd3_transformer
from soar_fast.train.parity import run_parity

pytestmark = pytest.mark.cuda


def test_graph_replay_equals_eager_bitwise_and_tracks_weight_updates():
    rows = run_parity("tiny", variants=("graphed_rollout",), device="cuda")
    assert rows[0].ok, rows[0]
    model = build_sd3_transformer("tiny").cuda()
    vf = SD3VelocityFn(model)
    z = torch.randn(2, 4, 8, 8, device="cuda")
    s = torch.rand(2, device="cuda")
    cond = (torch.randn(2, 5, 32, device="cuda"), torch.randn(2, 64, device="cuda"))
    ub = (torch.zeros(2, 5, 32, device="cuda"), torch.zeros(2, 64, device="cuda"))
    engine = RolloutEngine(vf, model, "cuda_graph")
    engine(z, s, ub, cond)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)  # in place, as an optimizer step does
    graphed = [t.clone() for t in engine(z, s, ub, cond)]
    eager = RolloutEngine(vf, model, "eager")(z, s, ub, cond)
    assert engine.captures == 1 and all(torch.equal(a, b) for a, b in zip(graphed, eager))
    engine(torch.randn(3, 4, 8, 8, device="cuda"), torch.rand(3, device="cuda"),
           tuple(t[:1].expand(3, *t.shape[1:]) for t in ub), tuple(torch.cat([t, t[:1]]) for t in cond))
    assert engine.captures == 2  # a new shape re-captures


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_fp8_rollout_vcfg_error_on_scaled_mm(scaling):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm FP8 needs SM 8.9+")
    rows = run_parity("digits", batch=4, size=8, variants=("fp8_rollout",), device="cuda", fp8_scaling=scaling)
    print(rows[0])
    assert "torch._scaled_mm" in rows[0].note and rows[0].ok


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn"])
def test_attention_backends_match_sdpa_math(backend):
    model = build_sd3_transformer("tiny", attention_head_dim=64, num_attention_heads=2,
                                  caption_projection_dim=128, joint_attention_dim=32).cuda().to(torch.bfloat16)
    vf = SD3VelocityFn(model)
    z = torch.randn(2, 4, 16, 16, device="cuda")
    s = torch.rand(2, device="cuda")
    cond = (torch.randn(2, 7, 32, device="cuda"), torch.randn(2, 64, device="cuda"))
    with attention_context("sdpa_math"):
        ref = vf(z, s, cond).float()
    with attention_context(backend) as ran:
        if ran != backend:
            pytest.skip(f"{backend} not available here (fell back to {ran})")
        out = vf(z, s, cond).float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


def test_batched_step_with_triton_ops_matches_reference_on_gpu():
    model = build_sd3_transformer("tiny").cuda()
    z0 = torch.randn(3, 4, 8, 8, device="cuda")
    cond = (torch.randn(3, 5, 32, device="cuda"), torch.randn(3, 64, device="cuda"))
    uncond = (torch.zeros(5, 32, device="cuda"), torch.zeros(64, device="cuda"))
    config = sf.SoarConfig(num_aux=4)
    draws = sf.sample_draws(z0, config, torch.Generator(device="cuda").manual_seed(0))
    ref = sf.soar_loss_from_draws(SD3VelocityFn(model), z0, cond, uncond, config, draws)
    out = batched_soar_step(SD3VelocityFn(model), z0, cond, uncond, config, draws, ops_backend="auto", backward=False)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()


@pytest.mark.parametrize("rows", [16, 21])  # 21: K of the weight-gradient GEMM padded for _scaled_mm
def test_fp8_training_linear_on_scaled_mm(rows):
    """Fp8TrainLinear on real torch._scaled_mm: output and both gradients within FP8 error of bf16."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm FP8 needs SM 8.9+")
    from soar_fast.fast.fp8 import enable_fp8_training

    ref = torch.nn.Sequential()
    ref.add_module("blocks", torch.nn.ModuleList([torch.nn.Linear(256, 512)]))
    ref = ref.cuda().to(torch.bfloat16)
    fp8 = copy.deepcopy(ref)
    assert enable_fp8_training(fp8) == 1 and fp8.blocks[0].use_scaled_mm
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    outs = []
    for m in (ref, fp8):
        xi = x.clone().requires_grad_()
        y = m.blocks[0](xi)
        y.backward(g)
        outs.append((y.float(), xi.grad.float(), m.blocks[0].weight.grad.float()))
    for a, b in zip(*outs):
        assert ((b - a).norm() / a.norm()).item() < 8e-2  # e4m3/e5m2 operands: a few percent
