"""The study's statistics on hand-computed cases: mean ± std, the paired interval and its verdict,
manifold precision / recall / coverage, and the rows of one evaluation."""

import math

import numpy as np
import pytest

from soar_fast.data import corrupt_digits, load_digits_tensors
from soar_fast.eval.metrics import precision_recall_coverage
from soar_fast.eval.study import (
    Summary,
    final_rows,
    paired,
    rows_of_eval,
    select,
    summarize,
    t_quantile,
)


def _rows(model, metric, values, step=300, g=1.0):
    return [{"model": model, "seed": s, "guidance_scale": g, "step": step, "metric": metric, "value": v}
            for s, v in enumerate(values)]


def test_summary_is_mean_and_sample_std_over_seeds():
    s = Summary([1.0, 2.0, 4.0])
    assert s.n == 3 and s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert f"{s:.2f}" == "2.33 ± 1.53"
    one = Summary([0.5])
    assert one.std == 0.0 and f"{one:.1f}" == "0.5"  # one seed: no ± shown
    assert math.isnan(Summary([]).mean) and f"{Summary([])}" == "-"


def test_paired_difference_interval_and_verdict_by_hand():
    rows = _rows("soar", "accuracy", [0.80, 0.84, 0.82]) + _rows("sft", "accuracy", [0.70, 0.75, 0.71])
    p = paired(rows, "accuracy", guidance_scale=1.0)
    d = np.array([0.10, 0.09, 0.11])
    assert p["diffs"] == pytest.approx(d.tolist()) and p["mean"] == pytest.approx(0.10)
    assert p["std"] == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2 dof) from a table
    assert p["ci95"] == pytest.approx([0.10 - half, 0.10 + half])
    assert p["wins"] == 3 and p["verdict"] == "better"
    assert t_quantile(0.975, 2) == pytest.approx(4.302652729911275)
    # the same numbers on a lower-is-better metric: SOAR is worse beyond the interval
    fd = _rows("soar", "frechet_distance", [0.80, 0.84, 0.82]) + _rows("sft", "frechet_distance", [0.70, 0.75, 0.71])
    q = paired(fd, "frechet_distance")
    assert q["verdict"] == "worse" and q["wins"] == 0
    # a spread that straddles 0 is a tie, however the mean leans
    tie = _rows("soar", "recall", [0.5, 0.2, 0.6]) + _rows("sft", "recall", [0.4, 0.4, 0.4])
    r = paired(tie, "recall")
    assert r["ci95"][0] < 0 < r["ci95"][1] and r["verdict"] == "tie" and r["wins"] == 2


def test_paired_compares_final_models_and_pairs_seeds():
    rows = (_rows("base", "coverage", [0.5, 0.6], step=0) + _rows("sft", "coverage", [0.1, 0.1], step=100)
            + _rows("sft", "coverage", [0.7, 0.8], step=300))
    p = paired(rows, "coverage", a="sft", b="base")  # sft at its last step (300) vs the base (0)
    assert p["diffs"] == pytest.approx([0.2, 0.2]) and p["n"] == 2
    mid = paired(rows + _rows("base", "coverage", [0.5, 0.6], step=100), "coverage", a="sft", b="base", step=100)
    assert mid["diffs"] == pytest.approx([-0.4, -0.5])
    assert [r["step"] for r in final_rows(rows, "sft")] == [300, 300]
    one = paired(rows[:1] + rows[4:5], "coverage", a="sft", b="base")
    assert one["n"] == 1 and one["verdict"] == "one seed" and one["mean"] == pytest.approx(0.2)
    assert paired(rows, "coverage", a="soar", b="base")["verdict"] == "missing"


def test_select_matches_floats_with_tolerance_and_summarize_filters():
    rows = _rows("sft", "accuracy", [0.1, 0.3], g=4.5) + _rows("sft", "accuracy", [0.9], g=1.0)
    assert len(select(rows, guidance_scale=4.5 + 1e-12)) == 2
    assert summarize(rows, guidance_scale=4.5).mean == pytest.approx(0.2)
    assert summarize(rows, guidance_scale=2.0).n == 0


def test_precision_recall_coverage_on_known_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    same = precision_recall_coverage(real, real.copy(), k=3)
    assert same == {"precision": 1.0, "recall": 1.0, "coverage": 1.0}
    far = precision_recall_coverage(real, real + 100.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "coverage": 0.0}
    # mode collapse: every fake sits on one real point -> faithful (precision 1) but no diversity
    collapsed = np.repeat(real[:1], 50, axis=0) + 1e-6 * rng.normal(size=(50, 4))
    m = precision_recall_coverage(real, collapsed, k=3)
    assert m["precision"] == 1.0 and m["coverage"] < 0.05 and m["recall"] < 0.05
    # half the fakes are off the manifold: precision ~ 0.5, coverage unchanged by the outliers
    mixed = np.concatenate([real[:100], real[:100] + 100.0])
    h = precision_recall_coverage(real, mixed, k=3)
    assert h["precision"] == pytest.approx(0.5) and h["coverage"] >= 0.5


def test_rows_of_one_evaluation_carry_every_metric_and_exposure_per_sigma():
    res = {"accuracy": 0.9, "frechet_distance": 12.0, "precision": 0.8, "recall": 0.7, "coverage": 0.6,
           "exposure_bias": 0.01, "exposure": {"sigma": [0.9, 0.5], "x0_own": [0.3, 0.2], "x0_true": [0.1, 0.15]}}
    rows = rows_of_eval(res, model="soar", seed=2, step=300, guidance_scale=4.5)
    assert {r["metric"] for r in rows} == {"accuracy", "frechet_distance", "precision", "recall", "coverage",
                                           "exposure_bias", "exposure_gap"}
    assert all(r["model"] == "soar" and r["seed"] == 2 and r["step"] == 300 and r["guidance_scale"] == 4.5 for r in rows)
    gaps = select(rows, metric="exposure_gap")
    assert [r["sigma"] for r in gaps] == [0.9, 0.5] and [r["value"] for r in gaps] == pytest.approx([0.2, 0.05])


def test_the_web_digits_are_a_fixed_corruption_of_the_real_ones():
    x, y = load_digits_tensors()
    a, la = corrupt_digits(x, y, 0.3, 0.2, seed=5)
    b, lb = corrupt_digits(x, y, 0.3, 0.2, seed=5)
    assert (a == b).all() and (la == lb).all()  # a dataset, not an augmentation
    flipped = (la != y).float().mean().item()
    assert 0.25 < flipped < 0.35  # about the asked fraction, always to another class
    assert a.min() >= -1 and a.max() <= 1 and 0.1 < (a - x).std().item() < 0.2
    clean, lc = corrupt_digits(x, y, 0.0, 0.0, seed=5)
    assert (clean == x).all() and (lc == y).all()
