"""The report of a study (and of the demo, its one-seed case): report.md with the tables of mean +- std
over seeds, the paired SOAR - SFT comparison and a verdict computed from the numbers; plots with
bands (metric vs CFG, metric vs steps, exposure bias vs sigma, loss curves); study.json with every row."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soar_fast.eval.study import HIGHER_IS_BETTER, paired, select, summarize

__all__ = ["plot_exposure", "plot_losses", "plot_vs_cfg", "plot_vs_steps", "write_study_report"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(runs: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Base (SFT-term) loss, total loss and auxiliary loss vs step for each run's metrics rows."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("train/base_loss", "train/loss", "train/aux_loss"), strict=True):
            ys = [r.get(key, float("nan")) for r in rows]
            ax.plot(steps, _smooth(ys), label=name)
    for ax, title in zip(axes, ("base (SFT) term", "total loss", "auxiliary (SOAR) term"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _smooth(ys: list[float], k: int = 5) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc = (acc + [y])[-k:]
        out.append(sum(acc) / len(acc))
    return out



_LABEL = {"accuracy": "accuracy ↑", "frechet_distance": "Frechet distance ↓", "precision": "precision ↑",
          "recall": "recall ↑", "coverage": "coverage ↑", "exposure_bias": "exposure bias ↓"}
_SAMPLE_METRICS = ("accuracy", "frechet_distance", "precision", "recall", "coverage")


def _models(rows: list[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["model"] for r in rows if r["model"] != "real"))
    order = {"base": 0, "sft": 1, "soar": 2}
    return sorted(seen, key=lambda m: (order.get(m, 3), m))


def _final_step(rows: list[dict], model: str) -> int:
    steps = [r["step"] for r in select(rows, model=model)]
    return max(steps) if steps else 0


def _band(ax: Any, xs: list[float], stats: list[Any], color: str, label: str) -> None:
    m = np.array([s.mean for s in stats])
    sd = np.array([s.std for s in stats])
    ax.plot(xs, m, "-o", color=color, ms=3, label=label)
    if any(s.n > 1 for s in stats):
        ax.fill_between(xs, m - sd, m + sd, color=color, alpha=0.2)


def plot_vs_cfg(rows: list[dict], path: str | Path) -> Path:
    """Each sample metric of every final model vs guidance scale, mean +- std band over seeds."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(_SAMPLE_METRICS), figsize=(4 * len(_SAMPLE_METRICS), 3.4))
    scales = sorted({r["guidance_scale"] for r in rows if r["metric"] == "accuracy" and r["model"] != "real"})
    for i, model in enumerate(_models(rows)):
        step = _final_step(rows, model)
        for ax, metric in zip(axes, _SAMPLE_METRICS, strict=True):
            st = [summarize(rows, model=model, metric=metric, guidance_scale=g, step=step) for g in scales]
            ok = [(g, s) for g, s in zip(scales, st, strict=True) if s.n]
            if ok:
                _band(ax, [g for g, _ in ok], [s for _, s in ok], f"C{i}", model)
    for ax, metric in zip(axes, _SAMPLE_METRICS, strict=True):
        ax.set_title(_LABEL[metric])
        ax.set_xlabel("guidance scale")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_vs_steps(rows: list[dict], scales: list[float], path: str | Path) -> Path:
    """Sample metrics of the post-trained models vs post-training step (step 0: the base), one row of
    panels per guidance scale, mean +- std band over seeds."""
    plt = _plt()
    metrics = ("accuracy", "frechet_distance", "precision", "recall")
    fig, axes = plt.subplots(len(scales), len(metrics), figsize=(4 * len(metrics), 3.2 * len(scales)), squeeze=False)
    for i, model in enumerate(m for m in _models(rows) if m != "base"):
        for row, g in enumerate(scales):
            for ax, metric in zip(axes[row], metrics, strict=True):
                steps = sorted({r["step"] for r in select(rows, model=model, metric=metric, guidance_scale=g)})
                pts = [(0, summarize(rows, model="base", metric=metric, guidance_scale=g, step=0))]
                pts += [(s, summarize(rows, model=model, metric=metric, guidance_scale=g, step=s)) for s in steps]
                pts = [(s, st) for s, st in pts if st.n]
                if len(pts) > 1:
                    _band(ax, [s for s, _ in pts], [st for _, st in pts], f"C{i + 1}", model)
                ax.set_title(f"{_LABEL[metric]}, CFG {g:g}")
                ax.set_xlabel("post-training step")
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_exposure(rows: list[dict], path: str | Path) -> Path:
    """Exposure bias σ²·(own − true) vs sigma for every final model, mean +- std band over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, model in enumerate(_models(rows)):
        sel = select(rows, model=model, metric="exposure_gap", step=_final_step(rows, model))
        sigmas = sorted({r["sigma"] for r in sel}, reverse=True)
        if sigmas:
            _band(ax, sigmas, [summarize(sel, sigma=s) for s in sigmas], f"C{i}", model)
    ax.set_title("exposure bias: σ²·(own − true) clean-image MSE gap")
    ax.set_xlabel("sigma (1 = noise)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _saturated(rows: list[dict], metric: str, g: float, models: list[str]) -> bool:
    """A bounded metric that every post-trained model has at its ceiling (>= 0.995) at scale g:
    it cannot tell them apart, so it is marked and left out of the verdict."""
    if metric not in ("accuracy", "precision", "recall", "coverage"):
        return False
    post = [m for m in models if m != "base"]
    means = [summarize(rows, model=m, metric=metric, guidance_scale=g, step=_final_step(rows, m)).mean for m in post]
    return bool(post) and all(x >= 0.995 for x in means)


def _fmt(x: Any, nd: int = 3) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _cell(p: dict[str, Any], nd: int) -> str:
    if p["n"] == 0:
        return "-"
    if p["n"] == 1:
        return f"{p['mean']:+.{nd}f}"
    return f"{p['mean']:+.{nd}f} ± {p['std']:.{nd}f} [{p['ci95'][0]:+.{nd}f}, {p['ci95'][1]:+.{nd}f}] {p['wins']}/{p['n']} **{p['verdict']}**"


def write_study_report(out_dir: str | Path, *, rows: list[dict], train: dict[str, dict[str, Any]],
                       config: dict[str, Any], setup: dict[str, str], grids: dict[str, str], seeds: list[int],
                       losses: dict[str, list[dict[str, Any]]], wall_s: float, title: str = "study",
                       command: str | None = None, commit: str | None = None) -> Path:
    """report.md, study.json and the plots of a finished study (`losses`: the first seed's metrics
    rows of each post-training run); returns the report's path."""
    out = Path(out_dir)
    k = len(seeds)
    scales = sorted({r["guidance_scale"] for r in rows if r["metric"] == "accuracy" and r["model"] != "real"})
    models = _models(rows)
    plots = {"metrics vs guidance scale": plot_vs_cfg(rows, out / "metrics_vs_cfg.png").name}
    curve = sorted({r["guidance_scale"] for r in rows if r["model"] not in ("base", "real")
                    and 0 < r["step"] < _final_step(rows, r["model"])})
    if curve:
        plots["metrics vs post-training steps"] = plot_vs_steps(rows, curve, out / "metrics_vs_steps.png").name
    if any(r["metric"] == "exposure_gap" for r in rows):
        plots["exposure bias vs sigma"] = plot_exposure(rows, out / "exposure_bias.png").name
    plots["loss curves (first seed)"] = plot_losses(losses, out / "loss_curves.png").name
    cmd = command or f"soar-fast {title}"
    lines = [f"# SOAR vs SFT on the sklearn digits: the {title}, {k} seed{'s' if k > 1 else ''}", "",
             f"Wall time **{wall_s / 60:.1f} min** on {os.cpu_count()} CPU(s) ({platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads); command `{cmd}`; commit "
             f"{commit or 'not recorded'}.", ""]
    if k == 1:
        lines += ["One seed, no error bars: `soar-fast study` repeats this over 3 seeds and reports mean ± std "
                  "and the paired SOAR − SFT interval.", ""]
    lines += ["## Setting", ""] + [f"- {a}: {b}" for a, b in setup.items()] + [""]
    lines += _tables(rows, models, scales, k)
    lines += _paired_tables(rows, models, scales, k)
    lines += ["## Verdict (measured)", "", _verdict(rows, scales, k), ""]
    lines += ["## Plots", ""] + [f"![{a}]({b})" for a, b in plots.items()] + [""]
    lines += ["## Samples (first seed; columns: classes 0-9)", ""]
    for name, g in grids.items():
        lines += [f"**{name}**", "", f"![{name}]({g})", ""]
    lines += ["## Training", "", "| run | steps | train wall time (s) | steps/s |", "|---|---|---|---|"]
    for key, t in train.items():
        lines.append(f"| {key} | {t.get('step')} | {_fmt(t.get('train_s'), 1)} | {_fmt(t.get('steps_per_s'), 2)} |")
    lines += ["", _METRIC_NOTE, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps({"config": config, "command": cmd, "commit": commit, "seeds": seeds,
                                                "wall_s": wall_s, "train": train, "rows": rows}, indent=0))
    return path


