"""Metrics stay on the device: an optimizer step that does not log reads the device once (the
NaN/stop decision and the gradient norm). Counted on CPU through the Tensor methods that force a
device-to-host copy on a GPU (item, tolist, bool, float, int, numpy, cpu)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from soar_fast.train import Trainer

SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.numpy, torch.Tensor.cpu}


class _CountSyncs(TorchFunctionMode):
    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore, self.calls = ignore, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS and not (args and id(args[0]) in self.ignore):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("step", ["fast", "eager"])
def test_one_host_sync_per_optimizer_step(tmp_path, make_cfg, step):
    t = Trainer(make_cfg(tmp_path / step, steps=3, runtime__step=step, optim__gradient_accumulation_steps=2,
                         optim__use_ema=True))
    t.train_step()  # the first step creates AdamW's state
    batches = t.micro_batches()  # data loading is host work: outside the count
    opt = t.step_fn.optimizer
    # AdamW keeps its step counters on the CPU (not capturable): reading them is no device sync
    ignore = {id(s["step"]) for s in opt.state.values()}
    with _CountSyncs(ignore) as mode:
        result = t.step_fn(t.step, batches, t.uncond)
    assert result.applied
    assert len(mode.calls) <= 1, mode.calls
    assert all(v.dim() == 0 and isinstance(v, torch.Tensor) for v in result.stats.values())  # not floats


@pytest.mark.compile
def test_the_compiled_micro_step_reads_the_device_zero_times(tmp_path, make_cfg):
    """The compiled fast step (per-block compile, fused ops, batched (1+M)B pass): a micro-step's
    forward and backward never read the device; the step's one read is the decision after them."""
    t = Trainer(make_cfg(tmp_path / "c", steps=3, runtime__step="fast", fast__compile="per_block"))
    t.train_step()  # compiles, creates AdamW's state
    from soar_fast.loss import keyed_draws

    z0, cond, idx = t.micro_batches()[0]
    draws = keyed_draws(z0, t.cfg.soar, seed=0, step=t.step, indices=idx)
    with _CountSyncs(set()) as mode:
        out = t.step_fn.micro_step(z0, cond, t.uncond, draws)
    assert mode.calls == [], mode.calls
    assert out.loss.dim() == 0 and all(v.dim() == 0 for v in out.stats.values())
