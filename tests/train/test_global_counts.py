"""With several rollout paths, points where u1 = 0 do not exist and each micro-batch holds its own
count: the step's gradient is the global batch's, normalised by the global counts, whatever the
split into micro-batches (and ranks: tests/distributed/test_dist_families.py's 2-rank runs)."""

import dataclasses

import pytest

from soar_fast.loss import keyed_draws
from soar_fast.loss.paths import point_mask
from soar_fast.train import Trainer


def _grads(tmp_path, make_cfg, name, batch, accum, step, normalization, naive=False):
    cfg = make_cfg(tmp_path / name, steps=1, optim__train_batch_size=batch, optim__gradient_accumulation_steps=accum,
                   runtime__step=step, optim__max_grad_norm=0.0)
    # 3 paths; 3 rollout steps: a sample with u0 < 1/3 has no points on paths 1-2
    cfg.soar = dataclasses.replace(cfg.soar, num_rollout_paths=3, sde_rollout_type="flow_sde", rollout_steps=3,
                                   normalization=normalization, cond_dropout=0.0)
    t = Trainer(cfg)
    batches = t.micro_batches()
    draws = [keyed_draws(z0, t.cfg.soar, seed=t.cfg.runtime.seed, step=0, indices=idx) for z0, _, idx in batches]
    counts = [point_mask(d.u0, t.cfg.soar).sum().item() for d in draws]
    t.step_fn.optimizer.zero_grad(set_to_none=True)
    t.step_fn.model.zero_grad(set_to_none=True)
    scales = [1.0 / accum] * accum if naive else t.step_fn.grad_scales(draws)
    for (z0, cond, _), d, s in zip(batches, draws, scales):
        t.step_fn.micro_step(z0, cond, t.uncond, d, grad_scale=s)
    return {n: p.grad.full_tensor().clone() for n, p in t.model.named_parameters() if p.grad is not None}, counts


@pytest.mark.parametrize("normalization", ["points", "sum"])
@pytest.mark.parametrize("step", ["eager", "fast"])
def test_accumulated_micro_batches_equal_one_batch_with_missing_points(tmp_path, make_cfg, step, normalization):
    one, c1 = _grads(tmp_path, make_cfg, "one", 16, 1, step, normalization)
    four, c4 = _grads(tmp_path, make_cfg, "four", 4, 4, step, normalization)
    assert sum(c1) == sum(c4) and len(set(c4)) > 1, (c1, c4)  # the micro-batches' counts differ
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
    assert max(rel(four[n], g) for n, g in one.items()) <= 1e-5
    naive, _ = _grads(tmp_path, make_cfg, "naive", 4, 4, step, normalization, naive=True)
    assert max(rel(naive[n], g) for n, g in one.items()) > 1e-3  # a mean of micro-batch means is not it
