"""The loop: SFT and SOAR through one path, NaN skipping and aborting, LR warm-up, output guard."""

import json
import math

import pytest
import torch

from soar_fast.config import ConfigError, OptimConfig
from soar_fast.loss import SoarOutput
from soar_fast.train import (
    EagerStep,
    Trainer,
    TrainingAborted,
    learning_rate_at,
    register_loss_step,
)
from soar_fast.train.build import LOSS_STEPS


def test_sft_and_soar_share_the_loop_and_log_their_terms(tmp_path, make_cfg):
    sft = Trainer(make_cfg(tmp_path / "sft", steps=2, soar__num_aux=0))
    sft.train()
    soar = Trainer(make_cfg(tmp_path / "soar", steps=2, soar__num_aux=2))
    soar.train()
    rows_sft = [json.loads(r) for r in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    rows_soar = [json.loads(r) for r in (tmp_path / "soar" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/aux_loss"] == 0 and r["train/rollout_deviation"] == 0 for r in rows_sft)
    assert all(r["train/aux_loss"] > 0 and r["train/rollout_deviation"] > 0 for r in rows_soar)
    for key in ("train/loss", "train/base_loss", "train/grad_norm", "train/lr", "perf/steps_per_s"):
        assert key in rows_soar[-1]
    assert json.loads((tmp_path / "soar" / "config.json").read_text())["soar"]["num_aux"] == 2


class _NanAt:
    """The eager step, returning a NaN loss on the calls listed in `bad` (0-based)."""

    def __init__(self, model, soar, bad):
        self.inner, self.bad, self.calls = EagerStep(model, soar), bad, 0

    def __call__(self, z0, cond, uncond, generator):
        out = self.inner(z0, cond, uncond, generator)
        self.calls += 1
        if self.calls - 1 in self.bad:
            return SoarOutput(loss=out.loss * float("nan"), metrics=out.metrics, base_losses=out.base_losses,
                              aux_losses=out.aux_losses)
        return out


@pytest.fixture
def nan_steps():
    registered = []

    def register(name, bad):
        register_loss_step(name, lambda m, s, f=None: _NanAt(m, s, bad))
        registered.append(name)

    yield register
    for name in registered:
        LOSS_STEPS.pop(name, None)


def test_a_nan_loss_skips_the_step_and_is_counted(tmp_path, make_cfg, nan_steps):
    nan_steps("nan_at_1", {1})
    t = Trainer(make_cfg(tmp_path / "r", steps=3, runtime__step="nan_at_1"))
    t.train_step()
    before = [p.detach().clone() for p in t.model.parameters()]
    exp_avg = {k: v["exp_avg"].clone() for k, v in t.optimizer.state.items()}
    m = t.train_step()  # the NaN step
    assert t.nan_skipped == 1 and m["nan_skipped"] == 1 and t.step == 2
    assert all(torch.equal(p, q) for p, q in zip(before, t.model.parameters(), strict=True))
    assert all(torch.equal(exp_avg[k], v["exp_avg"]) for k, v in t.optimizer.state.items())
    t.train_step()
    assert t.nan_streak == 0 and any(not torch.equal(p, q) for p, q in zip(before, t.model.parameters(), strict=True))
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] if (tmp_path / "r" / "metrics.jsonl").exists() else []
    assert all(math.isfinite(r["train/loss"]) for r in rows)


def test_a_nan_streak_aborts_with_a_clear_message(tmp_path, make_cfg, nan_steps):
    nan_steps("always_nan", set(range(100)))
    t = Trainer(make_cfg(tmp_path / "r", steps=10, runtime__step="always_nan", optim__max_nan_streak=3))
    with pytest.raises(TrainingAborted, match=r"aborted at step 3: 3 consecutive steps had a NaN/inf loss.*--learning_rate"):
        t.train()


def test_lr_warmup_is_linear_then_constant():
    cfg = OptimConfig(learning_rate=1e-3, lr_warmup_steps=4)
    assert [learning_rate_at(s, cfg) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_unknown_step_implementation_is_refused(tmp_path, make_cfg):
    with pytest.raises(ConfigError, match="runtime.step='fused'.*choose one of eager, fast"):
        Trainer(make_cfg(tmp_path / "r", runtime__step="fused"))


def test_grad_accumulation_of_one_batch_matches_one_big_batch_in_loss_scale(tmp_path, make_cfg):
    t = Trainer(make_cfg(tmp_path / "r", steps=1, optim__gradient_accumulation_steps=3))
    m = t.train_step()
    assert t.sampler.position == 3 * t.cfg.optim.train_batch_size and math.isfinite(m["loss"])


def test_bf16_autocast_trains_with_finite_losses(tmp_path, make_cfg):
    t = Trainer(make_cfg(tmp_path / "r", steps=2, runtime__mixed_precision="bf16"))
    t.train()
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/loss"]) for r in rows) and t.nan_skipped == 0
    assert all(p.dtype == torch.float32 for p in t.model.parameters())


def test_ema_weights_are_saved_beside_the_final_model(tmp_path, make_cfg):
    from safetensors.torch import load_file

    t = Trainer(make_cfg(tmp_path / "r", steps=3, optim__use_ema=True, optim__ema_decay=0.5, save_final_model=True))
    t.train()
    final = tmp_path / "r" / "final"
    live = load_file(str(final / "transformer" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(final / "transformer_ema" / "diffusion_pytorch_model.safetensors"))
    assert live.keys() == ema.keys()
    assert any(not torch.equal(live[k], ema[k]) for k in live)
    for n, p in t.model.named_parameters():  # the live weights are restored after writing the EMA
        assert torch.equal(p.detach(), live[n])


class _SelfBackward:
    """A step that runs its own backward (as a fused loss+grad step does), with the grad scale."""

    performs_backward = True

    def __init__(self, model, soar, fast=None):
        self.inner, self.scales, self.after = EagerStep(model, soar), [], 0

    def after_optimizer_step(self):
        self.after += 1

    def __call__(self, z0, cond, uncond, generator, grad_scale=1.0):
        out = self.inner(z0, cond, uncond, generator)
        (out.loss * grad_scale).backward()
        self.scales.append(grad_scale)
        return SoarOutput(loss=out.loss.detach(), metrics=out.metrics, base_losses=out.base_losses.detach(),
                          aux_losses=out.aux_losses.detach())


def test_a_step_that_runs_its_own_backward_matches_the_eager_step(tmp_path, make_cfg):
    register_loss_step("self_backward", _SelfBackward)
    try:
        kw = dict(steps=2, optim__gradient_accumulation_steps=2)
        a = Trainer(make_cfg(tmp_path / "a", **kw))
        a.train()
        b = Trainer(make_cfg(tmp_path / "b", runtime__step="self_backward", **kw))
        b.train()
    finally:
        LOSS_STEPS.pop("self_backward", None)
    assert b.loss_step.scales == [0.5] * 4 and b.loss_step.after == 2
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
