"""Markdown tables from a GPU suite folder (`benchmarks/run_gpu_suite.sh OUTDIR`): the step table
with the issue-8 goal checks and the profile breakdown, rollout modes, attention backends, parity rows, stages and kernels.

    python benchmarks/summarize_gpu.py OUTDIR            # prints markdown
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text()) if path.exists() else []
    except json.JSONDecodeError:
        return []


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def step_table(rows: list[dict], title: str) -> list[str]:
    steps = [r for r in rows if r.get("bench") == "soar_step"]
    if not steps:
        return []
    by: dict[str, dict[str, dict]] = {}
    for r in steps:
        by.setdefault(r["provider"], {})[r["metric"]] = r
    first = steps[0]
    gemm = next((r["value"] for r in rows if r.get("bench") == "bf16_gemm_8192"), None)
    out = [f"### {title}: {first['model']}, {first['shape']}, M={first['num_aux'] if first['provider'] != 'sft' else '-'}, "
           f"{first['dtype']} on {first['device']}", "",
           f"torch {first['torch']}, triton {first['triton']}, CUDA {first['cuda']}, commit {first['commit']}, "
           f"{first['date']}; measured bf16 GEMM rate (8192³): {_fmt(gemm, '.0f')} TFLOP/s", "",
           "| variant | | precision | ran (ops, rollout, compile) | ms/step p50 | samples/s | TFLOP/s | MFU | peak GiB "
           "| x (a) | rollout ms | warm-up s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, m in by.items():
        def val(k, m=m):
            return m.get(k, {}).get("value")

        if "error" in m or "skipped" in m:
            note = (m.get("error") or m.get("skipped"))["note"]
            out.append(f"| {v} | {m[next(iter(m))]['variant_desc']} | | | {'error' if 'error' in m else 'skipped'}: "
                       f"{note} | | | | | | | |")
            continue
        mfu = val("mfu")
        c = m["ms_per_step_p50"].get("config") or {}
        ran = f"{c.get('ops_backend', '-')}, {c.get('rollout', '-')}, {c.get('compile', '-')}" if c else "-"
        out.append(f"| {v} | {m['ms_per_step_p50']['variant_desc']} | {m['ms_per_step_p50'].get('precision', '-')} | "
                   f"{ran} | {_fmt(val('ms_per_step_p50'))} | "
                   f"{_fmt(val('samples_per_s'), '.2f')} | {_fmt(val('tflops'), '.0f')} | "
                   f"{_fmt(None if mfu is None else 100 * mfu)}% | {_fmt(val('peak_memory'))} | "
                   f"{_fmt(val('speedup_vs_a'), '.2f')} | {_fmt(val('rollout_ms_p50'))} | {_fmt(val('warmup_s'))} |")
    out += [""] + [f"FP8 weight refresh inside ({v}): {m['fp8_refresh_ms_p50']['value']:.1f} ms per step (timed alone)"
                   for v, m in by.items() if "fp8_refresh_ms_p50" in m]
    fp8 = next((r["value"] for r in rows if r.get("bench") == "fp8_gemm_8192"), None)
    if fp8:
        out += [f"MFU against the FP8 GEMM rate measured in the same run ({fp8:.0f} TFLOP/s, torch._scaled_mm "
                "e4m3): " + ", ".join(f"({v}) {100 * m['mfu_fp8']['value']:.1f}%" for v, m in by.items()
                                     if "mfu_fp8" in m)]
    out += goal_checks(by)
    return out + profile_table(steps)


def memory_table(rows: list[dict]) -> list[str]:
    """bench_memory.py: the planner's choice per GPU size, run under that memory fraction."""
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r.get("bench") == "memory_fit":
            by.setdefault(r["provider"], {})[r["metric"]] = r
    if not by:
        return []
    out = ["### Memory planner choices, measured under set_per_process_memory_fraction", "",
           "| GPU size | flags | predicted GiB | measured peak GiB | planner error | ms/step | note |",
           "|---|---|---|---|---|---|---|"]
    for size, m in by.items():
        first = next(iter(m.values()))
        peak = m.get("peak_memory", {})
        note = (m.get("error") or m.get("skipped") or {}).get("note", "")
        err = peak.get("planner_error")
        out.append(f"| {size} | {first.get('flags', '-')} | {_fmt(first.get('predicted_peak_gib'), '.2f')} | "
                   f"{_fmt(peak.get('value'), '.2f')} | {'-' if err is None else f'{err:+.1%}'} | "
                   f"{_fmt(m.get('ms_per_step_p50', {}).get('value'))} | {note} |")
    return out + [""]


