"""The data benchmark runs in smoke mode (tiny rows, CPU) through the trainer's batch stream and writes its rows."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_data_smoke_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "benchmarks" / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "data.json"
    assert bench.main(["--smoke", "--workers", "0,2", "--page_cache", "warm", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    required = {"bench", "provider", "variant", "config", "metric", "value", "unit", "device", "torch", "commit", "date"}
    assert all(required <= set(r) for r in rows)
    rates = {r["config"]["num_workers"]: r for r in rows if r["metric"] == "samples_per_s"}
    assert set(rates) == {0, 2} and all(r["value"] > 0 and r["target"] == 78.0 for r in rates.values())
    assert all(r["passed"] == (r["value"] > 78.0) for r in rates.values())
