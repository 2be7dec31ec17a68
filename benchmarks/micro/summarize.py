"""Summarise kernel benchmark rows (JSONL from SOAR_FAST_BENCH_JSON): a JSON array, a markdown
table (p50 ms, GB/s, % copy BW, speedup vs eager / compile) and the issue-7 goal checks (H100).

    python benchmarks/micro/summarize.py rows.jsonl --json out.json --md out.md
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

GOALS = {  # (op, mode) -> (min % copy BW, min x eager, must beat compile)
    ("soar_aux_states", "fwd"): (85.0, 4.0, True),
    ("soar_fused_mse", "fwd+bwd"): (85.0, 3.0, False),
    ("soar_fused_mse", "loss+grad"): (85.0, 3.0, False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args()
    rows = [json.loads(x) for x in Path(a.rows).read_text().splitlines() if x.strip()]
    cell = defaultdict(dict)
    for r in rows:
        if r["op"] != "copy":
            cell[(r["op"], r["mode"], r["shape"], r["dtype"])][(r["provider"], r["metric"])] = r[
                "value"
            ]
    speed = []
    lines = [
        "| op | mode | shape | dtype | provider | p50 ms | GB/s | % copy BW | x eager | x compile |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (op, mode, shape, dtype), c in sorted(cell.items()):
        eager, comp = c.get(("torch_eager", "time_ms_p50")), c.get(("torch_compile", "time_ms_p50"))
        for prov in ("torch_eager", "torch_compile", "triton", "native"):
            t = c.get((prov, "time_ms_p50"))
            if t is None:
                continue
            xe = eager / t if eager else None
            xc = comp / t if comp else None
            for base, x in (("torch_eager", xe), ("torch_compile", xc)):
                if x is not None and prov != base:
                    speed.append(
                        {
                            **{
                                k: v
                                for k, v in rows[0].items()
                                if k in ("device", "torch", "triton", "commit", "date")
                            },
                            "op": op,
                            "mode": mode,
                            "shape": shape,
                            "dtype": dtype,
                            "provider": prov,
                            "metric": "speedup",
                            "value": x,
                            "unit": "x",
                            "baseline": base,
                        }
                    )
            f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            lines.append(
                f"| {op} | {mode} | {shape} | {dtype} | {prov} | {t:.4f} | {f(c.get((prov, 'gbps')))} | "
                f"{f(c.get((prov, 'pct_copy_bw')))} | {f(xe)} | {f(xc)} |"
            )
    copy = [r["value"] for r in rows if r["metric"] == "copy_gbps"]
    lines.append(
        f"\ncopy bandwidth measured in the run: {', '.join(f'{x:.0f}' for x in copy)} GB/s; device {rows[0]['device']}"
    )
    lines.append("\nGoal checks (triton provider; goals are for an H100):")
    for (op, mode, shape, dtype), c in sorted(cell.items()):
        if (op, mode) in GOALS and ("triton", "time_ms_p50") in c:
            bw, xe_min, beat = GOALS[(op, mode)]
            t = c[("triton", "time_ms_p50")]
            pct = c.get(("triton", "pct_copy_bw"), 0.0)
            xe = c.get(("torch_eager", "time_ms_p50"), float("nan")) / t
            xc = c.get(("torch_compile", "time_ms_p50"), float("nan")) / t
            ok = pct >= bw and xe >= xe_min and (not beat or xc >= 1.0)
            lines.append(
                f"- {op} {mode} {shape} {dtype}: {pct:.1f}% copy BW (>= {bw}), {xe:.2f}x eager (>= {xe_min})"
                + (f", {xc:.2f}x compile (>= 1)" if beat else "")
                + f" -> {'MET' if ok else 'NOT MET'}"
            )
        if op == "soar_aux+loss" and ("triton", "bytes_saved_vs_reference_chain") in c:
            s = c[("triton", "bytes_saved_vs_reference_chain")]
            lines.append(
                f"- aux+loss pair bytes {shape} {dtype}: {s:.1f}% fewer than the reference chain (goal >= 30) -> "
                f"{'MET' if s >= 30 else 'NOT MET'}"
            )
    text = "\n".join(lines)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(rows + speed, indent=1))
    if a.md:
        Path(a.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
