"""Resume equivalence: N steps == N/2 steps + resume + N/2 steps, bit for bit on CPU (weights,
AdamW state, EMA, data position; the draws are keyed by step, so no RNG state is needed)."""

import torch

from soar_fast.train import Trainer


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _assert_same_state(a: Trainer, b: Trainer):
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(_local(p), _local(q)), f"parameter {n} differs"
    oa, ob = a.step_fn.optimizer, b.step_fn.optimizer
    assert len(oa.state) == len(ob.state) > 0
    for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"], strict=True):
        for name, t in oa.state[pa].items():
            assert torch.equal(_local(t), _local(ob.state[pb][name])), f"optimizer state {name} differs"
    if a.step_fn.ema is not None:
        for k, t in a.step_fn.ema.shadow.items():
            assert torch.equal(_local(t), _local(b.step_fn.ema.shadow[k])), f"EMA {k} differs"
    assert a.sampler.position == b.sampler.position and a.step == b.step


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, make_cfg):
    kw = dict(optim__gradient_accumulation_steps=2, optim__use_ema=True, optim__lr_warmup_steps=3,
              soar__num_aux=2)
    full = Trainer(make_cfg(tmp_path / "full", steps=6, **kw))
    full.train()
    half = Trainer(make_cfg(tmp_path / "split", steps=3, **kw))
    half.train()
    resumed = Trainer(make_cfg(tmp_path / "split", steps=6, checkpoint__resume_from_checkpoint="latest", **kw))
    assert resumed.step == 3
    resumed.train()
    _assert_same_state(full, resumed)
    # The resumed run's metrics rows continue the first half's, with no duplicates.
    steps = [int(line.split(",")[0].split(":")[1]) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_a_different_seed_gives_a_different_run(tmp_path, make_cfg):
    a = Trainer(make_cfg(tmp_path / "a", steps=2))
    a.train()
    b = Trainer(make_cfg(tmp_path / "b", steps=2, runtime__seed=1))
    b.train()
    assert any(not torch.equal(_local(p), _local(q)) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
