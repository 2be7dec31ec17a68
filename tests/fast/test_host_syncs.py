"""Zero host syncs per micro-step (issue 18), counted on CPU by `soar_fast.fast.profiling.count_host_syncs`:
the counter sees every kind of sync, and the trainer's step (eager, batched, FP8 rollout, compiled
per block) syncs once per optimizer step (the agreed NaN/stop/grad-norm read) and never in a micro-step."""

import pytest
import torch

from soar_fast.config import TrainConfig
from soar_fast.distributed import init_distributed
from soar_fast.fast.profiling import count_host_syncs
from soar_fast.models.spec import get_family
from soar_fast.train.step import build_train_step


def test_the_counter_sees_every_kind_of_sync_and_nothing_else():
    x = torch.randn(16)
    with count_host_syncs() as none:
        y = torch.where(x > 0, x * 2, x.exp()).sum(0, keepdim=True) + x.mean()
        y.clamp_(min=0)
    assert len(none) == 0, none
    with count_host_syncs() as s:
        x.sum().item()
        bool(x[0] > 0)
        float(x.max())
        x[x > 0]
        x.nonzero()
        x.tolist()
        torch.unique(x)
    ops = [op for op, _, _ in s.events]
    assert ops == ["_local_scalar_dense"] * 3 + ["index with a boolean mask", "nonzero", "tolist", "_unique2"], ops
    assert all(where.startswith("test_host_syncs.py:") for _, where, _ in s.events)


def _syncs(step_kind: str, rollout: str = "eager", compile: str = "none"):
    cfg = TrainConfig()
    cfg.runtime.step, cfg.fast.rollout, cfg.fast.compile = step_kind, rollout, compile
    family = get_family("sd3")
    step = build_train_step(family, family.build("tiny", seed=0), cfg, init_distributed(cfg.parallel))
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    cond = (torch.randn(2, 5, 32, generator=g), torch.randn(2, 64, generator=g))
    uncond = (torch.zeros(5, 32), torch.zeros(64))
    assert step(0, [(z0, cond, [0, 1])], uncond).applied  # warm: lazy state, CUDA-graph/FP8 set-up, compile
    per_micro, inner = [], step.micro_step

    def counted(*args, **kwargs):
        with count_host_syncs(step.model) as s:
            out = inner(*args, **kwargs)
        per_micro.append(list(s.events))
        return out

    step.micro_step = counted
    with count_host_syncs(step.model) as whole:
        assert step(1, [(z0, cond, [0, 1]), (z0, cond, [2, 3])], uncond).applied
    # AdamW reads its step counter, a host tensor even on a GPU run (no device sync): not ours
    ours = [e for e in whole.events if "torch/optim/" not in e[2]]
    return per_micro, ours


@pytest.mark.parametrize("step_kind, rollout", [("eager", "eager"), ("fast", "eager"), ("fast", "fp8")])
def test_no_host_sync_in_a_micro_step_and_one_per_optimizer_step(step_kind, rollout):
    per_micro, ours = _syncs(step_kind, rollout)
    assert per_micro == [[], []], per_micro
    assert [(op, where.split(":")[0]) for op, where, _ in ours] == [("tolist", "step.py")], ours


def test_the_compiled_step_has_no_host_sync_in_a_micro_step():
    """Blocks compiled with fullgraph=True (a sync would be a graph break they refuse); the eager glue
    between them, the batched step's bookkeeping and the backward are counted."""
    per_micro, ours = _syncs("fast", "eager", compile="per_block")
    assert per_micro == [[], []], per_micro
    assert len(ours) == 1, ours