def _tables(rows: list[dict], models: list[str], scales: list[float], k: int) -> list[str]:
    lines = [f"## Final models{' (mean ± std over seeds)' if k > 1 else ''}", ""]
    for g in scales:
        lines += [f"**CFG {g:g}**", "", "| model | " + " | ".join(_LABEL[m] for m in _SAMPLE_METRICS) + " |",
                  "|---" * (len(_SAMPLE_METRICS) + 1) + "|"]
        real = [summarize(rows, model="real", metric=m, guidance_scale=g, step=0) for m in ("accuracy", "frechet_distance")]
        lines.append(f"| real digits (held out; {'' if real[1].n else 'n/a'}same-size real subset) | {real[0]:.3f} | "
                     f"{real[1]:.2f} | - | - | - |")
        for model in models:
            step = _final_step(rows, model)
            cells = [f"{summarize(rows, model=model, metric=m, guidance_scale=g, step=step):{'.2f' if m == 'frechet_distance' else '.3f'}}"
                     + (" (saturated)" if model != "base" and _saturated(rows, m, g, models) else "")
                     for m in _SAMPLE_METRICS]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    eb = [(m, summarize(rows, model=m, metric="exposure_bias", step=_final_step(rows, m))) for m in models]
    if any(s.n for _, s in eb):
        g = next(r["guidance_scale"] for r in rows if r["metric"] == "exposure_bias")
        lines += [f"**Exposure bias (sampler CFG {g:g})**: " + ", ".join(f"{m} {s:.4f}" for m, s in eb if s.n), ""]
    return lines


