"""The loop: SFT and SOAR through one path, NaN skipping and aborting, LR warm-up, output guard."""

import json
import math

import pytest
import torch

from soar_fast.config import ConfigError, OptimConfig
from soar_fast.train import Trainer, TrainingAborted, learning_rate_at


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


@pytest.fixture
def nan_steps(monkeypatch):
    """Make `TrainStep.micro_step` return a NaN loss on the calls listed (0-based)."""
    from soar_fast.train.step import TrainStep

    def install(bad):
        real, calls = TrainStep.micro_step, [0]

        def micro_step(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            calls[0] += 1
            if calls[0] - 1 in bad:
                out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(TrainStep, "micro_step", micro_step)

    return install


def _local(t):
    return [p.detach().to_local().clone() for p in t.model.parameters()]


def test_a_nan_loss_skips_the_step_and_is_counted(tmp_path, make_cfg, nan_steps):
    nan_steps({1})
    t = Trainer(make_cfg(tmp_path / "r", steps=3))
    t.train_step()
    before = _local(t)
    opt = t.step_fn.optimizer
    exp_avg = {k: v["exp_avg"].to_local().clone() for k, v in opt.state.items()}
    r = t.train_step()  # the NaN step
    assert not r.applied and t.nan_skipped == 1 and t.step == 2
    assert all(torch.equal(p, q) for p, q in zip(before, _local(t), strict=True))
    assert all(torch.equal(exp_avg[k], v["exp_avg"].to_local()) for k, v in opt.state.items())
    assert t.train_step().applied
    assert t.nan_streak == 0 and any(not torch.equal(p, q) for p, q in zip(before, _local(t), strict=True))


def test_a_nan_streak_aborts_with_a_clear_message(tmp_path, make_cfg, nan_steps):
    nan_steps(set(range(100)))
    t = Trainer(make_cfg(tmp_path / "r", steps=10, optim__max_nan_streak=3))
    with pytest.raises(TrainingAborted, match=r"aborted at step 3: 3 consecutive steps had a NaN/inf loss.*--learning_rate"):
        t.train()


def test_lr_warmup_is_linear_then_constant():
    cfg = OptimConfig(learning_rate=1e-3, lr_warmup_steps=4)
    assert [learning_rate_at(s, cfg) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_unknown_step_implementation_is_refused(tmp_path, make_cfg):
    with pytest.raises(ConfigError, match="runtime.step='fused' is invalid: choose 'eager' or 'fast'"):
        Trainer(make_cfg(tmp_path / "r", runtime__step="fused"))


def test_grad_accumulation_of_one_batch_matches_one_big_batch_in_loss_scale(tmp_path, make_cfg):
    t = Trainer(make_cfg(tmp_path / "r", steps=1, optim__gradient_accumulation_steps=3))
    r = t.train_step()
    assert t.sampler.position == 3 * t.cfg.optim.train_batch_size and math.isfinite(r.stats["loss"].item())


def test_bf16_autocast_trains_with_finite_losses(tmp_path, make_cfg):
    t = Trainer(make_cfg(tmp_path / "r", steps=2, runtime__mixed_precision="bf16"))
    t.train()
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/loss"]) for r in rows) and t.nan_skipped == 0
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # fp32 master weights
    policy = t.model._get_fsdp_state()._mp_policy  # bf16 compute through FSDP2's policy, fp32 reduction
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_an_ema_run_exports_the_ema_weights_with_the_online_ones_beside(tmp_path, make_cfg):
    from safetensors.torch import load_file

    t = Trainer(make_cfg(tmp_path / "r", steps=3, optim__use_ema=True, optim__ema_decay=0.5, save_final_model=True))
    t.train()
    final = tmp_path / "r" / "final"
    ema = load_file(str(final / "transformer" / "diffusion_pytorch_model.safetensors"))
    live = load_file(str(final / "transformer_online" / "diffusion_pytorch_model.safetensors"))
    assert live.keys() == ema.keys()
    assert any(not torch.equal(live[k], ema[k]) for k in live)
    shadow = {n: v.full_tensor() if hasattr(v, "full_tensor") else v for n, v in t.step_fn.ema.shadow.items()}
    for n, p in t.model.named_parameters():  # the online weights as they are, the EMA as averaged
        assert torch.equal(p.detach().full_tensor(), live[n])
        assert torch.equal(shadow[n].to(ema[n].dtype), ema[n])


def test_the_fast_step_trains_like_the_eager_step(tmp_path, make_cfg):
    """The batched step (its own backward, scaled by 1/accumulation) follows the eager reference."""
    kw = dict(steps=2, optim__gradient_accumulation_steps=2)
    a = Trainer(make_cfg(tmp_path / "a", **kw))
    a.train()
    b = Trainer(make_cfg(tmp_path / "b", runtime__step="fast", **kw))
    b.train()
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p.detach().to_local(), q.detach().to_local(), rtol=1e-5, atol=1e-6)
