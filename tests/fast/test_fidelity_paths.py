"""The batched step with the reference-release choices (several rollout paths, the table aux
timestep, batch dropout) equals the eager reference on the same draws; what it cannot run it
refuses in one line."""

import copy

import pytest
import torch

import soar_fast as sf
from soar_fast.fast import batched_soar_step, row_coefficients
from soar_fast.loss.paths import point_mask
from soar_fast.models import SD3VelocityFn, build_sd3_transformer


def _setup(batch, num_aux, paths, size=(4, 4), seed=0, at_clean=(0,), **cfg):
    model = build_sd3_transformer("tiny", seed=seed)
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch, 4, *size, generator=g)
    cond = (torch.randn(batch, 5, 32, generator=g), torch.randn(batch, 64, generator=g))
    uncond = (torch.zeros(5, 32), torch.zeros(64))
    config = sf.SoarConfig(num_aux=num_aux, num_rollout_paths=paths, **cfg)
    draws = sf.sample_draws(z0, config, torch.Generator().manual_seed(seed + 1))
    for i in at_clean:  # samples with u1 = 0 keep only the ODE path
        draws.u0[i] = 0.01
    return model, z0, cond, uncond, config, draws


def _check(model, z0, cond, uncond, config, draws, chunks, ops_backend="auto"):
    ref_model = copy.deepcopy(model)
    ref = sf.soar_loss_from_draws(SD3VelocityFn(ref_model), z0, cond, uncond, config, draws)
    ref.loss.backward()
    out = batched_soar_step(SD3VelocityFn(model), z0, cond, uncond, config, draws, micro_chunks=chunks,
                            ops_backend=ops_backend)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    torch.testing.assert_close(out.base_losses, ref.base_losses.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.aux_losses, ref.aux_losses.detach(), rtol=1e-5, atol=1e-7)
    g_out = torch.cat([p.grad.flatten() for p in model.parameters()])
    g_ref = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
    assert torch.nn.functional.cosine_similarity(g_out, g_ref, dim=0) >= 0.99999
    assert (g_out - g_ref).norm() <= 1e-3 * g_ref.norm()
    assert set(out.metrics) == set(ref.metrics)
    for key in ref.metrics:
        assert abs(out.metrics[key] - ref.metrics[key]) <= 1e-5 * max(1.0, abs(ref.metrics[key]))
    return ref, out


@pytest.mark.parametrize("kind", ["simple", "sde", "flow_sde", "cps"])
def test_several_paths_match_the_eager_reference(kind):
    setup = _setup(3, 2, 3, sde_rollout_type=kind)
    ref, _ = _check(*setup, chunks=1)
    assert ref.aux_losses.shape == (6, 3) and (ref.aux_losses[2:, 0] == 0).all()


def test_several_paths_through_the_triton_kernels_match_the_eager_reference():
    """The fused kernels (Triton; its interpreter on CPU) take the P·M point rows, masked ones
    included (row coefficient 0)."""
    from soar_fast.ops import resolve_backend

    if resolve_backend("soar_fused_mse", "triton", torch.device("cpu"), torch.float32) != "triton" \
            and not torch.cuda.is_available():
        pytest.skip("Triton cannot run here (no CUDA, no interpreter)")
    _check(*_setup(3, 2, 3, size=(4, 6), sde_rollout_type="cps"), chunks=2, ops_backend="triton")


@pytest.mark.parametrize(
    "batch,num_aux,paths,chunks,extra",
    [
        pytest.param(4, 2, 2, 2, {"normalization": "sum", "lambda_aux": 0.5}, id="P2-sum-chunks2"),
        pytest.param(3, 3, 3, 3, {"aux_timestep": "table", "timestep_quantization": True}, id="P3-table-chunks3"),
        pytest.param(2, 1, 4, 1, {"cond_dropout": 0.5, "cond_dropout_per": "batch"}, id="P4-batch-dropout"),
        pytest.param(3, 2, 1, 1, {"aux_timestep": "table", "timestep_quantization": True}, id="P1-table"),
        pytest.param(2, 0, 3, 1, {}, id="sft-with-paths"),
    ],
)
def test_release_choices_match_the_eager_reference(batch, num_aux, paths, chunks, extra):
    _check(*_setup(batch, num_aux, paths, **extra), chunks=chunks)


def test_reference_release_config_matches_with_fp32_latents():
    model, z0, cond, uncond, _, _ = _setup(3, 2, 2)
    config = sf.SoarConfig.reference_release(num_aux=2, num_rollout_paths=2)
    draws = sf.sample_draws(z0, config, torch.Generator().manual_seed(4))
    draws.u0[1] = 0.02
    _check(model, z0, cond, uncond, config, draws, chunks=2)


