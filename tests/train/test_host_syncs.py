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
