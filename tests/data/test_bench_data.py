"""benchmarks/bench_data.py in smoke mode: a tiny cache written with the real ShardWriter, read through
the trainer's BatchStream with and without workers, one row set per setting with the 10x target."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_data_smoke_rows(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "benchmarks" / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "data.json"
    assert bench.main(["--smoke", "--workers", "0,2", "--page_cache", "warm", "--cache_root", str(tmp_path),
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    rates = {r["variant"]: r for r in rows if r["metric"] == "samples_per_s"}
    assert set(rates) == {"workers0_warm", "workers2_warm"}
    for r in rates.values():
        assert r["value"] > 0 and r["target"] == 78.0 and r["passed"] == (r["value"] > 78.0)
        assert {"bench", "provider", "config", "shape", "device", "torch", "commit", "date"} <= set(r)
    assert {r["metric"] for r in rows} == {"samples_per_s", "read_bandwidth", "first_batch_s"}