def test_all_samples_at_the_clean_end_keep_only_the_ode_points():
    setup = _setup(2, 2, 3, at_clean=(0, 1))
    ref, out = _check(*setup, chunks=1)
    assert ref.metrics["aux_points_per_sample"] == 2.0 and (out.aux_losses[2:] == 0).all()


def test_no_backward_mode_with_paths_keeps_the_graph_and_the_counts():
    model, z0, cond, uncond, config, draws = _setup(3, 2, 2)
    ref = sf.soar_loss_from_draws(SD3VelocityFn(copy.deepcopy(model)), z0, cond, uncond, config, draws)
    out = batched_soar_step(SD3VelocityFn(model), z0, cond, uncond, config, draws, backward=False)
    assert out.loss.requires_grad
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    torch.testing.assert_close(out.aux_losses.detach(), ref.aux_losses.detach(), rtol=1e-5, atol=1e-7)


def test_target_dtype_model_with_low_precision_latents_is_refused_in_one_line():
    model, z0, cond, uncond, _, _ = _setup(2, 2, 1)
    config = sf.SoarConfig(num_aux=2, target_dtype="model")
    zb = z0.bfloat16()
    draws = sf.sample_draws(zb, config, torch.Generator().manual_seed(0))
    with pytest.raises(sf.ConfigError) as err:
        batched_soar_step(SD3VelocityFn(model), zb, cond, uncond, config, draws)
    assert "SoarConfig.target_dtype='model'" in str(err.value) and "\n" not in str(err.value)


def test_row_coefficients_with_a_mask_count_the_points_that_exist():
    cfg = sf.SoarConfig(num_aux=2, num_rollout_paths=2, lambda_aux=0.5)
    mask = point_mask(torch.tensor([0.01, 0.5, 0.9]), cfg)  # sample 0 has u1 = 0
    n = 2 * 3 + 2 * 2
    c = row_coefficients(3, 4, cfg, torch.device("cpu"), mask)
    assert c.shape == (15,) and abs(c.sum().item() - 1.0) < 1e-6
    assert abs(c[0].item() - 1 / (3 + 0.5 * n)) < 1e-7 and (c[3:][~mask.flatten()] == 0).all()
    cs = row_coefficients(3, 4, sf.SoarConfig(num_aux=2, num_rollout_paths=2, normalization="sum"),
                          torch.device("cpu"), mask)
    assert abs(cs[:3].sum().item() - 1.0) < 1e-6 and abs(cs[3:].sum().item() - 1.0) < 1e-6


@pytest.mark.compile
def test_compiled_step_with_paths_never_recompiles_as_the_point_count_changes():
    from torch._dynamo.utils import counters

    from soar_fast.fast.compile import compile_model

    torch._dynamo.reset()
    counters.clear()
    model = build_sd3_transformer("tiny")
    ref_model = copy.deepcopy(model)
    compile_model(model, "per_block", fullgraph=True)
    z0 = torch.randn(2, 4, 4, 4)
    cond, uncond = (torch.randn(2, 5, 32), torch.randn(2, 64)), (torch.zeros(5, 32), torch.zeros(64))
    config = sf.SoarConfig(num_aux=2, num_rollout_paths=2)
    graphs = []
    for step, at_clean in enumerate([(), (0,), (0, 1)]):  # fewer points exist each step, same rows
        draws = sf.sample_draws(z0, config, torch.Generator().manual_seed(step))
        for i in at_clean:
            draws.u0[i] = 0.01
        model.zero_grad(), ref_model.zero_grad()
        out = batched_soar_step(SD3VelocityFn(model), z0, cond, uncond, config, draws)
        ref = sf.soar_loss_from_draws(SD3VelocityFn(ref_model), z0, cond, uncond, config, draws)
        ref.loss.backward()
        assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
        assert out.metrics["aux_points_per_sample"] == 2 + 2 * (2 - len(at_clean)) / 2
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0], f"recompiled across steps: {graphs}"
    assert len(counters["graph_break"]) == 0


def test_step_with_paths_and_table_timestep_never_reads_the_device():
    """Counted on CPU through the Tensor methods that force a device-to-host copy on a GPU."""
    from torch.overrides import TorchFunctionMode

    syncs = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.numpy, torch.Tensor.cpu}

    class Count(TorchFunctionMode):
        calls: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in syncs:
                self.calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model, z0, cond, uncond, config, draws = _setup(3, 2, 3, aux_timestep="table", timestep_quantization=True,
                                                    cond_dropout=0.5, cond_dropout_per="batch")
    vf = SD3VelocityFn(model)
    batched_soar_step(vf, z0, cond, uncond, config, draws, micro_chunks=2)  # warm-up (host-side caches)
    with Count() as mode:
        out = batched_soar_step(vf, z0, cond, uncond, config, draws, micro_chunks=2)
    assert mode.calls == [], mode.calls
    assert all(v.dim() == 0 for v in out.stats.values())