def profile_table(steps: list[dict]) -> list[str]:
    """The profile breakdown (`bench_step.py --profile N`): each category's share of step time per variant."""
    prof: dict[str, dict[str, dict]] = {}
    for r in steps:
        if r["metric"] == "profile_ms":
            prof.setdefault(r["provider"], {})[r["category"]] = r
    if not prof:
        return []
    cats = list(dict.fromkeys(c for m in prof.values() for c in m))
    out = ["", "Profile breakdown (torch.profiler; ms per step and share; rollout includes the FP8 refresh, "
           "optimizer includes clipping and EMA, idle = no kernel running):", "",
           "| variant | " + " | ".join(cats) + " | profiled ms/step |", "|---|" + "---|" * (len(cats) + 1)]
    for v, m in prof.items():
        wall = next(iter(m.values()))["profiled_wall_ms"]
        out.append(f"| {v} | " + " | ".join(f"{m[c]['value']:.1f} ({m[c]['share']:.0%})" if c in m else "-"
                                           for c in cats) + f" | {wall:.1f} |")
    return out


def goal_checks(by: dict[str, dict[str, dict]]) -> list[str]:
    """Issue 8's goals, against this run's numbers (only the variants that ran)."""
    p50 = {v: m["ms_per_step_p50"]["value"] for v, m in by.items() if "ms_per_step_p50" in m}
    lines = []

    def check(name, value, goal, ok):
        lines.append(f"- {name}: {value} (goal {goal}): {'met' if ok else 'NOT met'}")

    best = [v for v in ("g", "f") if v in p50]
    if "a" in p50 and best:
        x = max(p50["a"] / p50[v] for v in best)
        check("best of (f)/(g) over (a)", f"{x:.2f}x", ">= 2.5x", x >= 2.5)
        mfu = max(by[v]["mfu"]["value"] for v in best)
        check("MFU of (f)/(g)", f"{100 * mfu:.1f}%", ">= 45%", mfu >= 0.45)
        if "peak_memory" in by["a"]:
            mem = min(by[v]["peak_memory"]["value"] for v in best)
            check("peak memory of (f)/(g) vs (a)", f"{mem:.1f} vs {by['a']['peak_memory']['value']:.1f} GiB",
                  "<= (a)", mem <= by["a"]["peak_memory"]["value"])
    for soar, sft in (("d", "sft"), ("c", "sft_eager")):
        if soar in p50 and sft in p50:
            t_ratio = p50[soar] / p50[sft]
            f_ratio = by[soar]["tflops"]["flops_per_step"] / by[sft]["tflops"]["flops_per_step"]
            check(f"SOAR/SFT time ratio ({soar}/{sft}) vs FLOP ratio", f"{t_ratio:.2f} vs {f_ratio:.2f} "
                  f"(x{t_ratio / f_ratio:.3f})", "<= 1.05x", t_ratio / f_ratio <= 1.05)
    if "e" in p50:  # issue 18: (e) at >= 60% MFU, (f) faster than (e), (g) >= 1.3x (e)
        check("MFU of (e)", f"{100 * by['e']['mfu']['value']:.1f}%", ">= 60%", by["e"]["mfu"]["value"] >= 0.60)
        for v, goal in (("f", 1.0), ("g", 1.3), ("g_ao", 1.3)):
            if v in p50:
                check(f"({v}) over (e)", f"{p50['e'] / p50[v]:.2f}x", f"> {goal}x" if goal == 1.0 else f">= {goal}x",
                      p50["e"] / p50[v] > goal if goal == 1.0 else p50["e"] / p50[v] >= goal)
    roll = {v: m["rollout_ms_p50"]["value"] for v, m in by.items() if "rollout_ms_p50" in m}
    base = roll.get("b")
    for v, goal in (("e", 1.3), ("f", 1.8)):
        if base and v in roll:
            check(f"rollout ({v}) over the eager rollout (b)", f"{base / roll[v]:.2f}x", f">= {goal}x",
                  base / roll[v] >= goal)
    return lines


