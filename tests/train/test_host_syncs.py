"""Zero host syncs per micro-step, one per optimizer step (issue 18), counted on CPU by
`soar_fast.fast.profiling.count_host_syncs`: `.item()`/`bool()`/`float()`, `.tolist()`, boolean
masks and other data-dependent shapes, blocking device-to-host copies. On a CPU they cost
nothing, but the same code on a GPU would wait, so the count on CPU is the count on a GPU."""

import pytest
import torch

from soar_fast.fast.profiling import count_host_syncs
from soar_fast.train import Trainer


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


def _count(t: Trainer):
    """(syncs per micro-step, the optimizer step's syncs but AdamW's) of the trainer's next step."""
    t.train_step()  # warm: AdamW's state, FP8 copies, compiled graphs
    batches = t.micro_batches()  # data loading is host work: outside the count
    step, per_micro = t.step_fn, []
    inner = step.micro_step

    def counted(*args, **kwargs):
        with count_host_syncs(step.model) as s:
            out = inner(*args, **kwargs)
        per_micro.append(list(s.events))
        return out

    step.micro_step = counted
    with count_host_syncs(step.model) as whole:
        result = step(t.step, batches, t.uncond)
    assert result.applied
    assert all(v.dim() == 0 and isinstance(v, torch.Tensor) for v in result.stats.values())  # not floats
    # AdamW reads its step counters, host tensors even on a GPU run (not capturable): no device sync
    return per_micro, [e for e in whole.events if "torch/optim/" not in e[2]]


@pytest.mark.parametrize("step, rollout", [("fast", "eager"), ("fast", "fp8"), ("eager", "eager")])
def test_no_sync_in_a_micro_step_and_one_per_optimizer_step(tmp_path, make_cfg, step, rollout):
    t = Trainer(make_cfg(tmp_path / step, steps=3, runtime__step=step, fast__rollout=rollout,
                         optim__gradient_accumulation_steps=2, optim__use_ema=True))
    per_micro, ours = _count(t)
    assert per_micro == [[], []], per_micro
    assert [(op, where.split(":")[0]) for op, where, _ in ours] == [("tolist", "step.py")], ours  # the decision


@pytest.mark.compile
def test_the_compiled_micro_step_reads_the_device_zero_times(tmp_path, make_cfg):
    """The compiled fast step (per-block compile with fullgraph=True, which refuses a sync inside a
    block; the eager glue between the blocks, the batched step's bookkeeping and the backward are counted)."""
    t = Trainer(make_cfg(tmp_path / "c", steps=3, runtime__step="fast", fast__compile="per_block"))
    per_micro, ours = _count(t)
    assert per_micro == [[]], per_micro
    assert len(ours) == 1, ours