def _comparisons(models: list[str]) -> list[tuple[str, str]]:
    pairs = [("soar", "sft"), ("sft", "base"), ("soar", "base")]
    pairs += [(m, "sft") for m in models if m not in ("base", "sft", "soar")]
    return [(a, b) for a, b in pairs if a in models and b in models]


def _paired_tables(rows: list[dict], models: list[str], scales: list[float], k: int) -> list[str]:
    head = "mean ± std over seeds [95% t interval] seeds favouring the first, verdict" if k > 1 else "one seed"
    lines = [f"## Paired differences by seed ({head})", "",
             "Each cell: first model − second model at equal seed (data order, draws, evaluation noise); "
             "**better** / **worse** only when the 95% interval excludes 0.", ""]
    for a, b in _comparisons(models):
        lines += [f"**{a} − {b}**", "", "| metric | " + " | ".join(f"CFG {g:g}" for g in scales) + " |",
                  "|---" * (len(scales) + 1) + "|"]
        for m in _SAMPLE_METRICS:
            cells = ["saturated" if _saturated(rows, m, g, models) else
                     _cell(paired(rows, m, a=a, b=b, guidance_scale=g), 2 if m == "frechet_distance" else 3)
                     for g in scales]
            lines.append(f"| {_LABEL[m]} | " + " | ".join(cells) + " |")
        ex = [r for r in rows if r["metric"] == "exposure_bias"]
        if ex:
            p = paired(rows, "exposure_bias", a=a, b=b)
            lines.append(f"| {_LABEL['exposure_bias']} (CFG {ex[0]['guidance_scale']:g}) | {_cell(p, 4)} |" + " |" * (len(scales) - 1))
        lines.append("")
    return lines