def rollout_table(rows: list[dict]) -> list[str]:
    roll = [r for r in rows if r.get("bench") == "rollout"]
    refresh = [r for r in rows if r.get("bench") == "fp8_refresh"]
    att = [r for r in rows if r.get("bench") == "attention_fwd_bwd"]
    out = []
    if roll:
        out += ["### Rollout alone (uncompiled, one 2B no-grad CFG forward)", "", "| mode | ran | ms p50 | x eager |",
                "|---|---|---|---|"]
        out += [f"| {r['provider']} | {r['ran']} | {r['value']:.2f} | {_fmt(r.get('speedup_vs_eager'), '.2f')} |" for r in roll]
        out += [f"\nFP8 weight refresh ({r['provider']}): {r['value']:.2f} ms per optimizer step" for r in refresh[:1]]
        out.append("")
    if att:
        out += ["### Attention backends (fwd+bwd of one (1+M)B batch, uncompiled)", "", "| backend | ms p50 |", "|---|---|"]
        out += [f"| {r['provider']} | {_fmt(r['value'], '.1f') if r['metric'] == 'ms_p50' else r.get('note', '')} |"
                for r in att]
        out.append("")
    return out


def parity_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = ["### Parity on the GPU (digits preset, fp32, TF32 off)", "", "| variant | metric | value | tolerance | ok |",
           "|---|---|---|---|---|"]
    out += [f"| {r['variant']} | {r['metric']} | {_fmt(r['value'], '.3e')} | {r['tolerance']} | "
            f"{r.get('status') or ('ok' if r.get('ok') else 'FAIL')} {r['note']} |" for r in rows]
    return out + [""]


def trainer_table(rows: list[dict]) -> list[str]:
    """bench_train.py: `soar-fast train` end to end vs the step benchmark, same TrainConfig."""
    e2e = [r for r in rows if r.get("bench") == "trainer_e2e"]
    if not e2e:
        return []
    out = ["### `soar-fast train` end to end vs the step benchmark (same TrainConfig)", "",
           "| variant | trainer samples/s | benchmark samples/s | ratio | goal |", "|---|---|---|---|---|"]
    for v in dict.fromkeys(r["provider"] for r in e2e):
        m = {r["metric"]: r for r in e2e if r["provider"] == v}
        if "error" in m:
            out.append(f"| {v} | error: {m['error']['note']} | | | |")
            continue
        ratio = m["trainer_vs_bench"]
        out.append(f"| {v} | {m['trainer_samples_per_s']['value']:.2f} | {m['bench_samples_per_s']['value']:.2f} | "
                   f"{ratio['value']:.1%} | >= {ratio['goal']:.0%}: {'met' if ratio['meets_goal'] else 'NOT met'} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    d = Path((argv or sys.argv[1:])[0])
    lines = []
    for path in sorted(d.glob("step_*.json"), key=lambda q: (len(q.stem), q.stem)):  # 512, 1024, 512_run2
        res, _, tag = path.stem.removeprefix("step_").partition("_")
        lines += step_table(_load(path), f"{res} px" + (f", {tag}" if tag else "")) + [""]
    for path in sorted(d.glob("family_*.json")):  # SUITE=families: one table per family's real config
        lines += step_table(_load(path), f"family {path.stem.removeprefix('family_')}") + [""]
    lines += rollout_table(_load(d / "rollout_attention_512.json"))
    lines += memory_table(_load(d / "memory_fit.json"))
    lines += parity_table(_load(d / "parity.json"))
    for path in sorted(d.glob("train_*.json")):
        lines += trainer_table(_load(path))
    if (d / "stages.txt").exists():
        lines += ["### Stages", "", "```", (d / "stages.txt").read_text().strip(), "```", ""]
    if (d / "kernels.md").exists():
        lines += ["### Kernels", "", (d / "kernels.md").read_text()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
