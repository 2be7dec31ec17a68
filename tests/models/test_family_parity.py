"""FLUX.1 through `soar-fast parity` (the other families' modules test their own parity)."""

from soar_fast.train.parity import run_parity


def test_flux_eager_and_batched_steps_equal_the_reference():
    rows = run_parity(preset="tiny", family="flux", variants=("eager_step", "batched"))
    assert len(rows) == 6 and all(r.status == "ok" for r in rows), [(r.variant, r.metric, r.value) for r in rows]
