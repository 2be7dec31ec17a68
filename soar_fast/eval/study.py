"""The statistics of a study: result rows, mean +- std over seeds, and the paired SOAR - SFT comparison.

A row is one measured number: `{"model", "seed", "guidance_scale", "step", "metric", "value"}`
(+ `"sigma"` for exposure bias per sigma). `model` is 'base', 'sft', 'soar' (or an ablation such
as 'soar[M=4]'); `step` counts post-training steps (0 for the base). Seeds pair runs: SFT and SOAR
of one seed share data order, draws and evaluation noise, so their difference per seed cancels
what they share, and its spread over seeds is the error bar of the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["HIGHER_IS_BETTER", "METRICS", "Summary", "final_rows", "paired", "rows_of_eval", "select", "summarize", "t_quantile"]

#: The per-evaluation metrics and whether a larger value is better.
HIGHER_IS_BETTER = {"accuracy": True, "frechet_distance": False, "precision": True, "recall": True,
                    "coverage": True, "exposure_bias": False}
METRICS = tuple(HIGHER_IS_BETTER)


def rows_of_eval(res: dict[str, Any], *, model: str, seed: int, step: int, guidance_scale: float) -> list[dict]:
    """The rows of one `evaluate_model` result (scalars, and exposure bias per sigma if measured)."""
    key = {"model": model, "seed": seed, "guidance_scale": guidance_scale, "step": step}
    rows = [{**key, "metric": m, "value": float(res[m])} for m in METRICS if m in res]
    eb = res.get("exposure")
    if eb:
        for s, own, true in zip(eb["sigma"], eb["x0_own"], eb["x0_true"], strict=True):
            rows.append({**key, "metric": "exposure_gap", "sigma": float(s), "value": float(own - true)})
    return rows


def select(rows: Iterable[dict], **where: Any) -> list[dict]:
    """The rows whose fields equal every `where` item (floats compared with a small tolerance)."""
    def ok(r: dict) -> bool:
        for k, v in where.items():
            x = r.get(k)
            if isinstance(v, float) and isinstance(x, (int, float)):
                if abs(x - v) > 1e-9:
                    return False
            elif x != v:
                return False
        return True
    return [r for r in rows if ok(r)]


class Summary(tuple):
    """(mean, std, n): std is the sample standard deviation over seeds (ddof 1; 0 for one seed)."""

    __slots__ = ()

    def __new__(cls, values: Iterable[float]) -> Summary:
        v = np.asarray(list(values), dtype=np.float64)
        if v.size == 0:
            return super().__new__(cls, (math.nan, math.nan, 0))
        std = float(v.std(ddof=1)) if v.size > 1 else 0.0
        return super().__new__(cls, (float(v.mean()), std, int(v.size)))

    mean = property(lambda self: self[0])
    std = property(lambda self: self[1])
    n = property(lambda self: self[2])

    def __format__(self, spec: str) -> str:
        if self.n == 0:
            return "-"
        spec = spec or ".3f"
        return f"{self.mean:{spec}}" if self.n == 1 else f"{self.mean:{spec}} ± {self.std:{spec}}"


def summarize(rows: Iterable[dict], **where: Any) -> Summary:
    """Mean +- std over seeds of the rows matching `where` (one value per seed expected)."""
    return Summary(r["value"] for r in select(rows, **where))


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (scipy's; the 95% two-sided interval uses p = 0.975)."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def final_rows(rows: Iterable[dict], model: str, **where: Any) -> list[dict]:
    """The rows of `model` (matching `where`) at its last measured step: the final model."""
    sel = select(rows, model=model, **where)
    last = max((r["step"] for r in sel), default=0)
    return [r for r in sel if r["step"] == last]


def paired(rows: Iterable[dict], metric: str, *, a: str = "soar", b: str = "sft", **where: Any) -> dict[str, Any]:
    """a - b per seed for `metric` of the final models (at `where`, e.g. guidance_scale; a `step`
    there compares both at that step): the differences, their mean +- std, the 95% t interval of
    the mean, how many seeds favour a, and the verdict: 'better' or 'worse' when the interval
    excludes 0 (for a; the metric's direction decides), else 'tie'."""
    rows = list(rows)
    va = {r["seed"]: r["value"] for r in final_rows(rows, a, metric=metric, **where)}
    vb = {r["seed"]: r["value"] for r in final_rows(rows, b, metric=metric, **where)}
    seeds = sorted(set(va) & set(vb))
    d = np.asarray([va[s] - vb[s] for s in seeds], dtype=np.float64)
    sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0
    out: dict[str, Any] = {"metric": metric, "a": a, "b": b, **where, "seeds": seeds, "diffs": d.tolist(),
                           "wins": int((sign * d > 0).sum()), "n": len(seeds)}
    if not seeds:
        return {**out, "mean": math.nan, "std": math.nan, "ci95": [math.nan, math.nan], "verdict": "missing"}
    s = Summary(d)
    out.update(mean=s.mean, std=s.std)
    if len(seeds) < 2:
        out.update(ci95=[math.nan, math.nan], verdict="one seed")
        return out
    half = t_quantile(0.975, len(seeds) - 1) * s.std / math.sqrt(len(seeds))
    lo, hi = s.mean - half, s.mean + half
    out["ci95"] = [lo, hi]
    good = lo > 0 if sign > 0 else hi < 0  # the whole interval on a's good side of 0
    bad = hi < 0 if sign > 0 else lo > 0
    out["verdict"] = "better" if good else ("worse" if bad else "tie")
    return out
