"""`soar-fast parity` with several stochastic rollout paths (some samples without points)."""

from soar_fast.train.parity import main, run_parity


def test_parity_covers_several_rollout_paths(capsys):
    soar = {"num_rollout_paths": 3, "sde_rollout_type": "sde", "rollout_steps": 3}
    rows = run_parity(batch=6, variants=("eager_step", "batched", "batched_chunked"), soar=soar)
    assert len(rows) == 9 and all(r.status == "ok" for r in rows), [(r.variant, r.metric, r.value) for r in rows]
    assert main(["--num_rollout_paths", "2", "--sde_rollout_type", "cps", "--variants", "batched"]) == 0
    assert "parity: 3 ok, 0 failed" in capsys.readouterr().out