def _verdict(rows: list[dict], scales: list[float], k: int) -> str:
    models = _models(rows)
    if "sft" not in models or "soar" not in models:
        return "SFT or SOAR missing: no comparison."
    cells = [(m, g) for m in _SAMPLE_METRICS for g in scales]
    live = [(m, g) for m, g in cells if not _saturated(rows, m, g, models)]
    res = [paired(rows, m, guidance_scale=g) for m, g in live]
    if any(r["metric"] == "exposure_bias" for r in rows):
        res.append(paired(rows, "exposure_bias"))
    sat = f", {len(cells) - len(live)} saturated cells left out" if len(live) < len(cells) else ""
    if k == 1:
        wins = sum(1 for p in res if p["n"] and p["mean"] != 0 and (p["mean"] > 0) == HIGHER_IS_BETTER[p["metric"]])
        return (f"One seed: SOAR is ahead of SFT on {wins} of {len(res)} (metric, scale) cells{sat}, which says "
                "nothing beyond noise; run `soar-fast study` for error bars.")
    better = [p for p in res if p["verdict"] == "better"]
    worse = [p for p in res if p["verdict"] == "worse"]

    def name(p: dict) -> str:
        return p["metric"] + (f" at CFG {p['guidance_scale']:g}" if "guidance_scale" in p else "")

    text = (f"Over {k} seeds{sat}, SOAR beats SFT beyond the 95% interval on {len(better)} of {len(res)} "
            "(metric, scale) cells" + (f" ({', '.join(name(p) for p in better)})" if better else "")
            + f", loses on {len(worse)}" + (f" ({', '.join(name(p) for p in worse)})" if worse else "")
            + f", and the other {len(res) - len(better) - len(worse)} are ties within the error bars.")
    if not better:
        text += " **SOAR does not beat SFT beyond the error bars in this setting.**"
    sft_base = [paired(rows, m, a="sft", b="base", guidance_scale=g) for m, g in live]
    up = sum(p["verdict"] == "better" for p in sft_base)
    down = sum(p["verdict"] == "worse" for p in sft_base)
    text += (f" SFT itself improves the base beyond the interval on {up} of those {len(sft_base)} sample-metric cells "
             f"and worsens it on {down}.")
    return text


_METRIC_NOTE = (
    "Metrics. Accuracy: a classifier trained on real digits labels the generated samples; the fraction "
    "matching the prompt's class (GenEval analogue; at CFG 1 it does not saturate). Frechet distance: between "
    "the classifier's penultimate features of all 1,797 real digits and of the generated ones (FID analogue; "
    "the real row is a same-size real subset: the floor set by sample size). Precision / recall (Kynkäänniemi "
    "et al. 2019) and coverage (Naeem et al. 2020) on the same features with 5-nearest-neighbour balls: "
    "precision is fidelity, recall and coverage are diversity. Exposure bias: start on the true trajectory of "
    "a real digit, let the model's own CFG Euler sampler run a few steps, and compare its velocity error "
    "there (against the SOAR correction target (z − z0)/σ) with its error on the true state at the same "
    "sigma; the scalar is the mean over sigmas of σ²·(own − true).")
