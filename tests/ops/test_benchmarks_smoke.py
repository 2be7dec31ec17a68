"""The kernel microbenchmarks run in smoke mode (tiny shapes, Triton interpreter, native CPU) and
write well-formed long-format JSON rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KEYS = {
    "op",
    "provider",
    "mode",
    "shape",
    "dtype",
    "metric",
    "value",
    "unit",
    "device",
    "torch",
    "triton",
    "commit",
    "date",
}


def test_micro_benchmarks_smoke(tmp_path, native_lib):
    out = tmp_path / "rows.jsonl"
    env = {
        **os.environ,
        "SOAR_FAST_BENCH_SMOKE": "1",
        "SOAR_FAST_BENCH_JSON": str(out),
        "SOAR_FAST_BENCH_COMPILE": "0",
        "SOAR_FAST_NATIVE_LIB": str(native_lib),
        "TRITON_INTERPRET": "1",
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO / "benchmarks" / "micro"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        assert KEYS <= row.keys(), KEYS - row.keys()
        assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]), row
    seen = {(r["op"], r["provider"], r["mode"]) for r in rows}
    for op, mode in [
        ("soar_aux_states", "fwd"),
        ("soar_aux_z", "fwd"),
        ("soar_fused_mse", "fwd"),
        ("soar_fused_mse", "fwd+bwd"),
        ("soar_fused_mse", "loss+grad"),
        ("soar_aux+loss", "fwd+bwd"),
    ]:
        for provider in ("torch_eager", "triton", "native"):
            assert (op, provider, mode) in seen, (op, provider, mode)
    for provider in ("per_layer", "fused"):  # the FP8 rollout's weight refresh
        for mode in ("tensorwise", "rowwise"):
            assert ("fp8_refresh", provider, mode) in seen, (provider, mode)
    metrics = {r["metric"] for r in rows}
    assert {
        "time_ms_p20",
        "time_ms_p50",
        "time_ms_p80",
        "bytes",
        "gbps",
        "pct_copy_bw",
        "copy_gbps",
    } <= metrics
    for row in rows:
        if row["metric"] in ("gbps", "pct_copy_bw"):
            assert row["copy_gbps"] > 0 and row["bytes"] > 0
        if row["metric"] == "time_ms_p20":
            p = {
                r["metric"]: r["value"]
                for r in rows
                if all(r[k] == row[k] for k in ("op", "provider", "mode", "shape", "dtype"))
            }
            assert 0 < p["time_ms_p20"] <= p["time_ms_p50"] <= p["time_ms_p80"]
            expected = p["bytes"] / (p["time_ms_p50"] * 1e-3) / 1e9
            assert math.isclose(p["gbps"], expected, rel_tol=1e-9)
    saved = [
        r
        for r in rows
        if r["metric"] == "bytes_saved_vs_reference_chain" and r["provider"] == "triton"
    ]
    assert saved and all(0 < r["value"] < 100 for r in saved)
