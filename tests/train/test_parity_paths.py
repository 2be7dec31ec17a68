"""`soar-fast parity` with several stochastic rollout paths (some samples without points)."""

from soar_fast.train.parity import main, run_parity


def test_parity_covers_several_rollout_paths(capsys):
    soar = {"num_rollout_paths": 3, "sde_rollout_type": "sde", "rollout_steps": 3}
    rows = run_parity(batch=6, variants=("eager_step", "batched", "batched_chunked"), soar=soar)
    assert len(rows) == 9 and all(r.status == "ok" for r in rows), [(r.variant, r.metric, r.value) for r in rows]
    assert main(["--num_rollout_paths", "2", "--sde_rollout_type", "cps", "--variants", "batched"]) == 0
    assert "parity: 3 ok, 0 failed" in capsys.readouterr().out


def test_target_dtype_model_reaches_the_step(tmp_path, make_cfg):
    """With bf16 compute, target_dtype='model' forms the eager step's targets in bf16 (the
    release's arithmetic, a different loss), and the batched step refuses it in one line."""
    import dataclasses

    import pytest

    from soar_fast.config import ConfigError
    from soar_fast.loss import keyed_draws
    from soar_fast.train import Trainer

    losses = {}
    for target in ("fp32", "model"):
        cfg = make_cfg(tmp_path / target, steps=1, runtime__mixed_precision="bf16")
        cfg.soar = dataclasses.replace(cfg.soar, target_dtype=target)
        t = Trainer(cfg)
        z0, cond, idx = t.micro_batches()[0]
        d = keyed_draws(z0, cfg.soar, seed=0, step=0, indices=idx)
        losses[target] = t.step_fn.micro_step(z0, cond, t.uncond, d).loss.item()
    assert losses["fp32"] != losses["model"]
    cfg = make_cfg(tmp_path / "fast", steps=1, runtime__mixed_precision="bf16", runtime__step="fast")
    cfg.soar = dataclasses.replace(cfg.soar, target_dtype="model")
    t = Trainer(cfg)
    z0, cond, idx = t.micro_batches()[0]
    with pytest.raises(ConfigError, match="target_dtype='model'"):
        t.step_fn.micro_step(z0, cond, t.uncond, keyed_draws(z0, cfg.soar, seed=0, step=0, indices=idx))
